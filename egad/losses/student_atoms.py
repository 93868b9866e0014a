"""The student side of the sampled losses: exact student log-probs at a few ids ("atoms"), and the cross-entropy.

`egad.losses.sparse` compares the teacher with the student at the cached top-k ids and the sampled tail ids
(`egad.losses.sparse_tail` is the teacher side). The student's log-probs there are exact: log softmax(z / tau) over
the whole vocabulary, gathered at the ids, which may repeat. The objective's cross-entropy -log softmax(z)(y) at
tau = 1 is one more atom: at tau = 1 the targets join the ids and share their normaliser; at another temperature it
needs a normaliser of its own, computed in the same call (`student_atom_logprobs_and_ce`).

The (N, V) work is a hand-written autograd function, `_StudentAtoms`, in place on one scratch tensor, the only
(N, V) tensor it allocates (the gradient is written over it):

* forward: m = max z (a read; m / tau is exactly the maximum of z / tau, since dividing by tau > 0 keeps the order,
  rounding included); the shifted, tempered logits z / tau - m / tau in the scratch, exp in place, a sum. No entry
  is masked, so repeated ids need no finding, and exp meets no -inf that a mask would put there (on the CPU, exp of
  -inf, or of anything below about -87, takes a slow path many times the cost of the fast one). With a
  cross-entropy at another temperature, its normaliser sum exp(z - m) is taken first, in the same scratch;
* backward: d/dz = (scatter_add(g at the ids) - softmax(z / tau) sum_j g_j) / tau, written over the scratch, plus
  (softmax(z) - onehot(y)) g_ce for the cross-entropy, its softmax recomputed a block of rows at a time.

A temperature that itself needs a gradient takes plain autograd (`log_softmax(z / tau).gather`), the slow twin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from egad.losses import kernels
from egad.losses.divergences import _tau_column, _temper

__all__ = ["student_atom_logprobs", "student_atom_logprobs_and_ce"]


def student_atom_logprobs(student_logits: Tensor, ids: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Exact student log-probs log softmax(z_S / tau) at `ids`, which may repeat. (N, V), (N, J) -> (N, J) fp32"""
    z = student_logits.float()
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        return torch.log_softmax(_temper(z, temperature), dim=-1).gather(-1, ids)
    return _StudentAtoms.apply(z, ids, temperature, None)[0]


def student_atom_logprobs_and_ce(
    student_logits: Tensor, ids: Tensor, targets: Tensor, *, temperature: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """`student_atom_logprobs` at `temperature` (N, J), and the cross-entropy -log softmax(z_S)(targets) at tau = 1
    (N,), from one call: at a float temperature of 1 the targets are atoms like the others (one normaliser); at any
    other the call also takes the normaliser at tau = 1, in the same scratch (no second (N, V) tensor, max pass or
    gradient buffer)."""
    z = student_logits.float()
    y = targets.reshape(-1, 1).to(device=ids.device, dtype=ids.dtype)  # (N, 1)
    if not isinstance(temperature, Tensor) and float(temperature) == 1.0:
        logq = _StudentAtoms.apply(z, torch.cat([ids, y], dim=-1), 1.0, None)[0]
        return logq[:, :-1], -logq[:, -1]
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        ce = -torch.log_softmax(z, dim=-1).gather(-1, y).squeeze(-1)
        return student_atom_logprobs(z, ids, temperature=temperature), ce
    return _StudentAtoms.apply(z, ids, temperature, y)


def _shifted(z: Tensor, temperature: float | Tensor, m: Tensor, out: Tensor | None = None) -> Tensor:
    """z / tau - m, one pass at tau = 1 (z / 1 is z), in `out` when given, else in a new tensor; z / tau rounded as
    `_temper` rounds it. (N, V), (N, 1) -> (N, V)"""
    if not isinstance(temperature, Tensor) and float(temperature) == 1.0:
        return torch.sub(z, m, out=out) if out is not None else z - m
    if out is None:
        return _temper(z, temperature).sub_(m)
    if isinstance(temperature, Tensor):
        tau = temperature.to(device=z.device, dtype=torch.float32)
        torch.div(z, tau.reshape(-1, 1) if tau.dim() else tau, out=out)
    else:
        torch.div(z, float(temperature), out=out)
    return out.sub_(m)


def _block_rows(vocab: int) -> int:
    """Rows of a (rows, V) fp32 temporary of about 4 MiB: far smaller than a chunk's (N, V), few Python steps."""
    return max(1, (1 << 20) // max(vocab, 1))


class _StudentAtoms(torch.autograd.Function):
    """(log softmax(z / tau) at ids (N, J), -log softmax(z) at targets (N,) or an empty tensor); see the module
    docstring. `targets` (N, 1) is given only with a temperature other than the float 1. A row that is -inf
    everywhere gives NaN, as log_softmax does."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, temperature: float | Tensor, targets: Tensor | None):  # type: ignore[override]
        zd = z.detach()
        if kernels.active(zd):
            return _fused_forward(ctx, zd, ids, temperature, targets)
        ctx.fused = False
        m = zd.amax(-1, keepdim=True)  # (N, 1)
        mt = _temper(m, temperature) if isinstance(temperature, Tensor) or float(temperature) != 1.0 else m
        mt = torch.where(mt == -math.inf, 0.0, mt)  # a row of -inf: exp gives 0, log 0 = -inf
        top = _temper(zd.gather(-1, ids), temperature)  # (N, J): (z / tau) at the ids, as rounded in the scratch
        ce, scratch, extra = zd.new_zeros(0), None, []
        if targets is not None:
            m1 = torch.where(m == -math.inf, 0.0, m)
            scratch = zd - m1  # (N, V)
            total1 = scratch.exp_().sum(-1, keepdim=True)  # the normaliser at tau = 1
            ce = (total1.log() + m1 - zd.gather(-1, targets)).squeeze(-1)
            extra = [z, m1, total1, targets]
        e = _shifted(zd, temperature, mt, out=scratch).exp_()  # (N, V): the scratch
        total = e.sum(-1, keepdim=True)  # (N, 1)
        logq = top - (total.log() + mt)
        tau = temperature.to(device=z.device, dtype=torch.float32) if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(e, total, ids, *extra, *(() if tau is None else (tau,)))
        ctx.tau = float(temperature) if tau is None else None
        ctx.has_ce = targets is not None
        if targets is None:
            ctx.mark_non_differentiable(ce)
        return logq, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor, g_ce: Tensor):  # type: ignore[override]
        if ctx.fused:
            return _fused_backward(ctx, g, g_ce)
        saved = list(ctx.saved_tensors)
        e, total, ids = saved[:3]
        tau = saved[-1] if ctx.tau is None else None
        t = ctx.tau if tau is None else (tau[:, None] if tau.dim() else tau)
        gz = e.mul_(-g.sum(-1, keepdim=True) / (total * t))  # the scratch is not read again
        gz.scatter_add_(-1, ids, g / t)
        if ctx.has_ce:
            z, m1, total1, targets = saved[3:7]
            coef = g_ce[:, None] / total1  # (N, 1): softmax(z) g_ce = exp(z - m1) g_ce / total1
            step = _block_rows(z.shape[-1])
            tmp = z.new_empty(min(step, z.shape[0]), z.shape[-1])
            for r0 in range(0, z.shape[0], step):
                rows = slice(r0, r0 + step)
                w = tmp[: gz[rows].shape[0]]
                torch.sub(z[rows].detach(), m1[rows], out=w)
                gz[rows].addcmul_(w.exp_(), coef[rows])
            gz.scatter_add_(-1, targets, -g_ce[:, None])
        return gz, None, None, None


def _fused_forward(ctx, z: Tensor, ids: Tensor, temperature: float | Tensor, targets: Tensor | None):
    """`_StudentAtoms.forward` through `egad.losses.kernels`: the normalisers from one fused kernel, no (N, V)
    tensor written or saved (the backward recomputes the exponentials from z)."""
    tau = _tau_column(temperature, z)
    m, total, total1 = kernels.normalisers(z, tau, with_ce=targets is not None)
    logq = (z.gather(-1, ids) - m) / tau - total.log()
    ce = (total1.log() + m - z.gather(-1, targets)).squeeze(-1) if targets is not None else z.new_zeros(0)
    ctx.save_for_backward(z, ids, m, tau, total, *(() if targets is None else (total1, targets)))
    ctx.fused = True
    ctx.kernels = kernels.current()  # the backward may run in another thread
    ctx.has_ce = targets is not None
    if targets is None:
        ctx.mark_non_differentiable(ce)
    return logq, ce


def _fused_backward(ctx, g: Tensor, g_ce: Tensor):
    """d/dz = (scatter_add(g at the ids) - softmax(z / tau) sum_j g_j) / tau, plus (softmax(z) - onehot(y)) g_ce,
    the dense part from one fused kernel."""
    z, ids, m, tau, total = ctx.saved_tensors[:5]
    a = -g.sum(-1, keepdim=True) / (total * tau)
    b = None
    if ctx.has_ce:
        total1, targets = ctx.saved_tensors[5:7]
        b = g_ce[:, None] / total1
    gz = kernels.dense_grad(z, m, tau, a, b, mode=ctx.kernels)
    gz.scatter_add_(-1, ids, g / tau)
    if ctx.has_ce:
        gz.scatter_add_(-1, targets, -g_ce[:, None])
    return gz, None, None, None
