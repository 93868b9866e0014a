"""Tests for egad.plan.entropy_stream: the calibration reservoir and the EMA entropy histogram."""

from __future__ import annotations

import math

import pytest
import torch

from egad.plan.entropy import batch_mid_rank, fit_quantile_knots, quantile_cdf, token_entropy
from egad.plan.entropy_stream import EmaEntropyHistogram, EntropyQuantileCalibrator

# ---------------------------------------------------------------------------------------------------------------------
# EntropyQuantileCalibrator


def test_calibrator_exact_when_stream_fits():
    g = torch.Generator().manual_seed(10)
    chunks = [torch.rand(n, generator=g) for n in (5, 0, 100, 37)]
    cal = EntropyQuantileCalibrator(max_samples=1000)
    for c in chunks:
        cal.update(c)
    assert cal.num_seen == 142
    torch.testing.assert_close(cal.knots(51), fit_quantile_knots(torch.cat(chunks), 51))
    torch.testing.assert_close(cal.samples, torch.cat(chunks))


def test_calibrator_reservoir_is_uniform_and_bounded():
    n, cap = 20_000, 2_000
    stream = torch.arange(n, dtype=torch.float32)
    cal = EntropyQuantileCalibrator(max_samples=cap, seed=3)
    for c in stream.split(777):
        cal.update(c)
    kept = cal.samples
    assert cal.num_seen == n and kept.numel() == cap
    assert kept.unique().numel() == cap  # sampling without replacement
    # each item is kept with probability cap/n; counts per tenth of the stream are ~Binomial(n/10, cap/n)
    per_tenth = torch.bincount((kept / (n // 10)).long(), minlength=10).double()
    sd = math.sqrt(n / 10 * (cap / n) * (1 - cap / n))
    assert (per_tenth - cap / 10).abs().max().item() < 5 * sd
    knots = cal.knots(11)
    torch.testing.assert_close(knots.double(), torch.linspace(0, n - 1, 11, dtype=torch.float64), atol=0.05 * n, rtol=0)


def test_calibrator_deterministic_per_seed():
    def run(seed):
        cal = EntropyQuantileCalibrator(max_samples=50, seed=seed)
        for c in torch.arange(1000, dtype=torch.float32).split(64):
            cal.update(c)
        return cal.samples

    torch.testing.assert_close(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_calibrator_state_dict_roundtrip():
    stream = torch.arange(3000, dtype=torch.float32).split(250)
    a = EntropyQuantileCalibrator(max_samples=400, seed=5)
    for c in stream[:6]:
        a.update(c)
    b = EntropyQuantileCalibrator(max_samples=400, seed=99)
    b.load_state_dict(a.state_dict())
    for c in stream[6:]:
        a.update(c)
        b.update(c)
    assert a.num_seen == b.num_seen == 3000
    torch.testing.assert_close(a.samples, b.samples)
    with pytest.raises(ValueError, match="max_samples"):
        EntropyQuantileCalibrator(max_samples=10).load_state_dict(a.state_dict())


def test_calibrator_validation():
    with pytest.raises(ValueError, match="max_samples"):
        EntropyQuantileCalibrator(max_samples=0)
    cal = EntropyQuantileCalibrator()
    with pytest.raises(ValueError, match="update"):
        cal.knots()
    with pytest.raises(ValueError, match="finite"):
        cal.update(torch.tensor([math.inf]))
    with pytest.raises(ValueError, match="1-D"):
        cal.update(torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# EmaEntropyHistogram


def ref_hist(h: list[float], num_bins: int, log_min: float, log_max: float) -> list[float]:
    counts = [0.0] * num_bins
    width = (log_max - log_min) / num_bins
    for v in h:
        x = min(max(math.log(v + 1e-6), log_min), log_max)
        counts[min(int((x - log_min) // width), num_bins - 1)] += 1
    return [c / len(h) for c in counts]


def test_ema_histogram_update_rule():
    g = torch.Generator().manual_seed(11)
    hist = EmaEntropyHistogram(num_bins=16, decay=0.9, log_min=-14.0, log_max=3.0)
    b1 = torch.rand(50, generator=g) * 3
    b2 = torch.cat([torch.zeros(10), torch.rand(20, generator=g) * 20, torch.tensor([1e9])])  # incl. clamped values
    hist.update(b1)
    ref1 = ref_hist(b1.tolist(), 16, -14.0, 3.0)
    torch.testing.assert_close(hist.counts, torch.tensor(ref1, dtype=torch.float64))
    hist.update(torch.zeros(0))  # no-op
    hist.update(b2)
    ref2 = [0.9 * a + 0.1 * b for a, b in zip(ref1, ref_hist(b2.tolist(), 16, -14.0, 3.0), strict=True)]
    torch.testing.assert_close(hist.counts, torch.tensor(ref2, dtype=torch.float64))
    assert hist.num_updates == 2
    assert hist.counts.sum().item() == pytest.approx(1.0)


def test_ema_histogram_cdf_tracks_empirical_cdf():
    g = torch.Generator().manual_seed(12)
    # log-uniform entropies over [1e-5, 10]: uniform in log space, so the histogram CDF is nearly exact
    h = torch.exp(torch.rand(50_000, generator=g) * (math.log(10) - math.log(1e-5)) + math.log(1e-5))
    hist = EmaEntropyHistogram()
    hist.update(h)
    probe = torch.tensor([1e-4, 1e-3, 0.01, 0.1, 1.0, 5.0])
    u = hist.cdf(probe)
    emp = torch.tensor([(h <= p).double().mean().item() for p in probe.tolist()], dtype=torch.float64)
    torch.testing.assert_close(u.double(), emp, atol=0.01, rtol=0)
    assert u.dtype == torch.float32
    grid = torch.logspace(-9, 2, 500)
    ug = hist.cdf(grid)
    assert (ug[1:] >= ug[:-1]).all() and ug.min() >= 0 and ug.max() <= 1
    assert hist.cdf(torch.tensor([0.0, 1e6])).tolist() == pytest.approx([0.0, 1.0], abs=1e-3)


def test_ema_histogram_point_mass_is_mid_rank():
    hist = EmaEntropyHistogram()
    hist.update(torch.zeros(100))  # the common "many entropies are 0" case
    assert hist.cdf(torch.zeros(1)).item() == pytest.approx(0.5, abs=0.06)


def test_ema_histogram_knots_consistent_with_cdf():
    g = torch.Generator().manual_seed(13)
    hist = EmaEntropyHistogram(num_bins=512)
    for _ in range(5):
        near_zero = torch.rand(300, generator=g) * 1e-7
        spread = -torch.log1p(-torch.rand(700, generator=g))  # Exponential(1)
        hist.update(torch.cat([near_zero, spread]))
    k = 1001
    knots = hist.knots(k)
    assert knots.shape == (k,) and knots.dtype == torch.float32
    assert (knots[1:] >= knots[:-1]).all()
    probe = torch.cat([torch.zeros(3), torch.rand(200, generator=g) * 1e-6, torch.rand(500, generator=g) * 8, knots])
    diff = (quantile_cdf(probe, knots) - hist.cdf(probe)).abs().max().item()
    assert diff <= 1 / (k - 1) + 1e-4


def test_ema_histogram_state_dict_and_validation():
    g = torch.Generator().manual_seed(14)
    a = EmaEntropyHistogram(num_bins=64)
    a.update(torch.rand(100, generator=g))
    b = EmaEntropyHistogram(num_bins=64)
    b.load_state_dict(a.state_dict())
    nxt = torch.rand(100, generator=g)
    a.update(nxt)
    b.update(nxt)
    torch.testing.assert_close(a.counts, b.counts)
    assert b.num_updates == 2
    with pytest.raises(ValueError, match="num_bins"):
        EmaEntropyHistogram(num_bins=32).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="update"):
        EmaEntropyHistogram().cdf(torch.zeros(2))
    with pytest.raises(ValueError, match="update"):
        EmaEntropyHistogram().knots()
    with pytest.raises(ValueError, match="decay"):
        EmaEntropyHistogram(decay=1.0)
    with pytest.raises(ValueError, match="log_min"):
        EmaEntropyHistogram(log_min=3.0, log_max=3.0)
    with pytest.raises(ValueError, match="num_bins"):
        EmaEntropyHistogram(num_bins=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(64, 33, generator=g)
    h = token_entropy(logits)
    torch.testing.assert_close(token_entropy(logits.cuda().bfloat16()).cpu(), token_entropy(logits.bfloat16()))
    knots = fit_quantile_knots(h, 101)
    torch.testing.assert_close(fit_quantile_knots(h.cuda(), 101).cpu(), knots)
    torch.testing.assert_close(quantile_cdf(h.cuda(), knots).cpu(), quantile_cdf(h, knots))  # knots stay on CPU
    torch.testing.assert_close(batch_mid_rank(h.cuda()).cpu(), batch_mid_rank(h))
    cpu_hist, gpu_hist = EmaEntropyHistogram(num_bins=128), EmaEntropyHistogram(num_bins=128)
    cpu_hist.update(h)
    gpu_hist.update(h.cuda())
    torch.testing.assert_close(gpu_hist.cdf(h.cuda()).cpu(), cpu_hist.cdf(h))
    torch.testing.assert_close(gpu_hist.knots(101).cpu(), cpu_hist.knots(101))
