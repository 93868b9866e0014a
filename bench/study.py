"""Does EGAD beat the baselines? The ablation study on Dolly: presets x seeds on one fixed teacher, one protocol.

Every cell trains the same student from the same offline teacher cache (k = 64, hidden states of every token, so
each routing rule can pick its own tokens) for the same steps, selects nothing on test, and is evaluated the same
way: dev NLL, Dolly test500 ROUGE-L (sampling, MiniLLM settings) and response NLL, and fixed subsets of the other
MiniLLM sets. Finished cells are skipped, so the study runs in parts and the results merge. It writes
docs/results.md (or --results) and its plots from the run files.

    python bench/study.py --quick          # 4 cells, 1 seed, a few minutes (the tests run this)
    python bench/study.py                  # the whole grid, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

from egad.demo import FULL, QUICK, DemoSize, base_run, demo_teacher, demo_tokenizer, resolve_dolly, train_run
from egad.eval.report import load_run, plot_rouge
from egad.eval.suite import MINILLM_SEEDS, EvalSettings, run_eval
from egad.run_config import build_config
from egad.teacher.cache_job import run_cache_job

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
]
GRID = list(dict.fromkeys(BASELINES + COMPONENTS + CONTROLS))
QUICK_CELLS = ["sft", "kd", "egad_c1", "egad"]
OTHER_SETS = ["self_inst", "vicuna", "sinst", "uinst"]


def paired_bootstrap(a: list[float], b: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Mean difference a - b over paired examples, and the two-sided bootstrap p-value of 'no difference'."""
    rng = random.Random(seed)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    m = len(diffs)
    below = sum(statistics.fmean(diffs[rng.randrange(m)] for _ in range(m)) <= 0 for _ in range(n))
    p_one = below / n if mean > 0 else 1 - below / n
    return mean, min(1.0, 2 * p_one)


def per_example_rouge(cell_dir: Path, seeds: list[int]) -> list[float]:
    """Per test example ROUGE-L, averaged over the cell's training seeds (the unit of the paired test)."""
    runs = []
    for s in seeds:
        gen = next((cell_dir / f"seed{s}" / "eval" / "dolly_test").glob("generations-*.jsonl"))
        runs.append([json.loads(x)["rouge_l"] for x in gen.read_text().splitlines()])
    return [statistics.fmean(col) for col in zip(*runs, strict=True)]


def run_cell(
    cell: str,
    seed: int,
    size: DemoSize,
    dolly: Path,
    data_dir: Path | None,
    tok_dir: Path,
    cache: Path,
    teacher: Path,
    out: Path,
) -> Path:
    run_dir = out / cell / f"seed{seed}"
    if (run_dir / "eval" / "summary.json").is_file():
        return run_dir  # finished earlier: the study resumes
    raw = base_run(size, dolly, run_dir, tok_dir)
    raw["model"].update(student_config=size.student, teacher_cache=str(cache))
    raw["objective"] = {"preset": cell, "feat_layers": 2}
    raw["train"].update(max_steps=size.student_steps, seed=seed, eval_every=size.student_steps, eval_at_start=False)
    train_run(raw)
    gen_seed = MINILLM_SEEDS[seed % len(MINILLM_SEEDS)]
    settings = EvalSettings(
        seeds=(gen_seed,),
        max_prompt_len=size.max_prompt_len,
        max_len=size.max_len,
        max_new_tokens=size.max_new_tokens,
        batch_size=32,
        max_examples=size.test_examples,
    )
    run_eval(
        run_dir / "final", ["dolly_test"], settings, out_dir=run_dir / "eval", data_dir=data_dir, teacher_path=teacher
    )
    if data_dir is not None and size.other_examples:
        other = replace(settings, max_examples=size.other_examples)
        run_eval(run_dir / "final", OTHER_SETS, other, out_dir=run_dir / "eval", data_dir=data_dir)
    return run_dir


def aggregate(out: Path, cells: list[str], seeds: list[int]) -> dict[str, dict]:
    table = {}
    for cell in cells:
        runs = [load_run(out / cell / f"seed{s}") for s in seeds]
        row = {"dev_nll": [r.best_dev_nll for r in runs]}
        for name in ["dolly_test"] + OTHER_SETS:
            if all(name in r.evals for r in runs):
                row[name] = [r.evals[name]["rouge_l_mean"] for r in runs]
        row["test_nll"] = [r.evals["dolly_test"]["nll"] for r in runs]
        table[cell] = row
    return table


def _ms(vals: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def write_results(
    path: Path,
    out: Path,
    table: dict,
    seeds: list[int],
    teacher_nll: float,
    comparisons: list[str],
    command: str,
    minutes: float,
    size: DemoSize,
) -> None:
    sets = [s for s in ["dolly_test"] + OTHER_SETS if all(s in row for row in table.values())]
    head = ["cell", "dev NLL", "test NLL"] + [f"{s} ROUGE-L" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell, row in table.items():
        lines.append(
            "| "
            + " | ".join([cell, _ms(row["dev_nll"], 3), _ms(row["test_nll"], 3)] + [_ms(row[s]) for s in sets])
            + " |"
        )
    best_dev = min(table, key=lambda c: statistics.fmean(table[c]["dev_nll"]))
    best_rouge = max(table, key=lambda c: statistics.fmean(table[c]["dolly_test"]))
    text = [
        "# Results: EGAD vs baselines on Dolly",
        "",
        f"Command: `{command}`. Wall time: {minutes:.0f} min on a 2-core CPU. Training seeds: {seeds}. "
        f"Student: {size.student['hidden_size']}-wide, {size.student['num_hidden_layers']} layers, "
        f"{size.student_steps} steps of batch {size.batch}, all cells from one teacher cache (k = 64). "
        f"Teacher dev NLL: {teacher_nll:.3f}. Each ROUGE-L is one sampling seed per training seed (seed "
        "10, 20, 30 for training seeds 0, 1, 2); mean ± std over training seeds. Test sets other than Dolly are "
        f"the first {size.other_examples} records. No hyperparameter was tuned on test: every cell uses the "
        "preset defaults (docs/method.md), chosen before the study.",
        "",
        *lines,
        "",
        f"Best dev NLL: **{best_dev}**. Best Dolly test ROUGE-L: **{best_rouge}**.",
        "",
        "Paired tests (per-example Dolly test ROUGE-L averaged over seeds; two-sided paired bootstrap, 10,000 "
        "resamples):",
        "",
        *comparisons,
        "",
        "![ROUGE-L by method](results_rouge.png)",
        "",
        "Paper index: see README.md (method -> preset -> citation).",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 cells, 1 seed, miniature models")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--results", default=None, help="Markdown output (default docs/results.md, quick: OUT/results.md)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cells", default=None, help="comma-separated subset of the grid (default: all)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--teacher", default=None, help="teacher run folder (default: the demo's cached teacher)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    size = QUICK if args.quick else FULL
    cells = args.cells.split(",") if args.cells else (QUICK_CELLS if args.quick else GRID)
    seeds = list(range(1 if args.quick else args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dolly, data_dir = resolve_dolly(args.data, out)
    if args.teacher:
        # A teacher trained once, for longer, with the project's own command (configs/study_teacher.yaml).
        teacher_run = Path(args.teacher)
        teacher = teacher_run / "final"
        if not (teacher / "config.json").is_file():
            raise SystemExit(f"--teacher {teacher_run}: expected an `egad train` run folder with final/")
        tok_dir = teacher  # students share the teacher's tokenizer
    else:
        tok_dir = demo_tokenizer(size, dolly)
        teacher_run = demo_teacher(size, dolly, tok_dir)
        teacher = teacher_run / "final"
    cache_cfg = base_run(size, dolly, out / "cache-run", tok_dir)
    cache_cfg["model"]["teacher"] = str(teacher)
    cache_cfg["model"]["student_config"] = size.student
    cache_cfg["objective"] = {"preset": "egad", "feat_layers": 2}
    run_cache_job(build_config(cache_cfg), out / "cache", k=64, hidden_quantile=0.0)
    for cell in cells:
        for seed in seeds:
            print(f"[study] {cell} seed {seed}")
            run_cell(cell, seed, size, dolly, data_dir, tok_dir, out / "cache", teacher, out)
    table = aggregate(out, cells, seeds)
    teacher_nll = min(r["dev_nll"] for r in load_run(teacher_run).metrics if "dev_nll" in r)
    comparisons = []
    if "egad" in cells:
        egad = per_example_rouge(out / "egad", seeds)
        others = [c for c in cells if c in BASELINES and c != "sft"]
        best = max(others, key=lambda c: statistics.fmean(table[c]["dolly_test"])) if others else None
        for ref in dict.fromkeys(c for c in ("kd", best) if c in cells):
            diff, p = paired_bootstrap(egad, per_example_rouge(out / ref, seeds))
            comparisons.append(f"- EGAD - {ref}: {diff:+.2f} ROUGE-L, p = {p:.3f}")
    results = Path(args.results) if args.results else (out / "results.md" if args.quick else Path("docs/results.md"))
    minutes = (time.perf_counter() - t0) / 60
    command = "python bench/study.py" + (" --quick" if args.quick else "")
    write_results(results, out, table, seeds, teacher_nll, comparisons, command, minutes, size)
    fig_runs = [load_run(out / c / "seed0") for c in cells]
    for r, c in zip(fig_runs, cells, strict=True):
        r.label = c
    png = plot_rouge(fig_runs, results.parent)
    if png is not None:
        png.rename(results.parent / "results_rouge.png")
    print(results.read_text())


if __name__ == "__main__":
    main()
