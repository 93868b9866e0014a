"""Streaming estimators of the teacher-entropy CDF (spec section 2): the calibration reservoir behind
``cdf_mode='global'`` and the EMA histogram behind ``cdf_mode='ema_hist'``. Both end in quantile knots that
:func:`egad.plan.entropy.quantile_cdf` reads."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from egad.plan.entropy import _check_positive_int, _check_vector, fit_quantile_knots

__all__ = ["EmaEntropyHistogram", "EntropyQuantileCalibrator", "absorb_window"]


class EntropyQuantileCalibrator:
    """Collects teacher entropies over a calibration pass and fits the global quantile knots.

    Keeps a uniform random subsample of at most ``max_samples`` values of the stream with reservoir sampling
    (Algorithm R, Vitter 1985): item ``i`` (0-based) beyond the first ``max_samples`` draws ``j ~ U{0..i}`` and
    replaces slot ``j`` if ``j < max_samples``. While the stream fits, every value is kept, so the knots are exact.
    The result is deterministic given ``seed`` and the sequence of :meth:`update` calls. Samples live on the CPU.
    [spec section 2, ``cdf_mode='global'``: ">= 2M-token sample of response tokens", K = 1001; OURS]
    """

    def __init__(self, max_samples: int = 2_000_000, seed: int = 0) -> None:
        self.max_samples = _check_positive_int(max_samples, "max_samples", 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an int")
        self.seed = seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._samples = torch.empty(0, dtype=torch.float32)
        self._num_seen = 0

    @property
    def num_seen(self) -> int:
        """Number of entropy values passed to :meth:`update` so far."""
        return self._num_seen

    @property
    def samples(self) -> Tensor:
        """The kept values (a copy), at most ``max_samples`` of them."""
        return self._samples.clone()

    def update(self, h: Tensor) -> None:
        """Add a 1-D batch of entropies (already masked to response tokens) to the stream."""
        _check_vector(h, "h")
        x = h.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("h must be finite (found NaN or inf)")

        room = self.max_samples - self._samples.numel()
        if room > 0:
            take = x[:room]
            self._samples = torch.cat([self._samples, take])
            self._num_seen += take.numel()
            x = x[room:]
            if x.numel() == 0:
                return

        idx = torch.arange(self._num_seen, self._num_seen + x.numel(), dtype=torch.float64)
        # j = floor(U * (i + 1)) is uniform on {0..i}; float64 keeps the bias negligible for any realistic stream.
        u = torch.rand(x.numel(), generator=self._generator, dtype=torch.float64)
        j = torch.minimum((u * (idx + 1)).floor(), idx).long()
        keep = j < self.max_samples
        slots, vals = j[keep], x[keep]
        if slots.numel() > 0:
            # Sequential semantics: a later item overwrites an earlier one in the same slot. Indexed assignment with
            # duplicate indices has no defined winner, so keep only the last write per slot explicitly.
            order = torch.argsort(slots, stable=True)
            slots, vals = slots[order], vals[order]
            last = torch.ones_like(slots, dtype=torch.bool)
            last[:-1] = slots[1:] != slots[:-1]
            self._samples[slots[last]] = vals[last]
        self._num_seen += x.numel()

    def knots(self, num_knots: int = 1001) -> Tensor:
        """Quantile knots of the kept sample (:func:`fit_quantile_knots`); ``(num_knots,)`` fp32 on the CPU."""
        if self._samples.numel() == 0:
            raise ValueError("no entropies seen yet: call update() before knots()")
        return fit_quantile_knots(self._samples, num_knots)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints, suitable for ``torch.save`` inside a trainer checkpoint."""
        return {
            "max_samples": self.max_samples,
            "seed": self.seed,
            "num_seen": self._num_seen,
            "samples": self._samples.clone(),
            "rng_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; ``max_samples`` must match this instance's."""
        missing = {"max_samples", "seed", "num_seen", "samples", "rng_state"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        if int(state["max_samples"]) != self.max_samples:
            raise ValueError(
                f"state max_samples={int(state['max_samples'])} does not match this calibrator's "
                f"max_samples={self.max_samples}"
            )
        samples = state["samples"].detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        num_seen = int(state["num_seen"])
        if samples.numel() != min(num_seen, self.max_samples):
            raise ValueError(
                f"state is inconsistent: {samples.numel()} samples for num_seen={num_seen}, "
                f"max_samples={self.max_samples}"
            )
        self.seed = int(state["seed"])
        self._samples = samples.clone()
        self._num_seen = num_seen
        self._generator.set_state(state["rng_state"].to(device="cpu", dtype=torch.uint8))


class EmaEntropyHistogram:
    """EMA histogram of ``log(H + 1e-6)`` giving a running CDF of teacher entropies (``cdf_mode='ema_hist'``).

    [spec section 2: "a 4096-bin histogram on log(H+1e-6) with EMA decay 0.99", for on-policy or student-generated
    data; OURS]

    ``x = clamp(log(H + 1e-6), log_min, log_max)`` falls into one of ``num_bins`` equal bins on
    ``[log_min, log_max]``. Each :meth:`update` computes the batch's normalised histogram ``b`` and sets
    ``c <- decay * c + (1 - decay) * b`` (the first update sets ``c = b``), so ``c`` always sums to 1.

    CDF semantics (mid-bin): the CDF at the centre of bin ``i`` is the bin's mid-rank
    ``G_i = sum_{k<i} c_k + c_i / 2``, it is 0 at ``log_min`` and 1 at ``log_max``, and it is linear in ``x`` between
    these points. A point mass at a bin centre thus gets ``u = 0.5`` of its own mass, matching the mid-rank ties of
    the other estimators; values at or below ``exp(log_min) - 1e-6`` get 0, at or above ``exp(log_max) - 1e-6`` get 1.
    State lives on the device of the first batch, in float64. No check for NaN is made (it would cost a device sync
    per step); a NaN entropy is counted in the top bin, like ``+inf``.
    """

    _EPS = 1e-6

    def __init__(self, num_bins: int = 4096, decay: float = 0.99, log_min: float = -14.0, log_max: float = 3.0) -> None:
        self.num_bins = _check_positive_int(num_bins, "num_bins", 1)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= decay < 1.0):
            raise ValueError(f"decay={decay!r} must be a float in [0, 1)")
        for name, val in (("log_min", log_min), ("log_max", log_max)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise ValueError(f"{name}={val!r} must be a finite float")
        if not log_min < log_max:
            raise ValueError(f"log_min={log_min!r} must be < log_max={log_max!r}")
        self.decay = float(decay)
        self.log_min = float(log_min)
        self.log_max = float(log_max)
        self._counts: Tensor | None = None
        self._num_updates = 0

    @property
    def num_updates(self) -> int:
        """Number of non-empty batches absorbed."""
        return self._num_updates

    @property
    def counts(self) -> Tensor:
        """The EMA bin masses ``(num_bins,)`` (float64, sums to 1); raises before the first update."""
        return self._require_counts().clone()

    def _require_counts(self) -> Tensor:
        if self._counts is None:
            raise ValueError("the histogram is empty: call update() with a non-empty batch first")
        return self._counts

    def _to_log(self, h: Tensor) -> Tensor:
        return torch.log(h.double() + self._EPS).clamp(self.log_min, self.log_max)

    def update(self, h: Tensor) -> None:
        """Absorb a 1-D batch of entropies (already masked to response tokens); an empty batch is a no-op."""
        self.absorb(self.bin_counts(h))

    def bin_counts(self, h: Tensor) -> Tensor:
        """Raw bin counts (float64, ``(num_bins,)``) of a 1-D batch, on its device. Counts add across micro-batches
        and processes, so a window's histogram is the same however the window was split (sum, then `absorb`)."""
        _check_vector(h, "h")
        x = self._to_log(h.detach())
        width = (self.log_max - self.log_min) / self.num_bins
        # x == log_max lands in the last bin; NaN would index out of range, so map it there too rather than crash.
        idx = ((x - self.log_min) / width).floor().nan_to_num(self.num_bins - 1).long().clamp(0, self.num_bins - 1)
        return torch.bincount(idx, minlength=self.num_bins).double()

    def absorb(self, counts: Tensor) -> None:
        """One EMA update from raw bin counts (e.g. a window's, summed over its micro-batches and processes); all
        zeros is a no-op."""
        counts = counts.detach().double().reshape(-1)
        if counts.numel() != self.num_bins:
            raise ValueError(f"counts has {counts.numel()} bins, expected num_bins={self.num_bins}")
        total = float(counts.sum())
        if total <= 0:
            return
        device = self._counts.device if self._counts is not None else counts.device
        batch = counts.to(device) / total
        if self._counts is None:
            self._counts = batch
        else:
            self._counts = self.decay * self._counts + (1.0 - self.decay) * batch
        self._num_updates += 1

    def _breakpoints(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(xs, Fs)``: the piecewise-linear CDF in log space, both ``(num_bins + 2,)`` float64."""
        c = self._require_counts().to(device)
        c = c / c.sum()
        width = (self.log_max - self.log_min) / self.num_bins
        centres = self.log_min + width * (torch.arange(self.num_bins, dtype=torch.float64, device=device) + 0.5)
        mid = torch.cumsum(c, 0) - c / 2
        xs = torch.cat([centres.new_tensor([self.log_min]), centres, centres.new_tensor([self.log_max])])
        fs = torch.cat([mid.new_tensor([0.0]), mid, mid.new_tensor([1.0])])
        return xs, torch.cummax(fs.clamp(0.0, 1.0), 0).values

    def cdf(self, h: Tensor) -> Tensor:
        """``u = F_hat(h)`` in [0, 1], ``(N,)`` fp32 on ``h``'s device (see the class docstring for the semantics)."""
        _check_vector(h, "h")
        if h.numel() == 0:
            self._require_counts()
            return h.detach().new_zeros((0,), dtype=torch.float32)
        xs, fs = self._breakpoints(h.device)
        x = self._to_log(h.detach())
        i_hi = torch.searchsorted(xs, x, right=True).clamp(1, xs.numel() - 1)
        i_lo = i_hi - 1
        frac = ((x - xs[i_lo]) / (xs[i_hi] - xs[i_lo])).clamp(0.0, 1.0)
        return (fs[i_lo] + frac * (fs[i_hi] - fs[i_lo])).clamp(0.0, 1.0).float()

    def knots(self, num_knots: int = 1001) -> Tensor:
        """Entropy-space quantile knots of the histogram's CDF, ``(num_knots,)`` fp32, nondecreasing.

        Knot ``j`` is the smallest ``h`` with ``cdf(h) >= j/(K-1)`` (knot 0: the largest ``h`` with ``cdf(h) = 0``).
        Between consecutive knots both :meth:`cdf` and ``quantile_cdf(h, knots)`` are monotone and span the same
        ``[j/(K-1), (j+1)/(K-1)]``, so the two agree to within ``1/(K-1)``; the caller can therefore use
        :func:`quantile_cdf` uniformly for every ``cdf_mode``.

        Knots are ``exp(x) - 1e-6`` of log-space points ``x >= log_min``, so the lowest ones can be slightly negative
        (down to ``exp(log_min) - 1e-6``, about -1.7e-7 by default). They are deliberately not clipped at 0: clipping
        would turn the whole region below ``H = 0`` into one run of tied knots, and the mid-rank of that run would
        disagree with :meth:`cdf` at the (very common) entropies near 0.
        """
        _check_positive_int(num_knots, "num_knots", 2)
        xs, fs = self._breakpoints(self._require_counts().device)
        p = torch.linspace(0.0, 1.0, num_knots, dtype=torch.float64, device=xs.device)
        i_hi = torch.searchsorted(fs, p, right=False)  # first breakpoint with F >= p
        i_hi[0] = torch.searchsorted(fs, fs.new_tensor([0.0]), right=True)[0] - 1  # end of the F == 0 region
        i_hi = i_hi.clamp(0, xs.numel() - 1)
        i_lo = (i_hi - 1).clamp(min=0)
        gap = fs[i_hi] - fs[i_lo]
        frac = torch.where(gap > 0, (p - fs[i_lo]) / torch.where(gap > 0, gap, 1.0), 1.0).clamp(0.0, 1.0)
        frac[0] = 1.0  # knot 0 sits exactly on its breakpoint
        x = xs[i_lo] + frac * (xs[i_hi] - xs[i_lo])
        h = torch.exp(x) - self._EPS
        return torch.cummax(h.float(), 0).values

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, floats and ints, suitable for ``torch.save`` inside a trainer checkpoint."""
        return {
            "num_bins": self.num_bins,
            "decay": self.decay,
            "log_min": self.log_min,
            "log_max": self.log_max,
            "num_updates": self._num_updates,
            "counts": None if self._counts is None else self._counts.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the bin layout (num_bins, log_min, log_max) must match."""
        missing = {"num_bins", "decay", "log_min", "log_max", "num_updates", "counts"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        for key in ("num_bins", "log_min", "log_max"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state {key}={state[key]!r} does not match this histogram's {getattr(self, key)!r}")
        counts = state["counts"]
        if counts is not None:
            counts = counts.detach().double().reshape(-1).clone()
            if counts.numel() != self.num_bins:
                raise ValueError(f"state counts has {counts.numel()} bins, expected num_bins={self.num_bins}")
        self.decay = float(state["decay"])
        self._num_updates = int(state["num_updates"])
        self._counts = counts


def absorb_window(
    streams: Mapping[str, EmaEntropyHistogram],
    values: Mapping[str, list[Tensor]],
    reduce: Callable[[Tensor], Tensor],
    device: torch.device | str,
) -> None:
    """One EMA update per stream from a finished optimizer window: `values[name]` holds this process's values of its
    micro-batches, `reduce` sums bin counts over processes (identity for one). The same whatever the split: counts add,
    where an update per micro-batch would make the CDF depend on it. Every process calls it (a collective)."""
    for name, hist in streams.items():
        parts = values.get(name, [])
        x = torch.cat(parts).to(device) if parts else torch.zeros(0, device=device)
        hist.absorb(reduce(hist.bin_counts(x)).cpu())
