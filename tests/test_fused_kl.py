"""The hand-written forward KL against float64 autograd on the definition, and against `forward_kl`: odd shapes,
per-token and scalar temperatures, -inf entries on either side, values and student gradients."""

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
def test_fast_forward_kl_equals_float64_reference(shape, tau_kind, masked):
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
