"""Peak memory of the cache reader over a whole cache, small vs 10x larger: it must not grow with the cache.

Writes two caches with a tiny random Llama teacher (built from a config, synthetic token ids; k = 64, the hidden
states of teacher layers 1 and 2 at the top-50% entropy tokens): `--shards` shards and `--scale` times as many, with
the same examples per shard. Then reads every example of each through `TeacherCache.lookup` in a shuffled batch
order, each in a fresh process, and prints the reader's peak resident memory above the level before it started
(VmHWM, reset through /proc/self/clear_refs: torch's allocations and the shards' memory maps are invisible to
tracemalloc), the ratio large / small (the goal: <= 1.5) and the time per batch.

    python bench/cache_memory.py                      # 4 and 40 shards of 64 examples, about 2 minutes on 1 core
    python bench/cache_memory.py --shards 2 --examples-per-shard 32 --max-shards 2
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from egad.data import batches as D
from egad.teacher.cache import TeacherCache, write_cache

VOCAB = 4096


class _Tok:
    """The tokenizer fields the cache writer reads (ids are synthetic here)."""

    pad_token_id = 0
    eos_token_id = 1
    all_special_ids = [0, 1]

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": 0, "</s>": 1}


def synthetic_items(n: int, seed: int) -> list[dict]:
    """Short prompts, 64-192 response tokens: cache rows are response tokens only."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt = int(torch.randint(8, 33, (1,), generator=g))
        resp = int(torch.randint(64, 193, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (prompt + resp,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "index": i})
    return items


def build(out: Path, n_examples: int, per_shard: int) -> dict:
    cfg = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    items = synthetic_items(n_examples, seed=0)
    kw = {"hash_weights": False, "progress": False, "max_len": 256, "batch_size": 16}
    return write_cache(
        teacher, _Tok(), items, out, k=64, layers=[1, 2], hidden_quantile=0.5, calib_examples=64,
        examples_per_shard=per_shard, **kw,
    )  # fmt: skip


def _proc_field(key: str) -> int:
    """A 'Key: value kB' line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def read_all(path: Path, batch: int, max_shards: int, seed: int) -> dict:
    """One shuffled pass over every example through `lookup`; peak RSS growth and seconds per batch."""
    torch.set_num_threads(1)
    m = json.loads((path / "manifest.json").read_text())
    items = synthetic_items(m["examples"], seed=0)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = _proc_field("VmRSS")
    cache = TeacherCache(path, max_shards=max_shards)
    times, held = [], 0
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        targets = D.shift_labels(D.collate([items[i] for i in idx], 0)["labels"])
        t0 = time.perf_counter()
        sig = cache.lookup(idx, targets)
        times.append(time.perf_counter() - t0)
        held = max(held, len(cache.shards_held))
        del sig
    peak = _proc_field("VmHWM") - start
    return {"peak": peak, "batch_s": statistics.mean(times), "median_s": statistics.median(times), "held": held}


def tracemalloc_sees_torch() -> bool:
    """Whether tracemalloc counts a 40 MB torch tensor (it does not: torch allocates outside Python's allocator)."""
    tracemalloc.start()
    x = torch.ones(10_000_000)
    seen = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seen >= x.nbytes // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4, help="shards of the small cache")
    ap.add_argument("--scale", type=int, default=10, help="the large cache has this many times the shards")
    ap.add_argument("--examples-per-shard", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-shards", type=int, default=4, help="the reader's LRU bound")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read", help=argparse.SUPPRESS)  # internal: read one cache in this (fresh) process
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.read:
        print(json.dumps(read_all(Path(args.read), args.batch, args.max_shards, args.seed)))
        return
    print(f"tracemalloc sees torch allocations: {tracemalloc_sees_torch()} (so peaks are VmHWM growth)")
    tmp = Path(tempfile.mkdtemp(prefix="egad-cache-memory-"))
    try:
        rows = {}
        for name, shards in (("small", args.shards), ("large", args.shards * args.scale)):
            t0 = time.perf_counter()
            m = build(tmp / name, shards * args.examples_per_shard, args.examples_per_shard)
            size = sum(s["bytes"] for s in m["shards"])
            print(f"{name}: {len(m['shards'])} shards, {m['tokens']} tokens, {size / 2**20:.1f} MiB "
                  f"({size / len(m['shards']) / 2**20:.2f} MiB/shard), written in {time.perf_counter() - t0:.1f} s",
                  flush=True)  # fmt: skip
            cmd = [sys.executable, __file__, "--read", str(tmp / name), "--batch", str(args.batch),
                   "--max-shards", str(args.max_shards), "--seed", str(args.seed)]  # fmt: skip
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows[name] = r | {"bytes": size}
            print(f"{name}: peak reader memory {r['peak'] / 2**20:.1f} MiB (cache {size / 2**20:.1f} MiB), "
                  f"{r['batch_s'] * 1e3:.2f} ms/batch mean, {r['median_s'] * 1e3:.2f} median (batch {args.batch}), "
                  f"at most {r['held']} shards held", flush=True)  # fmt: skip
        ratio = rows["large"]["peak"] / rows["small"]["peak"]
        print(f"peak large / small = {ratio:.2f} (goal <= 1.5; cache sizes differ {args.scale}x)")
        print(json.dumps({k: {"peak_mib": round(v["peak"] / 2**20, 2), "ms_per_batch": round(v["batch_s"] * 1e3, 3)}
                          for k, v in rows.items()} | {"ratio": round(ratio, 3)}))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
