"""The cache's per-token encoding (egad.teacher.cache.codec): 8-bit codes, the systematic tail sample, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from egad.teacher.cache import codec


def test_quantise_is_within_half_a_step_and_keeps_minus_infinity() -> None:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(7, 33, generator=g).cumsum(-1) * 0.9  # descending log-probs down to about -15
    lp[2, 30:] = -math.inf
    lp[3] = -2.5  # a constant row
    lp[4] = -math.inf  # nothing finite
    codes, scale = codec.quantise(lp)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float16 and scale.shape == (7, 2)
    back = codec.dequantise(codes, scale)
    assert torch.equal(torch.isneginf(back), torch.isneginf(lp))
    finite = torch.isfinite(lp)
    step = scale[:, 1:].float()
    err = (back - lp).abs().masked_fill(~finite, 0)
    # Half a step, or the fp16 rounding of the row's largest value where that is the offset (code 0).
    bound = torch.maximum(step / 2, lp.masked_fill(~finite, 0).abs().amax(-1, keepdim=True) * 2.0**-11)
    assert (err <= bound + 1e-6).all()
    # The step is the row's range / 254, at most one fp16 ulp more: 8 bits are not wasted.
    hi = lp.masked_fill(~finite, -math.inf).amax(-1)
    lo = lp.masked_fill(~finite, math.inf).amin(-1)
    spread = [0, 1, 2, 5, 6]
    assert (step[spread, 0] <= (hi - lo)[spread] / 254 * (1 + 2.0**-9) + hi[spread].abs() * 2.0**-11 / 254).all()
    assert torch.equal(back[3], lp[3])


def test_systematic_sample_hits_each_id_s_pi_times_on_average() -> None:
    """Over evenly spaced phases the mean count of an id is S pi_v (up to 1/R), pi = p^b renormalised over the
    tail; no top-k id is ever drawn."""
    v, k, s, r, b = 97, 5, 16, 4000, 0.5
    logp = (torch.randn(1, v, generator=torch.Generator().manual_seed(1)) * 2).log_softmax(-1).expand(r, -1)
    top = logp.topk(k, -1).indices
    phase = (torch.arange(r, dtype=torch.float64) + 0.5) / r
    ids, log_z = codec.tail_sample(logp, top, s, b, phase)
    assert ids.shape == (r, s) and not torch.isin(ids, top[0]).any()
    rest = (b * logp[0].double()).scatter(0, top[0], -math.inf)
    torch.testing.assert_close(log_z[0].double(), rest.logsumexp(0), rtol=1e-6, atol=1e-6)
    counts = torch.zeros(v, dtype=torch.float64).index_add_(0, ids.reshape(-1), torch.ones(r * s, dtype=torch.float64))
    assert (counts / r - s * rest.softmax(0)).abs().max() <= 1.0 / r + 1e-9
    # Each token's own count of an id is floor or ceil of S pi_v: the sample is spread, not clumped.
    per_row = torch.zeros(r, v).scatter_add_(1, ids, torch.ones(r, s))
    expected = s * rest.softmax(0).float()
    assert ((per_row - expected).abs() < 1 + 1e-4).all()


def test_empty_tail_rows_draw_nothing() -> None:
    logp = torch.full((2, 6), -math.inf)
    logp[:, :3] = torch.tensor([-0.5, -1.5, -2.0]).log_softmax(-1)
    ids, log_z = codec.tail_sample(logp, logp.topk(3, -1).indices, 4, 0.5, torch.tensor([0.1, 0.9]))
    assert torch.isneginf(log_z).all() and (ids == 0).all()


def test_sample_phase_is_in_unit_interval_and_spread() -> None:
    ex, pos = torch.arange(500).repeat_interleave(40), torch.arange(40).repeat(500)
    u = codec.sample_phase(ex, pos)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 100  # equidistributed: within 5% per tenth


@pytest.mark.parametrize(("vocab", "dtype"), [(49152, torch.uint16), (65536, torch.uint16), (151665, torch.int32)])
def test_id_dtype_and_bytes_per_token(vocab: int, dtype: torch.dtype) -> None:
    assert codec.id_dtype(vocab) == dtype
    c, k, s = 3, 8, 5
    logp = torch.randn(c, 300).log_softmax(-1)
    for bits, samples in ((8, s), (16, s), (8, 0), (16, 0)):
        enc = codec.encode(
            logp, k=k, samples=samples, bits=bits, vocab_size=vocab, phase=torch.zeros(c, dtype=torch.float64)
        )
        stored = sum(t.nbytes for t in enc.values()) // c + 4  # + the fp32 entropy, stored beside
        assert stored == codec.bytes_per_token(k, samples, bits, vocab), (bits, samples)
        assert enc["topk_ids"].dtype == dtype


def test_decode_reads_both_encodings() -> None:
    logp = torch.randn(4, 200, generator=torch.Generator().manual_seed(3)).log_softmax(-1)
    phase = torch.linspace(0, 0.9, 4, dtype=torch.float64)
    for bits in (8, 16):
        enc = codec.encode(logp, k=6, samples=7, bits=bits, vocab_size=200, phase=phase)
        ids, lp, sid, slp = codec.decode(enc, 1, 3)
        assert ids.dtype == sid.dtype == torch.long and ids.shape == (2, 6) and slp.shape == (2, 7)
        assert torch.equal(ids, logp[1:3].topk(6, -1).indices)
        torch.testing.assert_close(slp, logp[1:3].gather(1, sid), atol=0.05 if bits == 8 else 5e-3, rtol=0)
    enc = codec.encode(logp, k=6, samples=0, bits=16, vocab_size=200)
    assert codec.decode(enc, 0, 4)[2:] == (None, None)
