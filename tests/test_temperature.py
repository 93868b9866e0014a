"""Tests for egad.plan.temperature against plain float64 references written independently below."""

from __future__ import annotations

import math

import pytest
import torch

from egad.plan.temperature import tau_squared_factor, token_temperature

# ---------------------------------------------------------------------------------------------------------------------
# naive float64 references


def ref_lower_median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[(len(s) - 1) // 2]


def ref_idts(score: list[float], tau0: float, kappa: float) -> list[float]:
    floored = [max(x, 1e-8) for x in score]
    med = ref_lower_median(floored)
    return [tau0 * math.exp(-kappa * math.tanh(math.log(x / med))) for x in floored]


def ref_edt(score: list[float], t0: float, theta: float, lo: float, hi: float) -> list[float]:
    out = []
    for x in score:
        t = t0 * 0.8 ** (theta / max(x, 1e-8))
        out.append(min(hi, max(lo, t)))
    return out


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# token_temperature


@pytest.mark.parametrize(("tau_min", "tau_max"), [(1.0, 2.0), (0.5, 3.0), (1.5, 1.5)])
def test_inverse_and_direct(tau_min, tau_max):
    d = torch.tensor([0.0, 0.25, 0.5, 1.0])
    inv = token_temperature(d, mode="inverse", tau_min=tau_min, tau_max=tau_max)
    direct = token_temperature(d, mode="direct", tau_min=tau_min, tau_max=tau_max)
    assert inv.dtype == direct.dtype == torch.float32
    torch.testing.assert_close(inv.double(), as64([tau_max - (tau_max - tau_min) * x for x in d.tolist()]))
    torch.testing.assert_close(direct.double(), as64([tau_min + (tau_max - tau_min) * x for x in d.tolist()]))
    # inverse: confident (d=0) tokens get tau_max; direct: they get tau_min
    assert inv[0].item() == pytest.approx(tau_max) and inv[-1].item() == pytest.approx(tau_min)
    assert direct[0].item() == pytest.approx(tau_min) and direct[-1].item() == pytest.approx(tau_max)


def test_default_is_inverse_one_to_two():
    d = torch.linspace(0, 1, 11)
    tau = token_temperature(d)
    torch.testing.assert_close(tau, 2.0 - d)


@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("kappa", [0.3, 1.0, -0.3])
def test_idts_matches_reference(n, kappa):
    g = torch.Generator().manual_seed(n)
    score = torch.rand(n, generator=g).pow(4) * 3
    score[0] = 0.0  # exercises the 1e-8 floor
    tau = token_temperature(torch.rand(n, generator=g), mode="idts", tau0=1.3, kappa=kappa, score=score)
    ref = as64(ref_idts(score.double().tolist(), 1.3, kappa))
    torch.testing.assert_close(tau.double(), ref, atol=1e-5, rtol=1e-5)
    lo, hi = 1.3 * math.exp(-abs(kappa)), 1.3 * math.exp(abs(kappa))
    assert tau.min().item() >= lo - 1e-6 and tau.max().item() <= hi + 1e-6


def test_idts_direction_and_median_token():
    score = torch.tensor([0.01, 0.5, 1.0, 2.0, 100.0])  # median 1.0
    tau = token_temperature(torch.zeros(5), mode="idts", score=score)
    assert tau[2].item() == pytest.approx(1.0)  # the median token keeps tau0
    assert (tau[1:] < tau[:-1]).all()  # low temperature for difficult (high-score) tokens


def test_edt_matches_reference_and_clips():
    score = torch.tensor([0.0, 1e-3, 0.2, 1.0, 3.0, 50.0])
    tau = token_temperature(torch.zeros(6), mode="edt", score=score, tau_min=0.5, tau_max=1.9, edt_t0=2.0)
    ref = as64(ref_edt(score.double().tolist(), 2.0, 1.0, 0.5, 1.9))
    torch.testing.assert_close(tau.double(), ref, atol=1e-6, rtol=1e-6)
    assert tau[0].item() == pytest.approx(0.5) and tau[-1].item() == pytest.approx(1.9)
    assert tau[3].item() == pytest.approx(1.6)  # 2 * 0.8 ** 1


def test_const():
    tau = token_temperature(torch.rand(5), mode="const", tau0=1.5)
    assert tau.dtype == torch.float32
    assert tau.tolist() == [1.5] * 5


@pytest.mark.parametrize("mode", ["inverse", "direct", "idts", "edt", "const"])
def test_empty_input(mode):
    out = token_temperature(torch.zeros(0), mode=mode, score=torch.zeros(0))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_token_temperature_validation():
    d = torch.rand(3)
    with pytest.raises(ValueError, match=r"mode='foo' is not one of \['inverse', 'direct', 'idts', 'edt', 'const'\]"):
        token_temperature(d, mode="foo")
    with pytest.raises(ValueError, match="tau_min"):
        token_temperature(d, tau_min=0.0)
    with pytest.raises(ValueError, match="tau_min"):
        token_temperature(d, tau_min=2.0, tau_max=1.0)
    with pytest.raises(ValueError, match="tau0"):
        token_temperature(d, tau0=0.0)
    with pytest.raises(ValueError, match="score"):
        token_temperature(d, mode="idts")
    with pytest.raises(ValueError, match="score"):
        token_temperature(d, mode="edt")
    with pytest.raises(ValueError, match="score"):
        token_temperature(d, mode="idts", score=torch.rand(4))
    with pytest.raises(ValueError, match="kappa"):
        token_temperature(d, kappa=math.inf)


# ---------------------------------------------------------------------------------------------------------------------
# tau_squared_factor


def test_tau_squared_factor_modes():
    tau = torch.tensor([1.0, 1.5, 2.0, 0.5])
    sq = [t * t for t in tau.tolist()]
    torch.testing.assert_close(tau_squared_factor(tau).double(), as64(sq))
    torch.testing.assert_close(tau_squared_factor(tau, "none"), torch.ones(4))
    norm = tau_squared_factor(tau, "normalized")
    torch.testing.assert_close(norm.double(), as64([x / (sum(sq) / len(sq)) for x in sq]))
    assert norm.double().mean().item() == pytest.approx(1.0, abs=1e-6)
    for mode in ("per_token", "none", "normalized"):
        out = tau_squared_factor(torch.zeros(0), mode)
        assert out.shape == (0,) and out.dtype == torch.float32
        assert tau_squared_factor(tau.double(), mode).dtype == torch.float32


def test_tau_squared_factor_validation():
    with pytest.raises(ValueError, match=r"mode='foo' is not one of \['per_token', 'none', 'normalized'\]"):
        tau_squared_factor(torch.ones(2), "foo")
    with pytest.raises(ValueError, match="tau"):
        tau_squared_factor(torch.ones(2, 2))
