"""THE method: one objective that composes entropy, curriculum, temperature, routing, divergence and features.

    L = (1 - alpha) CE + alpha KD + beta_f feat                                     (spec section 6)
    KD   = (1/N) sum_t w_t tau_t^2 D(p^(tau_t), q^(tau_t))
    feat = (1/(rho_e N)) sum_{t routed} l_feat(t)

N is the response-token count of the whole accumulation window on all processes (`num_tokens`) and rho_e the share
of tokens the router sends to the feature branch under the run-level CDF (`expected_route_share`), so micro-batches
add up exactly to the big batch. Each token's plan (weight, temperature, route) depends on the token alone and on
run-level state (egad.objective.token_plan), so it is made chunk by chunk from the same teacher projection as the
divergence: one teacher head GEMM per chunk. The loss's own vocabulary-sized work (softmaxes, divergences, the gradient
w.r.t. the logits) runs in chunks of `chunk_size` tokens inside the forward, as Liger-Kernel's chunked losses do, so its
working set is a few (chunk x V) fp32 tensors whatever N is.

What chunking does not remove: on the default path the student's full logits (B, L, V) come from the model's own
forward, and their gradient (B*L, V) is filled chunk by chunk, so two full-size tensors in the logits' dtype are
alive. With `fused` (final hidden state + lm_head weight) neither exists: each chunk is projected here, and the
gradient buffers are (B*L, d) and (V, d). A `DenseSignal` teacher holds its full logits (B, L, V) in its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from egad.config.schema import ObjectiveConfig
from egad.losses.features import FeatureProjector, feature_loss
from egad.models.heads import OutputHead
from egad.objective.chunked_logits import apply_chunked
from egad.objective.token_plan import (
    PlanConstants,
    PlanState,
    batch_decisions,
    batch_rules,
    expected_route_share,
    plan_constants,
    token_plan,
)
from egad.teacher.signal import TeacherSignal, chunk_signals


@dataclass
class StudentOutputs:
    """The student side. Either `logits` (B, L, V_S), or for the fused path `hidden` (B, L, d), the final hidden state,
    plus its head: `head` (egad.models.heads.OutputHead: weight, bias, scales, soft-cap, as
    `egad.models.heads.output_head` reads them from the model) or just `lm_head_weight` (V_S, d) for a plain linear
    head. `features`: hidden states of the mapped layers, (B, L, d_S) each."""

    logits: Tensor | None = None
    hidden: Tensor | None = None
    lm_head_weight: Tensor | None = None
    features: list[Tensor] | None = None
    head: OutputHead | None = None

    @property
    def fused(self) -> bool:
        return self.logits is None

    def output_head(self) -> OutputHead:
        if self.head is not None:
            return self.head
        if self.lm_head_weight is None:
            raise ValueError("StudentOutputs needs logits, or hidden and a head (lm_head_weight) for the fused path")
        return OutputHead(self.lm_head_weight)

    @property
    def vocab_rows(self) -> int:
        return self.output_head().rows if self.fused else self.logits.shape[-1]  # type: ignore[union-attr]


@dataclass
class ObjectiveOutput:
    """`loss` carries the gradient. `metrics` are detached 0-d tensors; `tokens` are detached (N,) per-token signals
    (entropy, difficulty, weight, tau, route) for logging and plots."""

    loss: Tensor
    metrics: dict[str, Tensor]
    tokens: dict[str, Tensor] = field(default_factory=dict)


def resolve_vocab(student_rows: int, teacher_rows: int | None, vocab_size: int | None) -> int:
    """The shared real vocabulary V. Padded embedding rows (Qwen2.5: 151,936 vs 152,064 for 151,665 tokens) are
    sliced away, so V must be given when the row counts differ."""
    rows = [student_rows] + ([teacher_rows] if teacher_rows is not None else [])
    if vocab_size is None:
        if len(set(rows)) > 1:
            raise ValueError(
                f"student has {student_rows} logit rows and teacher {teacher_rows}: pass vocab_size=len(tokenizer), "
                "the shared real vocabulary, so padded rows are sliced away before the softmax"
            )
        return rows[0]
    if vocab_size > min(rows):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logit rows (student {student_rows}, teacher "
            f"{teacher_rows}); the tokenizer does not match the models"
        )
    return vocab_size


def _student_chunk(x: Tensor, head: OutputHead | None, vocab: int) -> Tensor:
    """Student logits of one chunk, fp32, shared vocabulary, no grad; x: logits rows (C, V_S) or hidden rows (C, d)."""
    if head is None:
        return x[:, :vocab].float()
    return head.logits(x, vocab).float().detach()


@torch.no_grad()
def _entropies(teacher: TeacherSignal, rows: Tensor, cfg: ObjectiveConfig, vocab: int) -> Tensor:
    step = cfg.chunk_tokens(vocab)
    return torch.cat([teacher.chunk(rows[i : i + step], vocab).entropy() for i in range(0, rows.numel(), step)])


def _student_source(student: StudentOutputs) -> tuple[Tensor, OutputHead | None]:
    if student.fused:
        if student.hidden is None:
            raise ValueError("StudentOutputs needs logits, or hidden and a head (lm_head_weight) for the fused path")
        return student.hidden.reshape(-1, student.hidden.shape[-1]), student.output_head()
    return student.logits.reshape(-1, student.logits.shape[-1]), None  # type: ignore[union-attr]


@dataclass
class _Run:
    """Everything one objective call needs inside the autograd function."""

    cfg: ObjectiveConfig
    student: StudentOutputs
    teacher: TeacherSignal | None
    targets: Tensor  # (N,) target ids of the response tokens
    rows: Tensor  # (N,) flat positions
    keys: Tensor  # (N,) token keys of the hashed per-token draws
    state: PlanState
    consts: PlanConstants | None  # None: no plan (no teacher)
    progress: float
    vocab: int
    head: OutputHead | None
    ce_scale: float
    kd_scale: float
    need_grad: bool
    batch: dict[str, Tensor] = field(default_factory=dict)  # batch rules' decisions over the micro-batch (N,)
    parts: list[dict[str, Tensor | float]] = field(default_factory=list)
    teacher_chunks: int = 0

    def _ce(self, zs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(zs, targets, reduction="sum") if self.ce_scale else zs.new_zeros(())

    def chunk_terms(self, zs: Tensor, idx: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        zero = zs.new_zeros(())
        targets = self.targets[sl]
        if self.consts is None:
            return self._ce(zs, targets), zero
        cfg = self.cfg
        t = self.teacher.chunk(idx, self.vocab)  # the one teacher projection of this chunk
        self.teacher_chunks += 1
        sig = chunk_signals(t, zs, cfg.signals_needed, cfg.ea_temperature)
        if not sig:
            sig = {"n": zs.new_zeros(zs.shape[0])}  # plain KD: the plan is constant, only its length is needed
        plan = token_plan(
            sig,
            cfg,
            progress=self.progress,
            vocab=self.vocab,
            state=self.state,
            keys=self.keys[sl],
            consts=self.consts,
            batch={k: v[sl] for k, v in self.batch.items()},
        )
        self.parts.append(plan)
        if not self.kd_scale:
            return self._ce(zs, targets), zero
        ce = None
        if self.ce_scale and hasattr(t, "divergence_and_ce"):
            # Where the divergence can share the student's normaliser with the CE (forward KL at tau 1), it does.
            div, ce = t.divergence_and_ce(cfg.divergence, zs, plan["tau"], targets, **_div_kwargs(cfg))
        else:
            div = t.divergence(cfg.divergence, zs, plan["tau"], **_div_kwargs(cfg))  # (C,)
        ce_sum = ce.sum() if ce is not None else self._ce(zs, targets)
        coef = plan["weight"] * plan["tau2"]  # type: ignore[operator]
        if cfg.hard_branch == "feat_only":
            coef = coef * (~plan["route"]).float()  # type: ignore[operator]
        return ce_sum, (coef * div).sum()

    def plan(self) -> dict[str, Tensor | float] | None:
        """The whole micro-batch's plan, from its chunks."""
        if not self.parts:
            return None
        out: dict[str, Tensor | float] = {"lambda": self.parts[0]["lambda"]}
        for key, first in self.parts[0].items():
            if isinstance(first, Tensor):
                out[key] = torch.cat([p[key] for p in self.parts])  # type: ignore[misc]
        return out


def _div_kwargs(cfg: ObjectiveConfig) -> dict:
    return {
        "jsd": {"beta": cfg.jsd_beta},
        "skew_forward_kl": {"lam": cfg.skew_lambda},
        "skew_reverse_kl": {"lam": cfg.skew_lambda},
        "akl": {"mu": cfg.akl_mu},
        "todi": {"beta": cfg.todi_beta},
        "ttm": {"gamma": cfg.ttm_gamma},
        "wttm": {"gamma": cfg.ttm_gamma},
        "bild": {"top_k": cfg.bild_top_k},
    }.get(cfg.divergence, {})


def distillation_loss(
    student: StudentOutputs,
    teacher: TeacherSignal | None,
    targets: Tensor,
    cfg: ObjectiveConfig,
    *,
    progress: float = 0.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
    knots: Tensor | None = None,
    projector: FeatureProjector | None = None,
    state: PlanState | None = None,
    token_keys: Tensor | None = None,
) -> ObjectiveOutput:
    """The EGAD objective (or any preset of it) on one micro-batch.

    targets: (B, L) next-token ids aligned with the logits (use `shift_labels` on HF labels), -100 where ignored.
    progress: training progress s in [0, 1] for the curriculum. num_tokens: response tokens of the whole accumulation
    window on all processes (default: this batch's). knots: teacher-entropy quantile knots, or `state`: all the
    run-level state the plan reads (egad.objective.token_plan.PlanState). token_keys: (B, L) int64 keys naming each
    token whatever batch it is in (the trainer uses example index and position), for hashed per-token draws; default the
    flat positions.
    """
    if state is None:
        state = PlanState(knots=knots)
    elif knots is not None:
        raise ValueError("pass the teacher-entropy knots either as knots= or inside state=, not both")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress} must lie in [0, 1] (step / total_steps)")
    if cfg.uses_teacher and teacher is None:
        raise ValueError("this objective distils (alpha > 0 or beta_f > 0) but no teacher signal was given")
    teacher = teacher if cfg.uses_teacher else None
    vocab = resolve_vocab(student.vocab_rows, teacher.vocab_rows if teacher else None, vocab_size)
    x_flat, head = _student_source(student)
    flat_targets = targets.reshape(-1)
    if flat_targets.numel() != x_flat.shape[0]:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match the student outputs ({x_flat.shape[0]} positions)"
        )
    rows = (flat_targets != -100).nonzero().squeeze(-1)  # (N,)
    n_local = rows.numel()
    denom = float(num_tokens) if num_tokens is not None else float(n_local)
    denom = max(denom, 1.0)

    consts = plan_constants(cfg, state, progress=progress, vocab=vocab) if teacher is not None and n_local else None
    if token_keys is not None:
        if token_keys.numel() != flat_targets.numel():
            raise ValueError(f"token_keys {tuple(token_keys.shape)} do not match targets {tuple(targets.shape)}")
        keys = token_keys.reshape(-1).to(rows.device)[rows]
    else:
        keys = rows
    head_params = [t for t in ((head.weight, head.bias) if head is not None else ()) if t is not None]
    need_grad = torch.is_grad_enabled() and (x_flat.requires_grad or any(t.requires_grad for t in head_params))
    kd_alpha = cfg.alpha if teacher is not None else 0.0
    run = _Run(
        cfg,
        student,
        teacher,
        flat_targets[rows],
        rows,
        keys,
        state,
        consts,
        progress,
        vocab,
        head,
        ce_scale=(1 - cfg.alpha) / denom,
        kd_scale=kd_alpha / denom,
        need_grad=need_grad,
    )
    if consts is not None and batch_rules(cfg):
        # A batch rule ranks each token among the whole micro-batch: its entropies first, in a pass of their own.
        run.batch = batch_decisions(_entropies(teacher, rows, cfg, vocab), cfg, state, vocab)
    loss, ce, kd = apply_chunked(x_flat, head, run)
    plan = run.plan()
    if plan is not None and cfg.uses_features:
        _check_stored_features(teacher, rows, plan, cfg)

    feat = loss.new_zeros(())
    if plan is not None and cfg.uses_features:
        share = expected_route_share(cfg, state)
        feat = _feature_term(student, teacher, rows, plan, cfg, projector, share * denom)
        loss = loss + feat
    elif projector is not None and need_grad:
        loss = loss + 0.0 * sum(p.sum() for p in projector.parameters())  # keeps DDP's unused-parameter check happy
    metrics = _metrics(loss, ce / denom, kd / denom, feat, plan, n_local)
    metrics["teacher_chunks"] = torch.tensor(float(run.teacher_chunks))
    tokens = {k: v for k, v in (plan or {}).items() if isinstance(v, Tensor)}
    return ObjectiveOutput(loss=loss, metrics=metrics, tokens=tokens)


def _check_stored_features(teacher: TeacherSignal, rows: Tensor, plan: dict, cfg: ObjectiveConfig) -> None:
    """A cache stores hidden states for its hard tokens only: a routed token without one is an error, never a
    silently smaller feature term."""
    mask = teacher.feature_mask_at(rows)
    if mask is None:
        return
    missing = plan["route"] & ~mask.to(plan["route"].device)
    if bool(missing.any()):
        thr = getattr(teacher, "hidden_threshold", None)
        where = f"entropy >= {thr:.4f} nats" if thr is not None else "its hard tokens"
        raise ValueError(
            f"{int(missing.sum())} routed token(s) have no stored hidden state: the teacher cache keeps hidden states "
            f"for {where}, and the router (route_mode={cfg.route_mode!r}, rho={cfg.rho}) picked tokens below it. "
            "Route by the cache's own threshold (route_mode 'global_quantile' with rho = 1 - the cache's "
            "hidden_quantile reads it), lower objective.rho, or rebuild the cache with a lower --hidden-quantile"
        )


def _feature_term(
    student: StudentOutputs,
    teacher: TeacherSignal,
    rows: Tensor,
    plan: dict,
    cfg: ObjectiveConfig,
    projector: FeatureProjector | None,
    budget: float,
) -> Tensor:
    if projector is None or not student.features:
        raise ValueError(
            "the feature branch is on (beta_f > 0, route_mode != 'none') but the student features or "
            "the FeatureProjector are missing; capture the mapped layers or set beta_f=0"
        )
    routed = rows[plan["route"]]
    beta = cfg.beta_f * (plan["lambda"] if cfg.feat_weight_schedule == "follow_lambda" else 1.0)
    # Normalised by the window's expected routed count rho_e N (a run-level share times the window's token count):
    # the same for any split of the window, where the routed count of a micro-batch is not.
    budget = max(1.0, budget)
    if routed.numel() == 0:
        return sum(p.sum() for p in projector.parameters()) * 0.0
    hs = [h.reshape(-1, h.shape[-1])[routed] for h in student.features]
    per_tok = feature_loss(hs, teacher.features_at(routed), projector, kind=cfg.feat_loss)  # (N_r,)
    return beta * per_tok.sum() / budget


def _metrics(loss, ce, kd, feat, plan, n_local: int) -> dict[str, Tensor]:
    """ce and kd are per-token means over num_tokens (before the alpha mix); feat is already weighted."""
    m = {"loss": loss.detach(), "ce": ce, "kd": kd, "feat": feat.detach(), "n_tokens": torch.tensor(float(n_local))}
    if plan is not None:
        if "entropy" in plan:
            h = plan["entropy"]
            q = torch.quantile(h, torch.tensor([0.1, 0.5, 0.9], device=h.device)) if h.numel() else torch.zeros(3)
            m.update({"entropy_mean": h.mean(), "entropy_p10": q[0], "entropy_p50": q[1], "entropy_p90": q[2]})
        m.update(
            {
                "lambda": torch.tensor(float(plan["lambda"])),
                "weight_mean": plan["weight"].mean(),
                "weight_min": plan["weight"].min(),
                "weight_max": plan["weight"].max(),
                "tau_mean": plan["tau"].mean(),
                "routed_frac": plan["route"].float().mean(),
            }
        )
    return m
