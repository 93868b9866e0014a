"""Tests for egad.losses.divergences: fp32 implementation vs naive float64 references, plus invariants."""

from __future__ import annotations

import math

import pytest
import torch

from egad.losses.divergences import (
    DIVERGENCES,
    NO_TAU2,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)

try:
    import reference
except ImportError:  # tests/ imported as a package (e.g. once tests/__init__.py exists)
    from tests import reference

NAMES = sorted(DIVERGENCES)
# fp32 implementation vs float64 reference, values and gradients. Observed errors are <= ~3e-5 absolute on values of
# magnitude up to ~70 (wttm) and <= ~5e-6 on gradients, so these leave about an order of magnitude of headroom.
ATOL = 1e-5
RTOL = 1e-4
# A divergence of identical distributions is 0 up to fp32 rounding of log_softmax (values are O(1)).
ZERO_ATOL = 1e-6
# Lower bound on any divergence of unmasked inputs (fp32 rounding of a sum of non-negative terms).
NONNEG_ATOL = 1e-6
# bf16 / fp16 inputs are upcast at once, so the result must equal the fp32 computation on the rounded values; the
# small slack only allows a different kernel path, not a precision loss.
LOWP_ATOL = 1e-6
# JSD(beta) / beta - KL(p || q) = O(beta * chi2(p || q)); for unit-variance logits chi2 ~ e^2 - 1 and beta = 1e-4, so
# the relative error is ~1e-3 (measured 1.5e-3). 1e-2 is loose but still fails if the beta convention is swapped (O(1)).
LIMIT_RTOL = 1e-2

SHAPES = [(3 * 47, 123), (7, 1031)]
TEMPERATURES = ["1.0", "2.0", "per-token"]

# Non-default hyper-parameters, compared against the reference as well.
HYPER_CASES = [
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"lam": 0.3}),
    ("skew_reverse_kl", {"lam": 0.3}),
    ("akl", {"mu": 0.2}),
    ("akl", {"mu": 0.8}),
    ("todi", {"beta": 0.5}),
    ("todi", {"beta": 3.0}),
    ("ttm", {"gamma": 0.25}),
    ("wttm", {"gamma": 0.8}),
    ("bild", {"top_k": 2}),
    ("bild", {"top_k": 5}),
]


def _logits(n: int, v: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale  # student, teacher (N, V)


def _temperature(kind: str, n: int, seed: int) -> float | torch.Tensor:
    if kind == "per-token":
        return 1.0 + 2.0 * torch.rand(n, generator=torch.Generator().manual_seed(seed))  # (N,) in [1, 3]
    return float(kind)


def _compare_with_reference(name: str, s: torch.Tensor, t: torch.Tensor, seed: int, **kwargs) -> None:
    upstream = torch.randn(s.shape[0], generator=torch.Generator().manual_seed(seed + 1))  # (N,)

    s32, t32 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = DIVERGENCES[name](s32, t32, **kwargs)
    (out * upstream).sum().backward()

    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    expected = reference.REF_DIVERGENCES[name](s64, t64, **kwargs)
    (expected * upstream.double()).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (s.shape[0],)
    torch.testing.assert_close(out.double(), expected.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(t32.grad.double(), t64.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name: str, shape: tuple[int, int], temperature: str) -> None:
    n, v = shape
    s, t = _logits(n, v, seed=n + v)
    _compare_with_reference(name, s, t, seed=7, temperature=_temperature(temperature, n, seed=3))


@pytest.mark.parametrize(("name", "kwargs"), HYPER_CASES, ids=[f"{n}-{kw}" for n, kw in HYPER_CASES])
def test_hyperparameters_match_float64_reference(name: str, kwargs: dict) -> None:
    s, t = _logits(141, 123, seed=11)
    _compare_with_reference(name, s, t, seed=13, temperature=_temperature("per-token", 141, seed=5), **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero(name: str) -> None:
    _, t = _logits(64, 97, seed=21)
    tau = _temperature("per-token", 64, seed=22)
    # TTM never tempers the student, so its minimiser is the transformed teacher: z_S = gamma * z_T / tau.
    s = 0.5 * t / tau[:, None] if name in ("ttm", "wttm") else t.clone()
    s.requires_grad_()
    out = DIVERGENCES[name](s, t, temperature=tau)
    out.sum().backward()
    # WTTM scales the KL by sum_v p_v^gamma <= V^(1 - gamma), and its rounding error with it.
    atol = ZERO_ATOL * (97**0.5 if name == "wttm" else 1.0)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=atol, rtol=0)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_ttm_student_is_not_tempered(name: str) -> None:
    # With equal logits the (tempered) teacher differs from the untempered student, so the divergence is positive.
    _, t = _logits(16, 50, seed=23)
    assert (DIVERGENCES[name](t, t, temperature=2.0) > 1e-3).all()


@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_on_random_inputs(name: str) -> None:
    for seed, scale in [(31, 1.0), (32, 4.0), (33, 8.0)]:
        s, t = _logits(200, 64, seed=seed, scale=scale)
        for temperature in (1.0, 0.5, _temperature("per-token", 200, seed=seed)):
            out = DIVERGENCES[name](s, t, temperature=temperature)
            assert torch.isfinite(out).all()
            assert out.min().item() >= -NONNEG_ATOL, (seed, temperature)


def test_jsd_beta_limits_are_forward_and_reverse_kl() -> None:
    # beta weights the TEACHER: small beta -> forward KL(p || q), beta near 1 -> reverse KL(q || p).
    s, t = _logits(141, 123, seed=41, scale=1.0)
    beta = 1e-4
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    torch.testing.assert_close(jsd(s, t, beta=beta) / beta, fkl, atol=0, rtol=LIMIT_RTOL)
    torch.testing.assert_close(jsd(s, t, beta=1 - beta) / beta, rkl, atol=0, rtol=LIMIT_RTOL)
    # Guard against the limits holding trivially: the two directions differ by more than the tolerance.
    assert ((fkl - rkl).abs() > 3 * LIMIT_RTOL * fkl).any()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_is_exactly_zero_at_beta_endpoints(beta: float) -> None:
    s, t = _logits(33, 77, seed=43)
    t[:, 5:9] = -math.inf  # masked teacher entries make a log-mixture component -inf at these endpoints
    s.requires_grad_()
    out = jsd(s, t, beta=beta, temperature=1.5)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize(("skew", "plain"), [(skew_forward_kl, forward_kl), (skew_reverse_kl, reverse_kl)])
def test_skew_kl_at_lambda_zero_is_plain_kl(skew, plain) -> None:
    s, t = _logits(141, 123, seed=47)
    t[:, 60:70] = -math.inf  # masked teacher entries: the skewed mixture must reduce to p exactly there too
    tau = _temperature("per-token", 141, seed=48)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a, b = skew(s1, t, lam=0.0, temperature=tau), plain(s2, t, temperature=tau)
    (a.sum()).backward()
    (b.sum()).backward()
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-7, rtol=1e-7)
    # and a non-zero lambda really changes the value
    assert (skew(s, t, lam=0.5, temperature=tau) < b - 1e-3).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_give_fp32_output(name: str, dtype: torch.dtype) -> None:
    s, t = _logits(50, 123, seed=51)
    s_low, t_low = s.to(dtype).requires_grad_(), t.to(dtype)
    out = DIVERGENCES[name](s_low, t_low, temperature=2.0)
    expected = DIVERGENCES[name](s_low.detach().float(), t_low.float(), temperature=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=LOWP_ATOL, rtol=0)
    out.sum().backward()
    assert s_low.grad.dtype == dtype and torch.isfinite(s_low.grad.float()).all()


# BiLD is excluded: with -inf among the selected top-k teacher logits its pair differences are inf - inf (documented).
MASKABLE = [n for n in NAMES if n != "bild"]


@pytest.mark.parametrize("name", MASKABLE)
def test_masked_teacher_entries_stay_finite(name: str) -> None:
    n, v = 141, 123
    s, t = _logits(n, v, seed=61)
    g = torch.Generator().manual_seed(62)
    mask = torch.rand(n, v, generator=g) < 0.3  # (N, V) True = masked vocabulary entry
    mask[:, 0] = False  # every row keeps some support
    mask[:10] = False  # and some rows are not masked at all
    t = t.masked_fill(mask, -math.inf)
    tau = _temperature("per-token", n, seed=63)
    upstream = torch.randn(n, generator=g)

    s32, t32 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = DIVERGENCES[name](s32, t32, temperature=tau)
    (out * upstream).sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(s32.grad).all()
    assert torch.isfinite(t32.grad).all()

    # Same convention as the reference: p = 0 entries contribute 0, reverse terms at masked entries are dropped.
    s64 = s.double().requires_grad_()
    expected = reference.REF_DIVERGENCES[name](s64, t.double(), temperature=tau)
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_padded_vocabulary_equals_sliced_vocabulary(name: str) -> None:
    # Columns masked to -inf in BOTH models (e.g. vocabulary padding) carry no mass, so they must not change anything.
    s, t = _logits(40, 70, seed=65)
    pad = torch.zeros(70, dtype=torch.bool)
    pad[[3, 17, 18, 50, 69]] = True
    s_pad = s.masked_fill(pad, -math.inf).requires_grad_()
    s_cut = s[:, ~pad].clone().requires_grad_()
    tau = _temperature("per-token", 40, seed=66)
    out = DIVERGENCES[name](s_pad, t.masked_fill(pad, -math.inf), temperature=tau)
    expected = DIVERGENCES[name](s_cut, t[:, ~pad], temperature=tau)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert torch.isfinite(s_pad.grad).all()
    torch.testing.assert_close(s_pad.grad[:, ~pad], s_cut.grad, atol=ATOL, rtol=RTOL)
    assert (s_pad.grad[:, pad] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str) -> None:
    s = torch.zeros(0, 16, requires_grad=True)
    out = DIVERGENCES[name](s, torch.zeros(0, 16), temperature=torch.ones(0))
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert s.grad is not None and s.grad.shape == (0, 16)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_raise(name: str) -> None:
    fn = DIVERGENCES[name]
    kw = {"top_k": 2} if name == "bild" else {}
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 6\)"):
        fn(torch.zeros(3, 5), torch.zeros(3, 6), **kw)
    with pytest.raises(ValueError, match="shape"):
        fn(torch.zeros(5), torch.zeros(5), **kw)
    with pytest.raises(ValueError, match="shape"):
        fn(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), **kw)
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.zeros(3, 5), torch.zeros(3, 5), temperature=torch.ones(4), **kw)
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.zeros(3, 5), torch.zeros(3, 5), temperature=0.0, **kw)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("jsd", {"beta": -0.1}),
        ("jsd", {"beta": 1.5}),
        ("skew_forward_kl", {"lam": 1.0}),
        ("skew_forward_kl", {"lam": -0.1}),
        ("skew_reverse_kl", {"lam": 1.0}),
        ("akl", {"mu": 1.5}),
        ("ttm", {"gamma": 0.0}),
        ("wttm", {"gamma": -1.0}),
        ("bild", {"top_k": 1}),
        ("bild", {"top_k": 6}),
    ],
)
def test_invalid_hyperparameters_raise(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DIVERGENCES[name](torch.zeros(3, 5), torch.zeros(3, 5), **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_scalar_tensor_temperature_equals_float(name: str) -> None:
    s, t = _logits(20, 40, seed=71)
    a = DIVERGENCES[name](s, t, temperature=torch.tensor(2.5))
    b = DIVERGENCES[name](s, t, temperature=2.5)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bild_default_temperature_is_three() -> None:
    s, t = _logits(30, 60, seed=81)
    default = DIVERGENCES["bild"](s, t)
    torch.testing.assert_close(default, DIVERGENCES["bild"](s, t, temperature=3.0), atol=0, rtol=0)
    assert not torch.allclose(default, DIVERGENCES["bild"](s, t, temperature=1.0))


def test_registry() -> None:
    expected = {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "tvd",
        "akl",
        "todi",
        "ttm",
        "wttm",
        "bild",
    }
    assert set(DIVERGENCES) == expected
    assert set(reference.REF_DIVERGENCES) == expected
    assert frozenset({"ttm", "wttm", "bild"}) == NO_TAU2 and isinstance(NO_TAU2, frozenset)
    assert all(fn.__name__ == name for name, fn in DIVERGENCES.items())
