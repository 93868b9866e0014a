"""The live teacher: a frozen HF causal LM run under no_grad, returning a DenseSignal."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from egad.models import capture_hidden
from egad.teacher.signal import DenseSignal


class OnlineTeacher:
    """Runs the frozen teacher on a batch (a `TeacherSource`). `layers` are the teacher layers whose hidden states the
    feature branch needs (empty: none are captured)."""

    def __init__(self, model: PreTrainedModel, layers: list[int] | None = None) -> None:
        self.model = model
        self.layers = list(layers or [])

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> DenseSignal:
        if self.layers:
            with capture_hidden(self.model, self.layers) as feats:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return DenseSignal(logits, feats)
        return DenseSignal(self.model(input_ids=input_ids, attention_mask=attention_mask).logits)

    def signal(self, batch: dict[str, Tensor]) -> DenseSignal:
        return self(batch["input_ids"], batch["attention_mask"])
