"""The cache reader's batched gather against a naive per-example reference: every field bit for bit."""

from __future__ import annotations

import bisect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from egad.teacher.cache import CacheError, TeacherCache, codec, write_cache

V = 97  # odd, so no row width lines up with anything


class _Tok:
    pad_token_id = 0
    eos_token_id = 1
    all_special_ids = [0, 1]

    def get_vocab(self):
        return {"<pad>": 0, "</s>": 1}


def _items(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt, resp = int(torch.randint(1, 9, (), generator=g)), int(torch.randint(1, 14, (), generator=g))
        ids = torch.randint(3, V, (prompt + resp,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "index": i})
    return items


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    items = _items(23)
    root = tmp_path_factory.mktemp("lookup")
    kw = dict(vocab_size=V, examples_per_shard=5, batch_size=4, hash_weights=False, progress=False, max_len=64)
    write_cache(model, _Tok(), items, root / "q8", k=7, tail_samples=11, layers=[1, 2], hidden_quantile=0.6, **kw)
    write_cache(model, _Tok(), items, root / "fp16", k=5, tail_samples=0, logprob_bits=16, **kw)
    caches = {name: TeacherCache(root / name, max_shards=2) for name in ("q8", "fp16")}
    caches["q8_layer_2"] = TeacherCache(root / "q8", max_shards=2)
    caches["q8_layer_2"].require_layers([2])  # a layer map that reads a subset of the stored layers
    return items, caches


def _targets(items: list[dict], idx: list[int]) -> torch.Tensor:
    """(B, L) next-token targets of the items, right-padded with -100 (as shift_labels of a collated batch)."""
    width = max(len(items[i]["labels"]) for i in idx) + 2
    out = torch.full((len(idx), width), -100)
    for b, i in enumerate(idx):
        labels = items[i]["labels"][1:]
        out[b, : len(labels)] = torch.tensor(labels)
    return out


def _reference(cache: TeacherCache, idx: list[int], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The lookup example by example, row slice by row slice: what the reader did before it gathered in batches."""
    bsz, length = targets.shape
    mask = targets != -100
    k, s = cache.k, cache.tail_samples
    out = {
        "ids": torch.zeros(bsz, length, k, dtype=torch.long),
        "logprobs": torch.zeros(bsz, length, k),
        "tail_logmass": torch.full((bsz, length), float("-inf")),
        "entropy": torch.zeros(bsz, length),
        "feature_mask": torch.zeros(bsz, length, dtype=torch.bool),
        "sample_ids": torch.zeros(bsz, length, s, dtype=torch.long),
        "sample_logprobs": torch.zeros(bsz, length, s),
        "log_z": torch.full((bsz, length), float("-inf")),
    }
    feats = []
    starts = [sh["start"] for sh in cache.manifest["shards"]]
    for b, ex in enumerate(idx):
        i = bisect.bisect_right(starts, ex) - 1
        t = cache._shard(i)
        j = ex - starts[i]
        lo, hi = int(t["token_offsets"][j]), int(t["token_offsets"][j + 1])
        pos = mask[b].nonzero().squeeze(-1)
        assert pos.numel() == hi - lo
        ids, lp, sid, slp = codec.decode(t, lo, hi)
        out["ids"][b, pos], out["logprobs"][b, pos] = ids, lp
        out["tail_logmass"][b, pos], out["entropy"][b, pos] = t["tail_logmass"][lo:hi], t["entropy"][lo:hi]
        if s:
            out["sample_ids"][b, pos], out["sample_logprobs"][b, pos] = sid, slp
            out["log_z"][b, pos] = t["tail_logz"][lo:hi]
        if cache.layers:
            rows = t["hidden_rows"]
            a, z = int(torch.searchsorted(rows, lo)), int(torch.searchsorted(rows, hi))
            at = pos[rows[a:z] - lo]
            out["feature_mask"][b, at] = True
            if not feats:
                feats = [torch.zeros(bsz, length, t[f"hidden_{m}"].shape[-1]) for m in cache.layers]
            for f, m in zip(feats, cache.layers, strict=True):
                f[b, at] = t[f"hidden_{m}"][a:z].float()
    for n, f in enumerate(feats):
        out[f"feature_{n}"] = f
    return out


@pytest.mark.parametrize("name", ["q8", "fp16", "q8_layer_2"])
@pytest.mark.parametrize("idx", [[3], [22, 0, 7, 13, 5, 19, 11], [4, 4, 9, 21, 2], list(range(23))[::-1]])
def test_batched_lookup_equals_the_per_example_reference(caches, name, idx):
    items, by_name = caches
    cache = by_name[name]
    targets = _targets(items, idx)
    want = _reference(cache, idx, targets)
    got = cache.lookup(idx, targets)
    for field in ("ids", "logprobs", "tail_logmass", "entropy"):
        assert getattr(got, field).dtype == want[field].dtype, field
        assert torch.equal(getattr(got, field), want[field]), field
    if cache.tail_samples:
        for field, ref in (("ids", "sample_ids"), ("logprobs", "sample_logprobs"), ("log_z", "log_z")):
            assert torch.equal(getattr(got.tail_sample, field), want[ref]), field
    else:
        assert got.tail_sample is None
    if cache.layers:
        assert len(got.features) == len(cache.layers)
        assert torch.equal(got.feature_mask, want["feature_mask"]) and got.feature_mask.any()
        assert all(torch.equal(f, want[f"feature_{n}"]) for n, f in enumerate(got.features))
    else:
        assert got.features is None and got.feature_mask is None


def test_batched_lookup_names_the_first_mismatched_example(caches):
    items, by_name = caches
    targets = _targets(items, [6, 8, 2])
    targets[1, targets[1] != -100] = -100  # example 8 loses its response tokens in the batch
    with pytest.raises(CacheError, match=r"example 8 has 0 response tokens in the batch but \d+ cache rows"):
        by_name["q8"].lookup([6, 8, 2], targets)
