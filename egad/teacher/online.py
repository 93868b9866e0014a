"""The live teacher: a frozen HF causal LM run under no_grad, returning a DenseSignal, or with `fused` its last hidden
state and head as a FusedSignal (the loss then projects the teacher's logits chunk by chunk)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from egad.models.heads import check_output_head, decoder_hidden, output_head
from egad.models.load import capture_hidden
from egad.teacher.signal import DenseSignal, FusedSignal


class OnlineTeacher:
    """Runs the frozen teacher on a batch (a `TeacherSource`). `layers` are the teacher layers whose hidden states the
    feature branch needs (empty: none are captured). `fused`: hand over the last hidden state and the head instead of
    the logits; the head is checked once against the model's own logits (egad.models.heads), a head that cannot be
    reproduced is refused."""

    def __init__(
        self, model: PreTrainedModel, layers: list[int] | None = None, *, fused: bool = False, vocab: int = 0
    ) -> None:
        self.model = model
        self.layers = list(layers or [])
        self.fused = fused
        if fused:
            self.head = output_head(model)
            check_output_head(model, self.head, vocab=vocab or self.head.rows)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> DenseSignal | FusedSignal:
        with capture_hidden(self.model, self.layers) as feats:
            if self.fused:
                hidden = decoder_hidden(self.model, input_ids, attention_mask)
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        features = feats or None
        return FusedSignal(hidden, self.head, features) if self.fused else DenseSignal(logits, features)

    def signal(self, batch: dict[str, Tensor]) -> DenseSignal | FusedSignal:
        return self(batch["input_ids"], batch["attention_mask"])
