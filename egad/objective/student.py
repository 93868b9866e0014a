"""The trainable side of a run: the student and its feature projections in one module, whose forward returns the
objective. Keeping both in one module lets DDP / FSDP wrap and synchronise them together, and computing the loss
inside forward is what DDP's gradient hooks need (the forward must run through the wrapper)."""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from egad.losses.features import FeatureProjector
from egad.models.heads import check_output_head, decoder_hidden, output_head
from egad.models.load import capture_hidden
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.teacher.signal import TeacherSignal
from egad.xtok.objective import cross_distillation_loss


class DistillationModule(nn.Module):
    """forward(input_ids, attention_mask, targets, teacher_signal, objective_config, **loss_kwargs)
    -> (loss, metrics, per-token signals).

    `fused`: the loss applies the student's head per chunk (its full logits never exist); the head is checked once
    against the model's own logits (egad.models.heads), and a head egad cannot reproduce is refused here."""

    def __init__(
        self, student, projector: FeatureProjector | None, student_layers: list[int], fused: bool, vocab: int = 0
    ):
        super().__init__()
        self.student, self.projector = student, projector
        self.student_layers, self.fused = student_layers, fused
        if fused:
            check_output_head(student, output_head(student), vocab=vocab or output_head(student).rows)

    def forward(self, input_ids, attention_mask, targets=None, teacher: TeacherSignal | None = None, cfg=None, **kw):
        if cfg is None:  # scoring: the student's logits, through this module so that a sharding engine gathers
            return self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        hooks = capture_hidden(self.student, self.student_layers) if self.student_layers else nullcontext([])
        with hooks as feats:
            if self.fused:
                hidden = decoder_hidden(self.student, input_ids, attention_mask)
            else:
                logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.fused:
            s_out = StudentOutputs(hidden=hidden, head=output_head(self.student), features=feats or None)
        else:
            s_out = StudentOutputs(logits=logits, features=feats or None)
        # A teacher with its own tokenizer (egad.xtok.source.CrossSignal) is read at the aligned rows only.
        loss_fn = cross_distillation_loss if getattr(teacher, "cross", False) else distillation_loss
        out = loss_fn(s_out, teacher, targets, cfg, projector=self.projector, **kw)
        return out.loss, out.metrics, out.tokens
