"""egad's objective inside TRL's on-policy `DistillationTrainer` (the `egad[trl]` extra).

`EgadDistillationTrainer` is TRL's stable `DistillationTrainer` with its loss replaced by egad's, any preset: the
student still generates the completions (transformers or vLLM, as configured), and TRL's data handling, teacher
loading and preparation, accumulation, logging and checkpointing are untouched.

What is overridden, and why it is pinned. `compute_loss` (public) keeps TRL's two rules: the global count of
completion tokens of the generation batch (`inputs["num_items_in_batch"]`, gathered over processes when the
completions were generated) divided by the process count, which is exactly egad's `num_tokens` (the whole
accumulation window on all processes, scaled for DDP's gradient averaging), and the loss computed inside the
student wrapper's forward through TRL's `_forward_redirection`, so DDP prepares its gradient sync and FSDP keeps the
head's parameters gathered. `_compute_loss` (private) runs the backbones through TRL's private
`_get_last_hidden_state` (the student's, and the teacher's through its own wrapper), capturing the mapped layers'
hidden states on the way, and hands the last hidden states and both heads to egad: `StudentOutputs(hidden, head)`
and `FusedSignal`, so both heads are projected per chunk of tokens and neither model's full logits exist. Those two
private methods, their arguments and the keys of `inputs` (`prompt_ids`, `prompt_mask`, `completion_ids`,
`completion_mask`, `tool_mask`, `num_items_in_batch`) are TRL internals, hence `TRL_VERSIONS`: checked at
construction, with an error naming the installed version.

Progress is `state.global_step / state.max_steps`. The vocabulary is the head's row count: completions are sampled
over all rows, so no row may be sliced away (TRL requires the student's and teacher's vocabularies to be equal).

The feature projector (presets with beta_f > 0) becomes the student's submodule `egad_projector` right after TRL's
constructor, before `train()` creates the optimizer and wraps the model: TRL/transformers then give it optimizer
state, synchronise it with the student under DDP/FSDP and save it in every checkpoint (`model.safetensors` carries
the extra `egad_projector.*` weights, which `from_pretrained` ignores with a warning about unexpected keys). With a
PEFT student only the adapter is saved, so the projector is not in the checkpoint.

Metrics: egad's `kd`, `ce`, `feat`, `weight_mean`, `tau_mean`, `routed_frac`, teacher entropy and curriculum lambda
go into TRL's `_metrics[mode]` as `egad/<name>`, averaged over processes; TRL's own student-entropy metric is not
computed (egad's loss does not build the student's full distribution a second time).

Why no `EgadGKDTrainer`: TRL 1.16 keeps `GKDTrainer` in `trl.experimental` (unstable, may change or go without
notice), and it generates its on-policy completions inside `training_step`, after transformers counted
`num_items_in_batch` from the dataloader's labels. The global response-token count egad normalises by does not
exist there, so the same override would mis-scale every on-policy micro-batch; and GKD always materialises both
models' full logits. `DistillationTrainer` covers on-policy distillation (TRL itself points GKD users to it).
"""

from __future__ import annotations

from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import Tensor

from egad.config.schema import ConfigError, ObjectiveConfig
from egad.data.batches import IGNORE_INDEX
from egad.errors import EgadError
from egad.integrations.common import (
    PROJECTOR_ATTR,
    EgadObjective,
    check_knots,
    core_model,
    full_weight,
    resolve_objective,
)
from egad.models.heads import OutputHead, check_output_head, output_head
from egad.models.load import capture_hidden
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.teacher.signal import FusedSignal

try:
    import trl
    from trl import DistillationTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("egad.integrations.trl needs TRL: pip install 'egad[trl]'") from e

# The TRL releases whose DistillationTrainer internals (_compute_loss, _get_last_hidden_state, _forward_redirection,
# the keys of `inputs`) this adapter was written against: 1.10 made the trainer stable (its source has the same
# contract), 1.16 is the newest, and the one tested.
TRL_VERSIONS = ">=1.10,<1.17"

# Multimodal fields TRL extracts during generation and forwards to the backbone (as its own _compute_loss does).
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class TRLVersionError(EgadError):
    """The installed TRL is outside `TRL_VERSIONS`; the message names it and the fix."""


def check_trl_version(version: str | None = None) -> None:
    """Refuse a TRL whose private DistillationTrainer methods the adapter was not written against."""
    installed = version if version is not None else trl.__version__
    base = Version(installed).base_version  # a pre-release of 1.17 (1.17.0.dev0) counts as 1.17
    if base not in SpecifierSet(TRL_VERSIONS):
        raise TRLVersionError(
            f"egad.integrations.trl supports trl{TRL_VERSIONS} (it overrides DistillationTrainer._compute_loss and "
            f"calls _get_last_hidden_state, private methods that change between releases), but trl {installed} is "
            f"installed: pip install 'trl{TRL_VERSIONS}' (or 'egad[trl]')"
        )


def _completion_rows(feats: list[Tensor], k: int) -> list[Tensor] | None:
    """Hidden states of the positions that predict the k completion tokens, as `_get_last_hidden_state` keeps them
    (the full sequence minus its last position, then its last k). (B, k, d) each."""
    return [f[:, -k - 1 : -1] for f in feats] or None


def _head(model) -> OutputHead:
    """The model's head as egad reproduces it, an FSDP2-sharded weight gathered once per micro-batch (as TRL does)."""
    head = output_head(core_model(model))
    head.weight, head.bias = full_weight(head.weight), full_weight(head.bias)
    return head


class EgadDistillationTrainer(DistillationTrainer):
    """TRL's `DistillationTrainer` with egad's objective as its loss (see the module docstring).

    Arguments: TRL's (`model`, `teacher_model`, `args` positionally or by name, the rest by name), plus
    objective: a preset name ("egad", "kd", "egad_no_c3", ... egad.config.presets.PRESETS) or an ObjectiveConfig;
    entropy_knots: teacher-entropy quantile knots (egad.plan.entropy.fit_quantile_knots), required by every rule that
    reads the teacher-entropy CDF (under cdf_mode 'ema_hist' the running histogram starts from them); signal_knots:
    {"student_entropy": knots, "hellinger": knots} for rules that rank tokens by a student-side signal
    (egad.teacher.calibrate.calibrate_signals on the untrained student), streamed per window from there. Both heads
    are checked once against the models' own logits; a head egad cannot reproduce is refused with
    egad.models.heads.HeadError.
    """

    _tag_names = [*DistillationTrainer._tag_names, "egad"]

    def __init__(
        self,
        model,
        teacher_model=None,
        args=None,
        *,
        objective: str | ObjectiveConfig = "egad",
        entropy_knots: Tensor | None = None,
        signal_knots: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        cfg = resolve_objective(objective)
        check_knots(cfg, entropy_knots, signal_knots)  # before TRL loads any model
        if teacher_model is None:
            raise ConfigError("EgadDistillationTrainer needs teacher_model (a model id, folder or instance)")
        super().__init__(model, teacher_model, args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        vocab = output_head(core_model(student)).rows
        self.egad = EgadObjective(
            cfg,
            core_model(student),
            core_model(teacher),
            entropy_knots=entropy_knots,
            vocab=vocab,
            signal_knots=signal_knots,
        )
        self.egad.check_split(self.args.gradient_accumulation_steps, self.accelerator.num_processes)
        for m in (student, teacher):
            check_output_head(core_model(m), output_head(core_model(m)), vocab=vocab)
        self.egad.attach_projector(student)
        self.egad.check_optimizer(self.optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's rule: the count over the generated completions (transformers' comes from the raw dataloader), global,
        # divided by the process count for DDP's gradient averaging.
        training = self.model.training
        if training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if training:
            self.egad.begin_step(self.state.global_step, self.accelerator)  # may run a collective: not inside forward
        unwrapped = self.accelerator.unwrap_model(model)
        loss, metrics = self._forward_redirection(
            model, unwrapped, self._compute_loss, unwrapped, inputs, num_items_in_batch
        )
        # Gathered here, after the wrapped forward, so no collective runs inside it (TRL's own rule).
        mode = "train" if training else "eval"
        window = self.args.gradient_accumulation_steps if training and num_items_in_batch is not None else 1
        for name, value in self.egad.gathered_metrics(metrics, self.accelerator, window=window).items():
            self._metrics[mode][name].append(value)
        return (loss, None) if return_outputs else loss

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """egad's objective on one micro-batch, inside the student wrapper's forward: (loss, metrics)."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool outputs inside a completion are not the student's tokens
            loss_mask = loss_mask * inputs["tool_mask"]
        k = completion_ids.size(1)
        multimodal = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}
        egad = self.egad

        with capture_hidden(core_model(unwrapped_student), egad.student_layers) as s_feats:
            s_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, k, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad(), capture_hidden(core_model(unwrapped_teacher), egad.teacher_layers) as t_feats:
            t_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                k,
                **multimodal,
            )

        s_head, t_head = _head(unwrapped_student), _head(unwrapped_teacher)
        device = s_head.weight.device
        if t_head.weight.device != device:
            raise ConfigError(
                f"the student's head is on {device} and the teacher's on {t_head.weight.device}; the loss compares "
                "them chunk by chunk, so place both heads on the same device in their device_map"
            )
        # With a model split over devices the backbone can end on another device than the head.
        student = StudentOutputs(
            hidden=s_hidden.to(device), head=s_head, features=_completion_rows([f.to(device) for f in s_feats], k)
        )
        teacher = FusedSignal(t_hidden.to(device), t_head, _completion_rows([f.to(device) for f in t_feats], k))
        targets = completion_ids.to(device).masked_fill(loss_mask.to(device) == 0, IGNORE_INDEX)

        out = distillation_loss(
            student,
            teacher,
            targets,
            egad.cfg,
            progress=egad.progress(self.state),
            num_tokens=num_items_in_batch,
            vocab_size=egad.vocab,
            state=egad.plan_state(self.state.global_step, self.args.seed, device),
            projector=getattr(unwrapped_student, PROJECTOR_ATTR, None),
            token_keys=egad.token_keys(input_ids, attention_mask).to(device)[:, -k:],
        )
        if self.model.training:
            egad.observe(out.tokens)
        return out.loss, out.metrics


__all__ = ["TRL_VERSIONS", "EgadDistillationTrainer", "TRLVersionError", "check_trl_version"]
