"""egad's objective in a plain `transformers.Trainer`, and what the TRL adapter shares with it.

`EgadTrainer` trains a student on the usual causal-LM batches (`input_ids`, `attention_mask`, `labels` with -100 on
the prompt and padding) with `egad.objective.compose.distillation_loss` against a frozen live teacher; the loop,
optimizer, scheduler, checkpoints and logging stay transformers'.

The token count. transformers 5.x collects the micro-batches of one optimizer step first (`get_batch_samples`) and
counts their targets: `num_items_in_batch` is the number of `labels[..., 1:] != -100` over the whole accumulation
window (all labels for a model whose loss does not shift them), summed over processes when
`args.average_tokens_across_devices` (the default), and it is only counted when the model's forward takes `**kwargs`.
Its `compute_loss` divides by it and multiplies by the process count (DDP averages gradients), and `training_step`
skips its own division by the accumulation steps when `loss_is_scaled_for_ga`. egad's `num_tokens` is that same
window count, divided by the process count instead of multiplying the loss (the chunked loss hands its gradient
buffers over only when the upstream gradient is exactly 1). `EgadTrainer.get_batch_samples` counts it from
`shift_labels(labels)`, the very targets the loss reads, whatever the model's forward accepts; so 2 micro-batches of
accumulation give the same loss and update as one batch of twice the size (tests/test_hf_trainer.py).

The feature projector (presets with beta_f > 0) is attached to the student as the submodule `egad_projector`:
transformers then creates its optimizer state, wraps it with the model (DDP synchronises its gradients) and saves
it in every checkpoint, so a resumed run continues it. A checkpoint's `model.safetensors` therefore carries these
extra `egad_projector.*` weights; `from_pretrained` ignores them (with a warning about unexpected keys).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer

from egad.config.schema import ConfigError, ObjectiveConfig
from egad.data.batches import IGNORE_INDEX, shift_labels
from egad.integrations.common import EgadObjective, call_through
from egad.models.load import freeze, shared_vocab
from egad.objective.compose import ObjectiveOutput
from egad.objective.student import DistillationModule
from egad.teacher.online import OnlineTeacher


class EgadTrainer(Trainer):
    """A `transformers.Trainer` whose loss is egad's objective against a frozen live teacher.

    model: the student (a transformers causal LM). teacher_model: the teacher; it is frozen (eval mode, no grad) and
    placed by the accelerator. objective: a preset name or an ObjectiveConfig. entropy_knots: teacher-entropy
    quantile knots (egad.plan.entropy.fit_quantile_knots), required by every rule that reads them ('ema_hist' starts its
    running histogram from them). signal_knots: {"student_entropy": ..., "hellinger": ...} knots of the untrained
    student's signals, for the rules that rank tokens by them (streamed per window from there).
    fused: project the student's and teacher's heads per chunk of tokens (their full logits never exist); each
    head is checked once against the model's own logits and refused with egad.models.heads.HeadError if egad cannot
    reproduce it (pass fused=False for such a model). vocab_size: the shared real vocabulary; default
    len(processing_class) when a tokenizer is given, else the head's row count. Every other argument is the
    Trainer's.

    Batches need `input_ids` and `labels` (-100 where ignored), optionally `attention_mask`. Evaluation reports egad's
    loss (as `eval_loss`) and metrics; `prediction_step` returns no logits, so `compute_metrics` gets none. Tested in
    one process; for DDP the loss runs inside the wrapper's forward (`call_through`) and the count is global; FSDP is
    untested; DataParallel, DeepSpeed and tensor/sequence parallelism are refused.
    """

    loss_is_scaled_for_ga = True  # normalised by the window's token count, see the module docstring

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_model: PreTrainedModel,
        args=None,
        *,
        objective: str | ObjectiveConfig = "egad",
        entropy_knots: Tensor | None = None,
        signal_knots: dict[str, Tensor] | None = None,
        fused: bool = True,
        vocab_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module) or not isinstance(teacher_model, nn.Module):
            raise TypeError("EgadTrainer needs the student and the teacher as instantiated models")
        tokenizer = kwargs.get("processing_class")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if vocab_size is None and tokenizer is not None:
            vocab_size = shared_vocab(tokenizer, model, teacher_model)
        self.egad = EgadObjective(
            objective, model, teacher_model, entropy_knots=entropy_knots, vocab=vocab_size, signal_knots=signal_knots
        )
        self.egad.attach_projector(model)
        teacher = freeze(teacher_model)
        # The student side of egad's own trainer: hooks on the mapped layers, fused or full logits, the objective.
        self._egad_student = DistillationModule(
            model, self.egad.projector, self.egad.student_layers, fused, vocab=vocab_size or 0
        )
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ConfigError(
                "EgadTrainer does not support nn.DataParallel (several GPUs in one process); launch one process per "
                "GPU with `accelerate launch` or `torchrun`"
            )
        if self.is_deepspeed_enabled:
            raise ConfigError("EgadTrainer does not place a DeepSpeed teacher; use DDP or FSDP, or `egad train`")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (pc.tp_enabled or pc.cp_enabled or pc.sp_enabled):
            raise ConfigError("EgadTrainer normalises by whole sequences' tokens: tensor/sequence parallelism is off")
        self.egad.check_split(self.args.gradient_accumulation_steps, self.accelerator.num_processes)
        # egad counts the window's targets itself (get_batch_samples); transformers' own count is not needed.
        self.model_accepts_loss_kwargs = False
        self.egad.check_optimizer(self.optimizer)
        self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        self._egad_teacher = OnlineTeacher(
            unwrapped_teacher, self.egad.teacher_layers, fused=fused, vocab=vocab_size or 0
        )
        self._egad_logs: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """transformers' window of micro-batches, with num_items_in_batch = the window's response tokens:
        shift_labels(labels) != -100 summed over the window, and over processes when average_tokens_across_devices."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if any("labels" not in b for b in batches):
            raise ConfigError("EgadTrainer batches need `labels` (next tokens, -100 on the prompt and padding)")
        count = sum(int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in batches)
        num_items = torch.tensor(float(count), device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items = self.accelerator.gather(num_items[None]).sum()
        return batches, num_items

    def _num_tokens(self, num_items_in_batch: Tensor | float | None) -> Tensor | float | None:
        """egad's num_tokens from the window count: divided by the process count when the count is global (DDP
        averages the gradients), as is (a per-process mean) when it is not."""
        if num_items_in_batch is None:
            return None
        divisor = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return num_items_in_batch / divisor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        targets = shift_labels(labels)
        num_tokens = self._num_tokens(num_items_in_batch) if training else None
        teacher = None
        with self.accelerator.autocast():
            if self.egad.cfg.uses_teacher:
                unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
                teacher = call_through(
                    self.teacher_model, unwrapped_teacher, self._egad_teacher, input_ids, attention_mask
                )
            if training:
                self.egad.begin_step(self.state.global_step, self.accelerator)
            state = self.egad.plan_state(self.state.global_step, self.args.seed, input_ids.device)
            unwrapped = self.accelerator.unwrap_model(model)
            loss, metrics, tokens = call_through(
                model,
                unwrapped,
                self._egad_student,
                input_ids,
                attention_mask,
                targets,
                teacher,
                self.egad.cfg,
                progress=self.egad.progress(self.state),
                num_tokens=num_tokens,
                vocab_size=self.egad.vocab,
                state=state,
                token_keys=self.egad.token_keys(input_ids, attention_mask),
            )
        if training:
            self.egad.observe(tokens)
        mode = "train" if training else "eval"
        window = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = window if num_tokens is not None else 1.0
        gathered = self.egad.gathered_metrics(metrics, self.accelerator, window=scale)
        for name, value in gathered.items():
            self._egad_logs[mode][name].append(value)
        return (loss, ObjectiveOutput(loss, metrics, tokens)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """egad's loss on an eval batch (no logits: the fused path never builds them)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        stored = self._egad_logs[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in stored.items() if v})
        stored.clear()
        super().log(logs, start_time)


__all__ = ["EgadTrainer"]
