"""Configuration dataclasses. Each field has a one-line docstring; `__post_init__` names the bad field and the fix.

The defaults of `ObjectiveConfig` are full EGAD as in docs/method.md (spec sections 2-6). Baselines and ablations
are presets of the same dataclass (egad/config/presets.py), never separate code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from egad.errors import EgadError
from egad.losses.cross_vocab import CROSS_VOCAB_LOSSES, EXACT_DIVERGENCES
from egad.losses.divergences import DIVERGENCES, NO_TAU2
from egad.losses.features import FEATURE_LOSSES
from egad.plan.curriculum import CURRICULUM_MODES, PACING_KINDS
from egad.plan.routing import ROUTE_MODES
from egad.plan.temperature import TAU2_MODES, TEMP_MODES

# Allowed values are read from the modules that implement them: one place per idea.
_CHOICES: dict[str, tuple[str, ...]] = {
    "kernels": ("auto", "compiled", "eager"),
    "divergence": tuple(DIVERGENCES),
    "difficulty": ("quantile", "normalized"),
    "cdf_mode": ("global", "batch", "ema_hist"),
    "weighting": (
        "none",
        "curriculum",
        "ea_kd",
        "select_teacher_entropy",
        "select_student_entropy",
        "select_hellinger",
    ),
    "curriculum_mode": CURRICULUM_MODES,
    "pacing": PACING_KINDS,
    "temp_mode": TEMP_MODES,
    "temp_signal": ("teacher_entropy", "hellinger"),
    "tau2": TAU2_MODES,
    "route_mode": ROUTE_MODES,
    "feat_loss": tuple(FEATURE_LOSSES),
    "layer_map": ("uniform", "last"),
    "hard_branch": ("feat_plus_logits", "feat_only"),
    "feat_weight_schedule": ("constant", "follow_lambda"),
    "cross_vocab": ("none", *CROSS_VOCAB_LOSSES),
}


# The signal each hard-selection weighting ranks tokens by.
SELECT_SIGNAL = {
    "select_teacher_entropy": "entropy",
    "select_student_entropy": "student_entropy",
    "select_hellinger": "hellinger",
}


class ConfigError(EgadError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class ObjectiveConfig:
    """The distillation objective L = (1 - alpha) CE + alpha KD + beta_f feat (spec section 6)."""

    alpha: float = 0.5
    """Weight of the KD term; (1 - alpha) weighs the cross-entropy on the labels. 0 gives SFT (no teacher needed)."""
    divergence: str = "forward_kl"
    """Per-token base divergence D_base, a name from egad.losses.divergences.DIVERGENCES."""
    jsd_beta: float = 0.5
    """JSD mixture weight on the teacher: m = beta p + (1 - beta) q."""
    skew_lambda: float = 0.1
    """Skew of skew_forward_kl / skew_reverse_kl (DistiLLM)."""
    akl_mu: float = 0.5
    """Head/tail cumulative-mass split of AKL."""
    todi_beta: float = 1.0
    """Scale inside ToDi's sigmoid gate."""
    ttm_gamma: float = 0.5
    """Teacher power gamma = 1/T of TTM / WTTM."""
    bild_top_k: int = 8
    """Top-k logits whose pairwise differences BiLD matches."""

    difficulty: str = "quantile"
    """Difficulty d_t from teacher entropy: 'quantile' (empirical CDF) or 'normalized' (clip(H/log V/h_ref, 0, 1))."""
    cdf_mode: str = "global"
    """How the entropy CDF is estimated: 'global' (calibration knots), 'batch' (mid-rank), 'ema_hist' (running)."""
    h_ref: float = 1.0
    """Reference for difficulty='normalized': d = clip(H / log V / h_ref, 0, 1)."""

    weighting: str = "curriculum"
    """Per-token KD weight rule: 'curriculum' (C1), 'none', 'ea_kd', or hard top-`select_ratio` selection by a score."""
    curriculum_mode: str = "linear_interp"
    """C1 weight form: linear_interp (default), tilt, competence, static_easy, static_hard."""
    pacing: str = "linear"
    """C1 pacing lambda(s): linear, sqrt, cosine, step, reverse."""
    fixed_lambda: float | None = None
    """If set, lambda(s) is frozen at this value (e.g. 0 with tilt gives AKD-style weights)."""
    w_min: float = 0.2
    """Floor weight of linear_interp; weights lie in [w_min, 2 - w_min]."""
    pacing_s0: float = 0.0
    """Progress at which the pacing starts moving."""
    pacing_s1: float = 1.0
    """Progress at which the pacing reaches 1."""
    pacing_c0: float = 0.01
    """Initial competence of the sqrt pacing (0.3 is used by curriculum_mode='competence')."""
    tilt_beta_max: float = 2.0
    """Maximum exponent of the tilt weights."""
    select_ratio: float = 0.2
    """Fraction of tokens kept by the select_* weightings; kept tokens get weight 1/select_ratio."""
    ea_temperature: float = 1.0
    """Temperature at which EA-KD computes teacher and student entropies."""

    temp_mode: str = "inverse"
    """C2 per-token temperature: inverse (default), direct, idts, edt, const."""
    temp_signal: str = "teacher_entropy"
    """Score used by idts / edt temperatures: the teacher entropy, or the Hellinger distance (AdaKD)."""
    tau_min: float = 1.0
    """Lower temperature bound."""
    tau_max: float = 2.0
    """Upper temperature bound."""
    tau0: float = 1.0
    """Base temperature of 'const' and 'idts'."""
    kappa: float = 0.3
    """IDTS strength: tau in [tau0 e^-kappa, tau0 e^kappa]."""
    edt_t0: float = 2.0
    """EDT temperature scale T0 in tau = clip(T0 * 0.8^(theta / H), tau_min, tau_max)."""
    edt_theta: float = 1.0
    """EDT exponent numerator theta (larger: colder on low-entropy tokens)."""
    tau2: str = "per_token"
    """tau^2 convention: per_token, none, normalized (tau^2 / its run-level mean)."""

    route_mode: str = "global_quantile"
    """C3 router: global_quantile (u >= 1 - rho, per token), none, batch_topk (batch rule), abs, random, all."""
    rho: float = 0.2
    """Fraction of tokens routed to the hard (feature) branch."""
    h_abs: float = 1.0
    """Entropy threshold (nats) of route_mode='abs'."""
    beta_f: float = 1.0
    """Weight of the feature loss. 0 turns the feature branch off."""
    feat_loss: str = "cosine"
    """Per-token feature loss: cosine (1 - cos) or mse_ln (MSE after parameter-free layer norm)."""
    layer_map: str = "uniform"
    """Student-to-teacher layer map: uniform (K layers) or last."""
    feat_layers: int = 4
    """K, the number of mapped layers of the uniform map."""
    hard_branch: str = "feat_plus_logits"
    """Routed tokens get feature + logit KD (feat_plus_logits) or feature loss only (feat_only)."""
    feat_weight_schedule: str = "constant"
    """constant beta_f, or follow_lambda: beta_f * lambda(s)."""

    chunk_size: int = 0
    """Tokens per chunk of the vocabulary-sized work; 0 = auto, 2^24 / V (64 MiB per fp32 chunk x V tensor)."""

    kernels: str = "auto"
    """The cached teacher's full-vocabulary passes: fused kernels built by torch.compile ('compiled'), eager PyTorch
    ('eager'), or 'auto', the kernels where torch.compile works here and eager with a warning where it fails."""

    cross_vocab: str = "none"
    """Teacher and student tokenizers: 'none' (one shared tokenizer, checked), or distil across tokenizers at aligned
    positions (egad.xtok) with the 'exact' (matched tokens + a tail bucket), 'uld' or 'hybrid' per-token loss."""
    cross_vocab_weight: float = 0.5
    """Hybrid only: weight of the exact part; (1 - weight) weighs the ULD term over the unmatched tokens."""

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"objective.{name}={value!r} is not one of {list(allowed)}")
        _check_range("alpha", self.alpha, 0.0, 1.0)
        _check_range("jsd_beta", self.jsd_beta, 0.0, 1.0)
        _check_range("skew_lambda", self.skew_lambda, 0.0, 1.0, hi_open=True)
        _check_range("akl_mu", self.akl_mu, 0.0, 1.0)
        _check_range("w_min", self.w_min, 0.0, 1.0)
        _check_range("rho", self.rho, 0.0, 1.0, lo_open=True)
        _check_range("select_ratio", self.select_ratio, 0.0, 1.0, lo_open=True)
        _check_range("pacing_c0", self.pacing_c0, 0.0, 1.0, hi_open=True)
        if self.fixed_lambda is not None:
            _check_range("fixed_lambda", self.fixed_lambda, 0.0, 1.0)
        if not self.pacing_s1 > self.pacing_s0:
            raise ConfigError(f"objective.pacing_s1={self.pacing_s1} must be > pacing_s0={self.pacing_s0}")
        if not 0 < self.tau_min <= self.tau_max:
            raise ConfigError(f"objective.tau_min={self.tau_min}, tau_max={self.tau_max}: need 0 < tau_min <= tau_max")
        if self.chunk_size < 0:
            raise ConfigError(f"objective.chunk_size={self.chunk_size} must be >= 0 (0 picks it from the vocabulary)")
        for name in ("tau0", "ea_temperature", "h_ref", "feat_layers", "edt_t0"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"objective.{name}={getattr(self, name)} must be > 0")
        _check_range("cross_vocab_weight", self.cross_vocab_weight, 0.0, 1.0)
        if self.cross_vocab in ("exact", "hybrid") and self.divergence not in EXACT_DIVERGENCES:
            raise ConfigError(
                f"objective.divergence={self.divergence!r} is not offered across tokenizers "
                f"(objective.cross_vocab={self.cross_vocab!r}); choose one of {list(EXACT_DIVERGENCES)}"
            )
        student_side = sorted(self.signals_needed & {"student_entropy", "student_ea", "hellinger"})
        if self.cross_vocab != "none" and student_side:
            raise ConfigError(
                f"objective.cross_vocab={self.cross_vocab!r}: the plan reads {student_side}, which compare the two "
                "models over one vocabulary; across tokenizers the plan reads the teacher's entropy only "
                "(weighting curriculum, none or select_teacher_entropy; temp_signal teacher_entropy)"
            )
        if self.beta_f < 0:
            raise ConfigError(f"objective.beta_f={self.beta_f} must be >= 0 (0 turns features off)")
        if self.bild_top_k < 2:
            raise ConfigError(f"objective.bild_top_k={self.bild_top_k} must be >= 2")
        if self.hard_branch == "feat_only" and not self.uses_features:
            raise ConfigError(
                "objective.hard_branch='feat_only' drops logit KD on routed tokens, so it needs beta_f > 0 "
                "and a route_mode other than 'none'"
            )

    @property
    def uses_teacher(self) -> bool:
        """False for SFT (alpha = 0 and no features): the teacher need not run."""
        return self.alpha > 0 or self.uses_features

    @property
    def uses_features(self) -> bool:
        """True when the feature branch is on (needs hidden states and projections)."""
        return self.beta_f > 0 and self.route_mode != "none"

    def chunk_tokens(self, vocab: int) -> int:
        """Tokens per chunk for a vocabulary of `vocab` entries."""
        return self.chunk_size or max(16, 2**24 // max(vocab, 1))

    @property
    def needs_difficulty(self) -> bool:
        """True when some component reads the difficulty d_t (curriculum, linear temperatures, d-based routes)."""
        uses_d_route = self.uses_features and self.route_mode in ("batch_topk", "global_quantile")
        return self.weighting == "curriculum" or self.temp_mode in ("inverse", "direct") or uses_d_route

    @property
    def needs_knots(self) -> bool:
        """True when some rule reads the run-level teacher-entropy CDF (knots from calibration or a stream)."""
        return "entropy" in self.cdfs_needed

    @property
    def signals_needed(self) -> set[str]:
        """The per-token signals the plan of `cfg` reads: entropy (teacher, tau = 1), entropy_ea, student_entropy,
        hellinger. Plain KD and SFT need none."""
        need: set[str] = set()
        if self.needs_difficulty or (self.route_mode in ("abs", "global_quantile") and self.uses_features):
            need.add("entropy")
        if self.weighting == "select_teacher_entropy":
            need.add("entropy")
        if self.temp_mode in ("idts", "edt"):
            need.add("hellinger" if self.temp_signal == "hellinger" else "entropy")
        if self.weighting == "ea_kd":
            need.update({"entropy", "student_entropy"} if self.ea_temperature == 1.0 else {"entropy_ea", "student_ea"})
        if self.weighting == "select_student_entropy":
            need.add("student_entropy")
        if self.weighting == "select_hellinger":
            need.add("hellinger")
        return need

    @property
    def cdfs_needed(self) -> set[str]:
        """The signals whose run-level CDF (knots) the plan of `cfg` reads."""
        need: set[str] = set()
        if self.needs_difficulty and self.difficulty == "quantile" and self.cdf_mode != "batch":
            need.add("entropy")
        if self.uses_features and self.route_mode in ("global_quantile", "abs"):
            need.add("entropy")  # the quantile route, and the expected routed share that normalises the feature term
        if self.weighting == "curriculum" and self.curriculum_mode == "tilt" and self.difficulty == "normalized":
            need.add("entropy")  # E[exp(beta d)] over the run's d
        if self.tau2 == "normalized" and self.divergence not in NO_TAU2 and self.temp_mode != "const":
            if self.temp_mode in ("idts", "edt"):
                need.add("hellinger" if self.temp_signal == "hellinger" else "entropy")
            elif self.difficulty == "normalized":
                need.add("entropy")
        if self.temp_mode == "idts":
            need.add("hellinger" if self.temp_signal == "hellinger" else "entropy")  # the run-level median
        if self.weighting in SELECT_SIGNAL:
            need.add(SELECT_SIGNAL[self.weighting])
        return need


def _check_range(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"objective.{name}={value} must lie in {left}{lo}, {hi}{right}")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring, read from the source (used by `--help` and docs)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in docs.items() if k in names}


__all__ = ["ConfigError", "ObjectiveConfig", "field_docs"]
