"""The teacher's distribution at a token <-> the cache's per-token tensors (format 2; format 1 is read as it was).

Format 2 stores, per token: the top-k ids and log-probs, the exact tail log-mass and entropy, and optionally S ids
sampled from the tail (`egad.losses.sparse_tail`) with their log-probs and log sum_tail p^b. Ids are uint16 when the
vocabulary fits (V <= 65536), else int32. Log-probs are fp16, or 8-bit codes with a per-token fp16 (offset, step)
per group (top-k, sample): log p = offset - step * code, code 255 for -inf, so the rounding error is at most step / 2
(offset is the group's largest log-prob, step its range / 254). The entropy and both tail scalars stay fp32.

The tail sample is systematic: with one phase u per token, the points (u + j) / S, j < S, are read off the
cumulative distribution of pi = p^b / Z_b over the tail in vocabulary order, so an id appears floor or ceil of
S pi_v times, and each id's expected count is exactly S pi_v. The phase comes from a low-discrepancy sequence over
(example, position), so a token's sample does not depend on batching, shards or resumption.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE_EXPONENT = 0.5
# The R2 sequence's constants (1/g, 1/g^2, g the plastic number): well-spread phases for a 2-D index.
_R2 = (0.7548776662466927, 0.5698402909980532)
_CODES = 254  # finite codes 0..254; 255 marks -inf

__all__ = [
    "SAMPLE_EXPONENT",
    "bytes_per_token",
    "decode",
    "decode_rows",
    "dequantise",
    "encode",
    "id_dtype",
    "quantise",
]


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest dtype the ids of a `vocab_size` vocabulary fit."""
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


def _narrow_ids(ids: Tensor, vocab_size: int) -> Tensor:
    """ids in `id_dtype(vocab_size)`; uint16 ids are made on the CPU, where torch supports the dtype fully."""
    dtype = id_dtype(vocab_size)
    return ids.to(dtype) if dtype != torch.uint16 else ids.cpu().to(dtype)


def sample_phase(examples: Tensor, positions: Tensor) -> Tensor:
    """The systematic-sampling phase in [0, 1) of the tokens at (example, position), float64. (C,), (C,) -> (C,)"""
    u = 0.5 + examples.double() * _R2[0] + positions.double() * _R2[1]
    return (u - u.floor()).clamp(0.0, 1.0 - 1e-9)


def tail_sample(logp: Tensor, top_ids: Tensor, n: int, exponent: float, phase: Tensor) -> tuple[Tensor, Tensor]:
    """n systematic draws from the tail (entries outside `top_ids`) in proportion to p^exponent, and the exact
    log sum_tail p^exponent. (C, V) log-probs, (C, k), phase (C,) -> ids (C, n) long, log_z (C,) fp32.
    A row with an empty tail gets log_z = -inf and ids 0 (they carry no weight)."""
    x = (exponent * logp.float()).scatter_(1, top_ids, -math.inf)  # (C, V)
    log_z = torch.logsumexp(x, dim=-1)  # (C,)
    live = torch.isfinite(log_z)
    x.sub_(torch.where(live, log_z, 0.0)[:, None]).exp_()  # pi, in place
    cum = x.cumsum(-1, dtype=torch.float64)  # (C, V)
    del x
    steps = torch.arange(n, dtype=torch.float64, device=logp.device)
    points = (phase.to(cum.device)[:, None] + steps) / n * cum[:, -1:]  # strictly below the total
    ids = torch.searchsorted(cum, points, right=True).clamp_max(logp.shape[-1] - 1)
    return torch.where(live[:, None], ids, 0), log_z


def quantise(logp: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit codes of log-probs, per row: (C, n) -> codes uint8 (C, n), scale fp16 (C, 2) = (offset, step)."""
    lp = logp.float()
    finite = torch.isfinite(lp)
    hi = lp.masked_fill(~finite, -math.inf).amax(-1)
    lo = lp.masked_fill(~finite, math.inf).amin(-1)
    none = ~finite.any(-1)
    hi, lo = torch.where(none, 0.0, hi), torch.where(none, 0.0, lo)
    offset = hi.half()
    span = (offset.float() - lo).clamp_min(0.0)
    step = (span / _CODES).half()
    # fp16 may round the step down; one ulp up keeps the largest code within range.
    short = step.float() * _CODES < span
    step = torch.where(short, torch.nextafter(step, torch.tensor(math.inf, dtype=torch.float16)), step)
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((offset.float()[:, None] - lp) / step.float()[:, None]).round().clamp(0, _CODES)
    codes = torch.where(finite, codes, _CODES + 1).to(torch.uint8)
    return codes, torch.stack([offset, step], dim=-1)


def dequantise(codes: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `quantise` up to rounding: (C, n) uint8, (C, 2) fp16 -> (C, n) fp32."""
    c = codes.float()
    lp = scale[:, :1].float() - scale[:, 1:].float() * c
    return torch.where(codes == _CODES + 1, -math.inf, lp)


def _store_logprobs(lp: Tensor, bits: int, name: str, scale_name: str) -> dict[str, Tensor]:
    if bits == 16:
        return {name: lp.half()}
    codes, scale = quantise(lp)
    return {name: codes, scale_name: scale}


def encode(
    logp: Tensor, *, k: int, samples: int, bits: int, vocab_size: int, phase: Tensor | None = None,
    exponent: float = SAMPLE_EXPONENT,
) -> dict[str, Tensor]:  # fmt: skip
    """The stored tensors of C tokens from their fp32 log-probs (C, V) over the shared vocabulary (no entropy: the
    caller has it). `phase` (C,) is needed when samples > 0. Outputs are on logp's device, uint16 ids on the CPU."""
    if bits not in (8, 16):
        raise ValueError(f"logprob bits must be 8 or 16, got {bits}")
    top = logp.topk(k, dim=-1, sorted=True)
    # logsumexp of the complement, not log1p(-sum p_topk): no cancellation when the top-k holds ~all the mass, and
    # exactly -inf when k = V.
    tail = logp.scatter(1, top.indices, -math.inf).logsumexp(dim=-1)
    out = {"topk_ids": _narrow_ids(top.indices, vocab_size), "tail_logmass": tail.float()}
    out.update(_store_logprobs(top.values, bits, "topk_logprobs", "topk_scale"))
    if samples:
        if phase is None:
            raise ValueError("a tail sample needs the tokens' phases")
        sid, log_z = tail_sample(logp, top.indices, samples, exponent, phase)
        out.update({"sample_ids": _narrow_ids(sid, vocab_size), "tail_logz": log_z})
        out.update(_store_logprobs(logp.gather(1, sid), bits, "sample_logprobs", "sample_scale"))
    return out


def decode(t: dict[str, Tensor], lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Rows [lo, hi) of a shard's tensors, either format: (top-k ids long, top-k log-probs fp32, sample ids long or
    None, sample log-probs fp32 or None)."""
    return decode_rows(t, slice(lo, hi))


def decode_rows(t: dict[str, Tensor], rows: slice | Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """`decode` at any rows of a shard: a slice, or an index tensor (R,) (the rows of many examples at once; every
    step is per row, so the values are those of `decode` row by row)."""

    def logprobs(name: str, scale: str) -> Tensor:
        x = t[name][rows]
        return dequantise(x, t[scale][rows]) if x.dtype == torch.uint8 else x.float()

    ids = t["topk_ids"][rows].long()
    lp = logprobs("topk_logprobs", "topk_scale")
    if "sample_ids" not in t:
        return ids, lp, None, None
    return ids, lp, t["sample_ids"][rows].long(), logprobs("sample_logprobs", "sample_scale")


def bytes_per_token(k: int, samples: int, bits: int, vocab_size: int) -> int:
    """The signal's bytes per token in format 2 (headers and offsets aside)."""
    entry = (2 if id_dtype(vocab_size) == torch.uint16 else 4) + bits // 8
    groups = 0 if bits == 16 else 4 * (1 + bool(samples))
    return (k + samples) * entry + groups + 8 + (4 if samples else 0)
