"""What egad's loss needs inside another framework's trainer, shared by the HF Trainer (`hf.py`) and TRL (`trl.py`)
adapters: the objective and its run-level plan state (`EgadObjective`), the projector attached to the student, the
knots checks, the forward redirection through a DDP / FSDP wrapper, and the metrics to log."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from egad.config.presets import preset
from egad.config.schema import ConfigError, ObjectiveConfig
from egad.models.load import model_dims
from egad.objective.plan_runtime import PlanRuntime, feature_branch
from egad.objective.token_plan import PlanState, check_window_exact
from egad.plan.curriculum import training_progress
from egad.plan.routing import content_keys
from egad.teacher.calibrate import STUDENT_SIGNALS

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
    """A preset name (egad.config.presets.PRESETS) or an ObjectiveConfig, as the config the loss reads."""
    if isinstance(objective, ObjectiveConfig):
        return objective
    if isinstance(objective, str):
        return preset(objective)
    raise ConfigError(
        f"objective={objective!r} must be a preset name (egad.config.presets.PRESETS) or an ObjectiveConfig"
    )


def check_knots(cfg: ObjectiveConfig, knots: Tensor | None, signal_knots: dict | None = None) -> Tensor | None:
    """The calibrated knots as a 1-D fp32 CPU tensor; refuses, before any model is loaded, a rule that needs a CDF
    (the teacher entropy's, or a student-side signal's) when none was given."""
    for name in sorted(cfg.cdfs_needed & set(STUDENT_SIGNALS)):
        if not signal_knots or signal_knots.get(name) is None:
            raise ConfigError(
                f"this objective ranks tokens by their {name} against the run's CDF, which starts from the untrained "
                f"student: pass signal_knots={{'{name}': knots}}, e.g. egad.plan.entropy.fit_quantile_knots of "
                f"egad.teacher.calibrate.calibrate_signals(..., signals=['{name}'])['{name}']"
            )
        _as_knots(signal_knots[name], f"signal_knots[{name!r}]")
    if knots is None:
        if cfg.needs_knots:
            raise ConfigError(
                f"this objective reads the teacher-entropy CDF (cdf_mode={cfg.cdf_mode!r}), which needs quantile knots "
                "from a calibration pass (a running histogram starts from them too): pass "
                "entropy_knots=egad.plan.entropy.fit_quantile_knots(teacher_entropies), e.g. of "
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
        """Training progress s of the current optimizer step: 0 at the first, 1 at the last (egad.plan.curriculum)."""
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
        """Per-token keys of the hashed draws (random routing), from the sequences' content (egad.plan.routing)."""
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
