"""The objective across tokenizers: `egad.objective.compose.distillation_loss` when the teacher speaks another
vocabulary.

    L = (1 - alpha) CE + alpha KD + beta_f feat
    CE   = (1/N) sum over every student response target of -log q(y_t)
    KD   = (1/N) sum over the aligned targets a of w_a tau_a^2 D_x(p_a^(tau_a), q_a^(tau_a))
    feat = (1/(rho_e N)) sum over the routed aligned targets of l_feat(a)

N counts every student response target of the window (aligned or not, as in the same-tokenizer objective), so an
unaligned target acts as KD weight 0 and keeps its CE. D_x is `egad.losses.cross_vocab` (exact, uld or hybrid), computed
from the final hidden states of the aligned rows and each model's head by `chunked_cross_vocab_loss`, so neither
vocabulary's full logits exist; from a teacher cache (`egad.xtok.source.CrossTopKSignal`) the teacher side is its cached
top-k at the aligned rows (`chunked_cross_vocab_topk_loss`) and the plan reads the cached entropy. The plan (weight,
temperature, route) is `egad.objective.token_plan.token_plan` on the teacher's entropy at the aligned rows, its
vocabulary V_T (normalised difficulty reads log V_T), made chunk by chunk from the loss's own teacher projection (the
`plan` hook of `chunked_cross_vocab_loss`): one teacher head GEMM per chunk, as in the same-tokenizer objective. (A
batch rule, or the feature branch without KD, reads the entropies in a pass of their own first.) The feature branch
pairs the mapped layers' hidden states at aligned rows through the projector. Student-side plan signals (student
entropy, Hellinger) compare the models over one vocabulary and are refused (`ObjectiveConfig`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from egad.config.schema import ObjectiveConfig
from egad.losses.cross_vocab_chunked import chunked_cross_vocab_loss, chunked_cross_vocab_topk_loss
from egad.losses.features import FeatureProjector, feature_loss
from egad.objective.compose import ObjectiveOutput, StudentOutputs, _div_kwargs, _metrics, distillation_loss
from egad.objective.token_plan import (
    PlanState,
    batch_decisions,
    batch_rules,
    expected_route_share,
    plan_constants,
    token_plan,
)
from egad.plan.entropy import token_entropy

__all__ = ["cross_distillation_loss"]


def _ce(student: StudentOutputs, targets: Tensor, cfg: ObjectiveConfig, denom: float, vocab: int | None):
    """sum CE / denom over every response target, by the same chunked loss as SFT. -> (loss, per-token mean)"""
    sft = replace(cfg, alpha=0.0, beta_f=0.0, hard_branch="feat_plus_logits", cross_vocab="none")
    out = distillation_loss(student, None, targets, sft, num_tokens=denom, vocab_size=vocab)
    return out.loss, out.metrics["ce"]


def _loss_kwargs(cfg: ObjectiveConfig) -> dict:
    if cfg.cross_vocab == "uld":
        return {}
    kw = {"divergence": cfg.divergence, **_div_kwargs(cfg)}
    if cfg.cross_vocab == "hybrid":
        kw["matched_weight"] = cfg.cross_vocab_weight
    return kw


def _plan(teacher, cfg: ObjectiveConfig, state: PlanState, keys: Tensor, progress: float) -> dict:
    v_t = teacher.teacher_vocab
    need = cfg.signals_needed
    taus = (1.0,) + ((cfg.ea_temperature,) if "entropy_ea" in need else ())
    ents = teacher.entropies(cfg.chunk_tokens(v_t), taus)
    sig = {"entropy": ents[0]} if "entropy" in need else {}
    if "entropy_ea" in need:
        sig["entropy_ea"] = ents[1]
    if not sig:
        sig = {"n": ents[0].new_zeros(ents[0].shape[0])}
    consts = plan_constants(cfg, state, progress=progress, vocab=v_t)
    batch = batch_decisions(ents[0], cfg, state, v_t) if batch_rules(cfg) else {}
    plan = token_plan(sig, cfg, progress=progress, vocab=v_t, state=state, keys=keys, consts=consts, batch=batch)
    return plan


def _coef(plan: dict, cfg: ObjectiveConfig) -> Tensor:
    coef = plan["weight"] * plan["tau2"]  # (C,)
    return coef * (~plan["route"]).float() if cfg.hard_branch == "feat_only" else coef


def _kd(hs, head, teacher, cfg: ObjectiveConfig, state, keys, progress: float, denom: float, vocab: int | None):
    """sum over the aligned rows of w tau^2 D_x, and the plan. Without a batch rule, each chunk's plan is made from the
    loss's own teacher projection of that chunk (the `plan` hook of `chunked_cross_vocab_loss`)."""
    v_t, need, scale = teacher.teacher_vocab, cfg.signals_needed, cfg.alpha / denom
    v_s = vocab or head.rows
    if getattr(teacher, "topk", None) is not None:  # cached: the entropies are known, so the plan comes first
        plan = _plan(teacher, cfg, state, keys, progress)
        coef = _coef(plan, cfg)
        values = chunked_cross_vocab_topk_loss(hs, head, teacher.topk, teacher.vmap, loss=cfg.cross_vocab,
                                               temperature=plan["tau"], token_weights=coef * scale, student_vocab=v_s,
                                               chunk_size=cfg.chunk_tokens(v_s), **_loss_kwargs(cfg))  # fmt: skip
        return (values * coef).sum(), plan
    kw = dict(loss=cfg.cross_vocab, student_vocab=v_s, teacher_vocab=v_t, chunk_size=cfg.chunk_tokens(max(v_s, v_t)))
    if batch_rules(cfg):  # a batch rule ranks the whole micro-batch first: the plan in a pass of its own
        plan = _plan(teacher, cfg, state, keys, progress)
        coef = _coef(plan, cfg)
        values = chunked_cross_vocab_loss(hs, head, teacher.aligned_hidden(), teacher.head, teacher.vmap,
                                          temperature=plan["tau"], token_weights=coef * scale, **kw,
                                          **_loss_kwargs(cfg))  # fmt: skip
        return (values * coef).sum(), plan
    consts = plan_constants(cfg, state, progress=progress, vocab=v_t)
    parts: list[dict] = []

    def hook(zt: Tensor, sl: slice) -> tuple[Tensor, Tensor]:  # zt (C, V_T) fp32, no grad
        sig = {}
        if "entropy" in need:
            sig["entropy"] = token_entropy(zt)
        if "entropy_ea" in need:
            sig["entropy_ea"] = token_entropy(zt, temperature=cfg.ea_temperature)
        sig = sig or {"n": zt.new_zeros(zt.shape[0])}
        part = token_plan(sig, cfg, progress=progress, vocab=v_t, state=state, keys=keys[sl], consts=consts)
        parts.append(part)
        return part["tau"], _coef(part, cfg) * scale

    values = chunked_cross_vocab_loss(
        hs, head, teacher.aligned_hidden(), teacher.head, teacher.vmap, plan=hook, **kw, **_loss_kwargs(cfg)
    )  # (A,)
    plan: dict = {"lambda": parts[0]["lambda"]}
    plan.update({k: torch.cat([p[k] for p in parts]) for k, v in parts[0].items() if isinstance(v, Tensor)})
    return (values * _coef(plan, cfg)).sum(), plan


def cross_distillation_loss(
    student: StudentOutputs,
    teacher,
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
    """The objective of one micro-batch against a teacher with its own tokenizer (`egad.xtok.source.CrossSignal`).
    Arguments as `distillation_loss` (egad.objective.compose); the student must come as hidden states and its
    head (fused). vocab_size: the student's real vocabulary V_S."""
    if state is None:
        state = PlanState(knots=knots)
    if not student.fused or student.hidden is None:
        raise ValueError("the cross-tokenizer objective projects the student's aligned rows itself: pass hidden + head")
    flat_targets = targets.reshape(-1)
    n_local = int((flat_targets != -100).sum())
    denom = max(float(num_tokens) if num_tokens is not None else float(n_local), 1.0)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])  # (B*L_S, d_S)
    s_rows, t_rows = teacher.student_rows.to(hidden.device), teacher.teacher_rows.to(hidden.device)
    if s_rows.numel() and bool((flat_targets[s_rows] == -100).any()):
        raise ValueError("an aligned student row is not a response target: the alignment does not fit this batch")
    zero = hidden.sum() * 0.0
    loss, ce = (zero, zero.detach()) if cfg.alpha == 1.0 else _ce(student, targets, cfg, denom, vocab_size)
    loss = loss * (1.0 - cfg.alpha)
    keys = (token_keys.reshape(-1).to(s_rows.device) if token_keys is not None else torch.arange(hidden.shape[0],
            device=hidden.device))[s_rows]  # fmt: skip
    plan, kd = None, zero.detach()
    if s_rows.numel() and cfg.alpha > 0:
        head = student.output_head()
        kd_sum, plan = _kd(hidden[s_rows], head, teacher, cfg, state, keys, progress, denom, vocab_size)
        loss = loss + (cfg.alpha / denom) * kd_sum
        kd = kd_sum.detach() / denom
    elif s_rows.numel():
        plan = _plan(teacher, cfg, state, keys, progress)  # the feature branch alone
    feat = zero
    if plan is not None and cfg.uses_features:
        budget = expected_route_share(cfg, state) * denom
        feat = _features(student, teacher, s_rows, t_rows, plan, cfg, projector, budget)
        loss = loss + feat
    elif projector is not None and torch.is_grad_enabled():
        loss = loss + 0.0 * sum(p.sum() for p in projector.parameters())  # keeps DDP's unused-parameter check happy
    metrics = _metrics(loss, ce, kd, feat, plan, n_local)
    metrics["aligned_frac"] = torch.tensor(s_rows.numel() / max(n_local, 1))
    tokens = {k: v for k, v in (plan or {}).items() if isinstance(v, Tensor)}
    return ObjectiveOutput(loss=loss, metrics=metrics, tokens=tokens)


def _features(student, teacher, s_rows, t_rows, plan, cfg, projector, budget: float) -> Tensor:
    if projector is None or not student.features:
        raise ValueError("the feature branch is on but the student features or the FeatureProjector are missing")
    route = plan["route"]
    beta = cfg.beta_f * (plan["lambda"] if cfg.feat_weight_schedule == "follow_lambda" else 1.0)
    if not bool(route.any()):
        return sum(p.sum() for p in projector.parameters()) * 0.0
    hs = [h.reshape(-1, h.shape[-1])[s_rows[route]] for h in student.features]
    per_tok = feature_loss(hs, teacher.features_at(t_rows[route]), projector, kind=cfg.feat_loss)  # (A_r,)
    return beta * per_tok.sum() / max(1.0, budget)
