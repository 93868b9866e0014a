"""Offline teacher cache: round trip against a live teacher, hidden states, integrity checks and resume."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from egad.data import batches as D
from egad.data.batches import shift_labels
from egad.losses import sparse
from egad.losses.sparse import entropy_matched_tail
from egad.paths import sha256_file
from egad.plan.entropy import token_entropy
from egad.teacher.cache import (
    CacheError,
    TeacherCache,
    codec,
    fingerprint_examples,
    reader,
    tokenizer_sha256,
    write_cache,
)
from egad.teacher.online import OnlineTeacher

ARGS = {"template": "alpaca", "max_prompt_len": 48, "max_len": 96, "progress": False}


@pytest.fixture(scope="module")
def setup(dolly_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records, _ = D.load_records(dolly_path, "train", max_examples=24)
    items, _ = D.tokenize_dataset(records, tok, template="alpaca", max_prompt_len=48, max_len=96)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        # A wide init gives peaked, varied teacher distributions, so top-k, tail and entropy are not all ~uniform.
        initializer_range=0.5,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return tok, items, model


def live(model, tok, items, layers=()):
    batch = D.collate(items, tok.pad_token_id)
    sig = OnlineTeacher(model, list(layers))(batch["input_ids"], batch["attention_mask"])
    return shift_labels(batch["labels"]), sig


def test_round_trip_matches_live_teacher(setup, tmp_path):
    """The fp16 encoding without a tail sample: what format 1 stored, with uint16 ids."""
    tok, items, model = setup
    m = write_cache(model, tok, items, tmp_path, k=16, tail_samples=0, logprob_bits=16, examples_per_shard=10,
                    batch_size=4, **ARGS, extra={"x": 2})  # fmt: skip
    assert m["complete"] and len(m["shards"]) == 3 and len(m["knots"]) == 1001 and m["x"] == 2
    assert m["format_version"] == 2 and m["id_dtype"] == "uint16" and m["tail_samples"] == 0
    cache = TeacherCache(tmp_path, expect={"tokenizer_sha256": tokenizer_sha256(tok), "k": 16})
    # A different batch composition from the one the cache was written with (padding differs).
    idx = [3, 11, 0, 23, 17]
    targets, sig = live(model, tok, [items[i] for i in idx])
    got = cache.lookup(idx, targets)
    resp = targets != -100
    v = len(tok)
    logp = torch.log_softmax(sig.logits[..., :v].float(), -1)[resp]
    top = logp.topk(16, -1)
    assert torch.equal(got.ids[resp], top.indices)
    torch.testing.assert_close(got.logprobs[resp], top.values, rtol=1e-3, atol=1e-4)  # fp16 rounding is relative
    expected_tail = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(got.tail_logmass[resp], expected_tail, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.entropy[resp], token_entropy(sig.logits[resp][:, :v]), rtol=0, atol=1e-5)
    assert (got.ids[~resp] == 0).all() and torch.isneginf(got.tail_logmass[~resp]).all()
    assert got.features is None and got.feature_mask is None and got.vocab_rows == v and got.tail_sample is None
    assert 16 * 4 + 8 <= cache.bytes_per_token < 16 * 4 + 8 + 16 and cache.hidden_bytes == 0
    assert cache.knots[0] <= cache.knots[500] <= cache.knots[-1]


def _half_step_bound(true: Tensor) -> Tensor:
    """The most an 8-bit code can be off (codec.quantise): half the row's step, range / 254 rounded one fp16 ulp up,
    or the fp16 rounding of the row's largest value, which is the offset. (C, n) -> (C, 1)"""
    hi = true.amax(-1, keepdim=True)
    lo = true.masked_fill(~torch.isfinite(true), math.inf).amin(-1, keepdim=True)
    ulp = hi.abs() * 2.0**-11
    return torch.maximum((hi - lo + ulp) / 254 * (1 + 2.0**-9) / 2, ulp) + 1e-6


def test_round_trip_of_the_default_encoding(setup, tmp_path):
    """k ids and log-probs as 8-bit codes, plus 56 ids drawn from the tail, their codes and log sum_tail p^(1/2)."""
    tok, items, model = setup
    m = write_cache(model, tok, items, tmp_path, k=16, examples_per_shard=10, batch_size=4, **ARGS)
    assert (m["tail_samples"], m["logprob_bits"], m["sample_exponent"], m["dtype"]) == (56, 8, 0.5, "uint8")
    cache = TeacherCache(tmp_path)
    idx = [3, 11, 0, 23, 17]
    targets, sig = live(model, tok, [items[i] for i in idx])
    got = cache.lookup(idx, targets)
    resp = targets != -100
    v = len(tok)
    logp = torch.log_softmax(sig.logits[..., :v].float(), -1)[resp]  # (n, V)
    top = logp.topk(16, -1)
    assert torch.equal(got.ids[resp], top.indices)
    assert ((got.logprobs[resp] - top.values).abs() <= _half_step_bound(top.values)).all()
    sample = got.tail_sample
    ids, lp = sample.ids[resp], sample.logprobs[resp]
    assert ids.shape == (int(resp.sum()), 56) and sample.exponent == 0.5
    assert not (ids[:, :, None] == top.indices[:, None, :]).any()  # drawn from outside the top-k only
    true = logp.gather(1, ids)
    assert ((lp - true).abs() <= _half_step_bound(true)).all()
    rest = logp.scatter(1, top.indices, -math.inf)
    torch.testing.assert_close(sample.log_z[resp], (0.5 * rest).logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(sample.log_z[~resp]).all() and (sample.ids[~resp] == 0).all()
    # The sample depends on the token's (example, position), not on the batch the writer ran it in.
    width = resp.shape[1]
    rows = resp.reshape(-1).nonzero().squeeze(-1)
    phase = codec.sample_phase(torch.tensor(idx)[rows // width], rows % width)
    redrawn, _ = codec.tail_sample(logp, top.indices, 56, 0.5, phase)
    # fp32 logits move a little with the batch's padding, which may carry a point across an id boundary: rarely.
    assert (redrawn == ids).float().mean() > 0.99
    base = codec.bytes_per_token(16, 56, 8, v)  # + offsets and safetensors headers, per token
    assert base == 16 * 3 + 56 * 3 + 2 * 4 + 3 * 4 and base <= cache.bytes_per_token < base + 8


def test_k_equals_vocab_has_empty_tail(setup, tmp_path):
    tok, items, model = setup
    v = len(tok)
    m = write_cache(model, tok, items[:4], tmp_path, k=v, logprob_bits=16, **ARGS)
    assert m["tail_samples"] == 0  # nothing outside the top-k to sample
    targets, sig = live(model, tok, items[:4])
    got = TeacherCache(tmp_path).lookup(list(range(4)), targets)
    resp = targets != -100
    assert torch.isneginf(got.tail_logmass[resp]).all() and got.tail_sample is None
    assert torch.equal(got.ids[resp].sort(-1).values, torch.arange(v).expand(int(resp.sum()), v))
    torch.testing.assert_close(got.logprobs[resp].logsumexp(-1), torch.zeros(int(resp.sum())), atol=1e-3, rtol=0)


def test_hidden_states_of_high_entropy_tokens(setup, tmp_path):
    tok, items, model = setup
    m = write_cache(model, tok, items, tmp_path, k=8, layers=[1, 2], hidden_quantile=0.5, calib_examples=24, **ARGS)
    cache = TeacherCache(tmp_path, expect={"layers": [1, 2], "hidden_quantile": 0.5})
    idx = list(range(0, 24, 3))
    targets, sig = live(model, tok, [items[i] for i in idx], layers=[1, 2])
    got = cache.lookup(idx, targets)
    resp = targets != -100
    hard = resp & (got.entropy >= m["hidden_threshold"])
    assert torch.equal(got.feature_mask, hard) and 0.3 < hard.sum() / resp.sum() < 0.7
    for cached, ref in zip(got.features, sig.features, strict=True):
        torch.testing.assert_close(cached[hard], ref[hard], rtol=1e-3, atol=1e-3)
        assert (cached[~hard] == 0).all()
    assert cache.hidden_bytes > 0
    # A layer map that reads a subset of the stored layers (the study's last-layer feature control) gets those only.
    subset = TeacherCache(tmp_path)
    subset.require_layers([2])
    only = subset.lookup(idx, targets)
    assert len(only.features) == 1 and torch.equal(only.features[0], got.features[1])
    with pytest.raises(CacheError, match=r"stores teacher layers \[1, 2\].*maps to \[2, 3\] \(\[3\] missing\)"):
        subset.require_layers([2, 3])


def test_corrupted_shard_is_named(setup, tmp_path):
    tok, items, model = setup
    m = write_cache(model, tok, items, tmp_path, k=4, examples_per_shard=12, **ARGS)
    shard = tmp_path / m["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    cache = TeacherCache(tmp_path)
    targets, _ = live(model, tok, items[:2])
    cache.lookup([0, 1], targets)  # shard 0 is intact
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256 mismatch"):
        cache.lookup([12, 13], targets)


def test_identity_mismatch_and_wrong_rows(setup, tmp_path):
    tok, items, model = setup
    write_cache(model, tok, items[:6], tmp_path, k=4, **ARGS)
    with pytest.raises(CacheError, match="'template'"):
        TeacherCache(tmp_path, expect={"template": "chat"})
    with pytest.raises(CacheError, match="'data_fingerprint'"):
        TeacherCache(tmp_path, expect={"data_fingerprint": fingerprint_examples(items[:6], "alpaca", 48, 128)})
    targets, _ = live(model, tok, items[:2])
    with pytest.raises(CacheError, match="cache rows do not match the tokenized data"):
        TeacherCache(tmp_path).lookup([1, 0], targets)
    with pytest.raises(CacheError, match="'k' is 4 in the existing cache but 8 now"):
        write_cache(model, tok, items[:6], tmp_path, k=8, **ARGS)
    with pytest.raises(CacheError, match="'tail_samples' is 56 in the existing cache but 8 now"):
        write_cache(model, tok, items[:6], tmp_path, k=4, tail_samples=8, **ARGS)
    with pytest.raises(CacheError, match="'logprob_bits' is 8 in the existing cache but 16 now"):
        write_cache(model, tok, items[:6], tmp_path, k=4, logprob_bits=16, **ARGS)
    with pytest.raises(CacheError, match="tail_samples >= 0 and logprob_bits 8 or 16"):
        write_cache(model, tok, items[:6], tmp_path / "x", k=4, logprob_bits=4, **ARGS)


def test_interrupted_run_resumes_to_identical_files(setup, tmp_path):
    tok, items, model = setup
    args = dict(k=8, layers=[2], hidden_quantile=0.7, calib_examples=8, examples_per_shard=8, batch_size=3, **ARGS)
    clean = write_cache(model, tok, items, tmp_path / "clean", **args)
    part = write_cache(model, tok, items, tmp_path / "run", **args, stop_after_shards=1)
    assert not part["complete"] and len(part["shards"]) == 1
    assert not json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]
    with pytest.raises(CacheError, match="incomplete .*run `egad cache`"):
        TeacherCache(tmp_path / "run")
    part = write_cache(model, tok, items, tmp_path / "run", **args, stop_after_shards=1)
    assert len(part["shards"]) == 2
    # A listed shard corrupted between runs is rewritten, with everything after it.
    (tmp_path / "run" / "shard-00001.safetensors").write_bytes(b"garbage")
    done = write_cache(model, tok, items, tmp_path / "run", **args)
    assert done["complete"]
    assert [s["sha256"] for s in done["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert done["knots"] == clean["knots"] and done["hidden_threshold"] == clean["hidden_threshold"]
    assert not math.isnan(done["bytes_per_token"])
    assert write_cache(model, tok, items, tmp_path / "run", **args) == done  # complete: no work
    with pytest.raises(CacheError, match="'k'"):
        write_cache(model, tok, items, tmp_path / "run", **{**args, "k": 4})


def test_bf16_teacher_pass_is_recorded_and_close_to_fp32(setup, tmp_path):
    tok, items, model = setup
    fp32 = write_cache(model, tok, items[:6], tmp_path / "fp32", k=8, **ARGS)
    bf16 = write_cache(model, tok, items[:6], tmp_path / "bf16", k=8, precision="bf16", **ARGS)
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    h = [TeacherCache(tmp_path / p).entropy_sample(10_000) for p in ("fp32", "bf16")]
    assert h[0].numel() == h[1].numel() == fp32["tokens"]
    assert not torch.equal(h[0].sort().values, h[1].sort().values)  # the autocast really ran
    # bf16 rounds these very peaked toy logits (|z| ~ 50, steps of 0.25) yet keeps the distribution of entropies.
    assert abs(float(h[1].mean() - h[0].mean())) < 0.02 * float(h[0].mean())
    with pytest.raises(CacheError, match="'precision' is 'bf16' in the existing cache but 'fp32' now"):
        write_cache(model, tok, items[:6], tmp_path / "bf16", k=8, **ARGS)
    with pytest.raises(CacheError, match="precision"):
        write_cache(model, tok, items[:6], tmp_path / "x", k=8, precision="fp16", **ARGS)


# ---------------------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def sharded(setup, tmp_path_factory):
    """12 shards of 2 examples, with hidden states: many more shards than a small LRU holds."""
    tok, items, model = setup
    path = tmp_path_factory.mktemp("sharded")
    m = write_cache(model, tok, items, path, k=4, layers=[1, 2], hidden_quantile=0.5, calib_examples=24,
                    examples_per_shard=2, batch_size=8, **ARGS)  # fmt: skip
    assert len(m["shards"]) == 12
    return path


def targets_of(tok, items, idx):
    return shift_labels(D.collate([items[i] for i in idx], tok.pad_token_id)["labels"])


def flip_byte(file):
    """Modify a shard in place (no truncation: it may be mapped) and move its mtime on, as a later write would; a
    same-size write within the filesystem's timestamp granularity is invisible to size + mtime."""
    with open(file, "r+b") as fh:
        fh.seek(-3, 2)
        byte = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([byte[0] ^ 1]))
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_lru_is_bounded_and_matches_an_unbounded_reader(setup, sharded, monkeypatch):
    tok, items, _ = setup
    hashed = []
    monkeypatch.setattr(reader, "sha256_file", lambda f: hashed.append(f.name) or sha256_file(f))
    full, small = TeacherCache(sharded, max_shards=100), TeacherCache(sharded, max_shards=3)
    held, opened = [], small._shard

    def spy(i):
        t = opened(i)
        held.append(len(small.shards_held))
        return t

    small._shard = spy
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    spans = []
    for b in range(0, len(order), 8):
        idx = order[b : b + 8]
        spans.append(len({i // 2 for i in idx}))
        targets = targets_of(tok, items, idx)
        want, got = full.lookup(idx, targets), small.lookup(idx, targets)
        for name in ("ids", "logprobs", "tail_logmass", "entropy", "feature_mask"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        for name in ("ids", "logprobs", "log_z"):
            assert torch.equal(getattr(got.tail_sample, name), getattr(want.tail_sample, name)), name
        assert all(torch.equal(g, w) for g, w in zip(got.features, want.features, strict=True))
        assert got.feature_mask.any()
    assert max(spans) > 3 and max(held) == 3 and len(full.shards_held) == 12
    # Each shard is hashed once per reader, though the small one evicted and re-read most of them.
    assert sorted(hashed) == sorted(2 * [f"shard-{i:05d}.safetensors" for i in range(12)])
    assert len(held) > 12


def test_shard_modified_after_verification_is_caught(setup, sharded, tmp_path):
    tok, items, _ = setup
    path = tmp_path / "cache"
    shutil.copytree(sharded, path)
    cache = TeacherCache(path, max_shards=1)
    one, two = targets_of(tok, items, [0]), targets_of(tok, items, [2])
    cache.lookup([0], one)  # verifies shard 0
    cache.lookup([2], two)  # evicts it
    st = (path / "shard-00001.safetensors").stat()
    os.utime(path / "shard-00001.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, unchanged
    cache.lookup([2], two)
    flip_byte(path / "shard-00000.safetensors")
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors: sha256 mismatch .*rerun `egad cache`"):
        cache.lookup([0], one)
    assert cache.shards_held == [1]
    flip_byte(path / "shard-00001.safetensors")  # while held
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256 mismatch"):
        cache.lookup([2], two)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_shards(sharded, bad):
    with pytest.raises(CacheError, match="max_shards"):
        TeacherCache(sharded, max_shards=bad)


# ------------------------------------------------------------------------------------------------------- format 1
def _as_format_1(path) -> None:
    """Rewrite a cache of format 2 with fp16 log-probs and no tail sample into the format-1 layout (int32 ids, the
    manifest without the encoding fields), as an older egad wrote it."""
    m = json.loads((path / "manifest.json").read_text())
    for s in m["shards"]:
        file = path / s["file"]
        tensors = load_file(str(file))
        tensors["topk_ids"] = tensors["topk_ids"].int()
        save_file(tensors, str(file))
        s["sha256"], s["bytes"] = sha256_file(file), file.stat().st_size
    for name in ("tail_samples", "sample_exponent", "logprob_bits", "id_dtype"):
        del m[name]
    m["format_version"], m["dtype"] = 1, "float16"
    (path / "manifest.json").write_text(json.dumps(m))


def test_format_1_cache_still_reads_and_is_not_resumed(setup, tmp_path):
    tok, items, model = setup
    args = dict(k=8, tail_samples=0, logprob_bits=16, examples_per_shard=4, **ARGS)
    write_cache(model, tok, items[:8], tmp_path / "v2", **args)
    shutil.copytree(tmp_path / "v2", tmp_path / "v1")
    _as_format_1(tmp_path / "v1")
    idx = [5, 0, 7]
    targets = targets_of(tok, items, idx)
    old, new = TeacherCache(tmp_path / "v1").lookup(idx, targets), TeacherCache(tmp_path / "v2").lookup(idx, targets)
    assert old.tail_sample is None
    for name in ("ids", "logprobs", "tail_logmass", "entropy"):
        assert torch.equal(getattr(old, name), getattr(new, name)), name
    # The loss it gives is the bucket one, with the entropy-matched tail: what format 1 always gave.
    flat = (targets != -100).reshape(-1).nonzero().squeeze(-1)
    v = len(tok)
    student = torch.randn(flat.numel(), v, generator=torch.Generator().manual_seed(0))
    ids, lp, tail = old.rows_topk(flat)
    h = old.entropy_at(flat)
    for tau in (1.0, 2.0):
        want = sparse.forward_kl(student, ids, lp, entropy_matched_tail(lp, tail, h, 1 / tau, vocab_size=v),
                                 temperature=tau)  # fmt: skip
        got = old.chunk(flat, v).divergence("forward_kl", student, torch.full((flat.numel(),), tau))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(CacheError, match=r"format-1 cache.*delete .*v1 and rerun `egad cache`"):
        write_cache(model, tok, items[:8], tmp_path / "v1", **args)
