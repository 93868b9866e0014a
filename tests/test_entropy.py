"""Tests for egad.plan.entropy against small, plain float64 references written independently below."""

from __future__ import annotations

import math

import pytest
import torch

from egad.losses.divergences import hellinger_from_logprobs
from egad.plan.entropy import (
    batch_mid_rank,
    fit_quantile_knots,
    normalized_entropy,
    quantile_cdf,
    token_entropy,
)

# ---------------------------------------------------------------------------------------------------------------------
# naive float64 references (python loops over lists)


def ref_entropy(row: list[float], tau: float = 1.0) -> float:
    finite = [z / tau for z in row if z != -math.inf]
    top = max(finite)
    exps = [math.exp(z - top) for z in finite]
    total = sum(exps)
    h = 0.0
    for e in exps:
        p = e / total
        if p > 0:
            h -= p * math.log(p)
    return h


def ref_quantile(values: list[float], prob: float) -> float:
    s = sorted(values)
    pos = prob * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def ref_cdf(h: float, knots: list[float]) -> float:
    k = len(knots)
    equal = [j for j in range(k) if knots[j] == h]
    if equal:
        return (min(equal) + max(equal)) / 2 / (k - 1)
    if h < knots[0]:
        return 0.0
    if h > knots[-1]:
        return 1.0
    for j in range(k - 1):
        if knots[j] < h < knots[j + 1]:
            return (j + (h - knots[j]) / (knots[j + 1] - knots[j])) / (k - 1)
    raise AssertionError("unreachable")


def ref_mid_rank(values: list[float]) -> list[float]:
    n = len(values)
    out = []
    for h in values:
        below = sum(1 for x in values if x < h)
        same = sum(1 for x in values if x == h)
        rank = below + (same + 1) / 2  # average of ranks below+1 .. below+same
        out.append((rank - 0.5) / n)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# token_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_token_entropy_matches_reference_any_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 9, generator=g) * 3).to(dtype)
    h = token_entropy(logits)
    assert h.dtype == torch.float32 and h.shape == (6,)
    ref = torch.tensor([ref_entropy(r) for r in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(h.double(), ref, atol=1e-5, rtol=1e-5)


def test_token_entropy_extremes():
    v = 50
    uniform = torch.zeros(2, v)
    torch.testing.assert_close(token_entropy(uniform), torch.full((2,), math.log(v)))
    peaked = torch.zeros(1, v)
    peaked[0, 3] = 1e4  # huge logits must not overflow
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(token_entropy(torch.randn(3, v) * 1e4)).all()


@pytest.mark.parametrize("kind", ["float", "scalar_tensor", "vector", "column"])
def test_token_entropy_temperature(kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, generator=g) * 2
    taus = [0.5, 1.0, 2.0, 3.0]
    if kind == "float":
        temp, per_row = 2.0, [2.0] * 4
    elif kind == "scalar_tensor":
        temp, per_row = torch.tensor(2.0), [2.0] * 4
    elif kind == "vector":
        temp, per_row = torch.tensor(taus), taus
    else:
        temp, per_row = torch.tensor(taus)[:, None], taus
    h = token_entropy(logits, temperature=temp)
    rows = zip(logits.double().tolist(), per_row, strict=True)
    ref = torch.tensor([ref_entropy(r, t) for r, t in rows], dtype=torch.float64)
    torch.testing.assert_close(h.double(), ref, atol=1e-5, rtol=1e-5)


def test_token_entropy_masked_vocab_value_and_grad():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 8, generator=g)
    logits[:, 5:] = -math.inf
    logits[2, :4] = -math.inf  # one row with a single finite logit: entropy 0
    logits.requires_grad_(True)
    h = token_entropy(logits)
    ref = torch.tensor([ref_entropy(r) for r in logits.detach().double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(h.double(), ref, atol=1e-6, rtol=1e-6)
    assert h[2].item() == pytest.approx(0.0, abs=1e-7)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 5:] == 0).all()


def test_token_entropy_grad_matches_float64_autograd():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    base[1, 4] = -math.inf
    weights = torch.randn(6, generator=g, dtype=torch.float64)

    z32 = base.float().requires_grad_(True)
    (token_entropy(z32) * weights.float()).sum().backward()

    # float64 reference: H = logsumexp(z) - sum softmax(z) * z, restricted to finite entries by hand
    z64 = base.clone().requires_grad_(True)
    rows = []
    for i in range(z64.shape[0]):
        zi = z64[i][torch.isfinite(base[i])]
        p = torch.softmax(zi, dim=0)
        rows.append(torch.logsumexp(zi, dim=0) - (p * zi).sum())
    (torch.stack(rows) * weights).sum().backward()
    grad64 = torch.where(torch.isfinite(base), z64.grad, torch.zeros_like(base))
    torch.testing.assert_close(z32.grad.double(), grad64, atol=1e-5, rtol=1e-4)


def test_token_entropy_grad_wrt_tensor_temperature():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64)
    tau32 = torch.tensor([0.7, 1.0, 1.9], requires_grad=True)
    token_entropy(logits, temperature=tau32).sum().backward()
    tau64 = tau32.detach().double().requires_grad_(True)
    p = torch.softmax(logits / tau64[:, None], dim=-1)
    (-(p * p.log()).sum(-1)).sum().backward()
    torch.testing.assert_close(tau32.grad.double(), tau64.grad, atol=1e-5, rtol=1e-4)


def test_token_entropy_chunking_is_invisible():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(37, 13, generator=g)
    temp = torch.rand(37, generator=g) + 0.5
    full = token_entropy(logits, temperature=temp, chunk_size=None)
    torch.testing.assert_close(token_entropy(logits, temperature=temp, chunk_size=5), full, atol=0, rtol=0)


@pytest.mark.parametrize("threads", [2, 4])
def test_a_rows_entropy_has_the_same_bits_alone_and_in_a_batch(threads):
    """The plan's thresholds read these bits, so a row must not change with the chunk it lands in, a chunk of one
    included (ATen splits a lone row's sum over the threads, in another order)."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(24, 49152, generator=g) * 3
    logits[3, 1000:] = -math.inf
    temp = torch.rand(24, generator=g) + 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = token_entropy(logits, temperature=temp, chunk_size=None)
        alone = torch.cat([token_entropy(logits[i : i + 1], temperature=temp[i : i + 1]) for i in range(24)])
        tail = token_entropy(logits, temperature=temp, chunk_size=23)  # its last chunk holds one row
        student = torch.log_softmax(logits.roll(1, 0), -1)
        teacher = torch.log_softmax(logits, -1)
        dist = hellinger_from_logprobs(student, teacher)  # AdaKD's difficulty signal
        dist_alone = torch.cat([hellinger_from_logprobs(student[i : i + 1], teacher[i : i + 1]) for i in range(24)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, batch) and torch.equal(tail, batch) and torch.equal(dist_alone, dist)
    x = logits[:1].clone().requires_grad_(True)  # the lone row's copy does not double its gradient
    token_entropy(x).sum().backward()
    y = logits[:1].double().requires_grad_(True)
    logp = torch.log_softmax(y, -1)
    (-(logp.exp() * logp).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad.float(), rtol=1e-4, atol=1e-7)


def test_token_entropy_empty_and_validation():
    assert token_entropy(torch.zeros(0, 10)).shape == (0,)
    assert token_entropy(torch.zeros(0, 10), temperature=torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.zeros(10))
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2, 3), temperature=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2, 3), temperature=torch.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(torch.zeros(2, 3), chunk_size=0)


def test_normalized_entropy():
    v = 151_665
    h = torch.tensor([0.0, 1.0, math.log(v)], dtype=torch.float64)
    out = normalized_entropy(h, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.tensor([0.0, 1 / math.log(v), 1.0], dtype=torch.float64))
    assert out[1].item() == pytest.approx(0.0838, abs=1e-4)  # the spec's "H = 1 nat is H~ = 0.084"
    with pytest.raises(ValueError, match="vocab_size"):
        normalized_entropy(h, 1)


# ---------------------------------------------------------------------------------------------------------------------
# fit_quantile_knots


@pytest.mark.parametrize("m", [1, 2, 7, 100, 1234])
@pytest.mark.parametrize("k", [2, 5, 101])
def test_fit_quantile_knots_matches_reference(m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.rand(m, generator=g).pow(3) * 5  # skewed, like entropies
    knots = fit_quantile_knots(x, k)
    assert knots.dtype == torch.float32 and knots.shape == (k,)
    values = x.double().tolist()
    ref = torch.tensor([ref_quantile(values, j / (k - 1)) for j in range(k)], dtype=torch.float64)
    torch.testing.assert_close(knots.double(), ref, atol=1e-6, rtol=1e-6)
    assert (knots[1:] >= knots[:-1]).all()
    assert knots[0] == x.min() and knots[-1] == x.max()
    torch.testing.assert_close(knots, torch.quantile(x, torch.linspace(0, 1, k)), atol=1e-6, rtol=1e-6)


def test_fit_quantile_knots_with_ties():
    x = torch.tensor([0.0] * 50 + [1.0] * 30 + [2.0] * 20)
    knots = fit_quantile_knots(x, 11)
    ref = [ref_quantile(x.tolist(), j / 10) for j in range(11)]
    torch.testing.assert_close(knots.double(), torch.tensor(ref, dtype=torch.float64))


def test_fit_quantile_knots_beyond_torch_quantile_limit():
    m = 2**24 + 1  # torch.quantile refuses more than 2**24 elements
    x = torch.arange(m, dtype=torch.float32).flip(0)  # every integer up to 2**24 is exact in fp32
    knots = fit_quantile_knots(x, 1001)
    ref = torch.linspace(0, 1, 1001, dtype=torch.float64) * (m - 1)
    torch.testing.assert_close(knots.double(), ref, atol=0, rtol=1e-7)


def test_fit_quantile_knots_validation():
    with pytest.raises(ValueError, match="M=0"):
        fit_quantile_knots(torch.zeros(0))
    with pytest.raises(ValueError, match="num_knots"):
        fit_quantile_knots(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="finite"):
        fit_quantile_knots(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="1-D"):
        fit_quantile_knots(torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# quantile_cdf


def test_quantile_cdf_matches_reference_with_tie_runs():
    knots = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 4.0])
    h = torch.tensor([-1.0, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 1e-30])
    u = quantile_cdf(h, knots)
    ref = torch.tensor([ref_cdf(v, knots.tolist()) for v in h.tolist()], dtype=torch.float64)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u.double(), ref, atol=1e-7, rtol=0)
    assert u[1].item() == pytest.approx(1 / 7)  # run of knots 0..2 -> mid-rank 1/(K-1)
    assert u[0].item() == 0.0 and u[-2].item() == 1.0


def test_quantile_cdf_random_against_reference():
    g = torch.Generator().manual_seed(7)
    knots = torch.sort(torch.randint(0, 6, (21,), generator=g).float() / 2).values  # many ties
    h = torch.cat([torch.rand(200, generator=g) * 3.5 - 0.25, knots])
    u = quantile_cdf(h, knots)
    ref = torch.tensor([ref_cdf(v, knots.tolist()) for v in h.tolist()], dtype=torch.float64)
    torch.testing.assert_close(u.double(), ref, atol=1e-6, rtol=0)


def test_quantile_cdf_roundtrip_is_uniform():
    g = torch.Generator().manual_seed(8)
    x = -torch.log1p(-torch.rand(20_000, generator=g)) / 2  # Exponential(2)
    knots = fit_quantile_knots(x, 1001)
    u = quantile_cdf(x, knots)
    assert ((u >= 0) & (u <= 1)).all()
    ranks = batch_mid_rank(x)
    assert (u - ranks).abs().max().item() < 2e-3


def test_quantile_cdf_single_value_and_empty():
    knots = fit_quantile_knots(torch.full((10,), 0.3), 5)
    assert quantile_cdf(torch.tensor([0.3]), knots).item() == pytest.approx(0.5)
    assert quantile_cdf(torch.zeros(0), knots).shape == (0,)
    with pytest.raises(ValueError, match="nondecreasing"):
        quantile_cdf(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="K >= 2"):
        quantile_cdf(torch.zeros(2), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------------------------
# batch_mid_rank


def test_batch_mid_rank_matches_reference():
    g = torch.Generator().manual_seed(9)
    h = torch.randint(0, 5, (40,), generator=g).float() * 0.1
    u = batch_mid_rank(h)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u.double(), torch.tensor(ref_mid_rank(h.tolist()), dtype=torch.float64))
    assert u.mean().item() == pytest.approx(0.5, abs=1e-7)


def test_batch_mid_rank_small_cases():
    torch.testing.assert_close(batch_mid_rank(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([5 / 6, 1 / 6, 0.5]))
    torch.testing.assert_close(batch_mid_rank(torch.zeros(4)), torch.full((4,), 0.5))
    assert batch_mid_rank(torch.zeros(0)).shape == (0,)
