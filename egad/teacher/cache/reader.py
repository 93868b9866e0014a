"""Reading the cache: verified shards, served as TopKSignal batches (a TeacherSource)."""

from __future__ import annotations

import bisect
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from egad.data.batches import shift_labels
from egad.losses.sparse_tail import TailSample
from egad.paths import sha256_file
from egad.teacher.cache import codec
from egad.teacher.cache.format import IDENTITY, MANIFEST, CacheError, _first_difference, _identity, read_manifest
from egad.teacher.signal import TopKSignal


# --------------------------------------------------------------------------------------------------------------- read
class TeacherCache:
    """A complete cache, streamed: shards are memory-mapped on use, at most `max_shards` at a time (least recently
    used evicted first), so a process's memory is bounded by a few shards whatever the cache's size, in any batch
    order. Only the pages of a shard that batches touch become resident, and they are released when it is evicted
    (lookups copy rows out, so no signal keeps a map alive). `egad cache` replaces files by renaming, which leaves a
    live map intact; truncating a mapped shard in place would fault the reader.

    With `verify`, a shard's sha256 is checked the first time it is read (streamed, nothing kept); its size, mtime and
    inode are then re-checked on every use, and a changed file is hashed again, so a shard modified after verification
    is still caught (CacheError naming the file). `expect` maps identity fields (teacher_id, revision, weights_sha256,
    tokenizer_sha256, data_fingerprint, template, k, vocab_size, layers, hidden_quantile) to the values the run needs;
    the first difference raises CacheError."""

    def __init__(
        self, path: str | Path, *, expect: dict | None = None, verify: bool = True, max_shards: int = 4
    ) -> None:
        self.path = Path(path)
        self.verify = verify
        if isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1:
            raise CacheError(f"max_shards={max_shards!r}: the reader must be allowed to hold at least 1 shard")
        self.max_shards = max_shards
        m = read_manifest(self.path)
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
        self.tail_samples: int = int(m.get("tail_samples") or 0)  # 0 in a format-1 cache
        self.sample_exponent: float | None = m.get("sample_exponent")
        self.vocab_size: int = m["vocab_size"]
        self.layers: list[int] = list(m["layers"])  # the layers read: all stored, or the run's (require_layers)
        self.stored_layers: list[int] = list(m["layers"])
        self.knots: Tensor | None = None if m["knots"] is None else torch.tensor(m["knots"], dtype=torch.float32)
        self._starts = [s["start"] for s in m["shards"]]
        self._lru: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._verified: dict[int, tuple[int, int, int]] = {}  # shard -> _signature of the file its hash matched

    def __len__(self) -> int:
        return self.manifest["examples"]

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes per cached token, hidden states excluded (safetensors headers included)."""
        return float(self.manifest["bytes_per_token"])

    @property
    def hidden_bytes(self) -> int:
        return sum(s["hidden_bytes"] for s in self.manifest["shards"])

    def entropy_sample(self, n: int, seed: int = 0) -> Tensor:
        """A uniform sample (without replacement) of at most n cached teacher entropies, in token order; memory is n
        values plus one shard's entropy tensor, whatever the cache's size."""
        counts = [int(s["tokens"]) for s in self.manifest["shards"]]
        total = sum(counts)
        g = torch.Generator().manual_seed(seed)
        if total <= 4 * n:
            chosen = torch.randperm(total, generator=g)[:n].sort().values
        else:  # a permutation of every token would cost 8 bytes each: draw, then drop the rare repeats
            drawn = torch.randint(0, total, (n + n // 8 + 16,), generator=g).unique()  # sorted: keep a random n
            chosen = drawn[torch.randperm(drawn.numel(), generator=g)[:n]].sort().values
        parts, start = [], 0
        for s, count in zip(self.manifest["shards"], counts, strict=True):
            lo, hi = torch.searchsorted(chosen, start), torch.searchsorted(chosen, start + count)
            if hi > lo:
                with safe_open(str(self.path / s["file"]), "pt") as fh:
                    parts.append(fh.get_tensor("entropy")[chosen[lo:hi] - start].clone())
            start += count
        return torch.cat(parts) if parts else torch.zeros(0)

    def teacher_dims(self) -> tuple[int, int]:
        """(layers, hidden size) of the teacher that wrote the cache, for the feature branch's layer map."""
        m = self.manifest
        if not m.get("layers") or "teacher_num_layers" not in m:
            raise CacheError(
                f"{self.path} holds no teacher hidden states, but the objective's feature branch needs them: re-run "
                "`egad cache` with --hidden-quantile, or set objective.beta_f=0"
            )
        return int(m["teacher_num_layers"]), int(m["teacher_hidden_size"])

    def require_layers(self, layers: list[int]) -> None:
        """Read the hidden states of `layers` only, in that order (the run's layer map may use a subset of what the
        cache stores); refuse a cache that lacks any of them."""
        missing = [x for x in layers if x not in self.stored_layers]
        if missing:
            raise CacheError(
                f"{self.path} stores teacher layers {self.stored_layers} but this objective maps to {list(layers)} "
                f"({missing} missing): re-run `egad cache` with the same objective.layer_map / feat_layers and student"
            )
        self.layers = list(layers)

    def signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """The cached signal of a collated training batch (the TeacherSource interface): `train_index` holds the
        items' positions in the tokenized split the cache was written from."""
        if "train_index" not in batch:
            raise ValueError("a cached teacher needs batch['train_index'], the items' positions in the training split")
        targets = shift_labels(batch["labels"])
        return self.lookup(batch["train_index"].tolist(), targets, device=batch["labels"].device)

    @property
    def shards_held(self) -> list[int]:
        """The shards mapped now, least recently used first (at most `max_shards`)."""
        return list(self._lru)

    def _shard(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors, memory-mapped: its touched pages stay resident only while it is in the LRU."""
        held = self._lru.get(i)
        if held is not None and not self.verify:
            self._lru.move_to_end(i)
            return held
        s = self.manifest["shards"][i]
        file = self.path / s["file"]
        fix = "delete it and rerun `egad cache` with the same arguments to rewrite it"
        sig = _signature(file)
        if sig is None:
            self._lru.pop(i, None)
            raise CacheError(f"{file}: missing; {fix}")
        if held is not None and self._verified.get(i) == sig:
            self._lru.move_to_end(i)
            return held
        self._lru.pop(i, None)  # if held, its file changed while mapped: verified again below
        if self.verify and self._verified.get(i) != sig:
            # Hashed block by block, once per version of the file: a new size, mtime or inode (modified or replaced
            # after verification) means hashing it again, so a changed file is caught and a touched one is not.
            self._verified.pop(i, None)
            if sha256_file(file) != s["sha256"]:
                raise CacheError(
                    f"{file}: sha256 mismatch with {MANIFEST}: the file is corrupted or was modified; {fix}"
                )
        while len(self._lru) >= self.max_shards:
            self._lru.popitem(last=False)
        try:
            with safe_open(str(file), "pt") as fh:
                names = [n for n in fh.keys() if n != "example_index"]  # noqa: SIM118 (not a dict); unused here
                tensors = {name: fh.get_tensor(name) for name in names}  # views of one private map of the file
        except Exception as e:  # safetensors raises its own error types
            raise CacheError(f"{file}: unreadable ({e}); {fix}") from None
        if self.verify:
            if _signature(file) != sig:
                raise CacheError(f"{file}: modified while it was being verified against {MANIFEST}; {fix}")
            self._verified[i] = sig
        self._lru[i] = tensors
        return tensors

    def _gather(self, i: int, items: list[tuple[int, int]], out: _Batch) -> None:
        """Copy the rows of `items` ((batch row, example) pairs, all in shard i) into `out`, all examples at once: one
        index of the shard's rows, one decode, one write per tensor. A function of its own so that no view of the
        shard outlives the call: an evicted shard's map is then released at once."""
        t = self._shard(i)
        b = torch.tensor([b for b, _ in items])  # (n,) batch rows
        ex = torch.tensor([ex for _, ex in items])
        offsets = t["token_offsets"]
        lo, hi = offsets[ex - self._starts[i]], offsets[ex - self._starts[i] + 1]  # (n,) each
        mask = out.mask[b]  # (n, L)
        counts = mask.sum(-1)
        bad = (counts != hi - lo).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise CacheError(
                f"{self.path}: example {int(ex[j])} has {int(counts[j])} response tokens in the batch but "
                f"{int(hi[j] - lo[j])} cache rows: cache rows do not match the tokenized data: the data, template or "
                "tokenizer changed"
            )
        # Response positions row by row (nonzero's row-major order) against the examples' cache rows in order.
        r, pos = mask.nonzero().unbind(-1)  # (R,) each
        dst = b[r] * mask.shape[1] + pos  # flat (B * L) positions
        starts = counts.cumsum(0) - counts
        src = lo[r] + torch.arange(r.numel()) - starts[r]  # shard rows
        ids, logprobs, sample_ids, sample_logprobs = codec.decode_rows(t, src)
        k = self.k
        out.ids.view(-1, k)[dst] = ids
        out.logprobs.view(-1, k)[dst] = logprobs
        if self.tail_samples:
            s = self.tail_samples
            out.sample_ids.view(-1, s)[dst] = sample_ids  # type: ignore[union-attr]
            out.sample_logprobs.view(-1, s)[dst] = sample_logprobs  # type: ignore[union-attr]
            out.log_z.view(-1)[dst] = t["tail_logz"][src]  # type: ignore[union-attr]
        out.tail.view(-1)[dst] = t["tail_logmass"][src]
        out.entropy.view(-1)[dst] = t["entropy"][src]
        if self.layers:
            rows = t["hidden_rows"]  # sorted shard rows that hold hidden states
            at = torch.searchsorted(rows, src).clamp_max(max(rows.numel() - 1, 0))
            hit = rows[at] == src if rows.numel() else torch.zeros_like(src, dtype=torch.bool)
            out.feature_mask.view(-1)[dst[hit]] = True
            if not out.feats:
                shape = out.tail.shape
                out.feats = [torch.zeros(*shape, t[f"hidden_{m}"].shape[-1]) for m in self.layers]
            for f, m in zip(out.feats, self.layers, strict=True):
                f.view(-1, f.shape[-1])[dst[hit]] = t[f"hidden_{m}"][at[hit]].float()

    def lookup(
        self, example_indices: list[int], targets: Tensor, *, device: torch.device | str | None = None
    ) -> TopKSignal:
        """The cached signal for a batch: example j of the batch is `example_indices[j]` (its position in the list the
        cache was written from), `targets` (B, L) as from `shift_labels`. Non-response positions hold ids 0,
        log-probs 0, tail -inf, entropy 0 (the objective reads response positions only), and so does the tail sample
        (log_z -inf) when the cache has one. Rows are gathered shard by shard, held ones first, so a batch may span
        more shards than the LRU holds."""
        bsz, length = targets.shape
        if len(example_indices) != bsz:
            raise ValueError(f"{len(example_indices)} example indices for {bsz} rows of targets")
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for b, ex in enumerate(int(e) for e in example_indices):
            if not 0 <= ex < len(self):
                raise CacheError(f"{self.path}: example {ex} is outside the cache's {len(self)} examples")
            by_shard.setdefault(bisect.bisect_right(self._starts, ex) - 1, []).append((b, ex))
        out = _Batch(
            mask=(targets != -100).cpu(),
            ids=torch.zeros(bsz, length, self.k, dtype=torch.long),
            logprobs=torch.zeros(bsz, length, self.k),
            tail=torch.full((bsz, length), float("-inf")),
            entropy=torch.zeros(bsz, length),
            feature_mask=torch.zeros(bsz, length, dtype=torch.bool),
        )
        if self.tail_samples:
            out.sample_ids = torch.zeros(bsz, length, self.tail_samples, dtype=torch.long)
            out.sample_logprobs = torch.zeros(bsz, length, self.tail_samples)
            out.log_z = torch.full((bsz, length), float("-inf"))
        for i in sorted(by_shard, key=lambda i: i not in self._lru):
            self._gather(i, by_shard[i], out)

        def move(x: Tensor) -> Tensor:
            return x if device is None else x.to(device)

        features = [move(f) for f in out.feats] if self.layers else None
        fmask = move(out.feature_mask) if self.layers else None
        signal = (move(out.ids), move(out.logprobs), move(out.tail), move(out.entropy))
        sample = None
        if self.tail_samples:
            parts = (move(out.sample_ids), move(out.sample_logprobs), move(out.log_z))
            sample = TailSample(*parts, exponent=float(self.sample_exponent))
        return TopKSignal(*signal, features, self.vocab_size, fmask, tail_sample=sample)


@dataclass
class _Batch:
    """The tensors a lookup fills, shard by shard."""

    mask: Tensor
    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    entropy: Tensor
    feature_mask: Tensor
    feats: list[Tensor] = field(default_factory=list)
    sample_ids: Tensor | None = None
    sample_logprobs: Tensor | None = None
    log_z: Tensor | None = None


def _signature(file: Path) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of a file, None when it is missing: what tells a verified file from a changed one."""
    try:
        st = file.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None
