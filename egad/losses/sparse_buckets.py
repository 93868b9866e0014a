"""The two sides' bucket log-probs of the sparse losses (egad.losses.sparse): the teacher's cached top-k plus one tail
pseudo-token, and the student's exact log-probs over (the cached ids, everything else), the latter with a hand-written
backward that does its (N, V) work in place on one scratch tensor."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from egad.losses.divergences import _NEG, _temper


def teacher_bucket_logprobs(logprobs: Tensor, tail: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Teacher log-probs over (top-k ids, tail) at ``temperature``, tail as one pseudo-token. (N, k), (N,) -> (N, k+1).

    softmax((log p_ids, log m) / tau): exact at tau = 1 or k = V, an approximation otherwise (module docstring, 1).
    The softmax also renormalises away the rounding of a low-precision cache.
    """
    if logprobs.dim() != 2 or tail.shape != (logprobs.shape[0],):
        raise ValueError(f"expected logprobs (N, k) and tail (N,); got {tuple(logprobs.shape)}, {tuple(tail.shape)}")
    buckets = torch.cat([logprobs.float(), tail.float()[:, None]], dim=-1)
    return torch.log_softmax(_temper(buckets, temperature), dim=-1)


def student_bucket_logprobs(student_logits: Tensor, ids: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Exact student log-probs over (ids, everything else) at ``temperature``. (N, V), (N, k) -> (N, k+1).

    The last column is log(1 - sum_ids q), computed as a logsumexp over the non-cached entries (no cancellation when
    that mass is ~0); -inf when no entry is left, with a zero gradient there. The (N, V) part runs in
    `_StudentBuckets` (a hand-written backward, a few in-place passes over one scratch tensor); a temperature that
    itself needs a gradient takes the plain autograd path, `_student_buckets_autograd`.
    """
    return torch.log_softmax(_student_bucket_logits(student_logits, ids, temperature), dim=-1)


def _student_bucket_logits(student_logits: Tensor, ids: Tensor, temperature: float | Tensor) -> Tensor:
    """(z_ids / tau, logsumexp of the other entries / tau), unnormalised. (N, V), (N, J) -> (N, J+1)"""
    z = student_logits.float()
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        return _student_buckets_autograd(z, ids, temperature)
    return _StudentBuckets.apply(z, ids, temperature)


def _student_buckets_autograd(z: Tensor, ids: Tensor, temperature: float | Tensor) -> Tensor:
    """The bucket logits (z_ids / tau, logsumexp of the rest / tau), (N, k+1), in plain differentiable ops."""
    z = _temper(z, temperature)  # (N, V)
    top = z.gather(-1, ids)  # (N, k)
    # A finite floor instead of -inf keeps logsumexp's backward finite when every remaining entry is masked
    # (its gradient is exp(x - lse), NaN at -inf - -inf); rows left at the floor are then set to an exact -inf.
    rest_lse = torch.logsumexp(z.clamp_min(_NEG).scatter_(-1, ids, _NEG), dim=-1)  # (N,)
    tail = torch.where(rest_lse > _NEG / 2, rest_lse, -math.inf)
    return torch.cat([top, tail[:, None]], dim=-1)


class _StudentBuckets(torch.autograd.Function):
    """`_student_buckets_autograd` with its (N, V) work done in place on one scratch tensor.

    Forward: u = z / tau, the cached entries gathered and then set to -inf, and the rest's logsumexp as max + log sum
    exp(u - max), leaving e = exp(u - max) (0 at the cached ids) in the scratch. Backward: the tail's gradient reaches
    the rest as g_tail * softmax over the rest / tau = e * (g_tail / (sum e * tau)), written over e in place, and the
    cached ids get g_top / tau. Rows whose tail is -inf (nothing left, or only entries at the -inf floor) pass no
    tail gradient, as in the autograd version."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, temperature: float | Tensor) -> Tensor:  # type: ignore[override]
        u = _temper(z.detach(), temperature)  # (N, V), a new tensor: the scratch
        top = u.gather(-1, ids)  # (N, k)
        u.scatter_(-1, ids, -math.inf)
        m = u.amax(-1, keepdim=True)  # (N, 1)
        m = torch.where(m == -math.inf, 0.0, m)  # an all -inf row: exp(-inf) = 0, log 0 = -inf below
        e = u.sub_(m).exp_()  # (N, V)
        total = e.sum(-1)  # (N,)
        rest_lse = total.log() + m.squeeze(-1)
        keep = rest_lse > _NEG / 2
        tail = torch.where(keep, rest_lse, -math.inf)
        tau = temperature.to(device=z.device, dtype=torch.float32) if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(e, total, keep, ids, *(() if tau is None else (tau,)))
        ctx.tau = float(temperature) if tau is None else None
        return torch.cat([top, tail[:, None]], dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        e, total, keep, ids, *tau = ctx.saved_tensors
        t = ctx.tau if not tau else (tau[0][:, None] if tau[0].dim() else tau[0])
        g_top, g_tail = g[:, :-1], g[:, -1]
        coef = torch.where(keep, g_tail / total, 0.0)[:, None] / t  # (N, 1)
        gz = e.mul_(coef)  # the scratch is not read again: a second backward fails the version check
        gz.scatter_add_(-1, ids, g_top / t)
        return gz, None, None
