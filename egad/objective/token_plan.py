"""Per-token decisions of the objective, all under no_grad: difficulty d_t, curriculum weight w_t, temperature
tau_t, the tau^2 factor and the route r_t (spec sections 2-5; baseline weight rules of section 7).

Every decision is a function of the token's own signals (teacher entropy, student entropy, Hellinger distance) and of
run-level state (`PlanState`: the step, the calibrated or streamed CDFs, constants fitted from them), never of its
batch-mates. So a window split into micro-batches or processes in any way gives each token the same plan, and the
plan of a chunk can be made from that chunk alone, in the same pass as its divergence. Two batch rules remain as
options (`cdf_mode='batch'`, `route_mode='batch_topk'`); `batch_rules` names them, and the trainers refuse them
wherever one micro-batch is not the whole optimizer window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from egad.config.schema import SELECT_SIGNAL as _SELECT_SIGNAL
from egad.config.schema import ConfigError, ObjectiveConfig
from egad.losses.divergences import NO_TAU2
from egad.plan.curriculum import curriculum_weights, pacing, tilt_normaliser
from egad.plan.entropy import batch_mid_rank, knot_quantile, normalized_entropy, quantile_cdf
from egad.plan.entropy_stream import EmaEntropyHistogram
from egad.plan.routing import BATCH_ROUTES, route_tokens
from egad.plan.temperature import tau_squared_factor, token_temperature

# Points of the probability grid on which run-level expectations (tilt and tau^2 normalisers) are taken.
_GRID = 4096


@dataclass(frozen=True)
class PlanState:
    """Run-level state the plan reads besides the token: CDF knots of each signal a rule ranks tokens by, and the
    step's seed. `knots`: the teacher entropy at tau = 1 (calibrated before training, or streamed); `student_knots`
    and `hellinger_knots`: streamed, since they move as the student learns. `route_threshold`: nats; when set,
    `global_quantile` routes `H >= route_threshold` (an offline cache's hidden-state threshold). `seed`: of the hashed
    per-token draws (`route_mode='random'`), one per optimizer step."""

    knots: Tensor | None = None
    student_knots: Tensor | None = None
    hellinger_knots: Tensor | None = None
    route_threshold: float | None = None
    seed: int = 0

    @classmethod
    def from_streams(
        cls,
        knots: Tensor | None,
        streams: Mapping[str, EmaEntropyHistogram],
        *,
        seed: int,
        device: torch.device | str,
        route_threshold: float | None = None,
    ) -> PlanState:
        """The state of one optimizer step: the teacher knots, the student-side streams' current knots, the step's
        seed (egad.plan.routing.step_seed)."""

        def read(name: str) -> Tensor | None:
            return streams[name].knots().to(device) if name in streams else None

        return cls(
            knots=None if knots is None else knots.to(device),
            student_knots=read("student_entropy"),
            hellinger_knots=read("hellinger"),
            route_threshold=route_threshold,
            seed=seed,
        )

    def knots_of(self, signal: str) -> Tensor | None:
        return {"entropy": self.knots, "student_entropy": self.student_knots, "hellinger": self.hellinger_knots}[signal]


def batch_rules(cfg: ObjectiveConfig) -> list[str]:
    """The options of `cfg` whose decisions depend on a token's batch-mates, each with the alternative."""
    out = []
    if cfg.needs_difficulty and cfg.difficulty == "quantile" and cfg.cdf_mode == "batch":
        out.append("objective.cdf_mode='batch' ranks each token among its micro-batch (use 'global' or 'ema_hist')")
    if cfg.uses_features and cfg.route_mode in BATCH_ROUTES:
        out.append(
            f"objective.route_mode={cfg.route_mode!r} routes the top rho of each micro-batch (use 'global_quantile', "
            "the same share by the run-level entropy quantile)"
        )
    return out


def check_window_exact(cfg: ObjectiveConfig, *, grad_accum: int, processes: int) -> None:
    """Refuse a batch rule where one micro-batch on one process is not the whole optimizer window."""
    bad = batch_rules(cfg)
    if bad and (grad_accum > 1 or processes > 1):
        raise ConfigError(
            f"this run splits each optimizer window into {grad_accum} micro-batch(es) on {processes} process(es), "
            f"and {'; '.join(bad)}: each token's treatment would depend on how the window is split. Switch to the "
            "per-token option, or train with train.grad_accum 1 on one process"
        )


def _require(state: PlanState, signal: str) -> Tensor:
    knots = state.knots_of(signal)
    if knots is None:
        how = {
            "entropy": "calibrate them on the teacher (egad.teacher.calibrate.calibrate_entropy, or a cache's knots) "
            "and pass knots=",
            "student_entropy": "stream them (egad.teacher.calibrate.calibrate_signals before training, then "
            "EmaEntropyHistogram per window) and pass PlanState(student_knots=...)",
            "hellinger": "stream them (egad.teacher.calibrate.calibrate_signals before training, then "
            "EmaEntropyHistogram per window) and pass PlanState(hellinger_knots=...)",
        }[signal]
        raise ValueError(
            f"this objective ranks tokens by their {signal} against the run's CDF, which is missing: {how}"
        )
    return knots


def _probs(lo: float = 0.0) -> Tensor:
    """Midpoints of `_GRID` equal cells of [lo, 1]: a quadrature grid for expectations over a quantile function."""
    return lo + (1.0 - lo) * (torch.arange(_GRID, dtype=torch.float64) + 0.5) / _GRID


def _difficulty_of(h: Tensor, cfg: ObjectiveConfig, knots: Tensor | None, vocab: int) -> Tensor:
    if cfg.difficulty == "normalized":
        return (normalized_entropy(h, vocab) / cfg.h_ref).clamp(0, 1)
    if cfg.cdf_mode == "batch":
        return batch_mid_rank(h)
    return quantile_cdf(h, knots)  # type: ignore[arg-type]


def _difficulty_grid(cfg: ObjectiveConfig, state: PlanState, vocab: int) -> Tensor:
    """d over the run's token distribution, as a quadrature grid: u itself for the quantile difficulty (uniform by
    construction), d(Q(p)) for the normalised one."""
    p = _probs()
    if cfg.difficulty == "quantile":
        return p.float()
    return _difficulty_of(knot_quantile(_require(state, "entropy").cpu(), p), cfg, None, vocab)


def _lambda(cfg: ObjectiveConfig, progress: float) -> float:
    if cfg.fixed_lambda is not None:
        return cfg.fixed_lambda
    if cfg.curriculum_mode == "competence":
        # Competence gating uses the sqrt competence c(s); presets set pacing_c0=0.3 (0.01 starves early training).
        return pacing(progress, "sqrt", s0=cfg.pacing_s0, s1=cfg.pacing_s1, c0=cfg.pacing_c0)
    return pacing(progress, cfg.pacing, s0=cfg.pacing_s0, s1=cfg.pacing_s1, c0=cfg.pacing_c0)


def _temp_kwargs(cfg: ObjectiveConfig) -> dict:
    return dict(
        mode=cfg.temp_mode,
        tau_min=cfg.tau_min,
        tau_max=cfg.tau_max,
        tau0=cfg.tau0,
        kappa=cfg.kappa,
        edt_t0=cfg.edt_t0,
        edt_theta=cfg.edt_theta,
    )


def _temp_signal(cfg: ObjectiveConfig) -> str:
    return "hellinger" if cfg.temp_signal == "hellinger" else "entropy"


def _temp_population_lo(cfg: ObjectiveConfig) -> float:
    """Lower end of the probability range of the tokens the IDTS rule applies to: AdaKD applies it (and takes its
    median) over the selected tokens, the top `select_ratio` of the selection score; when that score is the
    temperature's own signal, those are its quantiles above 1 - ratio. Otherwise every token."""
    selected_by = _SELECT_SIGNAL.get(cfg.weighting)
    if cfg.temp_mode == "idts" and selected_by == _temp_signal(cfg):
        return 1.0 - cfg.select_ratio
    return 0.0


@dataclass(frozen=True)
class PlanConstants:
    """What the plan needs from the run at one step, computed once per objective call."""

    lam: float
    tilt_norm: float | None
    idts_median: float | None
    tau2_norm: float | None


def plan_constants(cfg: ObjectiveConfig, state: PlanState, *, progress: float, vocab: int) -> PlanConstants:
    """lambda(s) and the run-level constants: E[exp(beta d)] (tilt), the IDTS median, E[tau^2] (tau2='normalized')."""
    lam = _lambda(cfg, progress)
    tilt = median = t2 = None
    if cfg.weighting == "curriculum" and cfg.curriculum_mode == "tilt":
        beta = cfg.tilt_beta_max * (2.0 * lam - 1.0)
        if cfg.difficulty == "quantile":
            tilt = tilt_normaliser(beta)
        else:
            tilt = float(torch.exp(beta * _difficulty_grid(cfg, state, vocab).double()).mean())
    if cfg.temp_mode == "idts":
        knots = _require(state, _temp_signal(cfg)).cpu()
        lo = _temp_population_lo(cfg)
        median = float(knot_quantile(knots, lo + (1.0 - lo) / 2.0))
    if cfg.tau2 == "normalized" and cfg.divergence not in NO_TAU2:
        t2 = _tau2_norm(cfg, state, vocab, median)
    return PlanConstants(lam, tilt, median, t2)


def _tau2_norm(cfg: ObjectiveConfig, state: PlanState, vocab: int, median: float | None) -> float:
    """E[tau^2] over the tokens the temperature rule applies to, under the run's distribution of its signal."""
    if cfg.temp_mode == "const":
        return cfg.tau0**2
    if cfg.temp_mode in ("inverse", "direct"):
        d = _difficulty_grid(cfg, state, vocab)
        tau = token_temperature(d, **_temp_kwargs(cfg))
    else:
        score = knot_quantile(_require(state, _temp_signal(cfg)).cpu(), _probs(_temp_population_lo(cfg)))
        tau = token_temperature(torch.zeros_like(score), score=score, median=median, **_temp_kwargs(cfg))
    return float((tau.double() ** 2).mean())


@torch.no_grad()
def token_plan(
    sig: dict[str, Tensor],
    cfg: ObjectiveConfig,
    *,
    progress: float,
    vocab: int,
    knots: Tensor | None = None,
    state: PlanState | None = None,
    keys: Tensor | None = None,
    consts: PlanConstants | None = None,
    batch: dict[str, Tensor] | None = None,
) -> dict[str, Tensor | float]:
    """Difficulty, curriculum weight, temperature, tau^2 factor and route per token, all under no_grad.

    sig: the token's signals (N,) each, those of `cfg.signals_needed`. state: run-level state (or `knots` alone for
    the teacher entropy CDF). keys: (N,) int64 token keys for the hashed random draws (default: positions).
    consts: `plan_constants` for this step (computed here when not given). batch: for the batch rules only, their
    decisions made over the whole micro-batch (`batch_decisions`), sliced to these tokens: "difficulty", "route".
    """
    if state is None:
        state = PlanState(knots=knots)
    elif knots is not None:
        raise ValueError("pass the teacher-entropy knots either as knots= or inside state=, not both")
    if consts is None:
        consts = plan_constants(cfg, state, progress=progress, vocab=vocab)
    n = next(iter(sig.values())).numel() if sig else 0
    device = next(iter(sig.values())).device if sig else torch.device("cpu")
    h = sig.get("entropy")
    batch = batch or {}
    if "difficulty" in batch:
        d = batch["difficulty"]
    elif not cfg.needs_difficulty:
        d = torch.zeros(n, device=device)  # no component reads it (e.g. plain KD): no calibration needed
    else:
        knots_h = _require(state, "entropy") if "entropy" in cfg.cdfs_needed else None
        d = _difficulty_of(h, cfg, None if knots_h is None else knots_h.to(h.device), vocab)  # type: ignore[arg-type]
    lam = consts.lam
    w = _weights(sig, d, lam, cfg, vocab, state, consts)
    tau = _temperature(sig, d, w, cfg, consts)
    t2 = torch.ones_like(tau) if cfg.divergence in NO_TAU2 else tau_squared_factor(tau, cfg.tau2, norm=consts.tau2_norm)
    if "route" in batch:
        route = batch["route"]
    elif cfg.uses_features:
        u = d
        if cfg.route_mode == "global_quantile" and (cfg.difficulty != "quantile" or cfg.cdf_mode == "batch"):
            u = quantile_cdf(h, _require(state, "entropy").to(h.device))  # type: ignore[arg-type]
        route = route_tokens(
            u,
            mode=cfg.route_mode,
            rho=cfg.rho,
            entropy=h,
            h_abs=cfg.h_abs,
            keys=keys,
            seed=state.seed,
            entropy_threshold=state.route_threshold if cfg.route_mode == "global_quantile" else None,
        )
    else:
        route = torch.zeros(n, dtype=torch.bool, device=device)
    plan: dict[str, Tensor | float] = {"difficulty": d, "weight": w, "tau": tau, "tau2": t2, "route": route}
    plan["lambda"] = lam
    for key in ("entropy", "student_entropy", "hellinger"):
        if key in sig:
            plan[key] = sig[key]
    return plan


@torch.no_grad()
def batch_decisions(entropy: Tensor, cfg: ObjectiveConfig, state: PlanState, vocab: int) -> dict[str, Tensor]:
    """The decisions of the batch rules (cdf_mode 'batch', route_mode 'batch_topk'), made over the teacher entropies
    of a whole micro-batch (N,); empty when `cfg` has none."""
    if not batch_rules(cfg):
        return {}
    knots = state.knots if "entropy" in cfg.cdfs_needed else None
    d = _difficulty_of(entropy, cfg, None if knots is None else knots.to(entropy.device), vocab)
    out = {"difficulty": d}
    if cfg.uses_features and cfg.route_mode in BATCH_ROUTES:
        out["route"] = route_tokens(d, mode=cfg.route_mode, rho=cfg.rho)
    return out


def expected_route_share(cfg: ObjectiveConfig, state: PlanState) -> float:
    """The share of the run's tokens the router sends to the feature branch, by the run-level CDF: what the feature
    term is normalised by (times the window's token count), so that it is exact under any split."""
    if cfg.route_mode == "all":
        return 1.0
    if cfg.route_mode == "abs":
        knots = _require(state, "entropy")
        return float(1.0 - quantile_cdf(knots.new_tensor([cfg.h_abs]), knots)[0])
    return cfg.rho  # global_quantile and random by construction; batch_topk: ceil(rho N) / N


def _weights(
    sig: dict[str, Tensor],
    d: Tensor,
    lam: float,
    cfg: ObjectiveConfig,
    vocab: int,
    state: PlanState,
    consts: PlanConstants,
) -> Tensor:
    if cfg.weighting == "none":
        return torch.ones_like(d)
    if cfg.weighting == "curriculum":
        return curriculum_weights(
            d, lam, mode=cfg.curriculum_mode, w_min=cfg.w_min, beta_max=cfg.tilt_beta_max, tilt_norm=consts.tilt_norm
        )
    if cfg.weighting == "ea_kd":
        # EA-KD (Su et al.): w = (H_T + H_T H_S / H_ub) / 2 with H_ub = log V, entropies at t_ea.
        ht = sig.get("entropy_ea", sig.get("entropy"))
        hs = sig.get("student_ea", sig.get("student_entropy"))
        return (ht + ht * hs / math.log(vocab)) / 2  # type: ignore[operator]
    signal = _SELECT_SIGNAL[cfg.weighting]
    score = sig[signal]
    u = quantile_cdf(score, _require(state, signal).to(score.device))
    # Kept: the run's top select_ratio by this score (u >= 1 - ratio), each weighted 1 / ratio.
    return (u >= 1.0 - cfg.select_ratio).float() / cfg.select_ratio


def _temperature(sig: dict[str, Tensor], d: Tensor, w: Tensor, cfg: ObjectiveConfig, consts: PlanConstants) -> Tensor:
    score = sig.get("hellinger") if cfg.temp_signal == "hellinger" else sig.get("entropy")
    kw = dict(_temp_kwargs(cfg), median=consts.idts_median)
    if cfg.weighting.startswith("select_") and cfg.temp_mode == "idts":
        # AdaKD applies IDTS to the selected tokens only; the others (weight 0) keep tau0.
        tau = torch.full_like(d, cfg.tau0)
        sel = w > 0
        if sel.any():
            tau[sel] = token_temperature(d[sel], score=score[sel], **kw)  # type: ignore[index]
        return tau
    return token_temperature(d, score=score, **kw)


__all__ = [
    "PlanConstants",
    "PlanState",
    "batch_decisions",
    "batch_rules",
    "check_window_exact",
    "expected_route_share",
    "plan_constants",
    "token_plan",
]
