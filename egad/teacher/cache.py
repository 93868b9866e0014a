"""The offline teacher cache: the teacher's top-k distribution per response token, computed once, read by training.

A cache directory holds `manifest.json` and shards `shard-00000.safetensors`, ... Shard s covers the tokenized
examples [start, end) of the list given to `write_cache` (positions in that list, not `item["index"]`). Per shard:

    example_index  int64 (n_ex,)      the examples' positions in the list
    token_offsets  int64 (n_ex + 1,)  rows of example j are [off[j], off[j+1]): its response positions (targets != -100
                                      after `shift_labels`) in position order
    topk_ids       int32 (n_tok, k)   teacher top-k ids at tau = 1 over the first `vocab_size` logits, most likely first
    topk_logprobs  fp16  (n_tok, k)   their log-probs
    tail_logmass   fp32  (n_tok,)     log(1 - sum_topk p), -inf when k = vocab_size
    entropy        fp32  (n_tok,)     exact teacher entropy (nats, tau = 1) of the fp32 logits
    hidden_rows    int64 (n_hard,)    optional: rows whose entropy >= `hidden_threshold`
    hidden_{t}     fp16  (n_hard, d)  optional: hidden state of teacher layer t (`egad.models.capture_hidden`) there

The manifest records the identity (teacher id/revision/weights hash, tokenizer hash, data fingerprint, template, k,
vocab_size, layers, hidden_quantile), the shard list with sha256s, and at completion the 1001 global entropy quantile
knots over all cached tokens (`complete: true`). It is replaced atomically after each shard, and a shard is written
under a temporary name and renamed, so a killed run never lists a half-written shard; rerunning `write_cache` with the
same arguments verifies the listed shards and resumes after them (byte-identical to an uninterrupted run given the
same batch_size, which is not part of the identity: padding can move the last bits of the teacher's forward). Shard
entries also carry `bytes` and `hidden_bytes`; the knots use every token up to KNOT_SAMPLES, a uniform sample beyond.

The hidden-state threshold must be known before the first shard is written, so it is the `hidden_quantile` quantile of
the response-token entropies of the first `calib_examples` examples (one extra teacher pass over them), not of the
whole data set: the fraction of tokens kept overall is only approximately 1 - hidden_quantile.

Approximations: log-probs are stored in fp16 (relative rounding error <= 2^-11, i.e. <= 5e-3 absolute at log p = -10),
hidden states in fp16 (clamped to +-65504). The tail log-mass is computed in fp32 as a logsumexp over the log-probs
outside the top-k, which equals log(1 - sum_topk p) but stays exact when the top-k holds almost all the mass. The
entropy and tail come from fp32 logits, so they are as exact as the teacher's forward.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from egad import data as D
from egad.entropy import EntropyQuantileCalibrator, token_entropy
from egad.errors import EgadError
from egad.objective import shift_labels
from egad.teacher.online import OnlineTeacher
from egad.teacher.signal import TopKSignal

logger = logging.getLogger("egad.cache")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NUM_KNOTS = 1001
# Entropies kept for the knots: every token up to this many, a uniform reservoir sample beyond (4 bytes each).
KNOT_SAMPLES = 8_000_000
IDENTITY = ("teacher_id", "revision", "weights_sha256", "tokenizer_sha256", "data_fingerprint", "template", "k",
            "vocab_size", "layers", "hidden_quantile")  # fmt: skip
_FP16_MAX = 65504.0


class CacheError(EgadError):
    """A cache that cannot be used or resumed; the message names the file or field and the fix."""


# ------------------------------------------------------------------------------------------------------- fingerprints
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_examples(items: list[dict], template: str, max_prompt_len: int, max_len: int) -> str:
    """sha256 over every item's input_ids and labels, the template and the lengths (what the cache rows depend on)."""
    digest = hashlib.sha256(json.dumps([template, max_prompt_len, max_len, len(items)]).encode())
    for item in items:
        for key in ("input_ids", "labels"):
            ids = torch.as_tensor(item[key], dtype=torch.int64)
            digest.update(ids.numel().to_bytes(8, "little"))
            digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the vocabulary, the special-token ids and the backend tokenizer's JSON (normaliser, merges, ...)."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    special = {name: getattr(tokenizer, name, None) for name in names}
    special["all"] = sorted(getattr(tokenizer, "all_special_ids", None) or [])
    digest.update(json.dumps(special, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes, bytes). Reads every weight: for a large teacher pass
    `hash_weights=False` to `write_cache` and pin a `revision` instead."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------- manifest
def _identity(m: dict) -> dict:
    teacher = m.get("teacher") or {}
    flat = {"teacher_id": teacher.get("id"), "revision": teacher.get("revision")}
    flat["weights_sha256"] = teacher.get("weights_sha256")
    flat.update({f: m.get(f) for f in IDENTITY[3:]})
    return flat


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _first_difference(have: dict, want: dict) -> tuple[str, Any, Any] | None:
    for field, value in want.items():
        if _norm(have.get(field)) != _norm(value):
            return field, have.get(field), value
    return None


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise CacheError(f"{file}: no cache manifest; run `egad cache` to build the cache in {path}")
    try:
        m = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{file}: unreadable ({e}); delete {path} and rerun `egad cache`") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{file}: format_version {m.get('format_version')!r}, this egad reads {FORMAT_VERSION}; "
            f"delete {path} and rerun `egad cache`"
        )
    return m


def _write_json_atomic(file: Path, obj: dict) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    with tmp.open("w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, file)


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

    @torch.no_grad()
    def batch(self, items: list[dict], topk: bool = True) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        """Teacher statistics at a batch's response rows (row-major). -> (rows per example, stats on the CPU,
        features (N, d) on the teacher's device)."""
        batch = D.collate(items, self.pad_id)
        mask = shift_labels(batch["labels"]) != -100
        rows = mask.reshape(-1).nonzero().squeeze(-1).to(self.device)
        sig = self.teacher(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        # Bounds the fp32 (chunk, V) working set to ~64 MiB whatever the vocabulary.
        step = max(16, 2**24 // self.vocab)
        parts: dict[str, list[Tensor]] = {"entropy": [], "topk_ids": [], "topk_logprobs": [], "tail_logmass": []}
        for i in range(0, rows.numel(), step):
            z = sig.rows(rows[i : i + step], self.vocab)
            parts["entropy"].append(token_entropy(z, chunk_size=None).cpu())
            if topk:
                logp = torch.log_softmax(z, dim=-1)
                top = logp.topk(self.k, dim=-1, sorted=True)
                # logsumexp of the complement, not log1p(-sum p_topk): no cancellation when the top-k holds ~all
                # the mass, and exactly -inf when k = V.
                tail = logp.scatter(1, top.indices, float("-inf")).logsumexp(dim=-1)
                parts["topk_ids"].append(top.indices.int().cpu())
                parts["topk_logprobs"].append(top.values.half().cpu())
                parts["tail_logmass"].append(tail.cpu())
        stats = {name: torch.cat(p) for name, p in parts.items() if p}
        feats = [f.reshape(-1, f.shape[-1]).index_select(0, rows) for f in sig.features or []]
        return mask.sum(dim=1), stats, feats

    def threshold(self, items: list[dict], q: float) -> float:
        """The q-quantile of the response-token entropies of `items`, rounded to fp32 so that it compares
        identically with the stored fp32 entropies after a JSON round trip."""
        bs = self.batch_size
        h = torch.cat([self.batch(items[b : b + bs], topk=False)[1]["entropy"] for b in range(0, len(items), bs)])
        s = h.double().sort().values
        pos = q * (s.numel() - 1)
        lo, hi = int(pos), min(int(pos) + 1, s.numel() - 1)
        return float(torch.tensor(float(s[lo] + (pos - lo) * (s[hi] - s[lo])), dtype=torch.float32))

    def shard(self, items: list[dict], start: int, layers: list[int], threshold: float | None) -> dict[str, Tensor]:
        """The tensors of the shard made of `items` (examples start, start + 1, ...)."""
        counts, stats, hidden_rows = [], [], []
        hidden: list[list[Tensor]] = [[] for _ in layers]
        n_rows = 0
        for b in range(0, len(items), self.batch_size):
            c, s, feats = self.batch(items[b : b + self.batch_size])
            counts.append(c)
            stats.append(s)
            if layers:
                h = s["entropy"]
                local = (h >= threshold if threshold is not None else torch.ones_like(h, dtype=bool)).nonzero()[:, 0]
                hidden_rows.append(local + n_rows)
                # Selected per batch: a shard's full (tokens, d) states would not fit in memory for a large teacher.
                for slot, f in zip(hidden, feats, strict=True):
                    chosen = f.index_select(0, local.to(f.device)).float()
                    slot.append(chosen.clamp(-_FP16_MAX, _FP16_MAX).half().cpu())
            n_rows += s["entropy"].numel()
        tensors = {
            "example_index": torch.arange(start, start + len(items), dtype=torch.int64),
            "token_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)]),
        }
        for name in ("topk_ids", "topk_logprobs", "tail_logmass", "entropy"):
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
    size, sha = (out / name).stat().st_size, _sha256_file(out / name)
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
    vocab_size: int | None = None,
    layers: list[int] | None = None,
    hidden_quantile: float | None = None,
    calib_examples: int = 256,
    examples_per_shard: int = 512,
    batch_size: int = 8,
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
    """Cache the teacher's top-k signal over `items` (from `egad.data.tokenize_dataset`) in `out_dir`; returns the
    manifest. Resumes a partial cache with the same identity; `layers` without `hidden_quantile` stores the hidden
    states of every response token. `stop_after_shards` returns after that many new shards (tests: a simulated kill).
    `extra`: more JSON fields for the manifest (e.g. teacher dimensions), outside the identity."""
    out = Path(out_dir)
    layers = [int(t) for t in layers or []]
    if not items:
        raise CacheError("write_cache: no examples to cache")
    if hidden_quantile is not None and (not layers or not 0.0 <= hidden_quantile < 1.0):
        raise CacheError(f"hidden_quantile={hidden_quantile!r} needs layers and a value in [0, 1)")
    if examples_per_shard < 1 or batch_size < 1:
        raise CacheError(f"examples_per_shard and batch_size must be >= 1, got {examples_per_shard}, {batch_size}")
    head = teacher_model.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else teacher_model.config.vocab_size
    vocab = int(vocab_size or rows)
    if not 1 <= vocab <= rows or not 1 <= k <= vocab:
        raise CacheError(f"need 1 <= k <= vocab_size <= {rows} teacher logit rows, got k={k}, vocab_size={vocab}")
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
        "dtype": "float16",
        "vocab_size": vocab,
        "layers": layers,
        "hidden_quantile": hidden_quantile,
        "hidden_threshold": None,
        "examples": len(items),
        "examples_per_shard": examples_per_shard,
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
    run = _Pass(
        OnlineTeacher(teacher_model, layers), pad_id, next(teacher_model.parameters()).device, vocab, k, batch_size
    )
    was_training = teacher_model.training
    teacher_model.eval()
    try:
        if (out / MANIFEST).is_file():
            old = _read_manifest(out)
            want = _identity(m) | {"examples_per_shard": examples_per_shard}
            diff = _first_difference(_identity(old) | {"examples_per_shard": old.get("examples_per_shard")}, want)
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
                if not file.is_file() or _sha256_file(file) != s["sha256"]:
                    logger.warning("%s is missing or corrupted: rewriting the cache from it onward", file)
                    break
                m["shards"].append(s)
        else:
            out.mkdir(parents=True, exist_ok=True)
            if hidden_quantile is not None:
                m["hidden_threshold"] = run.threshold(items[: max(1, calib_examples)], hidden_quantile)
        _write_json_atomic(out / MANIFEST, m)

        per = examples_per_shard
        todo = range(len(m["shards"]), -(-len(items) // per))
        for written, s in enumerate(tqdm(todo, desc="teacher cache", unit="shard", disable=not progress)):
            if stop_after_shards is not None and written >= stop_after_shards:
                return m
            tensors = run.shard(items[s * per : (s + 1) * per], s * per, layers, m["hidden_threshold"])
            m["shards"].append(_save_shard(out, s, s * per, tensors))
            _update_totals(m)
            _write_json_atomic(out / MANIFEST, m)

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


# --------------------------------------------------------------------------------------------------------------- read
class TeacherCache:
    """A complete cache, read lazily: each shard is loaded (and its sha256 checked) on first use, then kept in memory.

    `expect` maps identity fields (teacher_id, revision, weights_sha256, tokenizer_sha256, data_fingerprint, template,
    k, vocab_size, layers, hidden_quantile) to the values the run needs; the first difference raises CacheError."""

    def __init__(self, path: str | Path, *, expect: dict | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        m = _read_manifest(self.path)
        if not m.get("complete"):
            done = len(m.get("shards", []))
            total = -(-m["examples"] // m["examples_per_shard"])
            raise CacheError(
                f"{self.path / MANIFEST}: the cache is incomplete ({done} of {total} shards); run `egad cache` with "
                "the same arguments to finish it"
            )
        if expect:
            unknown = sorted(set(expect) - set(IDENTITY))
            if unknown:
                raise CacheError(f"expect: unknown fields {unknown}; known: {list(IDENTITY)}")
            diff = _first_difference(_identity(m), expect)
            if diff:
                raise CacheError(
                    f"{self.path / MANIFEST}: field '{diff[0]}' is {diff[1]!r} in the cache but the run needs "
                    f"{diff[2]!r}; rebuild the cache with `egad cache` or point the run at a matching one"
                )
        self.manifest = m
        self.k: int = m["k"]
        self.vocab_size: int = m["vocab_size"]
        self.layers: list[int] = list(m["layers"])
        self.knots: Tensor | None = None if m["knots"] is None else torch.tensor(m["knots"], dtype=torch.float32)
        self._starts = [s["start"] for s in m["shards"]]
        self._loaded: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return self.manifest["examples"]

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes per cached token, hidden states excluded (safetensors headers included)."""
        return float(self.manifest["bytes_per_token"])

    @property
    def hidden_bytes(self) -> int:
        return sum(s["hidden_bytes"] for s in self.manifest["shards"])

    def _shard(self, i: int) -> dict[str, Tensor]:
        if i not in self._loaded:
            s = self.manifest["shards"][i]
            file = self.path / s["file"]
            fix = "delete it and rerun `egad cache` with the same arguments to rewrite it"
            if not file.is_file():
                raise CacheError(f"{file}: missing; {fix}")
            raw = file.read_bytes()
            if self.verify and hashlib.sha256(raw).hexdigest() != s["sha256"]:
                raise CacheError(
                    f"{file}: sha256 mismatch with {MANIFEST}: the file is corrupted or was modified; {fix}"
                )
            try:
                self._loaded[i] = load_bytes(raw)
            except Exception as e:  # safetensors raises its own error types
                raise CacheError(f"{file}: unreadable ({e}); {fix}") from None
        return self._loaded[i]

    def signal(
        self, example_indices: list[int], targets: Tensor, *, device: torch.device | str | None = None
    ) -> TopKSignal:
        """The cached signal for a batch: example j of the batch is `example_indices[j]` (its position in the list the
        cache was written from), `targets` (B, L) as from `shift_labels`. Non-response positions hold ids 0,
        log-probs 0, tail -inf, entropy 0 (the objective reads response positions only)."""
        bsz, length = targets.shape
        if len(example_indices) != bsz:
            raise ValueError(f"{len(example_indices)} example indices for {bsz} rows of targets")
        mask = (targets != -100).cpu()
        ids = torch.zeros(bsz, length, self.k, dtype=torch.long)
        logprobs = torch.zeros(bsz, length, self.k)
        tail = torch.full((bsz, length), float("-inf"))
        entropy = torch.zeros(bsz, length)
        feats: list[Tensor] = []
        feature_mask = torch.zeros(bsz, length, dtype=torch.bool)
        for b, ex in enumerate(int(e) for e in example_indices):
            if not 0 <= ex < len(self):
                raise CacheError(f"{self.path}: example {ex} is outside the cache's {len(self)} examples")
            i = bisect.bisect_right(self._starts, ex) - 1
            t = self._shard(i)
            j = ex - self._starts[i]
            lo, hi = int(t["token_offsets"][j]), int(t["token_offsets"][j + 1])
            pos = mask[b].nonzero().squeeze(-1)
            if pos.numel() != hi - lo:
                raise CacheError(
                    f"{self.path}: example {ex} has {pos.numel()} response tokens in the batch but {hi - lo} cache "
                    "rows: cache rows do not match the tokenized data: the data, template or tokenizer changed"
                )
            ids[b, pos] = t["topk_ids"][lo:hi].long()
            logprobs[b, pos] = t["topk_logprobs"][lo:hi].float()
            tail[b, pos] = t["tail_logmass"][lo:hi]
            entropy[b, pos] = t["entropy"][lo:hi]
            if self.layers:
                rows = t["hidden_rows"]
                a, z = int(torch.searchsorted(rows, lo)), int(torch.searchsorted(rows, hi))
                at = pos[rows[a:z] - lo]
                feature_mask[b, at] = True
                if not feats:
                    feats = [torch.zeros(bsz, length, t[f"hidden_{m}"].shape[-1]) for m in self.layers]
                for f, m in zip(feats, self.layers, strict=True):
                    f[b, at] = t[f"hidden_{m}"][a:z].float()

        def move(x: Tensor) -> Tensor:
            return x if device is None else x.to(device)

        features = [move(f) for f in feats] if self.layers else None
        fmask = move(feature_mask) if self.layers else None
        return TopKSignal(move(ids), move(logprobs), move(tail), move(entropy), features, self.vocab_size, fmask)
