"""Does EGAD beat the baselines? The ablation study on Dolly: presets x seeds on one fixed teacher, one protocol.

Every cell trains the same student from the same offline teacher cache (k = 64, hidden states of every token, so
each routing rule can pick its own tokens) for the same steps, selects nothing on test, and is evaluated the same
way: dev NLL, Dolly test500 ROUGE-L (sampling, MiniLLM settings) and response NLL, and fixed subsets of the other
MiniLLM sets. EGAD's spec-section-8 knobs are swept one at a time on dev NLL (seed 0, no test evaluation) and the
best setting becomes one more cell. Finished cells are skipped, so the study runs in parts and the results merge.
It writes docs/results.md (or --results) and results.png from the run files.

    egad study --quick                                   # 4 cells, 1 seed, a few minutes (tested)
    egad train -c configs/study_teacher.yaml             # the study's teacher, once (~25 min)
    egad study --teacher runs/study-teacher --jobs 2     # the whole grid, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from egad import experiment as X
from egad.config.methods import METHODS
from egad.config.run_config import build_config
from egad.config.schema import ConfigError
from egad.eval.runs import load_run
from egad.models.model_files import resolve_model_source
from egad.study import grid as G
from egad.study import prereg_page as PP
from egad.study import protocol as P
from egad.study import results as R
from egad.teacher.cache_job import run_cache_job

# The repository (docs/results.md, README.md) when egad runs from a checkout; the working directory otherwise.
_CHECKOUT = Path(__file__).resolve().parents[2]
REPO = _CHECKOUT if (_CHECKOUT / "README.md").is_file() and (_CHECKOUT / "docs").is_dir() else Path.cwd()


class _Help(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's help as a sentence with its default, as the other commands'."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        h = h[:1].upper() + h[1:]
        if "default" in h or action.default in (None, False, argparse.SUPPRESS):
            return h
        return f"{h} [default: {action.default}]"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="egad study", description=__doc__, formatter_class=_Help)
    ap.add_argument("--quick", action="store_true", help="4 cells, 1 seed, 2 tuning knobs, miniature models")
    ap.add_argument("--out", default="runs/study", help="the study's folder: cache, runs, results; reruns resume")
    ap.add_argument("--results", default=None, help="the results page (default: OUT/results.md)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per cell (0, 1, ...)")
    ap.add_argument(
        "--cells",
        default=None,
        help=f"grids ({', '.join(G.GRIDS)}; default toy) and cells, comma-separated: real,student_data",
    )
    ap.add_argument("--tune", default=None, help="comma-separated dev-sweep knobs (default: all; names: see grid.TUNE)")
    ap.add_argument("--no-tune", action="store_true", help="skip the dev sweep of EGAD's knobs")
    ap.add_argument(
        "--primary",
        default=None,
        help="the pre-registered primary comparisons, comma-separated a-b cell pairs (egad-kd,egad-feat_kd_all); "
        "Holm's correction runs over them (default: egad against kd and against the best baseline on dev)",
    )
    ap.add_argument(
        "--lr-grid",
        default=None,
        help="the pre-registered protocol (docs/preregistration.md): comma-separated learning rates; each cell's is "
        "chosen on --pilot-seed's final dev NLL, then the cell trains on every seed (replaces --tune)",
    )
    ap.add_argument("--pilot-seed", type=int, default=100, help="the protocol's tuning seed, not a final seed")
    ap.add_argument(
        "--anchor-grid",
        default="0.001,0.01,0.1",
        help=f"the protocol's strengths of {G.ANCHOR_CELL}'s L2 pull to the initial weights (its tuning budget)",
    )
    ap.add_argument(
        "--step-times",
        default=None,
        help="JSON {cell: seconds}: quiet step times per method (bench/study_step_time.py), for the protocol's page",
    )
    ap.add_argument("--beside", default=None, help="an earlier results page whose table this page shows for comparison")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    ap.add_argument("--size", default=None, help="YAML: `size:` fields replacing the built-in sizes, `run:` overrides")
    ap.add_argument(
        "--data", default=None, help="folder with dolly/ and eval/ (default: $EGAD_DATA_DIR, ../shared/data, the hub)"
    )
    ap.add_argument(
        "--teacher",
        default=None,
        help="teacher: an `egad train` run folder or a model (folder, .gguf, shortcut); default: the scale's own",
    )
    return ap.parse_args(argv)


def setup_study(args: argparse.Namespace) -> tuple[G.Setup, Path | None]:
    """The scale, data, teacher (a run folder, a model, or the toy teacher trained here) and the one teacher cache
    that every cell reads. Returns the setup and the teacher's training run folder (None for a model)."""
    size = X.TOY_QUICK if args.quick else X.TOY
    if args.size:
        size = X.load_scale(args.size, size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dolly, data_dir = X.resolve_dolly(args.data, out)
    spec = args.teacher or (size.teacher if isinstance(size.teacher, str) else None)
    teacher_run: Path | None = None
    if spec is not None and (Path(spec) / "final" / "config.json").is_file():
        teacher_run, teacher = Path(spec), Path(spec) / "final"
        spec = str(teacher)
    elif spec is not None:
        teacher = Path(resolve_model_source(spec))  # a model folder, hub id, .gguf file or shortcut
        if not (teacher / "config.json").is_file():
            raise ConfigError(f"--teacher {spec}: expected an `egad train` run folder (with final/) or a model")
    else:
        tok_dir = X.cached_tokenizer(size, dolly)
        teacher_run = X.cached_teacher(size, dolly, tok_dir)
        teacher = teacher_run / "final"
        spec = str(teacher)
    cache_cfg = X.base_run(size, dolly, out / "cache-run", spec)  # students share the teacher's tokenizer
    cache_cfg["model"].update(X.model_fields("student", size.student), teacher=spec)
    cache_cfg["objective"] = {"preset": "egad", "feat_layers": size.feat_layers}
    run_cache_job(build_config(cache_cfg), out / "cache", k=64, hidden_quantile=0.0)
    return G.Setup(size, dolly, data_dir, spec, out / "cache", teacher, out), teacher_run


def reference_row(sets: dict) -> dict:
    """A reference model's row of the results (the teacher, the untrained cut) from its evaluation summaries, one per
    set: dev and test NLL, and ROUGE-L per sampling seed of each generation set. `dev_nll` is NaN when the
    evaluation skipped `dolly_dev`."""
    return {
        "dev_nll": sets["dolly_dev"]["nll"] if "dolly_dev" in sets else math.nan,
        "test_nll": sets["dolly_test"]["nll"],
        "rouge": {k: list(v["rouge_l_per_seed"].values()) for k, v in sets.items() if "rouge_l_per_seed" in v},
    }


def eval_teacher(setup: G.Setup, teacher_run: Path | None, seeds: list[int]) -> dict:
    """The teacher under the students' protocol: one sampling seed per training seed; resumes per eval set. Its dev
    NLL is the best of its training run's log, or the `dolly_dev` evaluation for a model egad did not train."""
    ev = setup.out / "teacher" / "eval"
    gen_seeds = [G.sampling_seed(s) for s in seeds]
    kw = {"scale": setup.size, "data_dir": setup.data_dir, "skip_done": True}
    evals = X.evaluate(setup.teacher, ev, seeds=gen_seeds, dev=teacher_run is None, **kw)
    if teacher_run is not None:
        dev = min((r["dev_nll"] for r in load_run(teacher_run).metrics if "dev_nll" in r), default=math.nan)
        origin = f"Run folder `{teacher_run}`; its `config.yaml` holds the exact training settings."
    else:
        dev = evals["dolly_dev"]["nll"]
        origin = f"The model `{setup.teacher_spec}`, not trained here."
    return {**reference_row(evals), "dev_nll": dev, "origin": origin}


def eval_cut(setup: G.Setup) -> dict | None:
    """The untrained cut student, when the students are cut from the teacher: the floor every cell must clear."""
    if not isinstance(setup.size.student, (int, list)):
        return None
    model = X.save_cut_student(setup.teacher, setup.size.student, setup.out / "cut")
    kw = {"scale": setup.size, "data_dir": setup.data_dir, "skip_done": True}
    evals = X.evaluate(model, setup.out / "cut" / "eval", seeds=[G.sampling_seed(0)], dev=True, **kw)
    return reference_row(evals)


def teacher_answers(setup: G.Setup) -> Path:
    """The teacher's sampled answers to the training prompts the cells train on, for sequence-level KD: the first
    `train_examples` of the train split, or as many as one run consumes (steps x batch) when the scale uses all of
    them. Generated once (resumable), its minutes kept beside it for the results."""
    from egad.eval.answer import answer_dataset

    size, path = setup.size, setup.out / "teacher-answers.jsonl"
    if not path.is_file():
        t0 = time.perf_counter()
        answer_dataset(
            str(setup.teacher),
            str(setup.dolly),
            path,
            split="train",
            template=size.template,
            seed=0,
            max_prompt_len=size.max_prompt_len,
            max_len=size.max_len,
            max_new_tokens=size.max_len - size.max_prompt_len,
            max_examples=size.train_examples or size.student_steps * size.batch,
            mixed_precision=size.mixed_precision,
        )
        timing = {"minutes": (time.perf_counter() - t0) / 60}
        path.with_suffix(".timing.json").write_text(json.dumps(timing))
    return path


def tune(setup: G.Setup, knobs: dict[str, dict]) -> tuple[list[str], dict]:
    """Dev NLL (seed 0) of each knob setting against the EGAD defaults; the best setting, or {} if the defaults win."""
    dev = {"defaults": load_run(G.run_dir(setup, G.Cell("egad", "egad"), 0)).best_dev_nll}
    dev.update({k: load_run(G.run_dir(setup, G.Cell(f"tune/{k}", "egad"), 0)).best_dev_nll for k in knobs})
    best = min(dev, key=dev.get)
    lines = ["| EGAD setting (seed 0) | dev NLL |", "|---|---|"]
    lines += [f"| {k}{' (chosen)' if k == best else ''} | {v:.4f} |" for k, v in dev.items()]
    return lines, ({} if best == "defaults" else knobs[best])


def parse_floats(flag: str, spec: str) -> list[float]:
    """ "3e-4,1e-3" -> [0.0003, 0.001], each > 0."""
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: expected comma-separated numbers, e.g. 3e-4,1e-3,3e-3") from None
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"{flag} {spec!r}: expected one or more positive numbers")
    return values


def protocol_lines(setup: G.Setup, chosen: dict[str, dict]) -> list[str]:
    """The protocol's choices as a table: each cell's pilot dev NLLs and the setting chosen."""
    choices = json.loads((setup.out / "choices.json").read_text())
    lines = ["| cell | pilot runs (final dev NLL, pilot seed) | chosen |", "|---|---|---|"]
    for cell, run in chosen.items():
        tried = ", ".join(f"{k.rsplit('/', 1)[-1]}: {v:.4f}" for k, v in choices[cell]["dev_nll"].items())
        lines.append(f"| `{cell}` | {tried} | {', '.join(f'{k} = {v:g}' for k, v in run.items())} |")
    return lines


def parse_primary(spec: str | None, cells: list[str]) -> list[tuple[str, str]] | None:
    """--primary "a-b,c-d" -> [(a, b), (c, d)], every cell one of the study's (the dev-tuned cell counts)."""
    if spec is None:
        return None
    pairs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        a, sep, b = item.partition("-")
        if not sep or not a or not b or "-" in b:
            raise ConfigError(f"--primary: {item!r} is not a pair of cells written a-b (e.g. egad-kd)")
        unknown = [c for c in (a, b) if c not in cells and c != G.TUNED]
        if unknown:
            raise ConfigError(f"--primary {item}: {unknown} not among the study's cells {cells}")
        pairs.append((a, b))
    return pairs


def retire_stale_choice(cell_dir: Path, chosen: dict) -> None:
    """The dev-tuned cell is trained for one choice; if a longer sweep chose otherwise, set its old runs aside (never
    delete them) so that the cell is trained again rather than skipped as finished."""
    for cfg in cell_dir.glob("seed*/config.yaml"):
        objective = yaml.safe_load(cfg.read_text()).get("objective", {})
        if any(objective.get(k) != v for k, v in chosen.items()):
            cell_dir.rename(cell_dir.with_name(f"{cell_dir.name}.stale-{int(time.time())}"))
            return


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t0 = time.perf_counter()
    setup, teacher_run = setup_study(args)
    seeds = list(range(1 if args.quick else args.seeds))
    grid = args.cells or ("quick" if args.quick else "toy")
    cells = G.expand_cells(grid)
    unknown = [c for c in cells if c not in METHODS]
    if unknown:
        raise ConfigError(f"--cells: unknown cell(s) {unknown}; a grid ({', '.join(G.GRIDS)}) or preset names")
    if any(G.cell(c).needs_answers for c in cells):
        setup = replace(setup, answers=teacher_answers(setup))
    names = args.tune.split(",") if args.tune else list(G.TUNE)[: 2 if args.quick else None]
    bad = [k for k in names if k not in G.TUNE]
    if bad:
        raise ConfigError(f"--tune: unknown knob(s) {bad}; choose from {list(G.TUNE)}")
    primary = parse_primary(args.primary, cells)
    groups = {
        "baseline": [c for c in cells if c in G.BASELINES],
        "component": [c for c in cells if c in G.COMPONENTS and c not in G.BASELINES],
        "control": [c for c in cells if c in G.CONTROLS or c in G.PREREG_CONTROLS],
        "student data": [c for c in cells if c in G.STUDENT_DATA],
    }
    if args.lr_grid:
        protocol = P.run_protocol(
            setup,
            cells,
            seeds,
            lr_grid=parse_floats("--lr-grid", args.lr_grid),
            anchor_grid=parse_floats("--anchor-grid", args.anchor_grid),
            pilot_seed=args.pilot_seed,
            workers=args.jobs,
        )
        tuning, chosen = protocol_lines(setup, protocol), {}
    else:
        knobs = {} if args.no_tune or "egad" not in cells else {k: G.TUNE[k] for k in names}
        # The main comparison and the dev sweep first, so that a study stopped early has them.
        order = sorted(cells, key=lambda c: c not in ("kd", "egad"))
        jobs = [(G.cell(c), s) for c in order[:2] for s in seeds]
        jobs += [(G.Cell(f"tune/{k}", "egad", v, test_eval=False), 0) for k, v in knobs.items()]
        jobs += [(G.cell(c), s) for c in order[2:] for s in seeds]
        G.run_cells(setup, jobs, args.jobs)
        tuning, chosen = tune(setup, knobs) if knobs else ([], {})
        if chosen:
            retire_stale_choice(setup.out / G.TUNED, chosen)
            G.run_cells(setup, [(G.Cell(G.TUNED, "egad", chosen), s) for s in seeds], args.jobs)
            groups["dev-tuned"] = [G.TUNED]
    teacher = eval_teacher(setup, teacher_run, seeds)
    cut = eval_cut(setup)
    results = Path(args.results) if args.results else setup.out / "results.md"  # the checkout's docs/ only if asked
    results.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["egad study", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    log = setup.out / "invocations.jsonl"
    with log.open("a") as f:
        f.write(json.dumps({"command": command, "minutes": (time.perf_counter() - t0) / 60}) + "\n")
    invocations = [json.loads(x) for x in log.read_text().splitlines()]
    if args.lr_grid:
        page = PP.page(
            setup.out,
            cells,
            seeds,
            size=setup.size,
            teacher=teacher,
            cut=cut,
            invocations=invocations,
            primary=primary or [("egad", "kd"), ("egad", "feat_kd_all")],
            previous=results,
            repo=REPO,
            step_times=json.loads(Path(args.step_times).read_text()) if args.step_times else None,
        )
        results.write_text(page)
        print(page)
        return
    rows = R.aggregate(setup.out, groups, seeds)
    R.plot(rows, teacher, results.parent / "results.png")
    page = R.page(
        rows,
        teacher,
        setup,
        seeds,
        tuning,
        chosen,
        invocations,
        previous=results,
        cut=cut,
        beside=Path(args.beside) if args.beside else None,
        primary=primary,
    )
    results.write_text(page)
    print(page)


if __name__ == "__main__":
    main()
