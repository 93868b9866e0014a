"""What every trainer keeps of the per-token plan between steps, written once for egad's `Trainer` and the HF / TRL
integrations: the teacher-entropy knots, the streamed histograms (the teacher's under cdf_mode 'ema_hist', the
student-side signals a rule ranks tokens by), the routing threshold a cache fixes, and the feature branch's layer
pairs and projector.

A stream absorbs one whole optimizer window's counts, summed over processes (`end_window`), so no token's plan
depends on how the window is split (egad.objective.token_plan).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from egad.config.schema import ObjectiveConfig
from egad.losses.features import FeatureProjector, feature_pairs
from egad.models.load import copied_layers, model_dims
from egad.objective.token_plan import PlanState
from egad.plan.entropy import fit_quantile_knots
from egad.plan.entropy_stream import EmaEntropyHistogram, absorb_window
from egad.plan.routing import step_seed
from egad.teacher.cache import TeacherCache
from egad.teacher.calibrate import STUDENT_SIGNALS, calibrate_entropy, calibrate_signals
from egad.teacher.signal import TeacherSource


class PlanRuntime:
    """The run-level state the plan reads: start it from a calibration (`start_teacher`, `start_student`), read a
    step's `PlanState` (`state`), hand it each micro-batch's signals (`observe`) and close each window
    (`end_window`)."""

    def __init__(self, cfg: ObjectiveConfig, route_threshold: float | None = None) -> None:
        self.cfg = cfg
        self.knots: Tensor | None = None
        self.streams: dict[str, EmaEntropyHistogram] = {}
        self.route_threshold = route_threshold
        self._pending: dict[str, list[Tensor]] = {}

    @property
    def student_signals(self) -> list[str]:
        """The student-side signals whose CDF a rule of this objective reads."""
        return [s for s in STUDENT_SIGNALS if s in self.cfg.cdfs_needed]

    def start_teacher(self, values: Tensor, *, are_knots: bool = False) -> None:
        """The teacher-entropy CDF from calibration `values` (entropies, or quantile knots when `are_knots`): a
        running histogram under cdf_mode 'ema_hist' (its knots then), else the values' quantile knots."""
        if self.cfg.cdf_mode == "ema_hist":
            self.streams["entropy"] = EmaEntropyHistogram()
            self.streams["entropy"].update(values)
            self.knots = self.streams["entropy"].knots()
        else:
            self.knots = values if are_knots else fit_quantile_knots(values)
        self._pending = {name: [] for name in self.streams}

    def start_student(self, name: str, values: Tensor) -> None:
        """A student-side signal's running histogram, from the untrained student's values (or knots) on the
        calibration set."""
        self.streams[name] = EmaEntropyHistogram()
        self.streams[name].update(values)
        self._pending[name] = []

    def calibrate(
        self,
        source: TeacherSource | None,
        examples: list[dict],
        acc,
        student_scorer: Callable[[dict[str, Tensor]], Tensor],
        *,
        cache: TeacherCache | None = None,
        pad_id: int,
        batch_size: int,
        vocab: int,
    ) -> Tensor | None:
        """Start the state before the first step: the teacher-entropy CDF from the cache (exact over every cached
        token) or from the teacher on `examples`, and the student-side streams from the untrained student
        (`student_scorer`, in eval mode) on the same examples. Returns a sample of at most 20,000 of the teacher
        entropies the knots came from (for the report's histogram), or None when no CDF is needed."""
        kw = {"pad_id": pad_id, "batch_size": batch_size, "vocab": vocab}
        sample = None
        if cache is not None:
            self.start_teacher(cache.knots.to(acc.device), are_knots=True)
            sample = cache.entropy_sample(20000)
        elif source is not None and self.cfg.needs_knots:
            values = calibrate_entropy(source, examples, acc, **kw)
            self.start_teacher(values)
            sample = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:20000]]
        need = self.student_signals
        if need and source is not None:
            values = calibrate_signals(source, student_scorer, examples, acc, signals=need, **kw)
            for name in need:
                self.start_student(name, values[name])
        return sample

    def state(self, step: int, seed: int, device: torch.device | str) -> PlanState:
        """The state of optimizer step `step` of a run seeded `seed`."""
        return PlanState.from_streams(
            self.knots,
            self.streams,
            seed=step_seed(seed, step),
            device=device,
            route_threshold=self.route_threshold,
        )

    def observe(self, tokens: dict[str, Tensor]) -> None:
        """Keep one micro-batch's per-token signals for the window's update."""
        for name, parts in self._pending.items():
            if name in tokens:
                parts.append(tokens[name].detach().float())

    def end_window(self, reduce: Callable[[Tensor], Tensor], device: torch.device | str) -> None:
        """Every stream absorbs the finished window's values, their bin counts summed over processes by `reduce`
        (a collective: every process calls it); the teacher knots follow their stream."""
        absorb_window(self.streams, self._pending, reduce, device)
        for parts in self._pending.values():
            parts.clear()
        if "entropy" in self.streams:
            self.knots = self.streams["entropy"].knots()

    def streams_state(self) -> dict[str, dict]:
        return {name: h.state_dict() for name, h in self.streams.items()}

    def load_streams(self, saved: dict[str, dict]) -> None:
        for name, sd in saved.items():
            self.streams[name] = EmaEntropyHistogram()
            self.streams[name].load_state_dict(sd)
        self._pending = {name: [] for name in self.streams}


def feature_branch(
    cfg: ObjectiveConfig, student: nn.Module, teacher_dims: tuple[int, int], device: torch.device | str
) -> tuple[list[tuple[int, int]], FeatureProjector | None]:
    """The feature branch's (student, teacher) layer pairs and a fresh projector; ([], None) without the branch.
    `teacher_dims`: the teacher's (layers, hidden size), from the model or from a cache that stores its states."""
    if not cfg.uses_features:
        return [], None
    ls, ds = model_dims(student)
    lt, dt = teacher_dims
    pairs = feature_pairs(cfg.layer_map, ls, lt, min(cfg.feat_layers, ls), copied_from=copied_layers(student, lt))
    return pairs, FeatureProjector(ds, dt, len(pairs)).to(device)
