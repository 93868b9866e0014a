"""Writing the cache: one teacher pass over the tokenized training split, shard by shard, resumable."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from egad.data import batches as D
from egad.paths import sha256_file
from egad.plan.entropy import token_entropy
from egad.plan.entropy_stream import EntropyQuantileCalibrator
from egad.teacher.cache import codec
from egad.teacher.cache.format import (
    _FP16_MAX,
    FORMAT_VERSION,
    KNOT_SAMPLES,
    MANIFEST,
    NUM_KNOTS,
    CacheError,
    _first_difference,
    _identity,
    _write_json_atomic,
    fingerprint_examples,
    read_manifest,
    tokenizer_sha256,
    weights_sha256,
)
from egad.teacher.online import OnlineTeacher

logger = logging.getLogger("egad.cache")


# ------------------------------------------------------------------------------------------------------------ teacher
@dataclass
class _Pass:
    """The teacher and what every batch of the cache pass shares."""

    teacher: OnlineTeacher
    pad_id: int
    device: torch.device
    vocab: int
    k: int
    batch_size: int
    precision: str = "fp32"
    progress: bool = True
    samples: int = 0
    bits: int = 16

    @torch.no_grad()
    def batch(
        self, items: list[dict], topk: bool = True, first: int = 0
    ) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        """Teacher statistics at a batch's response rows (row-major); `first` is items[0]'s position in the cached
        list (it seeds the tail samples). -> (rows per example, stats on the CPU, features (N, d) on the teacher's
        device)."""
        batch = D.collate(items, self.pad_id)
        mask = D.shift_labels(batch["labels"]) != -100
        rows = mask.reshape(-1).nonzero().squeeze(-1).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with autocast:
            sig = self.teacher(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        # Bounds the fp32 (chunk, V) working set to ~64 MiB whatever the vocabulary.
        step = max(16, 2**24 // self.vocab)
        width = mask.shape[1]
        parts: dict[str, list[Tensor]] = {}
        for i in range(0, rows.numel(), step):
            at = rows[i : i + step]
            z = sig.rows(at, self.vocab)
            parts.setdefault("entropy", []).append(token_entropy(z, chunk_size=None).cpu())
            if topk:
                phase = codec.sample_phase(first + at // width, at % width)
                enc = codec.encode(z.log_softmax(-1), k=self.k, samples=self.samples, bits=self.bits,
                                   vocab_size=self.vocab, phase=phase)  # fmt: skip
                for name, t in enc.items():
                    parts.setdefault(name, []).append(t.cpu())
        stats = {name: torch.cat(p) for name, p in parts.items()}
        feats = [f.reshape(-1, f.shape[-1])[rows] for f in sig.features or []]
        return mask.sum(dim=1), stats, feats

    def threshold(self, items: list[dict], q: float) -> float:
        """The q-quantile of the response-token entropies of `items`, rounded to fp32 so that it compares
        identically with the stored fp32 entropies after a JSON round trip."""
        bs = self.batch_size
        starts = tqdm(range(0, len(items), bs), desc="hidden-state threshold", unit="batch", disable=not self.progress)
        h = torch.cat([self.batch(items[b : b + bs], topk=False)[1]["entropy"] for b in starts])
        s = h.double().sort().values
        pos = q * (s.numel() - 1)
        lo, hi = int(pos), min(int(pos) + 1, s.numel() - 1)
        return float(torch.tensor(float(s[lo] + (pos - lo) * (s[hi] - s[lo])), dtype=torch.float32))

    def shard(
        self, items: list[dict], start: int, layers: list[int], threshold: float | None, bar: tqdm | None = None
    ) -> dict[str, Tensor]:
        """The tensors of the shard made of `items` (examples start, start + 1, ...); `bar` counts examples."""
        counts, stats, hidden_rows = [], [], []
        hidden: list[list[Tensor]] = [[] for _ in layers]
        n_rows = 0
        for b in range(0, len(items), self.batch_size):
            c, s, feats = self.batch(items[b : b + self.batch_size], first=start + b)
            if bar is not None:
                bar.update(len(c))
            counts.append(c)
            stats.append(s)
            if layers:
                h = s["entropy"]
                local = (h >= threshold if threshold is not None else torch.ones_like(h, dtype=bool)).nonzero()[:, 0]
                hidden_rows.append(local + n_rows)
                # Selected per batch: a shard's full (tokens, d) states would not fit in memory for a large teacher.
                for slot, f in zip(hidden, feats, strict=True):
                    chosen = f[local.to(f.device)].float()
                    slot.append(chosen.clamp(-_FP16_MAX, _FP16_MAX).half().cpu())
            n_rows += s["entropy"].numel()
        tensors = {
            "example_index": torch.arange(start, start + len(items), dtype=torch.int64),
            "token_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)]),
        }
        for name in stats[0]:
            tensors[name] = torch.cat([s[name] for s in stats]).contiguous()
        if layers:
            tensors["hidden_rows"] = torch.cat(hidden_rows).to(torch.int64)
            for layer, slot in zip(layers, hidden, strict=True):
                tensors[f"hidden_{layer}"] = torch.cat(slot).contiguous()
        return tensors


def _save_shard(out: Path, index: int, start: int, tensors: dict[str, Tensor]) -> dict:
    """Write under a temporary name, then rename: a kill leaves either no shard file or a complete one."""
    name = f"shard-{index:05d}.safetensors"
    tmp = out / f".{name}.tmp"
    save_file(tensors, str(tmp))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / name)
    n_ex, n_tok = tensors["example_index"].numel(), tensors["entropy"].numel()
    hidden = sum(t.nbytes for n, t in tensors.items() if n.startswith("hidden_"))
    size, sha = (out / name).stat().st_size, sha256_file(out / name)
    return {"file": name, "start": start, "end": start + n_ex, "tokens": n_tok, "sha256": sha, "bytes": size,
            "hidden_bytes": hidden}  # fmt: skip


# -------------------------------------------------------------------------------------------------------------- write
def write_cache(
    teacher_model: torch.nn.Module,
    tokenizer: Any,
    items: list[dict],
    out_dir: str | Path,
    *,
    k: int = 64,
    tail_samples: int = 56,
    logprob_bits: int = 8,
    vocab_size: int | None = None,
    layers: list[int] | None = None,
    hidden_quantile: float | None = None,
    calib_examples: int = 256,
    examples_per_shard: int = 512,
    batch_size: int = 8,
    precision: str = "fp32",
    teacher_id: str = "",
    revision: str | None = None,
    template: str = "alpaca",
    max_prompt_len: int = 256,
    max_len: int = 512,
    hash_weights: bool = True,
    progress: bool = True,
    stop_after_shards: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Cache the teacher's top-k signal over `items` (from `egad.data.batches.tokenize_dataset`) in `out_dir`; returns
    the manifest. Resumes a partial cache with the same identity; `layers` without `hidden_quantile` stores the hidden
    states of every response token. `tail_samples` ids drawn from the tail beyond the top-k (0: none, the bucket
    only; none when k = vocab_size) and `logprob_bits` (8: codes with a per-token scale, 16: fp16) set the encoding
    (egad.teacher.cache.codec); the defaults, k = 64 with 56 samples at 8 bits, take 380 bytes per token for a
    vocabulary of at most 65,536 (bench/cache_fidelity.py measures the choice). `stop_after_shards` returns after
    that many new shards (tests: a simulated kill).
    `extra`: more JSON fields for the manifest (e.g. teacher dimensions), outside the identity."""
    out = Path(out_dir)
    layers = [int(t) for t in layers or []]
    if not items:
        raise CacheError("write_cache: no examples to cache")
    if hidden_quantile is not None and (not layers or not 0.0 <= hidden_quantile < 1.0):
        raise CacheError(f"hidden_quantile={hidden_quantile!r} needs layers and a value in [0, 1)")
    if precision not in ("fp32", "bf16"):
        raise CacheError(f"precision={precision!r}: the teacher pass runs in 'fp32' or under 'bf16' autocast")
    if examples_per_shard < 1 or batch_size < 1:
        raise CacheError(f"examples_per_shard and batch_size must be >= 1, got {examples_per_shard}, {batch_size}")
    head = teacher_model.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else teacher_model.config.vocab_size
    vocab = int(vocab_size or rows)
    if not 1 <= vocab <= rows or not 1 <= k <= vocab:
        raise CacheError(f"need 1 <= k <= vocab_size <= {rows} teacher logit rows, got k={k}, vocab_size={vocab}")
    if tail_samples < 0 or logprob_bits not in (8, 16):
        raise CacheError(f"need tail_samples >= 0 and logprob_bits 8 or 16, got {tail_samples}, {logprob_bits}")
    samples = tail_samples if k < vocab else 0  # nothing outside the top-k to sample
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    teacher = {
        "id": teacher_id,
        "revision": revision,
        "weights_sha256": weights_sha256(teacher_model) if hash_weights else "unhashed",
    }
    m: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "data_fingerprint": fingerprint_examples(items, template, max_prompt_len, max_len),
        "template": template,
        "k": k,
        "tail_samples": samples,
        "sample_exponent": codec.SAMPLE_EXPONENT if samples else None,
        "logprob_bits": logprob_bits,
        "dtype": "uint8" if logprob_bits == 8 else "float16",
        "id_dtype": str(codec.id_dtype(vocab)).removeprefix("torch."),
        "vocab_size": vocab,
        "layers": layers,
        "hidden_quantile": hidden_quantile,
        "hidden_threshold": None,
        "examples": len(items),
        "examples_per_shard": examples_per_shard,
        "precision": precision,
        "shards": [],
        "tokens": 0,
        "bytes_per_token": 0.0,
        "knots": None,
        "complete": False,
    }
    clash = sorted(set(extra or {}) & set(m))
    if clash:
        raise CacheError(f"extra manifest fields {clash} clash with the cache format's own fields; rename them")
    m.update(extra or {})
    device = next(teacher_model.parameters()).device
    run = _Pass(OnlineTeacher(teacher_model, layers), pad_id, device, vocab, k, batch_size, precision, progress,
                samples, logprob_bits)  # fmt: skip
    was_training = teacher_model.training
    teacher_model.eval()
    try:
        if (out / MANIFEST).is_file():
            old = read_manifest(out)
            if old["format_version"] != FORMAT_VERSION:
                raise CacheError(
                    f"{out / MANIFEST}: a format-{old['format_version']} cache, written by an older egad; this one "
                    f"writes format {FORMAT_VERSION} (a tail sample, 8-bit log-probs). It still reads as it is; to "
                    f"rebuild it, delete {out} and rerun `egad cache` (or `egad demo`)"
                )
            # A resumed cache must not mix shards of another layout, encoding or teacher precision.
            fields = ("examples_per_shard", "precision", "tail_samples", "logprob_bits")
            diff = _first_difference(
                _identity(old) | {f: old.get(f) for f in fields}, _identity(m) | {f: m[f] for f in fields}
            )
            if diff:
                raise CacheError(
                    f"{out / MANIFEST}: field '{diff[0]}' is {diff[1]!r} in the existing cache but {diff[2]!r} now; "
                    f"write to another directory, or delete {out} to rebuild it"
                )
            if old.get("complete"):
                return old
            m["hidden_threshold"] = old.get("hidden_threshold")
            for s in old["shards"]:
                file = out / s["file"]
                if not file.is_file() or sha256_file(file) != s["sha256"]:
                    logger.warning("%s is missing or corrupted: rewriting the cache from it onward", file)
                    break
                m["shards"].append(s)
        else:
            out.mkdir(parents=True, exist_ok=True)
            if hidden_quantile:  # 0.0 keeps every token: no threshold pass needed
                m["hidden_threshold"] = run.threshold(items[: max(1, calib_examples)], hidden_quantile)
        _write_json_atomic(out / MANIFEST, m)

        per = examples_per_shard
        todo = range(len(m["shards"]), -(-len(items) // per))
        done = sum(sh["end"] - sh["start"] for sh in m["shards"])
        bar = tqdm(total=len(items) - done, desc="teacher cache", unit="ex", disable=not progress)
        for written, s in enumerate(todo):
            if stop_after_shards is not None and written >= stop_after_shards:
                bar.close()
                return m
            tensors = run.shard(items[s * per : (s + 1) * per], s * per, layers, m["hidden_threshold"], bar)
            m["shards"].append(_save_shard(out, s, s * per, tensors))
            _update_totals(m)
            _write_json_atomic(out / MANIFEST, m)
        bar.close()

        # Knots from the shard files rather than in-memory state, so a resumed cache gets exactly a clean run's knots.
        calib_h = EntropyQuantileCalibrator(max_samples=KNOT_SAMPLES)
        for s in m["shards"]:
            with safe_open(str(out / s["file"]), "pt") as fh:
                calib_h.update(fh.get_tensor("entropy"))
        m["knots"] = calib_h.knots(NUM_KNOTS).tolist() if calib_h.num_seen else None
        m["complete"] = True
        _update_totals(m)
        _write_json_atomic(out / MANIFEST, m)
        return m
    finally:
        teacher_model.train(was_training)


def _update_totals(m: dict) -> None:
    m["tokens"] = sum(s["tokens"] for s in m["shards"])
    signal_bytes = sum(s["bytes"] - s["hidden_bytes"] for s in m["shards"])
    m["bytes_per_token"] = signal_bytes / m["tokens"] if m["tokens"] else 0.0
