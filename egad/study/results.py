"""Aggregate the study's run files into docs/results.md and results.png. Nothing here is typed in by hand except the
discussion, which is kept from the existing page when the study is regenerated."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from egad.config.methods import paper_index  # noqa: E402
from egad.eval.runs import load_run  # noqa: E402
from egad.experiment import OTHER_SETS  # noqa: E402
from egad.study.comparisons import Row, comparisons, effects  # noqa: E402
from egad.study.grid import sampling_seed  # noqa: E402
from egad.study.stats import compare_seeds  # noqa: E402

DISCUSSION = "## What the numbers show"


def train_minutes(run: Path) -> float:
    """Training wall minutes of one run: its timing.json (written by the study), or else the span from the run's
    config.yaml (written at setup) to its final model (runs from before timing.json; nan when neither is there)."""
    timing = run / "timing.json"
    recorded = json.loads(timing.read_text()) if timing.is_file() else {}
    if "train_min" in recorded:
        return float(recorded["train_min"])
    start, end = run / "config.yaml", run / "final" / "config.json"
    if start.is_file() and end.is_file():
        return (end.stat().st_mtime - start.stat().st_mtime) / 60
    return math.nan


def aggregate(out: Path, groups: dict[str, list[str]], seeds: list[int]) -> list[Row]:
    rows = []
    for group, cells in groups.items():
        for cell in cells:
            runs = [load_run(out / cell / f"seed{s}") for s in seeds]
            rouge = {
                name: [r.evals[name]["rouge_l_mean"] for r in runs]
                for name in ["dolly_test"] + OTHER_SETS
                if all(name in r.evals for r in runs)
            }
            rows.append(
                Row(
                    cell=cell,
                    group=group,
                    dev_nll=[r.best_dev_nll for r in runs],
                    test_nll=[r.evals["dolly_test"]["nll"] for r in runs],
                    rouge=rouge,
                    train_min=[train_minutes(out / cell / f"seed{s}") for s in seeds],
                )
            )
    return rows


def ms(vals: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"  # nan: a teacher given as a model folder has no dev log


def table(rows: list[Row], teacher: dict | None = None, cut: dict | None = None) -> list[str]:
    sets = [s for s in ["dolly_test"] + OTHER_SETS if all(s in r.rouge for r in rows)]
    head = ["group", "cell", "dev NLL", "test NLL"] + [f"{s} ROUGE-L" for s in sets] + ["train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ref in (("**teacher**", teacher), ("the untrained cut student", cut)):
        if ref:
            vals = [_num(ref["dev_nll"]), _num(ref["test_nll"])]
            vals += [ms(ref["rouge"][s]) if s in ref["rouge"] else "—" for s in sets] + ["—"]
            lines.append(f"| | {label} | " + " | ".join(vals) + " |")
    best = {
        "dev_nll": min(r.mean("dev_nll") for r in rows),
        "test_nll": min(r.mean("test_nll") for r in rows),
    }
    for r in rows:
        dev, test = ms(r.dev_nll, 3), ms(r.test_nll, 3)
        dev = f"**{dev}**" if r.mean("dev_nll") == best["dev_nll"] else dev
        test = f"**{test}**" if r.mean("test_nll") == best["test_nll"] else test
        minutes = "—" if any(math.isnan(m) for m in r.train_min) else ms(r.train_min, 1)
        cells = [r.group, f"`{r.cell}`", dev, test] + [ms(r.rouge[s]) for s in sets] + [minutes]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def kept_discussion(path: Path) -> list[str]:
    """The hand-written discussion of an earlier results page, so regenerating the tables does not erase it."""
    if not path.is_file() or DISCUSSION not in path.read_text():
        return [DISCUSSION, "", "_Not written yet: read the tables above._"]
    tail = path.read_text().split(DISCUSSION, 1)[1]
    return [DISCUSSION + tail.split("\n## ", 1)[0].rstrip()]


GROUP_COLOURS = {
    "baseline": "tab:gray",
    "component": "tab:blue",
    "control": "tab:orange",
    "dev-tuned": "tab:green",
    "student data": "tab:red",
}


def plot(rows: list[Row], teacher: dict | None, path: Path) -> Path:
    """Dev NLL and Dolly test ROUGE-L per cell (mean and std over training seeds), sorted by dev NLL."""
    rows = sorted(rows, key=lambda r: r.mean("dev_nll"), reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.3 * len(rows) + 1.5), sharey=True)
    ys = range(len(rows))
    colours = [GROUP_COLOURS.get(r.group, "tab:purple") for r in rows]
    panels = [(axes[0], "dev_nll", "dev NLL (lower is better)"), (axes[1], "rouge", "Dolly test ROUGE-L")]
    for ax, metric, label in panels:
        vals = [r.dev_nll if metric == "dev_nll" else r.rouge["dolly_test"] for r in rows]
        means = [statistics.fmean(v) for v in vals]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.barh(list(ys), means, xerr=sds, color=colours, capsize=2)
        lo = min(m - s for m, s in zip(means, sds, strict=True))
        hi = max(m + s for m, s in zip(means, sds, strict=True))
        if teacher and metric == "dev_nll":
            ax.axvline(teacher["dev_nll"], color="k", ls="--", lw=1, label="teacher")
            lo = min(lo, teacher["dev_nll"])
            ax.legend(loc="lower right", fontsize=8)
        pad = 0.1 * (hi - lo) or 0.1
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(ys), [r.cell for r in rows], fontsize=8)
    for group, colour in GROUP_COLOURS.items():
        axes[1].barh([0], [0], color=colour, label=group)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("EGAD study: mean ± std over training seeds (bars coloured by group)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Metrics of the paired tests: key -> (label, digits). "rouge:SET" is the ROUGE-L of eval set SET. The primary
# family (Holm) is every primary comparison on PRIMARY_METRICS; the other metrics are reported uncorrected.
def _student_text(size) -> str:
    st = size.student
    if isinstance(st, str):
        return f"`{st}`"
    if isinstance(st, dict):
        return f"{st.get('model_type', '')} {st['hidden_size']} wide, {st['num_hidden_layers']} layers, from scratch"
    return f"cut from the teacher (`model.student_cut: {st}`), the cut layers copied"


def beside_table(page: Path) -> list[str]:
    """The table of an earlier results page (the toy study), for comparison on this one."""
    if not page.is_file() or "## Table" not in page.read_text():
        return []
    body = page.read_text().split("## Table", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    return [f"From [{page.name}]({page.name}), the earlier study on a teacher trained from scratch:", "", *rows]


def _student_data_text(rows: list[Row], size, out: Path) -> str:
    cells = {r.cell for r in rows if r.group == "student data"}
    parts = []
    if cells & {"gkd", "egad_on_policy"}:
        parts.append(
            " `gkd` (JSD, beta 0.5) and `egad_on_policy` train half their batches (`train.on_policy: 0.5`) on the "
            f"student's own samples (temperature 1, at most {size.max_len - size.max_prompt_len} new tokens, ending "
            "at the end-of-turn token), scored by the teacher online; the other half on the dataset's responses"
        )
    if "seqkd" in cells:
        timing = out / "teacher-answers.timing.json"
        once = f", generated once in {json.loads(timing.read_text())['minutes']:.1f} min" if timing.is_file() else ""
        parts.append(
            " `seqkd` is SFT on the teacher's sampled answers to the same training prompts "
            f"(`egad generate`, temperature 1{once}, not in its train minutes)"
        )
    return ";".join(parts) + "." if parts else ""


def page(
    rows,
    teacher,
    setup,
    seeds,
    tuning,
    chosen,
    invocations: list[dict],
    *,
    previous: Path,
    cut: dict | None = None,
    beside: Path | None = None,
    primary: list[tuple[str, str]] | None = None,
) -> str:
    """The results page; `previous` is the page being replaced, whose discussion is kept; `beside` an earlier page
    whose table is shown for comparison; `cut` the untrained cut student's row; `primary` the pre-registered primary
    comparisons (a, b) (default: see `comparison_pairs`)."""
    index = paper_index([r.cell for r in rows])
    discussion = kept_discussion(previous)
    size = setup.size
    student = _student_text(size)
    lr = size.run.get("train.lr", 2e-3)
    precision = " with bf16 autocast" if size.mixed_precision == "bf16" else ""
    other = f"the first {size.other_examples} records of {', '.join(OTHER_SETS)}" if size.other_examples else "none"
    runs, command = invocations, invocations[-1]["command"]
    wall = sum(r["minutes"] for r in runs)
    dolly_n = "all 500" if size.test_examples is None else f"the first {size.test_examples}"
    student_data = _student_data_text(rows, size, setup.out)
    text = [
        "# Results: EGAD vs baselines on Dolly",
        "",
        f"Generated by `egad study` from the run files in `{setup.out}`; only the discussion is written by hand.",
        "",
        "## Protocol",
        "",
        f"- **Command:** `{command}`. Wall time **{wall:.0f} min** on this 2-core CPU, over {len(runs)} "
        "invocation(s) (finished cells are skipped, so the study runs in parts):",
        *[f"  - `{r['command']}`: {r['minutes']:.1f} min" for r in runs],
        f"- **Teacher:** `{setup.teacher}`, dev NLL **{_num(teacher['dev_nll'])}**, Dolly test NLL "
        f"{teacher['test_nll']:.3f}. {teacher['origin']}",
        f"- **Student:** {student}; {size.student_steps} steps of batch {size.batch}, lr {lr:g}{precision}, the "
        f"teacher's tokenizer and the `{size.template}` template"
        + (f", {size.train_examples} Dolly train examples" if size.train_examples else "")
        + ". Every cell reads the same offline teacher cache (k = 64, hidden states of every token, so each routing "
        "rule picks its own)" + (" except the `student data` group:" if student_data else ".") + student_data,
        "- **Train min:** the training wall minutes per run (mean ± std over seeds; two runs shared the 2 cores at a "
        "time, so compare them with each other, not with other machines); evaluation is the same for every cell and "
        "not included.",
        f"- **Seeds:** training seeds {seeds}; training seed s samples with generation seed "
        f"{', '.join(str(sampling_seed(s)) for s in seeds)}. Every figure is mean ± std over training seeds.",
        f"- **Evaluation:** dev NLL on {size.dev_examples} Dolly dev examples (also the checkpoint choice); Dolly test "
        f"({dolly_n} examples) ROUGE-L under MiniLLM sampling (temperature 1, top-p 1, top-k 0) and response NLL; "
        f"ROUGE-L on {other} (a fixed subset, for time).",
        "- **No tuning on test:** every preset uses its defaults (docs/method.md), fixed before the study; EGAD's "
        "knobs were swept on dev only (below)" + (f" and `egad_dev_tuned` uses {chosen}." if chosen else "."),
        "",
        "## Table",
        "",
        "Bold: best mean over all cells.",
        "",
        *table(rows, teacher, cut),
        "",
        "![dev NLL and ROUGE-L per cell](results.png)",
        *(["", *beside_table(beside)] if beside is not None and beside_table(beside) else []),
        "",
        *discussion,
        "",
    ]
    comp = comparisons(rows, lambda a, b: compare_seeds(setup.out, a, b, seeds), primary)
    if comp:
        text += ["## Paired tests (the training seed as the unit)", "", *comp, ""]
    eff = effects(rows)
    if eff:
        text += ["## Component main effects (the 2^3 factorial, the training seed as the unit)", "", *eff, ""]
    if tuning:
        text += ["## Dev sweep of EGAD's knobs (spec section 8, one at a time)", "", *tuning, ""]
    if index:
        text += [
            "## Paper index",
            "",
            *index,
            "",
        ]
    return "\n".join(text)
