"""The cross-vocabulary losses of `egad.losses.cross_vocab`, chunked over tokens: each chunk projects the student's and
the teacher's hidden states through their own heads, so neither vocabulary's full (N x V) logits are ever alive; one
teacher projection per chunk, and the student's gradients (hidden states, head) accumulated in place.
`chunked_cross_vocab_topk_loss` is the same engine against a cached teacher (`egad.losses.cross_vocab_topk`): its
chunk is a slice of the cached rows instead of a projection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from egad.losses.cross_vocab import CROSS_VOCAB_LOSSES, VocabMap
from egad.losses.cross_vocab_topk import CROSS_VOCAB_TOPK_LOSSES, TopKRows
from egad.models.heads import OutputHead


@dataclass
class _Run:
    fn: Callable[..., Tensor]
    hyper: dict
    vmap: VocabMap | None
    s_head: OutputHead  # weight/bias detached; the autograd inputs are passed to the Function separately
    t_head: OutputHead | None
    t_hidden: Tensor | TopKRows  # (N, d_T) hidden states to project, or the cached teacher's rows
    v_s: int
    v_t: int
    temperature: float | Tensor
    step: int
    weights: Tensor | None  # (N,) the caller's reduction weights, or None
    grads: tuple[bool, bool, bool]  # hidden, weight, bias need a gradient
    plan: Callable[[Tensor, slice], tuple[Tensor, Tensor]] | None = None  # see chunked_cross_vocab_loss

    def chunk(self, hs: Tensor, sl: slice, coef: Tensor | None):
        """Per-token values of rows `sl`, and with `coef` (N,) the gradient of sum(coef[sl] * values) w.r.t. the
        linear part of the student head's output. -> (C,), (C, V_S) or None"""
        with torch.no_grad():
            if isinstance(self.t_hidden, TopKRows):
                zt = self.t_hidden.rows(sl)
            else:  # (C, V_T) fp32: the chunk's one teacher projection, in the head's dtype (no fp32 copy of the weight)
                zt = self.t_head.logits(self.t_hidden[sl].to(self.t_head.weight.dtype), self.v_t).float()
            if self.plan is not None:  # first sweep: the caller's plan fills the chunk's temperatures and weights
                tau_c, w_c = self.plan(zt, sl)
                self.temperature[sl], self.weights[sl] = tau_c, w_c  # type: ignore[index]
        tau = self.temperature
        tau = tau[sl] if isinstance(tau, Tensor) and tau.dim() else tau
        coef = None if coef is None else coef[sl]
        with torch.enable_grad():
            x = hs[sl].detach().to(self.s_head.weight.dtype)
            leaf = self.s_head.linear(x, self.v_s).float().detach().requires_grad_(coef is not None)  # (C, V_S)
            values = self.fn(self.s_head.finish(leaf, self.v_s), zt, self.vmap, temperature=tau, **self.hyper)
            if coef is None:
                return values.detach(), None
            (g,) = torch.autograd.grad((values * coef).sum(), [leaf])  # (C, V_S)
        return values.detach(), g

    def accumulate(self, hs: Tensor, sl: slice, g: Tensor, bufs: list[Tensor | None]) -> None:
        gh, gw, gb = bufs
        head, w = self.s_head, self.s_head.weight[: self.v_s]
        if gh is not None:
            gh[sl] += (g.to(w.dtype) @ w).float() * head.hidden_scale
        if gw is not None:
            x = hs[sl].detach().float() * head.hidden_scale
            gw[: self.v_s].addmm_(g.t(), x)
        if gb is not None:
            gb[: self.v_s] += g.sum(0)

    def buffers(self, hs: Tensor, w: Tensor, b: Tensor | None) -> list[Tensor | None]:
        like = (hs, w, b)
        return [torch.zeros(t.shape, device=t.device, dtype=torch.float32) if need else None
                for t, need in zip(like, self.grads, strict=True)]  # fmt: skip

    def sweep(self, hs: Tensor, w: Tensor, b: Tensor | None, coef: Tensor | None):
        """Every chunk: values (N,), and with `coef` the gradient buffers of sum(coef * values)."""
        n = hs.shape[0]
        out = torch.empty(n, device=hs.device, dtype=torch.float32)
        bufs = self.buffers(hs, w, b) if coef is not None else [None, None, None]
        for start in range(0, n, self.step):
            sl = slice(start, start + self.step)
            values, g = self.chunk(hs, sl, coef)
            out[sl] = values
            if g is not None:
                self.accumulate(hs, sl, g, bufs)
        return out, bufs


def _scale_of(g: Tensor, w: Tensor) -> float | None:
    """c with g == c * w (to fp32 rounding), or None."""
    g, w = g.detach().double(), w.detach().double()
    ww = float((w * w).sum())
    if ww == 0.0:
        return 0.0 if not bool(g.any()) else None
    c = float((g * w).sum()) / ww
    tol = 1e-6 * max(float(g.abs().max()), 1e-30)
    return c if float((g - c * w).abs().max()) <= tol else None


class _ChunkedCrossVocab(torch.autograd.Function):
    """Per-token values (N,); the student gradient from the chunks, computed in forward when the caller's reduction
    weights are known (`token_weights`) and the upstream gradient turns out proportional to them, else by
    re-projecting every chunk in backward."""

    @staticmethod
    def forward(ctx, hs: Tensor, w: Tensor, b: Tensor | None, run: _Run):  # type: ignore[override]
        need = any(run.grads) and run.weights is not None
        out, bufs = run.sweep(hs, w, b, run.weights if need else None)
        run.plan = None  # planned once: a backward sweep reads the filled temperatures and weights
        ctx.run, ctx.pre = run, (bufs if need else None)
        ctx.save_for_backward(hs, w, *(() if b is None else (b,)))
        ctx.dtypes = (hs.dtype, w.dtype, None if b is None else b.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        run = ctx.run
        hs, w, *b = ctx.saved_tensors
        b = b[0] if b else None
        scale = _scale_of(g_out, run.weights) if ctx.pre is not None else None
        if scale is not None:
            bufs = [None if t is None else t.mul_(scale) for t in ctx.pre]
        else:
            bufs = run.sweep(hs, w, b, g_out.float())[1]
        ctx.pre = None
        grads = [None if t is None else t.to(dt) for t, dt in zip(bufs, ctx.dtypes, strict=True)]
        return (*grads, None)


def _as_head(head: OutputHead | Tensor) -> OutputHead:
    return head if isinstance(head, OutputHead) else OutputHead(head)


def chunked_cross_vocab_loss(
    student_hidden: Tensor,
    student_head: OutputHead | Tensor,
    teacher_hidden: Tensor,
    teacher_head: OutputHead | Tensor,
    vmap: VocabMap | None,
    *,
    loss: str = "exact",
    temperature: float | Tensor = 1.0,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    chunk_size: int | None = None,
    token_weights: Tensor | None = None,
    plan: Callable[[Tensor, slice], tuple[Tensor, Tensor]] | None = None,
    **hyper: float | str,
) -> Tensor:
    """Per-token `CROSS_VOCAB_LOSSES[loss]` from the final hidden states of aligned rows and the heads. -> (N,) fp32

    student_hidden (N, d_S) and teacher_hidden (N, d_T): row i of each is one aligned pair (gather them with
    `egad.xtok.Alignment.logit_positions`). Heads: an `egad.models.heads.OutputHead` or a bare (V_rows, d) weight. Real
    vocabularies: the map's, else `student_vocab` / `teacher_vocab`, else the heads' rows. `chunk_size`: rows per
    chunk (default 2^24 / max(V_T, V_S), at least 16, as `ObjectiveConfig.chunk_tokens`). Gradients reach the
    student's hidden states, head weight and bias; the teacher gets none.

    `token_weights` (N,), without gradient: the weights the caller reduces with, as (values * token_weights).sum()
    times any constant (the objective's w_t tau_t^2 / N). The student gradient is then computed in the forward pass,
    one teacher projection per chunk. Without them (or when the upstream gradient is not proportional to them) the
    backward re-projects every chunk: exact, at twice the head GEMMs.

    `plan(teacher_logits, rows) -> (temperature, token_weights)`, for a caller whose temperatures and weights depend
    on the teacher (egad's per-token plan reads its entropy): called once per chunk under no_grad with the chunk's
    teacher logits (C, V_T) fp32 and its row slice, before the chunk's loss, so that the plan and the loss share the
    chunk's one teacher projection; it returns (C,) each, and `temperature` / `token_weights` are then ignored. Read
    the filled values back from the caller's side (the plan sees every row once, in order).
    """
    if loss not in CROSS_VOCAB_LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {sorted(CROSS_VOCAB_LOSSES)}")
    if loss != "uld" and vmap is None:
        raise ValueError(f"loss={loss!r} needs the vocabulary map (egad.xtok.build_vocab_map)")
    s_head, t_head = _as_head(student_head), _as_head(teacher_head)
    n = student_hidden.shape[0]
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n:
        raise ValueError(
            f"expected student_hidden (N, d_S) and teacher_hidden (N, d_T); got {tuple(student_hidden.shape)} and "
            f"{tuple(teacher_hidden.shape)}"
        )
    v_s = vmap.student_vocab if vmap is not None else (student_vocab or s_head.rows)
    v_t = vmap.teacher_vocab if vmap is not None else (teacher_vocab or t_head.rows)
    if v_s > s_head.rows or v_t > t_head.rows:
        raise ValueError(
            f"vocabularies ({v_s} student, {v_t} teacher) exceed the head rows ({s_head.rows}, {t_head.rows})"
        )
    _check_weights(temperature, token_weights, n)
    tau = temperature.detach().float() if isinstance(temperature, Tensor) else temperature
    if plan is not None:  # filled chunk by chunk by the plan
        device = student_hidden.device
        tau = torch.ones(n, device=device, dtype=torch.float32)
        token_weights = torch.zeros(n, device=device, dtype=torch.float32)
    fn = CROSS_VOCAB_LOSSES[loss]
    step = chunk_size or max(16, 2**24 // max(v_s, v_t))
    return _launch(student_hidden, s_head, fn, hyper, vmap, t_head, teacher_hidden.detach(), v_s, v_t, tau, step,
                   token_weights, plan)  # fmt: skip


def _launch(hs, s_head, fn, hyper, vmap, t_head, t_rows, v_s, v_t, tau, step, token_weights, plan=None) -> Tensor:
    w, b = s_head.weight, s_head.bias
    trains = [t is not None and t.requires_grad for t in (hs, w, b)]
    grads = tuple(torch.is_grad_enabled() and x for x in trains)
    frozen = OutputHead(w.detach(), None if b is None else b.detach(), s_head.hidden_scale, s_head.logit_scale,
                        s_head.softcap)  # fmt: skip
    run = _Run(
        fn=fn,
        hyper=dict(hyper),
        vmap=vmap,
        s_head=frozen,
        t_head=t_head,
        t_hidden=t_rows,
        v_s=v_s,
        v_t=v_t,
        temperature=tau,
        step=step,
        weights=None if token_weights is None else token_weights.detach().float(),
        grads=grads,  # type: ignore[arg-type]
        plan=plan,
    )
    if not any(grads):
        with torch.no_grad():
            return run.sweep(hs, w, b, None)[0]
    return _ChunkedCrossVocab.apply(hs, w, b, run)


def chunked_cross_vocab_topk_loss(
    student_hidden: Tensor,
    student_head: OutputHead | Tensor,
    teacher: TopKRows,
    vmap: VocabMap | None,
    *,
    loss: str = "exact",
    temperature: float | Tensor = 1.0,
    student_vocab: int | None = None,
    chunk_size: int | None = None,
    token_weights: Tensor | None = None,
    **hyper: float | str,
) -> Tensor:
    """Per-token `CROSS_VOCAB_TOPK_LOSSES[loss]` from the student's final hidden states of N aligned rows (N, d_S), its
    head, and the cached teacher at the same rows (`TopKRows`, N rows). -> (N,) fp32. Arguments as
    `chunked_cross_vocab_loss`; the temperature and weights come from the caller (the cache already holds the
    entropy a plan reads, so there is no `plan` hook)."""
    if loss not in CROSS_VOCAB_TOPK_LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {sorted(CROSS_VOCAB_TOPK_LOSSES)}")
    if loss != "uld" and vmap is None:
        raise ValueError(f"loss={loss!r} needs the vocabulary map (egad.xtok.build_vocab_map)")
    s_head = _as_head(student_head)
    n = student_hidden.shape[0]
    if student_hidden.dim() != 2 or teacher.ids.shape[0] != n:
        raise ValueError(
            f"expected student_hidden (N, d_S) and the teacher's N rows; got {tuple(student_hidden.shape)} and "
            f"{teacher.ids.shape[0]} rows"
        )
    v_s = vmap.student_vocab if vmap is not None else (student_vocab or s_head.rows)
    if v_s > s_head.rows:
        raise ValueError(f"the student vocabulary ({v_s}) exceeds its head's {s_head.rows} rows")
    _check_weights(temperature, token_weights, n)
    tau = temperature.detach().float() if isinstance(temperature, Tensor) else temperature
    step = chunk_size or max(16, 2**24 // max(v_s, teacher.k))
    fn = CROSS_VOCAB_TOPK_LOSSES[loss]
    return _launch(student_hidden, s_head, fn, hyper, vmap, None, teacher, v_s, teacher.vocab_size, tau, step,
                   token_weights)  # fmt: skip


def _check_weights(temperature: float | Tensor, token_weights: Tensor | None, n: int) -> None:
    if isinstance(temperature, Tensor) and temperature.dim() and temperature.shape != (n,):
        raise ValueError(f"temperature must be a float or an ({n},) tensor, got {tuple(temperature.shape)}")
    if token_weights is not None and token_weights.shape != (n,):
        raise ValueError(f"token_weights must have shape ({n},), got {tuple(token_weights.shape)}")
