"""Tests for egad.plan.curriculum against plain float64 references written independently below."""

from __future__ import annotations

import math

import pytest
import torch

from egad.plan.curriculum import curriculum_weights, pacing

# ---------------------------------------------------------------------------------------------------------------------
# naive float64 references


def ref_linear_interp(d: list[float], lam: float, w_min: float) -> list[float]:
    out = []
    for x in d:
        easy = 1.0 - x  # weight that favours confident tokens
        hard = x
        out.append(w_min + (1.0 - w_min) * 2.0 * ((1.0 - lam) * easy + lam * hard))
    return out


def ref_tilt(d: list[float], lam: float, beta_max: float) -> list[float]:
    """exp(beta d) over its run-level mean for d uniform on [0, 1]: the integral of exp(beta u) du."""
    beta = beta_max * (2.0 * lam - 1.0)
    mean = (math.exp(beta) - 1.0) / beta if beta != 0 else 1.0
    return [math.exp(beta * x) / mean for x in d]


def uniform_grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


LAMS = [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]

# ---------------------------------------------------------------------------------------------------------------------
# pacing


@pytest.mark.parametrize(
    ("kind", "s", "kwargs", "expected"),
    [
        ("linear", 0.0, {}, 0.0),
        ("linear", 0.3, {}, 0.3),
        ("linear", 1.0, {}, 1.0),
        ("linear", 0.1, {"s0": 0.2, "s1": 0.6}, 0.0),
        ("linear", 0.5, {"s0": 0.2, "s1": 0.6}, 0.75),
        ("linear", 0.9, {"s0": 0.2, "s1": 0.6}, 1.0),
        ("sqrt", 0.0, {}, 0.01),
        ("sqrt", 0.25, {}, math.sqrt(0.25 * (1 - 1e-4) + 1e-4)),
        ("sqrt", 1.0, {}, 1.0),
        ("sqrt", 0.0, {"c0": 0.3}, 0.3),
        ("sqrt", 0.5, {"c0": 0.3, "s1": 0.8}, math.sqrt(0.5 * 0.91 / 0.8 + 0.09)),
        ("sqrt", 0.9, {"s1": 0.8}, 1.0),
        ("cosine", 0.0, {}, 0.0),
        ("cosine", 0.5, {}, 0.5),
        ("cosine", 0.25, {}, (1 - math.cos(math.pi / 4)) / 2),
        ("cosine", 1.0, {}, 1.0),
        ("cosine", 0.7, {"s1": 0.5}, 1.0),
        ("step", 0.0, {}, 0.0),
        ("step", 0.4999, {}, 0.0),
        ("step", 0.5, {}, 1.0),
        ("step", 1.0, {}, 1.0),
        ("reverse", 0.0, {}, 1.0),
        ("reverse", 0.3, {}, 0.7),
        ("reverse", 1.0, {}, 0.0),
    ],
)
def test_pacing_hand_computed(kind, s, kwargs, expected):
    out = pacing(s, kind, **kwargs)
    assert isinstance(out, float)
    assert out == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "sqrt", "cosine", "step", "reverse"])
def test_pacing_monotone_and_bounded(kind):
    values = [pacing(i / 200, kind) for i in range(201)]
    assert all(0.0 <= v <= 1.0 for v in values)
    pairs = list(zip(values, values[1:], strict=False))
    if kind == "reverse":
        assert all(b <= a for a, b in pairs)
    else:
        assert all(b >= a for a, b in pairs)


def test_pacing_validation():
    with pytest.raises(ValueError, match=r"kind='foo' is not one of \['linear', 'sqrt'"):
        pacing(0.5, "foo")
    with pytest.raises(ValueError, match="s="):
        pacing(1.5)
    with pytest.raises(ValueError, match="s="):
        pacing(math.nan)
    with pytest.raises(ValueError, match="s0"):
        pacing(0.5, s0=0.6, s1=0.6)
    with pytest.raises(ValueError, match="c0"):
        pacing(0.5, "sqrt", c0=1.0)
    with pytest.raises(ValueError, match="c0"):
        pacing(0.5, c0=-0.1)


# ---------------------------------------------------------------------------------------------------------------------
# curriculum_weights


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("w_min", [0.0, 0.2, 0.5, 1.0])
def test_linear_interp_matches_reference_and_has_unit_mean(lam, w_min):
    d = uniform_grid(1000)
    w = curriculum_weights(d, lam, w_min=w_min)
    assert w.dtype == torch.float32 and w.shape == d.shape
    ref = torch.tensor(ref_linear_interp(d.double().tolist(), lam, w_min), dtype=torch.float64)
    torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-6)
    assert w.double().mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w.min().item() >= w_min - 1e-6 and w.max().item() <= 2 - w_min + 1e-6


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_linear_interp_unit_mean_under_random_uniform_d(lam):
    g = torch.Generator().manual_seed(0)
    n = 100_000
    w = curriculum_weights(torch.rand(n, generator=g), lam)
    # w is affine in d with slope (1 - w_min) * 2 * (2 lam - 1), so sd(w) <= 1.6 / sqrt(12)
    sd = 1.6 / math.sqrt(12)
    assert abs(w.double().mean().item() - 1.0) < 5 * sd / math.sqrt(n)


def test_linear_interp_range_is_attained_and_direction():
    d = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(curriculum_weights(d, 0.0), torch.tensor([1.8, 0.2]))  # easy tokens favoured
    torch.testing.assert_close(curriculum_weights(d, 1.0), torch.tensor([0.2, 1.8]))  # hard tokens favoured


def test_lambda_half_is_flat():
    g = torch.Generator().manual_seed(1)
    d = torch.rand(257, generator=g)
    for w_min in (0.0, 0.2, 0.7):
        torch.testing.assert_close(curriculum_weights(d, 0.5, w_min=w_min), torch.ones(257))
    torch.testing.assert_close(curriculum_weights(d, 0.5, mode="tilt"), torch.ones(257))


@pytest.mark.parametrize("lam", LAMS)
def test_tilt_matches_reference_and_has_unit_mean(lam):
    g = torch.Generator().manual_seed(2)
    d = torch.rand(300, generator=g)
    w = curriculum_weights(d, lam, mode="tilt", beta_max=2.0)
    ref = torch.tensor(ref_tilt(d.double().tolist(), lam, 2.0), dtype=torch.float64)
    torch.testing.assert_close(w.double(), ref, atol=1e-5, rtol=1e-5)
    # The normaliser is run-level, not the vector's mean: over the uniform distribution of d the mean weight is 1.
    grid = curriculum_weights(uniform_grid(4000), lam, mode="tilt", beta_max=2.0)
    assert grid.double().mean().item() == pytest.approx(1.0, abs=1e-6)
    # An explicit normaliser (another run's distribution of d) is divided out as given.
    beta = 2.0 * (2.0 * lam - 1.0)
    want = torch.exp(beta * d.double()) / 2.5
    torch.testing.assert_close(curriculum_weights(d, lam, mode="tilt", tilt_norm=2.5).double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("lam", "sign"), [(0.0, -1), (1.0, 1)])
def test_tilt_extreme_ratio(lam, sign):
    d = torch.tensor([0.0, 0.5, 1.0])
    w = curriculum_weights(d, lam, mode="tilt", beta_max=2.0)
    assert (w[2] / w[0]).item() == pytest.approx(math.exp(sign * 2.0), rel=1e-6)
    huge = curriculum_weights(d, 1.0, mode="tilt", beta_max=500.0)  # must not overflow
    assert torch.isfinite(huge).all() and huge[2].item() == pytest.approx(500.0, rel=1e-5)  # e^b / ((e^b - 1) / b)


def test_competence_gating():
    d = torch.tensor([0.0, 0.2, 0.3, 0.31, 0.9, 1.0])
    c = pacing(0.0, "sqrt", c0=0.3)
    assert c == pytest.approx(0.3)
    w = curriculum_weights(d, c, mode="competence")
    assert w.dtype == torch.float32
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert curriculum_weights(d, pacing(1.0, "sqrt", c0=0.3), mode="competence").tolist() == [1.0] * 6


def test_static_modes_ignore_lambda():
    d = uniform_grid(64)
    for lam in (0.0, 0.4, 1.0):
        torch.testing.assert_close(curriculum_weights(d, lam, mode="static_easy"), curriculum_weights(d, 0.0))
        torch.testing.assert_close(curriculum_weights(d, lam, mode="static_hard"), curriculum_weights(d, 1.0))


@pytest.mark.parametrize("mode", ["linear_interp", "tilt", "competence", "static_easy", "static_hard"])
def test_empty_input(mode):
    out = curriculum_weights(torch.zeros(0), 0.3, mode=mode)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_curriculum_weights_validation():
    d = torch.rand(4)
    with pytest.raises(ValueError, match=r"mode='foo' is not one of \['linear_interp', 'tilt'"):
        curriculum_weights(d, 0.5, mode="foo")
    with pytest.raises(ValueError, match="lam"):
        curriculum_weights(d, 1.1)
    with pytest.raises(ValueError, match="lam"):
        curriculum_weights(d, -0.1)
    with pytest.raises(ValueError, match="w_min"):
        curriculum_weights(d, 0.5, w_min=1.5)
    with pytest.raises(ValueError, match="beta_max"):
        curriculum_weights(d, 0.5, mode="tilt", beta_max=-1.0)
    with pytest.raises(ValueError, match="d must"):
        curriculum_weights(torch.rand(2, 2), 0.5)
