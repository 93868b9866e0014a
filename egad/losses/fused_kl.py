"""Forward KL with a hand-written backward: the same values and student gradients as
`egad.losses.divergences.forward_kl`, in a few full-vocabulary passes instead of the ~20 that autograd records
(masks, where, exp, subtract and their mirrors). The dense and fused teachers' chunks use it for KD's default
divergence; the reference tests compare it with float64 autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from egad.losses import kernels
from egad.losses.divergences import _check_pair, _checked_tau, _tau_column, _tempered, forward_kl


class _ForwardKL(torch.autograd.Function):
    """KL(p || q) per row with p = softmax(z_T / tau), q = softmax(z_S / tau); terms at -inf entries dropped as in
    `forward_kl`. Gradient w.r.t. z_S: (q * S - p_kept) / tau, with S the kept teacher mass (1 without -inf).

    Five (C, V) buffers at most (the two inputs, log q then q, log p then p, one difference), reused in place: the
    masked-entry handling runs only on the rows whose sum comes out non-finite."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, tau: Tensor | float, targets: Tensor | None):  # type: ignore[override]
        ctx.fused = kernels.active(zs)
        if ctx.fused:
            return _fused_forward(ctx, zs, zt, tau, targets)
        logq = torch.log_softmax(_tempered(zs, tau), dim=-1)
        # The cross-entropy at tau = 1 from the same normaliser: -log q(y) (the caller passes targets only at tau 1).
        ce = None if targets is None else -logq.gather(-1, targets[:, None]).squeeze(-1)
        logp = torch.log_softmax(_tempered(zt, tau), dim=-1)
        terms = logp - logq
        p = logp.exp_()
        kl = terms.mul_(p).sum(-1)
        q = logq.exp_()
        bad = ~torch.isfinite(kl)
        kept_mass = None
        if bool(bad.any()):
            # Rows with -inf entries: a term is dropped where p or q is 0 (0 * -inf and p * log(p / 0) give non-finite
            # terms exactly there), and the gradient's teacher side keeps only entries where q > 0.
            rows = bad.nonzero().squeeze(1)
            t = terms[rows]
            kl[rows] = torch.where(torch.isfinite(t), t, 0.0).sum(-1)
            p[rows] = torch.where(q[rows] > 0, p[rows], 0.0)
            kept_mass = torch.ones_like(kl)
            kept_mass[rows] = p[rows].sum(-1)
        del terms
        ctx.save_for_backward(q, p, *(() if targets is None else (targets,)))
        ctx.kept_mass = kept_mass
        ctx.tau = tau
        if ce is None:
            return kl, kl.new_zeros(())
        return kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor, g_ce: Tensor):  # type: ignore[override]
        if ctx.fused:
            return _fused_backward(ctx, g, g_ce)
        q, p, *targets = ctx.saved_tensors
        scale = g / ctx.tau.to(g).reshape(-1) if isinstance(ctx.tau, Tensor) else g / float(ctx.tau)
        # KL: (q S - p) scale; CE (tau = 1): (q - onehot(y)) g_ce. In place on the saved buffers, not read again.
        q_coef = scale if ctx.kept_mass is None else scale * ctx.kept_mass
        if targets:
            q_coef = q_coef + g_ce
        grad = q.mul_(q_coef[:, None]).sub_(p.mul_(scale[:, None]))
        if targets:
            grad.scatter_add_(-1, targets[0][:, None], -g_ce[:, None])
        return grad, None, None, None


def _fused_forward(ctx, zs: Tensor, zt: Tensor, tau: Tensor | float, targets: Tensor | None):
    """`_ForwardKL.forward` through `egad.losses.kernels`: the row statistics from one fused kernel; the inputs are
    saved instead of q and p, and the backward recomputes both from them."""
    tau_col = _tau_column(tau, zs)
    ms, total_s, mt, total_t, kl, kept = kernels.kl_forward(zs, zt, tau_col)
    ctx.save_for_backward(zs, zt, tau_col, ms, total_s, mt, total_t, kept, *(() if targets is None else (targets,)))
    ctx.kernels = kernels.current()  # the backward may run in another thread
    kl = kl.squeeze(-1)
    if targets is None:
        return kl, kl.new_zeros(())
    # At tau = 1 (the only temperature that comes with targets) ms and total_s are the CE's own normaliser.
    return kl, (total_s.log() + ms - zs.gather(-1, targets[:, None])).squeeze(-1)


def _fused_backward(ctx, g: Tensor, g_ce: Tensor):
    """(q S - p_kept) g / tau, plus (q - onehot(y)) g_ce with targets: the dense part from one fused kernel."""
    zs, zt, tau, ms, total_s, mt, total_t, kept, *targets = ctx.saved_tensors
    scale = g[:, None] / tau
    cq = scale * kept + (g_ce[:, None] if targets else 0.0)
    grad = kernels.kl_grad(zs, zt, tau, ms, total_s, mt, total_t, cq, scale, mode=ctx.kernels)
    if targets:
        grad.scatter_add_(-1, targets[0][:, None], -g_ce[:, None])
    return grad, None, None, None


def forward_kl_fast(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """`forward_kl` with a hand-written backward, for a teacher and temperature that take no gradient. -> (N,)"""
    zs, zt = _check_pair(student_logits, teacher_logits)
    if zt.requires_grad or (isinstance(temperature, Tensor) and temperature.requires_grad):
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    tau = _checked_tau(temperature, zs.shape[0], zs.device)
    if isinstance(tau, Tensor):
        tau = tau.detach().reshape(-1).expand(zs.shape[0])  # a 0-d temperature as a per-row one
    return _ForwardKL.apply(zs, zt, tau, None)[0]


def forward_kl_and_ce_fast(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`forward_kl` at tau = 1 and the cross-entropy -log q(targets), both (N,), from one student log-softmax."""
    zs, zt = _check_pair(student_logits, teacher_logits)
    if zt.requires_grad:
        raise ValueError("forward_kl_and_ce_fast takes a teacher without gradient")
    return _ForwardKL.apply(zs, zt, 1.0, targets.long())
