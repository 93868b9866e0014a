"""Teacher per-token entropy and its conversion to a difficulty score in [0, 1] (spec section 2).

Everything here returns fp32. The caller computes these under ``torch.no_grad()``; only :func:`token_entropy` is
meant to be differentiable as well.

Three estimators of the empirical CDF ``F_hat`` of teacher entropies (knob ``cdf_mode``):

* ``global``: :func:`fit_quantile_knots` fits K quantile knots once (over a stream:
  ``egad.plan.entropy_stream.EntropyQuantileCalibrator``), then :func:`quantile_cdf` maps entropies to ``u = F_hat(H)``;
* ``ema_hist``: ``egad.plan.entropy_stream.EmaEntropyHistogram``, for on-policy or student-generated data;
* ``batch``: :func:`batch_mid_rank`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "batch_mid_rank",
    "fit_quantile_knots",
    "knot_quantile",
    "normalized_entropy",
    "quantile_cdf",
    "row_sum",
    "token_entropy",
]

# Rows per chunk in token_entropy: bounds the fp32 working set to a few (chunk, V) buffers (spec section 10).
_DEFAULT_CHUNK = 2048


def _check_vector(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
    return x


def _check_positive_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


def row_sum(x: Tensor) -> Tensor:
    """``x.sum(-1)`` of an (N, V) tensor, with bits that do not depend on N. ATen sums a lone row in two passes split
    over the threads, in another order than a row among others (1 ulp apart at V = 49,152 on 2 threads), and the
    plan's thresholds read these bits, so a row's plan would depend on the chunk it lands in: a lone row is summed
    beside a copy of itself."""
    if x.shape[0] == 1:
        return torch.cat([x, x]).sum(-1)[:1]
    return x.sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Entropy


def token_entropy(
    logits: Tensor, *, temperature: float | Tensor = 1.0, chunk_size: int | None = _DEFAULT_CHUNK
) -> Tensor:
    """Shannon entropy of ``softmax(logits / temperature)`` per row, in nats, fp32.

    ``H_t = -sum_v p_t(v) log p_t(v)`` with ``p_t = softmax(z_t / tau)`` [spec section 2; EGAD-abs "teacher's output
    entropy"]. The spec computes it at ``tau = 1``; other temperatures are accepted for diagnostics.

    The input is upcast to fp32 (whatever its dtype) and ``log p`` comes from ``log_softmax`` so that no
    ``log(0)`` is ever taken. Entries equal to ``-inf`` (masked vocabulary) have ``p = 0`` and contribute exactly
    0 to both the value and the gradient. A row must hold at least one finite logit; ``+inf`` and NaN logits are not
    supported.

    Args:
        logits: ``(N, V)`` logits of any floating dtype, typically already gathered at the response positions.
        temperature: a positive scalar, or a tensor of shape ``()``, ``(N,)`` or ``(N, 1)`` (one temperature per row).
        chunk_size: rows processed at a time. Rows are independent, so this only bounds the peak fp32 memory
            (``V`` is ~1.5e5 for Qwen2.5); ``None`` processes everything at once.

    Returns:
        ``(N,)`` fp32 entropies, differentiable with respect to ``logits`` (and a tensor ``temperature``).
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor (N, V), got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    n, v = logits.shape
    if v < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got V={v}")
    if chunk_size is not None:
        _check_positive_int(chunk_size, "chunk_size", 1)

    if isinstance(temperature, Tensor):
        tau = temperature.to(device=logits.device, dtype=torch.float32)
        if tau.ndim == 1:
            tau = tau[:, None]
        if tau.ndim > 2 or (tau.ndim >= 1 and tau.shape[0] not in (1, n)) or (tau.ndim == 2 and tau.shape[1] != 1):
            raise ValueError(
                f"temperature tensor must have shape (), (N,) or (N, 1) with N={n}, got {tuple(temperature.shape)}"
            )
        if tau.numel() > 0 and not bool(torch.all(tau > 0)):
            raise ValueError("temperature must be > 0 everywhere")
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature={temperature!r} must be a finite float > 0")
        tau = float(temperature)

    if n == 0:
        return logits.new_zeros((0,), dtype=torch.float32)

    step = n if chunk_size is None else chunk_size
    parts = []
    for start in range(0, n, step):
        z = logits[start : start + step].float()
        if isinstance(tau, Tensor):
            t = tau if tau.ndim < 1 or tau.shape[0] == 1 else tau[start : start + step]
            z = z / t
        elif tau != 1.0:
            z = z / tau
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        # p * logp is 0 * -inf = NaN at masked entries; zeroing logp there (rather than the product) also keeps the
        # backward pass finite, because the gradient then never multiplies -inf by 0.
        logp = logp.masked_fill(torch.isneginf(logp), 0.0)
        parts.append(-row_sum(p * logp))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def normalized_entropy(entropy: Tensor, vocab_size: int) -> Tensor:
    """``H_tilde = H / log V`` (fp32), in [0, 1] up to rounding; not clipped.

    Literal log-V normalisation [spec section 2; the bound ``H_ub = log C`` is EA-KD's, SRC: EA-KD code,
    ``mdistiller/distillers/KD_ours.py``]. Pass the shared real vocabulary (151,665 for Qwen2.5), not the padded
    embedding size.
    """
    if not isinstance(entropy, Tensor):
        raise ValueError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
    _check_positive_int(vocab_size, "vocab_size", 2)
    return entropy.float() / math.log(vocab_size)


# ---------------------------------------------------------------------------------------------------------------------
# Global quantile knots


def fit_quantile_knots(entropies: Tensor, num_knots: int = 1001) -> Tensor:
    """Quantile knots of the empirical distribution of ``entropies`` at probabilities ``linspace(0, 1, K)``.

    Knot ``j`` is the ``j/(K-1)`` quantile with linear interpolation between order statistics, i.e. with
    ``x_(0) <= ... <= x_(M-1)`` sorted and ``pos = j/(K-1) * (M-1)``:
    ``q_j = x_(floor(pos)) + (pos - floor(pos)) * (x_(floor(pos)+1) - x_(floor(pos)))``, which is
    ``torch.quantile(..., interpolation='linear')``. ``torch.quantile`` refuses inputs above 2**24 elements, so this
    uses one sort plus index arithmetic (in float64) and works for any M that fits in memory.
    [spec section 2, ``cdf_mode='global'``: K = 1001 knots; OURS]

    Args:
        entropies: ``(M,)`` finite values, M >= 1.
        num_knots: K >= 2.

    Returns:
        ``(K,)`` fp32, nondecreasing, ``q_0 = min`` and ``q_{K-1} = max``.
    """
    _check_vector(entropies, "entropies")
    _check_positive_int(num_knots, "num_knots", 2)
    m = entropies.numel()
    if m == 0:
        raise ValueError("entropies is empty (M=0): need at least one value to fit quantile knots")
    x = entropies.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("entropies must be finite (found NaN or inf)")
    s = torch.sort(x).values.double()
    pos = torch.linspace(0.0, 1.0, num_knots, dtype=torch.float64, device=s.device) * (m - 1)
    lo = pos.floor().long().clamp_(0, m - 1)
    hi = (lo + 1).clamp_(max=m - 1)
    frac = pos - lo.double()
    knots = (s[lo] + frac * (s[hi] - s[lo])).float()
    # Exact in float64 up to rounding; the cummax makes "nondecreasing" hold unconditionally after the fp32 cast.
    return torch.cummax(knots, dim=0).values


def quantile_cdf(entropy: Tensor, knots: Tensor) -> Tensor:
    """``u = F_hat(h)`` by piecewise-linear interpolation of the quantile function given by ``knots``.

    Knot ``j`` sits at probability ``j/(K-1)``. For ``q_j < h < q_{j+1}``:
    ``u = (j + (h - q_j) / (q_{j+1} - q_j)) / (K-1)`` (``torch.searchsorted`` plus linear interpolation, spec
    section 2, ``cdf_mode='global'``). If ``h`` equals a run of identical knots ``q_lo = ... = q_hi`` (common: many
    entropies are ~0), ``u`` is the mid-rank ``(lo + hi) / 2 / (K-1)`` (spec: "ties get mid-rank"). Below the first
    knot ``u = 0``; above the last ``u = 1``. NaN entries are not supported.

    Args:
        entropy: ``(N,)`` values.
        knots: ``(K,)`` nondecreasing knots, K >= 2, e.g. from :func:`fit_quantile_knots`.

    Returns:
        ``(N,)`` fp32 in [0, 1], on ``entropy``'s device.
    """
    _check_vector(entropy, "entropy")
    _check_vector(knots, "knots")
    k = knots.numel()
    if k < 2:
        raise ValueError(f"knots must hold K >= 2 values, got K={k}")
    q = knots.detach().to(device=entropy.device, dtype=torch.float32)
    if not bool((q[1:] >= q[:-1]).all()):
        raise ValueError("knots must be nondecreasing")
    h = entropy.detach().float()
    if h.numel() == 0:
        return h.new_zeros((0,))

    left = torch.searchsorted(q, h, right=False)  # first j with q_j >= h
    right = torch.searchsorted(q, h, right=True)  # first j with q_j > h
    tie = right > left
    # Off a tie, left == right == i and q_{i-1} < h < q_i; clamp so the gathers below stay in range everywhere.
    i_hi = left.clamp(1, k - 1)
    i_lo = i_hi - 1
    q_lo = q[i_lo].double()
    q_hi = q[i_hi].double()
    gap = q_hi - q_lo
    frac = torch.where(gap > 0, (h.double() - q_lo) / torch.where(gap > 0, gap, 1.0), 0.0).clamp(0.0, 1.0)
    u = (i_lo.double() + frac) / (k - 1)
    u = torch.where(left == 0, 0.0, u)
    u = torch.where(left == k, 1.0, u)
    u = torch.where(tie, (left + right - 1).double() / (2 * (k - 1)), u)
    return u.float()


def batch_mid_rank(entropy: Tensor) -> Tensor:
    """Within-batch empirical CDF: ``u_t = (rank_t - 0.5) / N`` with 1-based ranks and ties at their average rank.

    [spec section 2, ``cdf_mode='batch'``; per-batch percentile as in Wang et al. 2025, SRC: 80/20 paper, page.]
    With ``n_lt`` values strictly below ``h_t`` and ``n_le`` at or below it, the tied ranks are
    ``n_lt + 1 .. n_le``, so ``rank_t = (n_lt + 1 + n_le) / 2`` and ``u_t = (n_lt + n_le) / (2N)``. The mean of ``u``
    is exactly 0.5. NaN entries are not supported.

    Returns:
        ``(N,)`` fp32 in (0, 1).
    """
    _check_vector(entropy, "entropy")
    n = entropy.numel()
    h = entropy.detach().float()
    if n == 0:
        return h.new_zeros((0,))
    s = torch.sort(h).values
    n_lt = torch.searchsorted(s, h, right=False)
    n_le = torch.searchsorted(s, h, right=True)
    return ((n_lt + n_le).double() / (2 * n)).float()


def knot_quantile(knots: Tensor, p: Tensor | float) -> Tensor:
    """The quantile function the knots define: ``Q(p)``, linear between knot ``j`` at ``j/(K-1)`` and knot ``j+1``.

    The inverse of :func:`quantile_cdf` off ties. ``p`` is clipped to [0, 1]. Returns fp32 of ``p``'s shape (a 0-d
    tensor for a float ``p``), on the knots' device.
    """
    _check_vector(knots, "knots")
    k = knots.numel()
    if k < 2:
        raise ValueError(f"knots must hold K >= 2 values, got K={k}")
    q = knots.detach().double()
    pos = torch.as_tensor(p, dtype=torch.float64, device=q.device).clamp(0.0, 1.0) * (k - 1)
    lo = pos.floor().long().clamp(0, k - 2)
    frac = pos - lo.double()
    return (q[lo] + frac * (q[lo + 1] - q[lo])).float()
