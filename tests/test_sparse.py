"""Tests for egad.losses.sparse (divergences against a cached top-k teacher) and egad.teacher.signal.TopKSignal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from egad.losses import sparse, sparse_buckets
from egad.losses.divergences import DIVERGENCES
from egad.losses.sparse import SPARSE_DIVERGENCES
from egad.losses.sparse_buckets import student_bucket_logprobs, teacher_bucket_logprobs
from egad.teacher.signal import DenseSignal, TopKSignal

NAMES = sorted(DIVERGENCES)
TEMPERATURES = ["1.0", "2.0", "per-token"]
# Sparse (k = V) vs dense, both fp32: the only difference is one extra log_softmax of already normalised log-probs,
# so errors are rounding-level. Observed <= ~2e-5 absolute on wttm values of magnitude ~30 and <= ~3e-6 on gradients.
ATOL = 1e-5
RTOL = 1e-4
# fp32 implementation vs float64 bucket reference (same order of error as tests/test_divergences.py).
REF_ATOL = 1e-5
REF_RTOL = 1e-4
# Divergence of identical bucket distributions: 0 up to fp32 rounding of log_softmax (values are O(1)).
ZERO_ATOL = 2e-6
NONNEG_ATOL = 1e-6
LOWP_ATOL = 1e-6

HYPER_CASES = [
    ("jsd", {"beta": 0.2}),
    ("skew_forward_kl", {"lam": 0.3}),
    ("skew_reverse_kl", {"lam": 0.3}),
    ("akl", {"mu": 0.2}),
    ("todi", {"beta": 3.0}),
    ("ttm", {"gamma": 0.25}),
    ("wttm", {"gamma": 0.8}),
    ("bild", {"top_k": 2}),
    ("bild", {"top_k": 5}),
]


# ----------------------------------------------------------------------------------------------------------- helpers
def _logits(n: int, v: int, seed: int, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale  # student, teacher (N, V)


def _temperature(kind: str, n: int, seed: int) -> float | Tensor:
    if kind == "per-token":
        return 1.0 + 2.0 * torch.rand(n, generator=torch.Generator().manual_seed(seed))  # (N,) in [1, 3]
    return float(kind)


def _signal(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What a cache writer stores: top-k ids and log-probs at tau = 1 (descending), log of the remaining mass."""
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)
    top, ids = logp.topk(k, dim=-1)  # (N, k), sorted descending
    if k == teacher_logits.shape[-1]:
        tail = torch.full(top.shape[:1], -math.inf, dtype=torch.float64)
    else:
        tail = torch.log1p(-top.exp().sum(-1))
    return ids, top.float(), tail.float()


def _call(name: str, s: Tensor, sig: tuple[Tensor, Tensor, Tensor], **kwargs) -> Tensor:
    return SPARSE_DIVERGENCES[name](s, *sig, **kwargs)


def _ref_buckets(probs: Tensor, ids: Tensor) -> Tensor:
    """float64 (N, k+1) bucket probabilities (probs at ids, 1 - their sum) of a probability matrix."""
    top = probs.gather(-1, ids)
    return torch.cat([top, 1.0 - top.sum(-1, keepdim=True)], dim=-1)


def _ref_kl(a: Tensor, b: Tensor) -> Tensor:
    return (a * (a / b).log()).sum(-1)


# --------------------------------------------------------------------------------------------- k = V equals dense
def _compare_with_dense(name: str, s: Tensor, t: Tensor, temperature: float | Tensor, **kwargs) -> None:
    upstream = torch.randn(s.shape[0], generator=torch.Generator().manual_seed(5))
    sig = _signal(t, t.shape[-1])
    s_sparse, s_dense = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = _call(name, s_sparse, sig, temperature=temperature, **kwargs)
    expected = DIVERGENCES[name](s_dense, t, temperature=temperature, **kwargs)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (s.shape[0],)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", [(141, 123), (5, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_full_topk_equals_dense(name: str, shape: tuple[int, int], temperature: str) -> None:
    n, v = shape
    s, t = _logits(n, v, seed=n + v)
    _compare_with_dense(name, s, t, _temperature(temperature, n, seed=3))


@pytest.mark.parametrize(("name", "kwargs"), HYPER_CASES, ids=[f"{n}-{kw}" for n, kw in HYPER_CASES])
def test_full_topk_hyperparameters_equal_dense(name: str, kwargs: dict) -> None:
    s, t = _logits(141, 123, seed=11)
    _compare_with_dense(name, s, t, _temperature("per-token", 141, seed=12), **kwargs)


# --------------------------------------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_student_buckets_match_float64_reference(temperature: str) -> None:
    n, v, k = 141, 123, 17
    s, t = _logits(n, v, seed=13)
    ids = _signal(t, k)[0]
    tau = _temperature(temperature, n, seed=14)
    upstream = torch.randn(n, k + 1, generator=torch.Generator().manual_seed(15))

    s32 = s.clone().requires_grad_()
    out = student_bucket_logprobs(s32, ids, temperature=tau)
    (out * upstream).sum().backward()
    s64 = s.double().requires_grad_()
    tau64 = tau.double()[:, None] if isinstance(tau, Tensor) else tau
    expected = _ref_buckets(torch.softmax(s64 / tau64, -1), ids).log()
    (expected * upstream.double()).sum().backward()

    assert out.shape == (n, k + 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected.detach(), atol=REF_ATOL, rtol=REF_RTOL)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=REF_ATOL, rtol=REF_RTOL)


def _ref_bucket_logits(s: Tensor, ids: Tensor, tau: float | Tensor) -> Tensor:
    """float64 (N, k+1) bucket logits (s_ids / tau, logsumexp over the rest / tau) by a plain masked logsumexp."""
    u = s.double() / (tau.double()[:, None] if isinstance(tau, Tensor) and tau.dim() else tau)
    in_top = torch.zeros(u.shape, dtype=torch.bool).scatter_(-1, ids, True)
    return torch.cat([u.gather(-1, ids), torch.logsumexp(u.masked_fill(in_top, -math.inf), -1, keepdim=True)], -1)


@pytest.mark.parametrize("temperature", ["1.0", "1.7", "0-d", "per-token"])
@pytest.mark.parametrize(("n", "v", "k"), [(37, 131, 13), (3, 5, 1), (9, 11, 10), (1, 64, 7)])
def test_student_bucket_fast_path_matches_float64_reference(n: int, v: int, k: int, temperature: str) -> None:
    # The in-place forward / hand-written backward of _StudentBuckets against float64 autograd, on odd shapes.
    s, t = _logits(n, v, seed=n * v + k, scale=4.0)
    ids = _signal(t, k)[0]
    tau = torch.tensor(1.3) if temperature == "0-d" else _temperature(temperature, n, seed=k)
    upstream = torch.randn(n, k + 1, generator=torch.Generator().manual_seed(k))
    s32 = s.clone().requires_grad_()
    out = sparse_buckets._StudentBuckets.apply(s32, ids, tau)
    (out * upstream).sum().backward()
    s64 = s.double().requires_grad_()
    expected = _ref_bucket_logits(s64, ids, tau)
    (expected * upstream.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (n, k + 1)
    torch.testing.assert_close(out.double(), expected.detach(), atol=REF_ATOL, rtol=REF_RTOL)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=REF_ATOL, rtol=REF_RTOL)


@pytest.mark.parametrize("temperature", ["1.0", "per-token"])
def test_student_bucket_fast_path_masked_entries_match_autograd_path(temperature: str) -> None:
    # -inf entries, rows whose rest is all -inf or at the finite floor, a k = V row: the fast path gives the values
    # and gradients of the plain-autograd version (finite everywhere, no tail gradient where the tail is -inf).
    n, v, k = 23, 41, 6
    s, t = _logits(n, v, seed=31)
    ids = _signal(t, k)[0]
    in_top = torch.zeros(n, v, dtype=torch.bool).scatter_(-1, ids, True)
    s[torch.rand(n, v, generator=torch.Generator().manual_seed(32)) < 0.3] = -math.inf
    s[0] = s[0].masked_fill(~in_top[0], -math.inf)  # nothing left in the tail
    s[1] = s[1].masked_fill(~in_top[1], torch.finfo(torch.float32).min)  # only the floor left
    s[2, ids[2, 0]] = -math.inf  # a cached id at -inf
    tau = _temperature(temperature, n, seed=33)
    upstream = torch.randn(n, k + 1, generator=torch.Generator().manual_seed(34))
    fast, slow = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = sparse_buckets._StudentBuckets.apply(fast, ids, tau)
    expected = sparse_buckets._student_buckets_autograd(slow, ids, tau)
    (out.masked_fill(out == -math.inf, 0) * upstream).sum().backward()
    (expected.masked_fill(expected == -math.inf, 0) * upstream).sum().backward()
    assert out[0, -1] == -math.inf and (out[1, -1] == -math.inf) == (temperature == "1.0")
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(fast.grad).all()
    rows = torch.arange(n) != 1
    torch.testing.assert_close(fast.grad[rows], slow.grad[rows], atol=1e-6, rtol=1e-6)
    # Row 1 at tau > 1: the tail is finite (the floor / tau) and its gradient is spread evenly over the v - k equal
    # entries. (The autograd path rounds floor + log(v - k) back to the floor there and gives each entry all of it.)
    want = 0.0 if temperature == "1.0" else upstream[1, -1] / tau[1] / (v - k)
    torch.testing.assert_close(fast.grad[1][~in_top[1]], torch.full((v - k,), float(want)), atol=1e-6, rtol=1e-6)
    # The full k = V case: every row's tail is -inf and passes nothing.
    full = s.clone().requires_grad_()
    all_ids = torch.arange(v).expand(n, v)
    out = student_bucket_logprobs(full, all_ids, temperature=tau)
    assert (out[:, -1] == -math.inf).all()


def test_student_bucket_fast_path_edges() -> None:
    s, t = _logits(12, 30, seed=41)
    ids = _signal(t, 5)[0]
    # bf16 logits: fp32 out, a bf16 gradient equal to the fp32 path's on the same (upcast) values.
    s_low = s.bfloat16().requires_grad_()
    s_ref = s.bfloat16().float().requires_grad_()
    student_bucket_logprobs(s_low, ids, temperature=1.5).sum().backward()
    student_bucket_logprobs(s_ref, ids, temperature=1.5).sum().backward()
    assert s_low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_low.grad, s_ref.grad.bfloat16(), atol=0, rtol=0)
    # A temperature that needs a gradient takes the autograd path and gets one.
    tau = (1.0 + torch.rand(12, generator=torch.Generator().manual_seed(42))).requires_grad_()
    student_bucket_logprobs(s, ids, temperature=tau).sum().backward()
    assert tau.grad is not None and torch.isfinite(tau.grad).all()
    # The scratch buffer is handed out once: a second backward through the same graph is refused, not wrong.
    x = s.clone().requires_grad_()
    out = student_bucket_logprobs(x, ids, temperature=2.0)
    out[:, -1].sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out[:, -1].sum().backward()


def test_teacher_buckets_treat_tail_as_one_pseudo_token() -> None:
    n, v, k = 64, 97, 9
    _, t = _logits(n, v, seed=17)
    _, lp, tail = _signal(t, k)
    tau = _temperature("per-token", n, seed=18)
    p = torch.softmax(t.double(), -1)
    bucket = _ref_buckets(p, _signal(t, k)[0])  # tau = 1 buckets (p_ids, m)
    powered = bucket ** (1.0 / tau.double()[:, None])
    expected = powered / powered.sum(-1, keepdim=True)
    out = teacher_bucket_logprobs(lp, tail, temperature=tau)
    torch.testing.assert_close(out.exp().double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(teacher_bucket_logprobs(lp, tail).exp().double(), bucket, atol=1e-6, rtol=1e-5)
    # Documented direction of the approximation: for tau > 1 the tempered tail is underestimated, since
    # m^(1/tau) <= sum_tail p_v^(1/tau).
    exact_tail = _ref_buckets(torch.softmax(t.double() / tau.double()[:, None], -1), _signal(t, k)[0])[:, -1]
    assert (out[:, -1].exp().double() < exact_tail).all()


def test_forward_kl_matches_float64_bucket_reference() -> None:
    n, v, k = 141, 123, 20
    s, t = _logits(n, v, seed=19)
    sig = _signal(t, k)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(20))
    s32 = s.clone().requires_grad_()
    out = sparse.forward_kl(s32, *sig)
    (out * upstream).sum().backward()
    s64 = s.double().requires_grad_()
    expected = _ref_kl(
        _ref_buckets(torch.softmax(t.double(), -1), sig[0]), _ref_buckets(torch.softmax(s64, -1), sig[0])
    )
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=REF_ATOL, rtol=REF_RTOL)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=REF_ATOL, rtol=REF_RTOL)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_f_divergences_lower_bound_dense_at_tau_one(name: str) -> None:
    # Data processing: merging the tail into one outcome cannot increase an f-divergence.
    s, t = _logits(141, 123, seed=21)
    out = _call(name, s, _signal(t, 10))
    dense = DIVERGENCES[name](s, t)
    assert (out <= dense + NONNEG_ATOL).all()
    assert (out < dense - 1e-3).any()  # and the truncation is visible


# ----------------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_for_truncated_signal(name: str) -> None:
    for seed, scale in [(31, 1.0), (32, 4.0), (33, 8.0)]:
        s, t = _logits(200, 64, seed=seed, scale=scale)
        sig = _signal(t, 12)
        for temperature in (1.0, 0.5, _temperature("per-token", 200, seed=seed)):
            out = _call(name, s, sig, temperature=temperature)
            assert torch.isfinite(out).all()
            assert out.min().item() >= -NONNEG_ATOL, (seed, temperature)


def _ttm_minimiser(t: Tensor, ids: Tensor, gamma: float) -> Tensor:
    """Student logits whose (untempered) buckets equal the TTM target over the buckets at tau = 1.

    The target is proportional to (p_ids^gamma, m^gamma): the tail pseudo-token is powered as a whole, so the dense
    minimiser gamma * z_T does not reach 0 for k < V. Give the cached ids gamma * log p and spread m^gamma over the
    tail in proportion to p.
    """
    logp = torch.log_softmax(t.double(), -1)
    in_top = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    log_m = torch.logsumexp(logp.masked_fill(in_top, -math.inf), -1, keepdim=True)
    return torch.where(in_top, gamma * logp, gamma * log_m + logp - log_m).float()


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero(name: str) -> None:
    _, t = _logits(64, 97, seed=41)
    sig = _signal(t, 13)
    s = _ttm_minimiser(t, sig[0], 0.5) if name in ("ttm", "wttm") else t.clone()
    s.requires_grad_()
    out = _call(name, s, sig)
    out.sum().backward()
    # WTTM scales the KL by sum_v p_v^gamma <= (k+1)^(1 - gamma), and its rounding error with it.
    atol = ZERO_ATOL * (14**0.5 if name == "wttm" else 1.0)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=atol, rtol=0)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_ttm_student_is_not_tempered(name: str) -> None:
    s, t = _logits(16, 50, seed=43)
    sig = _signal(t, 50)
    untempered = _call(name, s, sig, temperature=2.0)
    expected = DIVERGENCES[name](s, t, temperature=2.0)  # k = V: exact, and the dense student is untempered
    torch.testing.assert_close(untempered, expected, atol=ATOL, rtol=RTOL)


def test_bild_student_led_half_is_exact_when_student_top_k_is_cached() -> None:
    n, v, k = 141, 123, 16
    s, t = _logits(n, v, seed=45)
    sig = _signal(t, k)
    # Lift the cached ids so that the student's top 8 over the full vocabulary lie among them.
    s = s.scatter_add(-1, sig[0], torch.full((n, k), 20.0))
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    out, expected = sparse.bild(s1, *sig), DIVERGENCES["bild"](s2, t)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(s1.grad, s2.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_give_fp32_output(name: str) -> None:
    s, t = _logits(50, 123, seed=51)
    ids, lp, tail = _signal(t, 20)
    s_low = s.bfloat16().requires_grad_()
    lp_low, tail_low = lp.bfloat16(), tail.bfloat16()
    out = _call(name, s_low, (ids, lp_low, tail_low), temperature=2.0)
    expected = _call(name, s_low.detach().float(), (ids, lp_low.float(), tail_low.float()), temperature=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=LOWP_ATOL, rtol=0)
    out.sum().backward()
    assert s_low.grad.dtype == torch.bfloat16 and torch.isfinite(s_low.grad.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_student_tail_mass_near_zero_stays_finite(name: str) -> None:
    n, v, k = 40, 70, 10
    s, t = _logits(n, v, seed=53)
    sig = _signal(t, k)
    in_top = torch.zeros(n, v, dtype=torch.bool).scatter_(-1, sig[0], True)
    # Tail mass e^-1e4 (underflows in fp32, while its log is exact) and exactly 0 (every other entry -inf).
    for fill in (-1e4, -math.inf):
        s_fill = s.masked_fill(~in_top, fill).requires_grad_()
        out = _call(name, s_fill, sig, temperature=1.5)
        out.sum().backward()
        assert torch.isfinite(out).all(), fill
        assert torch.isfinite(s_fill.grad).all(), fill
        if fill == -math.inf:  # an empty student tail is an exact -inf bucket and passes no gradient
            assert (student_bucket_logprobs(s_fill, sig[0])[:, -1] == -math.inf).all()
            assert (s_fill.grad[~in_top] == 0).all()


def test_student_tail_log_mass_is_exact_when_tiny() -> None:
    # 1 - sum q(ids) would round to 0 here; the logsumexp keeps log(tail) = -1e4 - log(sum over ids) + log(V - k).
    s = torch.zeros(3, 8)
    s[:, 4:] = -1e4
    ids = torch.arange(4).expand(3, 4)
    logq = student_bucket_logprobs(s, ids)
    torch.testing.assert_close(logq[:, -1], torch.full((3,), -1e4), atol=0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str) -> None:
    s = torch.zeros(0, 16, requires_grad=True)
    sig = (torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8), torch.zeros(0))
    out = _call(name, s, sig, temperature=torch.ones(0))
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert s.grad is not None and s.grad.shape == (0, 16)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_raise(name: str) -> None:
    kw = {"top_k": 2} if name == "bild" else {}
    ids, lp, tail = torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match="shape|expected"):
        _call(name, torch.zeros(3, 5), (ids, lp[:, :3], tail), **kw)
    with pytest.raises(ValueError, match="expected"):
        _call(name, torch.zeros(3, 5), (ids, lp, torch.zeros(2)), **kw)
    with pytest.raises(ValueError, match="expected"):
        _call(name, torch.zeros(5), (ids, lp, tail), **kw)
    with pytest.raises(ValueError, match="k must be"):
        _call(name, torch.zeros(3, 3), (ids, lp, tail), **kw)
    with pytest.raises(ValueError, match="temperature"):
        _call(name, torch.zeros(3, 5), (ids, lp, tail), temperature=torch.ones(4), **kw)


def test_bild_top_k_cannot_exceed_cached_k() -> None:
    s, t = _logits(4, 30, seed=55)
    with pytest.raises(ValueError, match="top_k"):
        sparse.bild(s, *_signal(t, 6), top_k=8)


def test_registry() -> None:
    assert set(SPARSE_DIVERGENCES) == set(DIVERGENCES)
    assert all(fn.__name__ == name for name, fn in SPARSE_DIVERGENCES.items())


# ------------------------------------------------------------------------------------------------------ TopKSignal
def test_topk_signal_flat_access() -> None:
    b, l, v, k = 2, 5, 40, 6
    g = torch.Generator().manual_seed(57)
    logits = torch.randn(b, l, v, generator=g)
    ids, lp, tail = _signal(logits.reshape(-1, v), k)
    lp_all = torch.log_softmax(logits.reshape(-1, v), -1)
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    feats = [torch.randn(b, l, 3, generator=g)]
    signal = TopKSignal(
        ids=ids.reshape(b, l, k).int(),
        logprobs=lp.reshape(b, l, k).bfloat16(),
        tail_logmass=tail.reshape(b, l),
        entropy=entropy.reshape(b, l),
        features=feats,
        vocab_rows=v,
    )
    flat = torch.tensor([7, 0, 3])
    got_ids, got_lp, got_tail = signal.rows_topk(flat)
    assert got_ids.dtype == torch.long and got_lp.dtype == torch.float32 and got_tail.dtype == torch.float32
    assert torch.equal(got_ids, ids[flat])
    torch.testing.assert_close(got_lp, lp[flat].bfloat16().float(), atol=0, rtol=0)
    torch.testing.assert_close(got_tail, tail[flat], atol=0, rtol=0)
    torch.testing.assert_close(signal.entropy_at(flat), entropy[flat], atol=0, rtol=0)
    dense = DenseSignal(logits=logits, features=feats)
    torch.testing.assert_close(signal.features_at(flat)[0], dense.features_at(flat)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="hidden states"):
        TopKSignal(ids=ids, logprobs=lp, tail_logmass=tail, entropy=entropy).features_at(flat)


def test_entropy_matched_tail_is_exact_for_a_uniform_tail():
    from egad.losses.sparse import entropy_matched_tail, teacher_bucket_logprobs

    g = torch.Generator().manual_seed(3)
    n, v, k = 9, 301, 17
    z = torch.zeros(n, v, dtype=torch.float64)
    z[:, :k] = torch.randn(n, k, generator=g, dtype=torch.float64) * 2 + 4  # a distinct head, then a flat tail
    logp = z.log_softmax(-1)
    lp, ids = logp.sort(-1, descending=True)
    lp, ids = lp[:, :k], ids[:, :k]
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
    h = -(logp.exp() * logp).sum(-1)  # float64: fp32 inputs add ~1e-7 H / m to log n_eff (see the docstring)
    for tau in (1.0, 1.5, 2.0, 3.0):
        exact = (z / tau).log_softmax(-1)  # the true tempered teacher
        want = torch.cat(
            [exact.gather(-1, ids), torch.logsumexp(exact.scatter(-1, ids, float("-inf")), -1)[:, None]], -1
        )
        got = teacher_bucket_logprobs(lp, entropy_matched_tail(lp, tail, h, 1.0 / tau, vocab_size=v), temperature=tau)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)  # fp32 bucket softmax of values ~10
        if tau > 1:  # the single pseudo-token would be far off
            naive = teacher_bucket_logprobs(lp, tail, temperature=tau)
            assert (naive[:, -1] - want[:, -1]).abs().max() > 0.5
