"""The hand-written forward KL against float64 autograd on the definition, and against `forward_kl`: odd shapes,
per-token and scalar temperatures, -inf entries on either side, values and student gradients; each on the eager
passes and on the compiled kernels (the `kernel_mode` fixture)."""

from __future__ import annotations

import math

import pytest
import torch

from egad.losses.divergences import forward_kl
from egad.losses.fused_kl import forward_kl_fast


def _ref(zs: torch.Tensor, zt: torch.Tensor, tau) -> torch.Tensor:
    """sum_v p (log p - log q) in float64, terms dropped where p or q is 0 (the library's masked-entry rule)."""
    t = tau.double()[:, None] if isinstance(tau, torch.Tensor) and tau.dim() == 1 else float(tau)
    logq = torch.log_softmax(zs.double() / t, -1)
    logp = torch.log_softmax(zt.double() / t, -1)
    keep = torch.isfinite(logq) & torch.isfinite(logp)
    la, lb = torch.where(keep, logp, 0.0), torch.where(keep, logq, 0.0)
    return torch.where(keep, la.exp() * (la - lb), 0.0).sum(-1)


@pytest.mark.parametrize("shape", [(1, 2), (7, 13), (33, 257)])
@pytest.mark.parametrize("tau_kind", ["float", "tensor", "0d"])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_forward_kl_equals_float64_reference(shape, tau_kind, masked, kernel_mode):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    n, v = shape
    zs = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    zt = torch.randn(n, v, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    if masked and v > 2:
        zt[0, 1:] = -math.inf  # a one-hot teacher row
        zt[-1, 0] = -math.inf
        with torch.no_grad():
            zs[-1, -1] = -math.inf  # a student entry at -inf where the teacher has mass: dropped
    tau = {"float": 1.7, "tensor": torch.rand(n, generator=g) + 0.5, "0d": torch.tensor(1.3)}[tau_kind]
    got = forward_kl_fast(zs, zt, temperature=tau)
    want = _ref(zs, zt, tau)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    w = torch.randn(n, generator=g)  # an arbitrary upstream gradient per row
    (g_got,) = torch.autograd.grad((got * w).sum(), zs)
    zs64 = zs.detach().double().requires_grad_()
    (g_want,) = torch.autograd.grad((_ref(zs64, zt, tau) * w.double()).sum(), zs64)
    g_want = torch.nan_to_num(g_want, nan=0.0)  # d/dz at a -inf logit: 0
    torch.testing.assert_close(g_got.double(), g_want, atol=1e-6, rtol=1e-5)
    # And the autograd implementation the library keeps for the other divergences agrees.
    torch.testing.assert_close(got, forward_kl(zs, zt, temperature=tau), atol=1e-6, rtol=1e-6)


def test_the_shared_cross_entropy_equals_the_separate_one_dense(kernel_mode):
    """Forward KL and CE from one student log-softmax (tau 1): the same values and student gradient as the two apart,
    for any upstream weights of each."""
    from egad.losses.fused_kl import forward_kl_and_ce_fast

    g = torch.Generator().manual_seed(4)
    zs = (torch.randn(11, 29, generator=g) * 2).requires_grad_()
    zt = torch.randn(11, 29, generator=g) * 3
    zt[2, 5:] = -math.inf
    y = torch.randint(0, 29, (11,), generator=g)
    a, b = torch.rand(11, generator=g), torch.rand(11, generator=g)
    kl, ce = forward_kl_and_ce_fast(zs, zt, y)
    (g_got,) = torch.autograd.grad((a * kl + b * ce).sum(), zs)
    ce_ref = torch.nn.functional.cross_entropy(zs, y, reduction="none")
    kl_ref = _ref(zs, zt, 1.0)
    torch.testing.assert_close(kl.double(), kl_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce, ce_ref, atol=1e-6, rtol=1e-6)
    (g_want,) = torch.autograd.grad((a * forward_kl(zs, zt) + b * ce_ref).sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)


def test_the_shared_cross_entropy_equals_the_separate_one_cached():
    """The sampled cached forward KL reads the CE from its atoms: the target may be a top-k id, a sampled id or
    neither; values and gradients equal the sampled KL plus F.cross_entropy."""
    from egad.losses.sparse import forward_kl, forward_kl_and_ce
    from egad.losses.sparse_tail import TailSample

    g = torch.Generator().manual_seed(6)
    n, v, k, s = 9, 41, 5, 7
    zs = (torch.randn(n, v, generator=g) * 2).requires_grad_()
    logp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    top = logp.topk(k, -1)
    rest = logp.scatter(-1, top.indices, -math.inf)
    tail = torch.logsumexp(rest, -1)
    sampled = torch.multinomial((rest / 2).softmax(-1), s, replacement=True, generator=g)
    sample = TailSample(sampled, logp.gather(-1, sampled), torch.logsumexp(rest / 2, -1), 0.5)
    y = torch.randint(0, v, (n,), generator=g)
    y[0], y[1] = top.indices[0, 2], sampled[1, 3]
    a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
    kl, ce = forward_kl_and_ce(zs, top.indices, top.values, tail, sample, y)
    kl_ref = forward_kl(zs, top.indices, top.values, tail, sample=sample)
    ce_ref = torch.nn.functional.cross_entropy(zs, y, reduction="none")
    torch.testing.assert_close(kl, kl_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ce, ce_ref, atol=1e-6, rtol=1e-6)
    (g_got,) = torch.autograd.grad((a * kl + b * ce).sum(), zs)
    (g_want,) = torch.autograd.grad((a * kl_ref + b * ce_ref).sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)
