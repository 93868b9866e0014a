from __future__ import annotations

import pytest
import torch

from egad.losses.features import (
    FeatureProjector,
    cosine_feature_loss,
    feature_loss,
    last_layer_map,
    mse_ln_feature_loss,
    uniform_layer_map,
)


def test_uniform_map_matches_spec_examples():
    assert uniform_layer_map(24, 28, 4) == [(6, 7), (12, 14), (18, 21), (24, 28)]
    assert uniform_layer_map(28, 28, 4) == [(7, 7), (14, 14), (21, 21), (28, 28)]
    assert uniform_layer_map(4, 12, 4) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert last_layer_map(24, 28) == [(24, 28)]
    with pytest.raises(ValueError, match="feat_layers"):
        uniform_layer_map(2, 4, 4)


def test_projector_shapes_and_no_bias():
    p = FeatureProjector(5, 7, 3)
    assert len(p.proj) == 3 and all(lin.bias is None and lin.weight.shape == (7, 5) for lin in p.proj)


def _ref_cos(a, b):
    a, b = a.double(), b.double()
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _ref_mse_ln(a, b):
    def ln(x):
        x = x.double()
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5)

    return ((ln(a) - ln(b)) ** 2).sum(-1) / a.shape[-1]


@pytest.mark.parametrize("fn,ref", [(cosine_feature_loss, _ref_cos), (mse_ln_feature_loss, _ref_mse_ln)])
def test_feature_losses_against_float64(fn, ref):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(141, 37, generator=g, requires_grad=True)
    b = torch.randn(141, 37, generator=g)
    a64 = a.detach().double().requires_grad_()
    got, want = fn(a, b), ref(a64, b)
    assert got.dtype == torch.float32 and got.shape == (141,)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    up = torch.randn(141, generator=g)
    (ga,) = torch.autograd.grad((got * up).sum(), a)
    (gw,) = torch.autograd.grad((want * up.double()).sum(), a64)
    torch.testing.assert_close(ga.double(), gw, atol=1e-5, rtol=1e-4)
    assert fn(b, b).abs().max() < 1e-5


def test_feature_loss_averages_layers_and_detaches_teacher():
    g = torch.Generator().manual_seed(1)
    p = FeatureProjector(6, 10, 2)
    hs = [torch.randn(9, 6, generator=g) for _ in range(2)]
    ht = [torch.randn(9, 10, generator=g, requires_grad=True) for _ in range(2)]
    out = feature_loss(hs, ht, p, kind="cosine")
    want = sum(cosine_feature_loss(p.proj[k](hs[k]), ht[k]) for k in range(2)) / 2
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert all(h.grad is None for h in ht)
    with pytest.raises(ValueError, match="layer map"):
        feature_loss(hs[:1], ht, p)
