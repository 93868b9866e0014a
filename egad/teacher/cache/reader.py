"""Reading the cache: verified shards, served as TopKSignal batches (a TeacherSource)."""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from torch import Tensor

from egad.data import shift_labels
from egad.teacher.cache.format import IDENTITY, MANIFEST, CacheError, _first_difference, _identity, _read_manifest
from egad.teacher.signal import TopKSignal


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

    def entropy_sample(self, n: int, seed: int = 0) -> Tensor:
        """A uniform sample of at most n cached teacher entropies (reads only the entropy tensor of each shard)."""
        parts = []
        for s in self.manifest["shards"]:
            with safe_open(str(self.path / s["file"]), "pt") as fh:
                parts.append(fh.get_tensor("entropy"))
        h = torch.cat(parts) if parts else torch.zeros(0)
        order = torch.randperm(h.numel(), generator=torch.Generator().manual_seed(seed))[:n]
        return h[order]

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
        """Refuse a cache whose stored hidden-state layers are not the ones this run's layer map reads."""
        if list(layers) != self.layers:
            raise CacheError(
                f"{self.path} stores teacher layers {self.layers} but this objective maps to {list(layers)}: re-run "
                "`egad cache` with the same objective.layer_map / feat_layers and student"
            )

    def signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """The cached signal of a collated training batch (the TeacherSource interface): `train_index` holds the
        items' positions in the tokenized split the cache was written from."""
        if "train_index" not in batch:
            raise ValueError("a cached teacher needs batch['train_index'], the items' positions in the training split")
        targets = shift_labels(batch["labels"])
        return self.lookup(batch["train_index"].tolist(), targets, device=batch["labels"].device)

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

    def lookup(
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
