"""The study grid and how one cell is run: same student, teacher cache, steps, data and evaluation for every cell."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from egad import experiment as X
from egad.config.methods import DERIVED, method
from egad.eval.suite import MINILLM_SEEDS

BASELINES = [
    "sft",
    "kd",
    "rkl",
    "skl",
    "akl",
    "todi",
    "ttm",
    "ea_kd",
    "adakd_idts",
    "se_kd_teacher",
    "se_kd_student",
    "feat_kd_all",
]
COMPONENTS = ["egad_c1", "egad_c2", "egad_c3", "egad_no_c3", "egad_no_c2", "egad_no_c1", "egad"]  # + kd = 2^3
CONTROLS = [
    "egad_reverse_curriculum",
    "egad_direct_temp",
    "kd_tau1.5",
    "kd_tau2",
    "egad_random_route",
    "egad_feat_only",
    "kd_alpha0.8",
]
# Cells that change what the student trains on rather than the loss: the on-policy cells need the teacher online (a
# cache cannot hold the student's samples); `seqkd` is SFT on the teacher's sampled answers to the same training
# prompts (TEACHER_ANSWERS, generated once per study). Every cell is a method of egad.config.methods.
TEACHER_ANSWERS = "teacher_answers"
STUDENT_DATA = [m.name for m in DERIVED if "train.on_policy" in m.run or m.teacher_answers]
# The pre-registered study's controls for the feature branch (egad.config.methods, docs/preregistration.md).
ANCHOR_CELL = "kd_anchor"
PREREG_CONTROLS = [ANCHOR_CELL, "feat_kd_last"]
# In priority order: a study that runs out of time drops cells from the end.
PREREG_CELLS = ["kd", "feat_kd_all", "egad", ANCHOR_CELL, "feat_kd_last", "sft", "rkl", "adakd_idts"]
GRID = list(dict.fromkeys(BASELINES + COMPONENTS + CONTROLS))
QUICK_CELLS = ["sft", "kd", "egad_c1", "egad"]
# The real-teacher grid (issue: real pretrained LLMs): the baselines users ask for, and the 2^3 component grid.
REAL_CELLS = ["sft", "kd", "rkl", "ea_kd", "adakd_idts", "se_kd_student", "feat_kd_all", *COMPONENTS]
GRIDS = {
    "toy": GRID,
    "quick": QUICK_CELLS,
    "real": REAL_CELLS,
    "student_data": list(STUDENT_DATA),
    "prereg": PREREG_CELLS,
}
# Spec section 8 sweeps, one knob at a time from the EGAD defaults, judged on dev NLL only (seed 0, no test eval).
TUNE = {
    "w_min=0": {"w_min": 0.0},
    "w_min=0.5": {"w_min": 0.5},
    "tau_max=1.5": {"tau_max": 1.5},
    "tau_max=3": {"tau_max": 3.0},
    "rho=0.1": {"rho": 0.1},
    "rho=0.5": {"rho": 0.5},
    "beta_f=0.5": {"beta_f": 0.5},
    "beta_f=2": {"beta_f": 2.0},
    "pacing=sqrt": {"pacing": "sqrt"},
    "curriculum=tilt": {"curriculum_mode": "tilt"},
    "curriculum=static_hard": {"curriculum_mode": "static_hard"},  # spec 9: the EA-KD-like control of C1
    "alpha=0.8": {"alpha": 0.8},
}
# The real study's shorter sweep (its runs are ~10x dearer): the knobs that moved the toy study most, both ways.
TUNE_REAL = ["beta_f=2", "rho=0.5", "tau_max=1.5", "curriculum=static_hard"]
TUNED = "egad_dev_tuned"


@dataclass(frozen=True)
class Cell:
    """One grid cell: a preset plus objective overrides, and dotted run-config overrides (`run`), under a folder
    name."""

    name: str
    preset: str
    overrides: dict = field(default_factory=dict)
    test_eval: bool = True
    run: dict = field(default_factory=dict)

    @property
    def on_policy(self) -> bool:
        return float(self.run.get("train.on_policy", 0.0)) > 0

    @property
    def needs_answers(self) -> bool:
        return self.run.get("data.train") == TEACHER_ANSWERS


@dataclass(frozen=True)
class Setup:
    """What every cell shares."""

    size: X.Scale
    dolly: Path
    data_dir: Path
    teacher_spec: str  # the teacher as the run configs name it (shortcut, model or folder); the students' tokenizer
    cache: Path
    teacher: Path  # its model folder
    out: Path
    answers: Path | None = None  # the teacher's answers to the training prompts, for cells that train on them


def cell(name: str) -> Cell:
    m = method(name)
    run = {**m.run, **({"data.train": TEACHER_ANSWERS} if m.teacher_answers else {})}
    return Cell(name, m.base, dict(m.objective), run=run)


def expand_cells(spec: str) -> list[str]:
    """A grid name, or comma-separated grid names and cell names, as the list of cells (in order, once each)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return list(dict.fromkeys(c for n in names for c in GRIDS.get(n, [n])))


def sampling_seed(train_seed: int) -> int:
    """The MiniLLM generation seed that scores training seed s (10, 20, 30, ...)."""
    return MINILLM_SEEDS[train_seed % len(MINILLM_SEEDS)]


def log_path(setup: Setup, cell: Cell, seed: int) -> Path:
    return setup.out / cell.name / f"seed{seed}.log"


def run_dir(setup: Setup, cell: Cell, seed: int) -> Path:
    return setup.out / cell.name / f"seed{seed}"


def is_done(setup: Setup, cell: Cell, seed: int) -> bool:
    """Trained, and evaluated when the cell is. Dolly test is scored last (experiment.evaluate): its summary, not the
    evaluation's eval/summary.json, which is written after the other sets, marks the end."""
    d = run_dir(setup, cell, seed)
    if cell.test_eval:
        return (d / "eval" / "dolly_test" / "summary.json").is_file()
    return (d / "final" / "config.json").is_file()


def cell_config(setup: Setup, cell: Cell, seed: int) -> dict:
    """The raw run config of one (cell, seed): the scale's base run, the shared student and cache, the cell's preset
    and overrides."""
    size = setup.size
    raw = X.base_run(size, setup.dolly, run_dir(setup, cell, seed), setup.teacher_spec)
    # The teacher is named for a student cut from it; with the cache it never runs.
    raw["model"].update(
        X.model_fields("student", size.student), teacher=setup.teacher_spec, teacher_cache=str(setup.cache)
    )
    raw["objective"] = {"preset": cell.preset, "feat_layers": size.feat_layers, **cell.overrides}
    curve = size.dev_every is not None
    raw["train"].update(
        max_steps=size.student_steps, seed=seed, eval_every=size.dev_every or size.student_steps, eval_at_start=curve
    )
    if cell.on_policy:
        # The student's samples are as long as a dataset response may be; the teacher scores them online.
        raw["model"]["teacher_cache"] = None
        raw["train"]["on_policy_max_new_tokens"] = size.max_len - size.max_prompt_len
    for key, value in cell.run.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    if cell.needs_answers:
        if setup.answers is None:
            raise ValueError(f"cell {cell.name} trains on the teacher's answers, but the study generated none")
        raw["data"]["train"] = str(setup.answers)
    return raw


def timing_path(setup: Setup, cell: Cell, seed: int) -> Path:
    return run_dir(setup, cell, seed) / "timing.json"


def run_cell(setup: Setup, cell: Cell, seed: int) -> Path:
    """Train and evaluate one (cell, seed); a finished one is skipped, so the study resumes where it stopped. The
    training and evaluation minutes go to the run's timing.json (a run resumed after an interruption counts only the
    part this call did)."""
    size, out = setup.size, run_dir(setup, cell, seed)
    if is_done(setup, cell, seed):
        return out
    timing = timing_path(setup, cell, seed)
    minutes = json.loads(timing.read_text()) if timing.is_file() else {}
    if not (out / "final" / "config.json").is_file():
        t0 = time.perf_counter()
        X.train_run(cell_config(setup, cell, seed), resume=True)  # from its last checkpoint, if it has one
        minutes["train_min"] = (time.perf_counter() - t0) / 60
        timing.write_text(json.dumps(minutes))
    # A finished cell never resumes, and its last step checkpoint (weights plus optimizer state, about 4x final/ on
    # the real scale) filled the disk at 46 cells: only final/ and best/ stay.
    for done_state in out.glob("checkpoint-*"):
        shutil.rmtree(done_state)
    if cell.test_eval:
        seeds = [sampling_seed(seed)]
        teacher = setup.teacher if size.test_kl else None
        t0 = time.perf_counter()
        X.evaluate(
            out / "final",
            out / "eval",
            scale=size,
            data_dir=setup.data_dir,
            seeds=seeds,
            teacher=teacher,
            skip_done=True,
        )
        minutes["eval_min"] = (time.perf_counter() - t0) / 60
        timing.write_text(json.dumps(minutes))
    return out


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_logged(setup: Setup, cell: Cell, seed: int) -> Path:
    """run_cell with this process's stdout and stderr (progress bars, warnings) sent to the cell's log file."""
    log = log_path(setup, cell, seed)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("a") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            return run_cell(setup, cell, seed)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def run_cells(setup: Setup, jobs: list[tuple[Cell, int]], workers: int = 1) -> None:
    """Run (cell, seed) jobs. With workers > 1, each runs in its own process on cores // workers threads: the study's
    models are small, so separate processes use the cores better than one process's intra-op threads."""
    todo = [(c, s) for c, s in jobs if not is_done(setup, c, s)]
    if workers <= 1 or len(todo) <= 1:
        for cell, seed in todo:
            print(f"[study] {cell.name} seed {seed}", flush=True)
            run_cell(setup, cell, seed)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_logged, setup, c, s): (c, s) for c, s in todo}
        bar = tqdm(as_completed(futures), total=len(futures), desc=f"study ({workers} processes)")
        for fut in bar:
            cell, seed = futures[fut]
            try:
                fut.result()
            except Exception as exc:
                raise RuntimeError(
                    f"study cell {cell.name} seed {seed} failed; see {log_path(setup, cell, seed)}"
                ) from exc
            bar.set_postfix_str(f"{cell.name} seed {seed}")
