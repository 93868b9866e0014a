"""The teacher of a cross-tokenizer run, online or cached. `CrossTeacher` runs the frozen teacher on its own encoding
of the batch's examples and hands over its last hidden state, its head and the aligned rows (`CrossSignal`);
`CrossCacheTeacher` reads the same rows from an `egad cache` written with the teacher's tokenizer (`CrossTopKSignal`).

The teacher's side of every training item (`egad.xtok.pairing.TeacherSide`) is made once, before training; a batch
names its items by `train_index` (their positions in the training split), as it does for a cache. The teacher's full
logits never exist: the objective (`egad.xtok.objective`) projects the aligned rows chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from egad.data import batches as D
from egad.losses.cross_vocab import VocabMap
from egad.losses.cross_vocab_topk import TopKRows
from egad.models.heads import OutputHead
from egad.models.load import tokenizer_name
from egad.plan.entropy import token_entropy
from egad.teacher.cache import CacheError, TeacherCache, run_identity, tokenizer_sha256
from egad.teacher.cache.format import MANIFEST, read_manifest
from egad.teacher.online import OnlineTeacher
from egad.teacher.signal import FusedSignal
from egad.xtok.pairing import TeacherSide, collate_teacher

__all__ = ["CrossCacheTeacher", "CrossSignal", "CrossTeacher", "CrossTopKSignal", "open_cross_cache"]


@dataclass
class CrossSignal:
    """The teacher over one micro-batch in its own tokenisation. hidden: its last hidden state (B, L_T, d_T); head:
    its `OutputHead`; features: mapped-layer hidden states (B, L_T, d_T) or None. student_rows (A,) and teacher_rows
    (A,): the aligned pairs as flat indices into the student's (B * L_S) and the teacher's (B * L_T) positions.
    teacher_vocab: V_T (the head's rows beyond are padding). loss: the cross-vocabulary loss's name; vmap its map
    (None for uld)."""

    hidden: Tensor
    head: OutputHead
    features: list[Tensor] | None
    student_rows: Tensor
    teacher_rows: Tensor
    teacher_vocab: int
    loss: str
    vmap: VocabMap | None

    cross = True  # the objective dispatches on it (egad.objective.student)

    @property
    def vocab_rows(self) -> int:
        return self.head.rows

    def aligned_hidden(self) -> Tensor:
        """The teacher's last hidden state at the aligned rows. -> (A, d_T)"""
        return self.hidden.reshape(-1, self.hidden.shape[-1])[self.teacher_rows]

    @torch.no_grad()
    def entropies(self, step: int, temperatures: tuple[float, ...] = (1.0,)) -> list[Tensor]:
        """The teacher's entropy (nats, fp32) at the aligned rows at each temperature, projected `step` rows at a
        time. -> (A,) each"""
        h = self.aligned_hidden()
        parts: list[list[Tensor]] = [[] for _ in temperatures]
        for start in range(0, h.shape[0], step):
            z = self.head.logits(h[start : start + step].to(self.head.weight.dtype), self.teacher_vocab).float()
            for out, tau in zip(parts, temperatures, strict=True):
                out.append(token_entropy(z, temperature=tau))
        return [torch.cat(p) if p else h.new_zeros(0, dtype=torch.float32) for p in parts]

    def response_entropies(self) -> Tensor:
        """What calibration reads (egad.teacher.calibrate): the teacher's entropy at tau = 1 at the aligned rows, the
        population the plan ranks. -> (A,)"""
        return self.entropies(max(16, 2**24 // self.teacher_vocab))[0]

    def features_at(self, teacher_rows: Tensor) -> list[Tensor]:
        if not self.features:
            raise ValueError("the feature branch is on but the teacher signal has no hidden states of mapped layers")
        return [f.reshape(-1, f.shape[-1])[teacher_rows] for f in self.features]


class CrossTeacher:
    """A `TeacherSource` for a teacher with its own tokenizer: `signal(batch)` collates the teacher's side of the
    batch's items (by `train_index`), runs the fused online teacher on it and returns a `CrossSignal`."""

    def __init__(
        self, online: OnlineTeacher, side: TeacherSide, *, pad_id: int, vocab: int, loss: str, vmap: VocabMap | None
    ) -> None:
        if not online.fused:
            raise ValueError("the cross-tokenizer teacher hands over its last hidden state: build it with fused=True")
        self.online, self.side, self.pad_id = online, side, pad_id
        self.vocab, self.loss, self.vmap = vocab, loss, vmap

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor]) -> CrossSignal:
        positions = [int(i) for i in batch["train_index"].tolist()]
        device = batch["input_ids"].device
        t = collate_teacher(self.side, positions, batch["input_ids"].shape[1], self.pad_id)
        t = {k: v.to(device) for k, v in t.items()}
        sig = self.online(t["teacher_input_ids"], t["teacher_attention_mask"])
        assert isinstance(sig, FusedSignal)
        return CrossSignal(
            sig.hidden, sig.head, sig.features, t["student_rows"], t["teacher_rows"], self.vocab, self.loss, self.vmap
        )


# ---------------------------------------------------------------------------------------------------------- cached
@dataclass
class CrossTopKSignal:
    """The cached teacher at one micro-batch's A aligned rows, in its own token space: `topk` (A rows of top-k ids over
    V_T, log-probs, tail, exact entropy, tail sample), features: mapped-layer hidden states (A, d_T) or None, and
    feature_mask (A,) where they were stored (None: everywhere). student_rows (A,) as in `CrossSignal`; teacher_rows
    is arange(A), the rows of these tensors. loss, vmap: as in `CrossSignal`."""

    topk: TopKRows
    features: list[Tensor] | None
    feature_mask: Tensor | None
    student_rows: Tensor
    teacher_rows: Tensor
    teacher_vocab: int
    loss: str
    vmap: VocabMap | None

    cross = True

    @property
    def vocab_rows(self) -> int:
        return self.teacher_vocab

    def entropies(self, step: int, temperatures: tuple[float, ...] = (1.0,)) -> list[Tensor]:
        """The cached exact entropy at the aligned rows; the cache holds it at tau = 1 only. -> (A,) each"""
        if any(t != 1.0 for t in temperatures):
            raise ValueError(
                f"a cached teacher stores its entropy at tau=1 only, not at {temperatures}; set ea_temperature=1.0"
            )
        return [self.topk.entropy.float() for _ in temperatures]

    def response_entropies(self) -> Tensor:
        return self.topk.entropy.float()

    def features_at(self, teacher_rows: Tensor) -> list[Tensor]:
        if not self.features:
            raise ValueError("the feature branch is on but the teacher cache holds no hidden states of mapped layers")
        return [f[teacher_rows] for f in self.features]


class CrossCacheTeacher:
    """A `TeacherSource` that reads a cache written with the teacher's tokenizer for a student with another one:
    `signal(batch)` looks the batch's items up by their teacher-side position (`cache_index`), in the teacher's
    tokenisation, and keeps the aligned rows. Build it with `open_cross_cache`."""

    def __init__(
        self, cache: TeacherCache, side: TeacherSide, teacher_items: list[dict], cache_index: list[int], *,
        pad_id: int, loss: str, vmap: VocabMap | None,
    ) -> None:  # fmt: skip
        self.cache, self.side, self.teacher_items, self.cache_index = cache, side, teacher_items, cache_index
        self.pad_id, self.loss, self.vmap = pad_id, loss, vmap
        self.vocab = int(cache.vocab_size)

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor]) -> CrossTopKSignal:
        positions = [int(i) for i in batch["train_index"].tolist()]
        device = batch["input_ids"].device
        t = collate_teacher(self.side, positions, batch["input_ids"].shape[1], self.pad_id)
        examples = [self.cache_index[i] for i in positions]
        labels = D.collate([self.teacher_items[j] for j in examples], self.pad_id)["labels"]  # (B, L_T)
        sig = self.cache.lookup(examples, D.shift_labels(labels))  # on the CPU: only the aligned rows move
        rows = t["teacher_rows"]
        ids, logprobs, tail = sig.rows_topk(rows)
        sample = None if sig.tail_sample is None else sig.tail_sample.rows(rows)
        if sample is not None:
            sample = type(sample)(*(x.to(device) for x in (sample.ids, sample.logprobs, sample.log_z)),
                                  exponent=sample.exponent)  # fmt: skip
        topk = TopKRows(ids.to(device), logprobs.to(device), tail.to(device), sig.entropy_at(rows).to(device),
                        self.vocab, sample)  # fmt: skip
        feats = fmask = None
        if sig.features:
            feats = [f.reshape(-1, f.shape[-1])[rows].to(device) for f in sig.features]
            fmask = sig.feature_mask_at(rows).to(device)
        arange = torch.arange(rows.numel(), device=device)
        s_rows = t["student_rows"].to(device)
        return CrossTopKSignal(topk, feats, fmask, s_rows, arange, self.vocab, self.loss, self.vmap)


def open_cross_cache(
    path, data_cfg, teacher_tok, side: TeacherSide, student_items: list[dict], *, loss: str, vmap: VocabMap | None
) -> CrossCacheTeacher:
    """The cache at `path`, read for a student with another tokenizer. The cache must have been written with the
    teacher's tokenizer (refused otherwise, both named) over the teacher's own tokenisation of the same training
    split (`egad.data.batches.tokenized_split` with the teacher's tokenizer: its data fingerprint is checked); each
    student item is then found by its record among the teacher's items."""
    path = Path(path)
    m = read_manifest(path)
    want = tokenizer_sha256(teacher_tok)
    if m.get("tokenizer_sha256") != want:
        name = m.get("tokenizer_name")
        written = repr(name) if name else f"the tokenizer of teacher {(m.get('teacher') or {}).get('id')!r}"
        raise CacheError(
            f"{path / MANIFEST}: written with {written} (sha256 {str(m.get('tokenizer_sha256'))[:12]}), but this run's "
            f"teacher reads with {tokenizer_name(teacher_tok)!r} (sha256 {want[:12]}): set model.teacher_tokenizer to "
            "the cache's tokenizer, or write a cache for this teacher with `egad cache`"
        )
    teacher_items, _ = D.tokenized_split(data_cfg, teacher_tok, "train")
    cache = TeacherCache(path, expect=run_identity(teacher_tok, teacher_items, data_cfg, len(teacher_tok)))
    at = {item["index"]: j for j, item in enumerate(teacher_items)}
    index = []
    for i, item in enumerate(student_items):
        j = at.get(item["index"])
        if j is None or teacher_items[j]["input_ids"] != side.input_ids[i]:
            why = "no response token is left" if j is None else "its tokens differ from the teacher side's"
            raise CacheError(
                f"{path}: training record {item['index']} has no usable row in the cache ({why} in the teacher's "
                "tokenisation): raise data.max_len above data.max_prompt_len, or rebuild the cache with `egad cache`"
            )
        index.append(j)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    return CrossCacheTeacher(cache, side, teacher_items, index, pad_id=pad, loss=loss, vmap=vmap)
