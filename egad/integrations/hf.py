"""egad's objective in a plain `transformers.Trainer`, and what the TRL adapter shares with it.

`EgadTrainer` trains a student on the usual causal-LM batches (`input_ids`, `attention_mask`, `labels` with -100 on
the prompt and padding) with `egad.objective.distillation_loss` against a frozen live teacher; the loop, optimizer,
scheduler, checkpoints and logging stay transformers'.

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

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer

from egad.config import ConfigError, ObjectiveConfig
from egad.curriculum import training_progress
from egad.data import IGNORE_INDEX, shift_labels
from egad.models import freeze, model_dims, shared_vocab
from egad.objective import ObjectiveOutput
from egad.plan_runtime import PlanRuntime, feature_branch
from egad.presets import preset
from egad.routing import content_keys
from egad.student import DistillationModule
from egad.teacher.calibrate import STUDENT_SIGNALS
from egad.teacher.online import OnlineTeacher
from egad.token_plan import PlanState, check_window_exact

# The student submodule that holds the feature projections, so that the trainer optimises, wraps and saves them.
PROJECTOR_ATTR = "egad_projector"

# egad metric -> logged name. The first three are loss terms (each micro-batch holds its share of the window's mean),
# the rest token statistics of the micro-batch.
_LOGGED = {
    "kd": "egad/kd",
    "ce": "egad/ce",
    "feat": "egad/feat",
    "weight_mean": "egad/weight_mean",
    "tau_mean": "egad/tau_mean",
    "routed_frac": "egad/routed_frac",
    "entropy_mean": "egad/teacher_entropy",
    "lambda": "egad/lambda",
}
_LOSS_TERMS = ("kd", "ce", "feat")


def resolve_objective(objective: str | ObjectiveConfig) -> ObjectiveConfig:
    """A preset name (egad.presets.PRESETS) or an ObjectiveConfig, as the config the loss reads."""
    if isinstance(objective, ObjectiveConfig):
        return objective
    if isinstance(objective, str):
        return preset(objective)
    raise ConfigError(f"objective={objective!r} must be a preset name (egad.presets.PRESETS) or an ObjectiveConfig")


def check_knots(cfg: ObjectiveConfig, knots: Tensor | None, signal_knots: dict | None = None) -> Tensor | None:
    """The calibrated knots as a 1-D fp32 CPU tensor; refuses, before any model is loaded, a rule that needs a CDF
    (the teacher entropy's, or a student-side signal's) when none was given."""
    for name in sorted(cfg.cdfs_needed & set(STUDENT_SIGNALS)):
        if not signal_knots or signal_knots.get(name) is None:
            raise ConfigError(
                f"this objective ranks tokens by their {name} against the run's CDF, which starts from the untrained "
                f"student: pass signal_knots={{'{name}': knots}}, e.g. egad.entropy.fit_quantile_knots of "
                f"egad.teacher.calibrate.calibrate_signals(..., signals=['{name}'])['{name}']"
            )
        _as_knots(signal_knots[name], f"signal_knots[{name!r}]")
    if knots is None:
        if cfg.needs_knots:
            raise ConfigError(
                f"this objective reads the teacher-entropy CDF (cdf_mode={cfg.cdf_mode!r}), which needs quantile knots "
                "from a calibration pass (a running histogram starts from them too): pass "
                "entropy_knots=egad.entropy.fit_quantile_knots(teacher_entropies), e.g. of "
                "egad.teacher.calibrate.calibrate_entropy"
            )
        return None
    return _as_knots(knots, "entropy_knots")


def _as_knots(knots: Tensor, name: str) -> Tensor:
    knots = torch.as_tensor(knots).detach().float().cpu().reshape(-1)
    if knots.numel() < 2 or not bool(torch.isfinite(knots).all()) or bool((knots[1:] < knots[:-1]).any()):
        raise ConfigError(f"{name} must be a finite, nondecreasing 1-D tensor of at least 2 quantiles")
    return knots


def core_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose decoder layers, head and config egad reads)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def full_weight(t: Tensor | None) -> Tensor | None:
    """A plain tensor for an FSDP2-sharded (DTensor) head weight, gathered once per micro-batch as TRL does."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def call_through(wrapper: nn.Module, inner: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` inside `wrapper`'s forward (DDP / FSDP), with `inner` the module it wraps.

    The loss calls the student's decoder and head directly, not its forward; calling the wrapper with `inner.forward`
    patched to `fn` (Lightning's and TRL's forward redirection) keeps what the wrapper does around a forward: DDP's
    gradient-sync preparation, FSDP's gathering of the root parameters."""
    if wrapper is inner:
        return fn(*args, **kwargs)
    had_own = "forward" in inner.__dict__
    original = inner.forward

    def restore() -> None:
        if had_own:
            inner.forward = original  # type: ignore[method-assign]
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*a: Any, **k: Any) -> Any:
        restore()  # fn may call the real forward (the unfused path)
        return fn(*a, **k)

    inner.forward = redirected  # type: ignore[method-assign]
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


class EgadObjective:
    """What both trainers add to their framework: the objective config, the feature branch's layer pairs and
    projector, the run-level state of the per-token plan and the metrics to log.

    The run-level state: the teacher-entropy knots given (required when a rule reads them); under cdf_mode 'ema_hist'
    a running histogram started from them; and for rules on a student-side signal (student entropy, Hellinger) a
    running histogram started from `signal_knots`. Each running histogram absorbs the counts of one whole optimizer
    window, summed over processes, when the next step begins, as egad's own trainer does; so no token's plan depends
    on how the window is split."""

    def __init__(
        self,
        objective: str | ObjectiveConfig,
        student: nn.Module,
        teacher: nn.Module,
        *,
        entropy_knots: Tensor | None,
        vocab: int | None,
        signal_knots: dict[str, Tensor] | None = None,
    ) -> None:
        self.cfg = resolve_objective(objective)
        self.vocab = vocab
        knots = check_knots(self.cfg, entropy_knots, signal_knots)
        self.plan = PlanRuntime(self.cfg)
        if knots is not None and self.cfg.needs_knots:
            self.plan.start_teacher(knots, are_knots=True)
        else:
            self.plan.knots = knots
        for name in self.plan.student_signals:
            self.plan.start_student(name, _as_knots(signal_knots[name], name))  # type: ignore[index]
        self._step: int | None = None
        device = student.get_input_embeddings().weight.device
        dims = model_dims(teacher) if self.cfg.uses_features else (0, 0)
        self.pairs, self.projector = feature_branch(self.cfg, student, dims, device)

    @property
    def streams(self) -> dict:
        return self.plan.streams

    @property
    def student_layers(self) -> list[int]:
        return [p[0] for p in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [p[1] for p in self.pairs]

    def attach_projector(self, student: nn.Module) -> None:
        """Make the projector a submodule of the student (see the module docstring)."""
        if self.projector is not None:
            if hasattr(student, PROJECTOR_ATTR):
                raise ConfigError(f"the student already has an attribute {PROJECTOR_ATTR!r}; pass a fresh model")
            setattr(student, PROJECTOR_ATTR, self.projector)

    def check_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """A user-made optimizer must include the projector, which the trainer cannot add to it."""
        if optimizer is None or self.projector is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) not in held for p in self.projector.parameters()):
            raise ConfigError(
                f"the optimizer passed in `optimizers` does not hold the feature projector's parameters "
                f"(model.{PROJECTOR_ATTR}); build it after constructing the trainer from trainer.model.parameters(), "
                "or let the trainer create it"
            )

    @staticmethod
    def progress(state) -> float:
        """Training progress s of the current optimizer step: 0 at the first, 1 at the last (egad.curriculum)."""
        return training_progress(state.global_step, state.max_steps) if state.max_steps > 0 else 0.0

    def check_split(self, grad_accum: int, processes: int) -> None:
        check_window_exact(self.cfg, grad_accum=grad_accum, processes=processes)

    def begin_step(self, step: int, accelerator) -> None:
        """Called before each micro-batch, outside any wrapped forward (it may run a collective): when a new
        optimizer step begins, the running histograms absorb the finished window's counts, summed over processes."""
        if step == self._step:
            return
        if self._step is not None:
            multi = accelerator.num_processes > 1
            self.plan.end_window(
                (lambda c: accelerator.reduce(c, "sum")) if multi else (lambda c: c), accelerator.device
            )
        self._step = step

    def plan_state(self, step: int, seed: int, device: torch.device) -> PlanState:
        """The run-level state the plan reads at optimizer step `step`."""
        return self.plan.state(step, seed, device)

    @staticmethod
    def token_keys(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Per-token keys of the hashed draws (random routing), from the sequences' content (egad.routing)."""
        return content_keys(input_ids, attention_mask)

    def observe(self, out_tokens: dict[str, Tensor]) -> None:
        """Keep a training micro-batch's signals for the running histograms (absorbed per window)."""
        self.plan.observe(out_tokens)

    def gathered_metrics(self, metrics: dict[str, Tensor], accelerator, *, window: float) -> dict[str, float]:
        """egad's metrics of one micro-batch, averaged over processes, by logged name.

        The loss terms are this micro-batch's share of the window mean; times `window` (the accumulation steps when
        the loss is normalised by the window's count, else 1) each is the window's mean, so the trainer's average over
        the window's micro-batches logs the exact per-token value. A metric a process lacks (no response token) is
        NaN there and left out of its mean; every process gathers the same fixed list."""
        device = accelerator.device
        values = []
        for key in _LOGGED:
            v = metrics.get(key)
            v = float("nan") if v is None else float(v) * (window if key in _LOSS_TERMS else 1.0)
            values.append(v)
        vec = torch.tensor(values, dtype=torch.float32, device=device)[None]
        if accelerator.num_processes > 1:
            vec = accelerator.gather(vec)
        means = vec.nanmean(0).tolist()
        return {name: value for name, value in zip(_LOGGED.values(), means, strict=True) if not math.isnan(value)}


class EgadTrainer(Trainer):
    """A `transformers.Trainer` whose loss is egad's objective against a frozen live teacher.

    model: the student (a transformers causal LM). teacher_model: the teacher; it is frozen (eval mode, no grad) and
    placed by the accelerator. objective: a preset name or an ObjectiveConfig. entropy_knots: teacher-entropy
    quantile knots (egad.entropy.fit_quantile_knots), required by every rule that reads them ('ema_hist' starts its
    running histogram from them). signal_knots: {"student_entropy": ..., "hellinger": ...} knots of the untrained
    student's signals, for the rules that rank tokens by them (streamed per window from there).
    fused: project the student's and teacher's heads per chunk of tokens (their full logits never exist); each
    head is checked once against the model's own logits and refused with egad.heads.HeadError if egad cannot
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


__all__ = ["PROJECTOR_ATTR", "EgadObjective", "EgadTrainer", "call_through", "check_knots", "resolve_objective"]
