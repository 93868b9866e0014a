"""Tests for egad.plan.routing against plain references written independently below."""

from __future__ import annotations

import math

import pytest
import torch

from egad.plan.routing import hashed_uniform, route_count, route_tokens, topk_mask

# ---------------------------------------------------------------------------------------------------------------------
# naive references


def ref_topk(score: list[float], k: int) -> list[bool]:
    # repeatedly take the largest remaining score, earliest index first on ties
    chosen: set[int] = set()
    for _ in range(k):
        best = None
        for i, s in enumerate(score):
            if i not in chosen and (best is None or s > score[best]):
                best = i
        chosen.add(best)
    return [i in chosen for i in range(len(score))]


# ---------------------------------------------------------------------------------------------------------------------
# route_count / topk_mask


@pytest.mark.parametrize(
    ("frac", "n", "k"),
    [(0.2, 10, 2), (0.7, 10, 7), (0.3, 10, 3), (0.2, 11, 3), (0.2, 1, 1), (1.0, 9, 9), (0.0, 9, 0), (0.5, 0, 0)],
)
def test_route_count(frac, n, k):
    assert route_count(frac, n) == k


@pytest.mark.parametrize("n", [1, 5, 10, 37])
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.2, 0.5, 0.7, 1.0])
def test_topk_mask_matches_reference(n, frac):
    g = torch.Generator().manual_seed(n)
    score = torch.randint(0, 4, (n,), generator=g).float()  # heavy ties
    mask = topk_mask(score, frac)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    k = math.ceil(round(frac * n, 9))
    assert int(mask.sum()) == k
    assert mask.tolist() == ref_topk(score.tolist(), k)


def test_topk_mask_random_tie_breaking():
    score = torch.tensor([3.0] + [1.0] * 20)
    picks = set()
    for seed in range(8):
        mask = topk_mask(score, 0.2, generator=torch.Generator().manual_seed(seed))  # k = 5
        assert int(mask.sum()) == 5 and bool(mask[0])
        again = topk_mask(score, 0.2, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(mask, again)
        picks.add(tuple(mask.nonzero().flatten().tolist()))
    assert len(picks) > 1  # different seeds break the ties differently


def test_topk_mask_validation_and_empty():
    assert topk_mask(torch.zeros(0), 0.3).shape == (0,)
    with pytest.raises(ValueError, match="frac"):
        topk_mask(torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="score"):
        topk_mask(torch.zeros(3, 1), 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# route_tokens


@pytest.mark.parametrize("n", [1, 9, 10, 100, 1001])
@pytest.mark.parametrize("rho", [0.1, 0.2, 0.3, 1.0])
def test_batch_topk_counts_exact(n, rho):
    g = torch.Generator().manual_seed(n)
    d = torch.rand(n, generator=g)
    k = math.ceil(round(rho * n, 9))
    top = route_tokens(d, mode="batch_topk", rho=rho)
    assert int(top.sum()) == k
    if 0 < k < n:  # the routed tokens are exactly the k largest d
        assert d[top].min() >= d[~top].max()


def test_default_route_is_the_run_level_quantile():
    d = torch.arange(10, dtype=torch.float32) / 10
    assert route_tokens(d).tolist() == [False] * 8 + [True] * 2  # u >= 0.8


def test_random_route_is_a_function_of_each_token_key_and_seed():
    """A token's draw follows it into any batch: the same keys in another order, or among other tokens, get the same
    routes; another seed gives others."""
    keys = torch.arange(1000, 1500) * 2**24 + 7
    a = route_tokens(torch.zeros(500), mode="random", rho=0.2, keys=keys, seed=42)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    b = route_tokens(torch.zeros(500), mode="random", rho=0.2, keys=keys[perm], seed=42)
    assert torch.equal(a[perm], b)
    half = route_tokens(torch.zeros(250), mode="random", rho=0.2, keys=keys[250:], seed=42)
    assert torch.equal(a[250:], half)
    c = route_tokens(torch.zeros(500), mode="random", rho=0.2, keys=keys, seed=43)
    assert not torch.equal(a, c)


def test_hashed_uniform_matches_a_pure_python_hash_and_is_uniform():
    def mix(x: int) -> int:
        for _ in range(2):
            x ^= x >> 16
            x = (x * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    keys = [0, 1, 2**24 + 5, 2**40 + 3, 12345678901]
    seed = 2**35 + 99
    want = []
    for k in keys:
        h = mix((k & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF))
        want.append(mix(h ^ (k >> 32) ^ (seed >> 32)) / 2**32)
    assert hashed_uniform(torch.tensor(keys), seed).tolist() == want
    u = hashed_uniform(torch.arange(20000) * 2**24, seed=3)
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert ((counts - 2000).abs() < 5 * math.sqrt(2000 * 0.9)).all()  # each decile ~ Binomial(20000, 0.1)


def test_global_quantile_threshold():
    d = torch.tensor([0.0, 0.5, 0.79, 0.8, 0.81, 1.0])
    assert route_tokens(d, mode="global_quantile", rho=0.2).tolist() == [False, False, False, True, True, True]
    assert route_tokens(d, mode="global_quantile", rho=1.0).all()


def test_abs_threshold():
    d = torch.rand(5)
    entropy = torch.tensor([0.0, 0.99, 1.0, 2.5, 11.9])
    assert route_tokens(d, mode="abs", entropy=entropy).tolist() == [False, False, True, True, True]
    assert route_tokens(d, mode="abs", entropy=entropy, h_abs=3.0).tolist() == [False] * 4 + [True]


def test_none_and_all():
    d = torch.rand(6)
    assert not route_tokens(d, mode="none").any()
    assert route_tokens(d, mode="all").all()


@pytest.mark.parametrize("mode", ["none", "all", "batch_topk", "global_quantile", "abs", "random"])
def test_empty_batch(mode):
    out = route_tokens(torch.zeros(0), mode=mode, entropy=torch.zeros(0))
    assert out.shape == (0,) and out.dtype == torch.bool


def test_route_tokens_validation():
    d = torch.rand(4)
    with pytest.raises(ValueError, match=r"mode='foo' is not one of \['none', 'all', 'global_quantile'"):
        route_tokens(d, mode="foo")
    for rho in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match="rho"):
            route_tokens(d, rho=rho)
    with pytest.raises(ValueError, match="entropy"):
        route_tokens(d, mode="abs")
    with pytest.raises(ValueError, match="entropy"):
        route_tokens(d, mode="abs", entropy=torch.rand(3))
    with pytest.raises(ValueError, match="h_abs"):
        route_tokens(d, mode="abs", entropy=torch.rand(4), h_abs=math.nan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_routes_equal_cpu():
    d = torch.rand(100, generator=torch.Generator().manual_seed(3))
    keys = torch.arange(100)
    for mode in ("batch_topk", "random"):
        cpu = route_tokens(d, mode=mode, keys=keys, seed=5)
        gpu = route_tokens(d.cuda(), mode=mode, keys=keys.cuda(), seed=5)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
