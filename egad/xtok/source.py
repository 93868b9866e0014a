"""The online teacher of a cross-tokenizer run: a `TeacherSource` that runs the frozen teacher on its own encoding of
the batch's examples and hands over its last hidden state, its head and the aligned rows (`CrossSignal`).

The teacher's side of every training item (`egad.xtok.pairing.TeacherSide`) is made once, before training; a batch
names its items by `train_index` (their positions in the training split), as it does for a cache. The teacher's full
logits never exist: the objective (`egad.xtok.objective`) projects the aligned rows chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from egad.losses.cross_vocab import VocabMap
from egad.models.heads import OutputHead
from egad.plan.entropy import token_entropy
from egad.teacher.online import OnlineTeacher
from egad.teacher.signal import FusedSignal
from egad.xtok.pairing import TeacherSide, collate_teacher

__all__ = ["CrossSignal", "CrossTeacher"]


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
