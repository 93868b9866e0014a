"""The trainable side of a run: the student and its feature projections in one module, whose forward returns the
objective. Keeping both in one module lets DDP / FSDP wrap and synchronise them together, and computing the loss
inside forward is what DDP's gradient hooks need (the forward must run through the wrapper)."""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from egad.losses.features import FeatureProjector
from egad.models import capture_hidden
from egad.objective import StudentOutputs, distillation_loss
from egad.teacher.signal import TeacherSignal


class DistillationModule(nn.Module):
    """forward(input_ids, attention_mask, targets, teacher_signal, objective_config, **loss_kwargs)
    -> (loss, metrics, per-token signals)."""

    def __init__(self, student, projector: FeatureProjector | None, student_layers: list[int], fused: bool):
        super().__init__()
        self.student, self.projector = student, projector
        self.student_layers, self.fused = student_layers, fused

    def forward(self, input_ids, attention_mask, targets, teacher: TeacherSignal | None, cfg, **kw):
        hooks = capture_hidden(self.student, self.student_layers) if self.student_layers else nullcontext([])
        with hooks as feats:
            if self.fused:
                hidden = self.student.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
            else:
                logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.fused:
            head = self.student.get_output_embeddings()
            if getattr(head, "bias", None) is not None:
                raise ValueError("train.fused_lm_head needs an lm_head without bias; set it to false for this model")
            s_out = StudentOutputs(hidden=hidden, lm_head_weight=head.weight, features=feats or None)
        else:
            s_out = StudentOutputs(logits=logits, features=feats or None)
        out = distillation_loss(s_out, teacher, targets, cfg, projector=self.projector, **kw)
        return out.loss, out.metrics, out.tokens
