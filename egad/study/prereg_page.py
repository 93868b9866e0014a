"""The results page of the pre-registered study (docs/preregistration.md), from its run files: the verdict on the
primary comparisons first, then the table, the tests, the controls, each part's contribution, the dev-NLL curves,
compute and the protocol's choices. The discussion and the list of deviations are written by hand and kept when the
page is regenerated.

Unlike the exploratory page (`results.py`), every number here follows the pre-registration: final weights (no
checkpoint chosen on dev), the primary family on Dolly test NLL only, Holm over that family and nothing else.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from egad.eval.runs import load_run  # noqa: E402
from egad.experiment import OTHER_SETS  # noqa: E402
from egad.study.comparisons import fmt_p, interval, signed  # noqa: E402
from egad.study.grid import PREREG_CELLS  # noqa: E402
from egad.study.results import ms  # noqa: E402
from egad.study.stats import holm, seed_test  # noqa: E402

SETS = ["dolly_test", *OTHER_SETS]
KEPT = ("## What the numbers show", "## Deviations from the pre-registration")
LAST_THIRD = (210, 240, 270, 300)  # the pre-registered length check, in steps (scaled to the run's length)


@dataclass
class Cell:
    """One cell's per-seed numbers, in seed order."""

    name: str
    final_dev: list[float]
    test_nll: list[float]
    kl: list[float]
    rouge: dict[str, list[float]]
    tokens: list[float]  # response tokens trained on
    train_s: list[float]  # logged training seconds (contended: two runs share the cores)
    curve: dict[int, list[float]]  # step -> dev NLL per seed
    curve_s: dict[int, list[float]]  # step -> training seconds so far per seed

    def values(self, metric: str) -> list[float]:
        if metric.startswith("rouge:"):
            return self.rouge[metric.split(":", 1)[1]]
        return getattr(self, metric)


def _finite(x) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else math.nan


def load_cell(out: Path, name: str, seeds: list[int]) -> Cell:
    cell = Cell(name, [], [], [], {s: [] for s in SETS}, [], [], {}, {})
    for s in seeds:
        run = load_run(out / name / f"seed{s}")
        devs = [r for r in run.metrics if "dev_nll" in r]
        cell.final_dev.append(_finite(devs[-1]["dev_nll"]) if devs else math.nan)
        test = run.evals["dolly_test"]
        cell.test_nll.append(_finite(test["nll"]))
        cell.kl.append(_finite(test.get("kl")))
        for name_ in SETS:
            cell.rouge[name_].append(_finite(run.evals[name_]["rouge_l_mean"]) if name_ in run.evals else math.nan)
        train = [r for r in run.metrics if "tokens" in r and "step" in r]
        cell.tokens.append(sum(r["tokens"] for r in train))
        cell.train_s.append(sum(r["train_s"] for r in train))
        elapsed, so_far = {}, 0.0
        for r in run.metrics:
            if "train_s" in r:
                so_far += r["train_s"]
            if "dev_nll" in r and "step" in r:
                elapsed[r["step"]] = so_far
                cell.curve.setdefault(r["step"], []).append(_finite(r["dev_nll"]))
        for step, sec in elapsed.items():
            cell.curve_s.setdefault(step, []).append(sec)
    return cell


def prereg_commit(repo: Path) -> str:
    """The commit that added docs/preregistration.md, or 'unknown' outside a git checkout."""
    try:
        got = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%h", "--", "docs/preregistration.md"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return got[-1] if got else "unknown"


def tests(cells: dict[str, Cell], pairs: list[tuple[str, str]], metric: str) -> dict[tuple[str, str], dict]:
    """seed_test of a - b on `metric` for each pair whose cells both exist, over the seeds where both are finite."""
    out = {}
    for a, b in pairs:
        if a in cells and b in cells:
            d = [x - y for x, y in zip(cells[a].values(metric), cells[b].values(metric), strict=True)]
            kept = [x for x in d if math.isfinite(x)]
            if kept:
                out[a, b] = seed_test(kept) | {"dropped": len(d) - len(kept)}
    return out


def verdict(primary: dict[tuple[str, str], dict]) -> list[str]:
    """One sentence per primary comparison: what the pre-registered decision rule says."""
    lines = []
    for (a, b), res in primary.items():
        lower = res["mean"] < 0
        ok = lower and res["holm_t"] < 0.05
        word = "beats" if ok else "does not beat"
        lines.append(
            f"- **`{a}` {word} `{b}`** on Dolly test NLL: {a} - {b} = {interval(res, 3)} nats per token "
            f"(95% t-interval over {res['n']} seeds), t-test p = {fmt_p(res['p_t'])}, Holm p = {fmt_p(res['holm_t'])}, "
            f"sign-flip p = {fmt_p(res['p_sign'])}." + ("" if ok or lower else f" The difference favours `{b}`.")
        )
    return lines


def test_table(blocks: list[tuple[dict[tuple[str, str], dict], str, int]], holm_col: bool = False) -> list[str]:
    """One table of seed-level tests: each block is (tests by pair, metric label, digits); empty when no test."""
    head = "| a - b | metric | per-seed differences | mean [95% t-interval] | t-test p |"
    head += " Holm p | sign-flip p |" if holm_col else " sign-flip p |"
    lines = [head, "|" + "---|" * (7 if holm_col else 6)]
    for results, label, digits in blocks:
        for (a, b), res in results.items():
            per = ", ".join(signed(x, digits) for x in res["diffs"])
            note = f" ({res['dropped']} seed(s) not finite)" if res["dropped"] else ""
            cells = [f"`{a}` - `{b}`", label + note, per, interval(res, digits), fmt_p(res["p_t"])]
            cells += [fmt_p(res["holm_t"])] if holm_col else []
            lines.append("| " + " | ".join([*cells, fmt_p(res["p_sign"])]) + " |")
    return lines if len(lines) > 2 else ["_No pair of these cells was run._"]


# What each comparison isolates, in the terms of the pre-registration's cells (a - b on test NLL).
CONTRIBUTIONS = [
    ("the feature term on every token (both layer pairs)", "feat_kd_all", "kd"),
    ("entropy guidance given the feature term: curriculum, per-token temperature and routing, together", "egad",
     "feat_kd_all"),
    ("EGAD as a whole, against uniform distillation", "egad", "kd"),
    ("an L2 pull to the initial weights alone (the anchor control)", "kd_anchor", "kd"),
    ("the feature term on the pair that is not a copy (the feature control)", "feat_kd_last", "kd"),
    ("the feature term beyond what the anchor gives", "feat_kd_all", "kd_anchor"),
]  # fmt: skip


def contributions(cells: dict[str, Cell]) -> list[str]:
    """One row per part of the method a pair of cells isolates: the seed-mean difference and its 95% t-interval on
    test NLL (uncorrected: only the primary family is corrected)."""
    lines = [
        "| what the difference isolates | a - b | test NLL, mean [95% t-interval] | t-test p |",
        "|---|---|---|---|",
    ]
    for what, a, b in CONTRIBUTIONS:
        res = tests(cells, [(a, b)], "test_nll").get((a, b))
        if res:
            lines.append(f"| {what} | `{a}` - `{b}` | {interval(res, 3)} | {fmt_p(res['p_t'])} |")
    if len(lines) == 2:
        return ["_No pair of these cells was run._"]
    return lines + [
        "",
        "The design does not separate EGAD's three entropy-guided parts from one another: no pre-registered cell "
        "removes one of them alone, so the second row is their joint effect given the feature term.",
    ]


def time_axis(cells: dict[str, Cell], step_times: dict[str, float] | None) -> tuple[str, dict[str, list[float]]]:
    """The curves' time axis: (label, {cell: minutes at each of its curve's steps, in step order}). Quiet minutes
    (step x the method's quiet step time) when every cell has a step time, so quality at equal compute reads off the
    plot; otherwise the runs' logged minutes, contended (two runs shared the cores)."""
    if step_times and all(name in step_times for name in cells):
        minutes = {name: [s * step_times[name] / 60 for s in sorted(c.curve)] for name, c in cells.items()}
        return "training minutes, quiet (step x quiet step time)", minutes
    minutes = {name: [statistics.fmean(c.curve_s[s]) / 60 for s in sorted(c.curve)] for name, c in cells.items()}
    return "training minutes (logged, contended)", minutes


def teacher_label(teacher_dev: float, y_low: float) -> str:
    """The teacher's legend entry; its value is named when the axis, fitted to the students, leaves its line out."""
    return f"teacher ({teacher_dev:.2f}, below the axis)" if teacher_dev < y_low else "teacher"


def curve_plot(
    cells: dict[str, Cell], path: Path, teacher_dev: float | None = None, step_times: dict[str, float] | None = None
) -> Path:
    """Dev NLL against steps and against training minutes (`time_axis`): mean over seeds, band = min..max over
    seeds."""
    time_label, minutes = time_axis(cells, step_times)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for name, c in cells.items():
        steps = sorted(c.curve)
        mean = [statistics.fmean(c.curve[s]) for s in steps]
        lo, hi = [min(c.curve[s]) for s in steps], [max(c.curve[s]) for s in steps]
        (line,) = axes[0].plot(steps, mean, marker=".", label=name)
        axes[0].fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        axes[1].plot(minutes[name], mean, marker=".", color=line.get_color(), label=name)
    lows = [min(v) for c in cells.values() for s, v in c.curve.items() if s > 0]
    if lows:
        axes[0].set_ylim(
            min(lows) - 0.2, max(max(v) for c in cells.values() for s, v in c.curve.items() if s > 0) + 0.2
        )
    for ax, xlabel in zip(axes, ("optimizer step", time_label), strict=True):
        if teacher_dev is not None and math.isfinite(teacher_dev):
            label = teacher_label(teacher_dev, ax.get_ylim()[0])
            ax.axhline(teacher_dev, color="k", ls="--", lw=1, label=label)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev NLL (nats per token; mean over seeds, band: min to max)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Dev-NLL curves of the pre-registered study")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def length_check(cells: dict[str, Cell], names: list[str], total_steps: int) -> list[str]:
    """The ranking of `names` by seed-mean dev NLL at the last third's evaluation steps, and whether it held."""
    at = sorted({round(s * total_steps / 300) for s in LAST_THIRD})
    present = [n for n in names if n in cells]
    lines = ["| step | ranking by seed-mean dev NLL (best first) |", "|---|---|"]
    rankings = []
    for step in at:
        if not all(step in cells[n].curve for n in present):
            continue
        order = sorted(present, key=lambda n: statistics.fmean(cells[n].curve[step]))
        rankings.append(tuple(order))
        means = ", ".join(f"`{n}` {statistics.fmean(cells[n].curve[step]):.3f}" for n in order)
        lines.append(f"| {step} | {means} |")
    stable = len(set(rankings)) == 1
    lines += ["", "The ranking " + ("held" if stable else "**changed**") + " over the last third of training."]
    return lines


def dropped_cells(names: list[str]) -> list[str]:
    """The pre-registered cells this page does not show, named in its stopping rule's terms; empty when none is."""
    missing = [c for c in PREREG_CELLS if c not in names]
    if not missing:
        return []
    tail = PREREG_CELLS[len(PREREG_CELLS) - len(missing) :] == missing
    how = (
        "dropped from the end of the pre-registered list, whole, as its stopping rule says when the compute runs out"
        if tail
        else "not run (they are not the end of the pre-registered list: a deviation from its stopping rule)"
    )
    return ["", f"Cells {', '.join(f'`{c}`' for c in missing)}: {how}; no comparison on this page uses them."]


def logged_hours(out: Path) -> tuple[int, float, float]:
    """(runs, training hours, evaluation hours) summed over every run's timing.json under `out`."""
    timings = [json.loads(f.read_text()) for f in sorted(out.rglob("timing.json"))]
    hours = [sum(t.get(k, 0.0) for t in timings) / 60 for k in ("train_min", "eval_min")]
    return len(timings), hours[0], hours[1]


def kept(previous: Path, heading: str) -> list[str]:
    text = previous.read_text() if previous.is_file() else ""
    if heading not in text:
        return [heading, "", "_Not written yet._"]
    return [heading + text.split(heading, 1)[1].split("\n## ", 1)[0].rstrip()]


def page(
    out: Path,
    names: list[str],
    seeds: list[int],
    *,
    size,
    teacher: dict,
    cut: dict | None,
    invocations: list[dict],
    primary: list[tuple[str, str]],
    previous: Path,
    repo: Path,
    step_times: dict[str, float] | None = None,
    generator: str = "`egad study`",
) -> str:
    """The page of the cells `names` (in the pre-registered order); also writes results-curves.png beside
    `previous`. `generator` names what wrote the page, for its header."""
    cells = {c: load_cell(out, c, seeds) for c in names}
    choices = json.loads((out / "choices.json").read_text()) if (out / "choices.json").is_file() else {}
    prim = tests(cells, primary, "test_nll")
    for key, h in zip(prim, holm([r["p_t"] for r in prim.values()]), strict=True):
        prim[key]["holm_t"] = h
    curve_plot(cells, previous.parent / "results-curves.png", teacher.get("dev_nll"), step_times)
    commit = prereg_commit(repo)
    wall = sum(r["minutes"] for r in invocations)
    n_runs, train_h, eval_h = logged_hours(out)
    sets = [s for s in SETS if any(not math.isnan(x) for c in cells.values() for x in c.rouge[s])]
    text = [
        "# Results: the pre-registered study",
        "",
        f"Pre-registered in [docs/preregistration.md](preregistration.md) at commit `{commit}`, before any final run. "
        f"Generated by {generator} from the run files in `{out}`; only the discussion and the deviations are "
        "written by hand.",
        "",
        "## Verdict on the primary comparisons",
        "",
        *verdict(prim),
        *dropped_cells(names),
        "",
        *kept(previous, KEPT[0]),
        "",
        *kept(previous, KEPT[1]),
        "",
        "## Table",
        "",
        f"Mean ± std over {len(seeds)} training seeds ({seeds}), each run's final weights after "
        f"{size.student_steps} steps. NLL and KL in nats per response token on Dolly test (KL(teacher || student)); "
        f"ROUGE-L under MiniLLM sampling, up to {size.max_new_tokens} new tokens.",
        "",
    ]
    head = ["cell", "lr", "final dev NLL", "test NLL", "test KL"] + [f"{s} ROUGE-L" for s in sets]
    text += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ref in (("**teacher**", teacher), ("untrained cut", cut)):
        if ref:
            vals = ["—", f"{ref['dev_nll']:.3f}", f"{ref['test_nll']:.3f}", "—"]
            vals += [ms(ref["rouge"][s]) if s in ref.get("rouge", {}) else "—" for s in sets]
            text.append(f"| {label} | " + " | ".join(vals) + " |")
    for name, c in cells.items():
        run = choices.get(name, {}).get("run", {})
        lr = ", ".join(f"{v:g}" if k == "train.lr" else f"gamma {v:g}" for k, v in sorted(run.items(), reverse=True))
        vals = [f"`{name}`", lr or "—", ms(c.final_dev, 3), ms(c.test_nll, 3), ms(c.kl, 3)]
        vals += [ms(c.rouge[s]) for s in sets]
        text.append("| " + " | ".join(vals) + " |")
    text += [
        "",
        "## Primary comparisons (Holm over this family)",
        "",
        "The unit is the training seed: each seed gives one difference a - b (negative favours a), the two cells "
        "paired by seed (same batches in the same order). Two-sided paired t-test, Holm's correction over the "
        f"{len(prim)} primary comparisons; the exact sign-flip p over all 2^n sign patterns beside it "
        f"(its floor with {len(seeds)} seeds: {2 / 2 ** len(seeds):.4f}).",
        "",
        *test_table([(prim, "test NLL", 3)], holm_col=True),
        "",
        "## Exploratory comparisons (uncorrected)",
        "",
        "The primary pairs on the other metrics (ROUGE-L: higher is better, so positive favours a), then every other "
        "cell against `kd` on test NLL.",
        "",
    ]
    metrics = [("kl", "test KL", 3)] + [(f"rouge:{s}", f"{s} ROUGE-L", 2) for s in sets]
    others = [(c, "kd") for c in cells if c not in ("kd", *[a for a, _ in primary])]
    blocks = [(tests(cells, primary, m), label, d) for m, label, d in metrics]
    text += test_table(blocks + [(tests(cells, others, "test_nll"), "test NLL", 3)])
    controls = [("kd_anchor", "feat_kd_all"), ("feat_kd_last", "feat_kd_all"), ("egad", "kd_anchor")]
    text += [
        "",
        "## The anchor and feature controls",
        "",
        "Read as pre-registered: if `kd_anchor` - `kd` is about as large as `feat_kd_all` - `kd` (their difference "
        "holds 0), an anchor can explain the feature term's gain; if `feat_kd_last` beats `kd`, feature matching "
        "helps without the copied-layer anchor.",
        "",
        *test_table([(tests(cells, controls, "test_nll"), "test NLL", 3)]),
        "",
        "## What each part contributes",
        "",
        *contributions(cells),
        "",
        "## Dev-NLL curves and the length check",
        "",
        "![dev NLL against step and training time](results-curves.png)",
        "",
        *length_check(cells, ["kd", "feat_kd_all", "egad"], size.student_steps),
        "",
        "## Compute",
        "",
        f"The {n_runs} runs (pilots included) logged {train_h:.1f} hours of training and {eval_h:.1f} hours of "
        "evaluation, process time, of which a run resumed after an interruption logs only its last part. The "
        f"invocations of `egad study` that ran to their end (`invocations.jsonl`) took {wall:.0f} min of wall time "
        f"over {len(invocations)}; one stopped by an interruption is not logged. Logged training time is contended "
        "(two runs share the 2 cores); the quiet step time is measured apart, one method at a time.",
        "",
        "| cell | response tokens trained on | logged train min | quiet step time (s) |",
        "|---|---|---|---|",
    ]
    for name, c in cells.items():
        quiet = f"{step_times[name]:.2f}" if step_times and name in step_times else "not measured"
        text.append(
            f"| `{name}` | {statistics.fmean(c.tokens):,.0f} | {ms([s / 60 for s in c.train_s], 1)} | {quiet} |"
        )
    text += ["", "## The learning-rate protocol", "", "| cell | pilot runs (final dev NLL, pilot seed) | chosen |"]
    text += ["|---|---|---|"]
    for name, ch in choices.items():
        tried = ", ".join(f"{k.rsplit('/', 1)[-1]}: {v:.4f}" for k, v in ch["dev_nll"].items())
        text.append(f"| `{name}` | {tried} | {', '.join(f'{k} = {v:g}' for k, v in ch['run'].items())} |")
    return "\n".join(text) + "\n"
