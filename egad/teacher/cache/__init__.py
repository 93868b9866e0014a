"""The offline teacher cache: the teacher's top-k distribution per response token, computed once, read by training.

A cache directory holds `manifest.json` and shards `shard-00000.safetensors`, ... Shard s covers the tokenized
examples [start, end) of the list given to `write_cache` (positions in that list, not `item["index"]`). Per shard
(format 2; the encoding is `egad.teacher.cache.codec`):

    example_index    int64 (n_ex,)      the examples' positions in the list
    token_offsets    int64 (n_ex + 1,)  rows of example j are [off[j], off[j+1]): its response positions (targets !=
                                        -100 after `shift_labels`) in position order
    topk_ids         uint16 (n_tok, k)  teacher top-k ids at tau = 1 over the first `vocab_size` logits, most likely
                                        first; int32 when vocab_size > 65536
    topk_logprobs    uint8 (n_tok, k)   their log-probs as 8-bit codes (fp16 log-probs with logprob_bits = 16)
    topk_scale       fp16 (n_tok, 2)    the codes' per-token (offset, step): log p = offset - step * code
    tail_logmass     fp32 (n_tok,)      log(1 - sum_topk p), -inf when k = vocab_size
    entropy          fp32 (n_tok,)      exact teacher entropy (nats, tau = 1) of the fp32 logits
    sample_ids       (n_tok, S)         with tail_samples = S > 0: ids drawn from the tail in proportion to p^(1/2)
    sample_logprobs  (n_tok, S)         their log-probs, coded as the top-k's (with a `sample_scale` at 8 bits)
    tail_logz        fp32 (n_tok,)      log sum_tail p^(1/2), exact
    hidden_rows      int64 (n_hard,)    optional: rows whose entropy >= `hidden_threshold`
    hidden_{t}       fp16 (n_hard, d)   optional: teacher layer t's hidden state there (egad.models.load)

The default (k = 64, S = 56, 8 bits) takes 380 bytes per token for a vocabulary up to 65,536. Format 1 (int32 ids,
fp16 log-probs, no sample) still reads, and serves the signal it always did; `write_cache` refuses to resume or
extend it and says how to rebuild it.

The manifest records the identity (teacher id/revision/weights hash, tokenizer hash, data fingerprint, template, k,
vocab_size, layers, hidden_quantile), the teacher pass's precision (fp32, or bf16 autocast; a cache resumes only
in the precision it started in), the shard list with sha256s, and at completion the 1001 global entropy quantile
knots over all cached tokens (`complete: true`). It is replaced atomically after each shard, and a shard is written
under a temporary name and renamed, so a killed run never lists a half-written shard; rerunning `write_cache` with the
same arguments verifies the listed shards and resumes after them (byte-identical to an uninterrupted run given the
same batch_size, which is not part of the identity: padding can move the last bits of the teacher's forward). Shard
entries also carry `bytes` and `hidden_bytes`; the knots use every token up to KNOT_SAMPLES, a uniform sample beyond.

`TeacherCache` streams: a shard is memory-mapped when a batch needs it and at most `max_shards` (default 4) are held,
least recently used evicted first, so a reader's memory is a few shards whatever the cache's size or batch order (a
rank reads only the shards holding its examples). A shard's sha256 is checked on its first read; its size, mtime and
inode on every later use, and a changed file is hashed again (an evicted shard is not re-hashed otherwise).

The hidden-state threshold must be known before the first shard is written, so it is the `hidden_quantile` quantile of
the response-token entropies of the first `calib_examples` examples (one extra teacher pass over them), not of the
whole data set: the fraction of tokens kept overall is only approximately 1 - hidden_quantile.

Approximations: 8-bit log-probs are off by at most half a step (the token's top-k range / 254, about 0.03 nats for a
range of 8), fp16 ones by a relative 2^-11; hidden states are fp16 (clamped to +-65504). The tail sample makes the
forward-KL family's tail term a Monte-Carlo estimate (`egad.losses.sparse_tail`): right on average, noisy per token.
The tail log-mass is computed in fp32 as a logsumexp over the log-probs outside the top-k, which equals
log(1 - sum_topk p) but stays exact when the top-k holds almost all the mass. The entropy and tail come from fp32
logits, so they are as exact as the teacher's forward.
"""

from egad.teacher.cache import codec
from egad.teacher.cache.format import (
    FORMAT_VERSION,
    IDENTITY,
    MANIFEST,
    CacheError,
    fingerprint_examples,
    run_identity,
    tokenizer_sha256,
    weights_sha256,
)
from egad.teacher.cache.reader import TeacherCache
from egad.teacher.cache.writer import write_cache

__all__ = [
    "FORMAT_VERSION",
    "IDENTITY",
    "MANIFEST",
    "CacheError",
    "TeacherCache",
    "codec",
    "fingerprint_examples",
    "run_identity",
    "tokenizer_sha256",
    "weights_sha256",
    "write_cache",
]
