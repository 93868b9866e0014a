"""Forward KL with a hand-written backward: the same values and student gradients as
`egad.losses.divergences.forward_kl`, in a few full-vocabulary passes instead of the ~20 that autograd records
(masks, where, exp, subtract and their mirrors). The dense and fused teachers' chunks use it for KD's default
divergence; the reference tests compare it with float64 autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from egad.losses.divergences import _check_pair, _temper, forward_kl


class _ForwardKL(torch.autograd.Function):
    """KL(p || q) per row with p = softmax(z_T / tau), q = softmax(z_S / tau); terms at -inf entries dropped as in
    `forward_kl`. Gradient w.r.t. z_S: (q * S - p_kept) / tau, with S the kept teacher mass (1 without -inf)."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, tau: Tensor | float):  # type: ignore[override]
        logq = torch.log_softmax(_temper(zs, tau), dim=-1)
        logp = torch.log_softmax(_temper(zt, tau), dim=-1)
        finite = bool(torch.isfinite(logq).all()) and bool(torch.isfinite(logp).all())
        if finite:
            p = logp.exp()
            kl = (p * (logp - logq)).sum(-1)
            kept_mass = None
        else:
            keep = torch.isfinite(logq) & torch.isfinite(logp)
            p = torch.where(keep, logp.exp(), 0.0)
            kl = torch.where(keep, p * (torch.where(keep, logp, 0.0) - torch.where(keep, logq, 0.0)), 0.0).sum(-1)
            kept_mass = p.sum(-1)
        ctx.save_for_backward(logq, p)
        ctx.kept_mass = kept_mass
        ctx.tau = tau
        return kl

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        logq, p = ctx.saved_tensors
        q = logq.exp()
        if ctx.kept_mass is not None:
            q.mul_(ctx.kept_mass[:, None])
        grad = q.sub_(p)
        scale = g if not isinstance(ctx.tau, Tensor) else g / ctx.tau.to(g).reshape(-1)
        if not isinstance(ctx.tau, Tensor):
            scale = scale / float(ctx.tau)
        return grad.mul_(scale[:, None]), None, None


def forward_kl_fast(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """`forward_kl` with a hand-written backward, for a teacher and temperature that take no gradient. -> (N,)"""
    zs, zt = _check_pair(student_logits, teacher_logits)
    if zt.requires_grad or (isinstance(temperature, Tensor) and temperature.requires_grad):
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().to(device=zs.device, dtype=torch.float32)
        if temperature.dim() == 0:
            temperature = temperature.reshape(1).expand(zs.shape[0])
    return _ForwardKL.apply(zs, zt, temperature)
