"""`egad report`: a Markdown table and PNG plots built from run folders, never typed by hand.

A run folder is what `egad train` writes (config.yaml, metrics.jsonl, entropy_knots.safetensors) plus what
`egad eval --out RUN/eval` adds (eval/summary.json). The folder's name labels the run. report.md holds the table,
the setup the numbers come from (models, data, steps, seeds, the command) and each figure with its caption.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import Tensor  # noqa: E402

from egad.config.presets import preset  # noqa: E402
from egad.config.schema import ObjectiveConfig  # noqa: E402
from egad.eval.runs import RUN_FILES, ReportError, Run, load_run, rouge_sets  # noqa: E402
from egad.objective.token_plan import PlanState, token_plan  # noqa: E402


def results_table(runs: list[Run]) -> str:
    """Method x eval set, ROUGE-L mean ± std over seeds, plus dev NLL and test response NLL."""
    sets = rouge_sets(runs)
    head = ["run", "method", "dev NLL"] + [f"{s} ROUGE-L" for s in sets] + [f"{s} NLL" for s in sets[:1]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        dev = f"{r.dev_nll:.3f}" if r.dev_nll is not None else "—"
        cells = [r.label, r.method, dev]
        for s in sets:
            e = r.evals.get(s)
            cells.append(_rouge_cell(e))
        for s in sets[:1]:
            e = r.evals.get(s)
            cells.append(f"{e['nll']:.3f}" if e else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rouge_cell(e: dict | None) -> str:
    """mean ± std over sampling seeds; a single seed has no spread to show."""
    if not e:
        return "—"
    if _seeds(e) == 1:
        return f"{e['rouge_l_mean']:.2f} (1 seed)"
    return f"{e['rouge_l_mean']:.2f} ± {e['rouge_l_std']:.2f}"


def _seeds(e: dict | None) -> int:
    """How many sampling passes (seeds, or one greedy pass) an eval set's ROUGE-L is the mean of."""
    if not e or "rouge_l_mean" not in e:
        return 0
    if "rouge_l_per_seed" in e:
        return len(e["rouge_l_per_seed"])
    settings = e.get("settings", {})
    return 1 if settings.get("greedy") else len(settings.get("seeds", ())) or 1


def _seed_note(runs: list[Run]) -> str:
    """What the ROUGE-L bars and their error bars show, from the seed counts actually evaluated."""
    counts = {_seeds(e) for r in runs for e in r.evals.values() if _seeds(e)}
    if counts == {1}:
        return "one sampling seed, so no error bars"
    if len(counts) == 1:
        return f"mean ± std over {counts.pop()} sampling seeds"
    return "mean ± std over sampling seeds; none on one-seed bars"


def plot_training_curves(runs: list[Run], out: Path) -> Path:
    """Training CE per run, and the dev NLL over steps; when no run logged dev evaluations (the real demo scores every
    model once, after training), the dev NLL of each model as bars, the teacher and the untrained cut among them."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        steps, ce = r.train_series("ce")
        if steps:
            a.plot(steps, ce, label=r.label)
    curves = [(r, *r.series("dev_nll")) for r in runs if r.series("dev_nll")[0]]
    for r, steps, dev in curves:
        b.plot(steps, dev, marker="o", label=r.label)
    teacher_nll = [x for r in runs for x in r.series("dev_teacher_nll")[1]]
    if teacher_nll:
        b.axhline(teacher_nll[-1], color="k", ls="--", lw=1, label="teacher")
    scored = [r for r in runs if r.dev_nll is not None]
    if not curves and scored:
        bars = b.bar([r.label for r in scored], [r.dev_nll for r in scored], color="tab:blue")
        b.bar_label(bars, fmt="%.3f", fontsize=8)
        b.set(title="Dev response NLL of each model", ylabel="NLL (nats/token)")
    else:
        b.set(title="Dev response NLL", xlabel="step", ylabel="NLL (nats/token)")
    a.set(
        title="Training cross-entropy on labels", xlabel="step (mean of each logged window)", ylabel="CE (nats/token)"
    )
    for ax in (a, b):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out / "training_curves.png")


def _knots_run(runs: list[Run]) -> Run | None:
    """The run whose calibration knots the entropy and curriculum plots use: an EGAD run if there is one (its plan is
    the one worth drawing), else the first run that has knots."""
    with_knots = [r for r in runs if (r.path / "entropy_knots.safetensors").is_file()]
    return next((r for r in with_knots if r.method.startswith("egad")), with_knots[0] if with_knots else None)


def plot_entropy_histogram(runs: list[Run], out: Path) -> Path | None:
    r = _knots_run(runs)
    if r is None:
        return None
    tensors = load_file(str(r.path / "entropy_knots.safetensors"))
    sample = tensors.get("sample", tensors["knots"])
    rho = float(r.config.get("objective", {}).get("rho", preset(r.method).rho))
    thr = float(torch.quantile(sample.float(), 1 - rho))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(sample.numpy(), bins=80, color="tab:blue", alpha=0.8)
    ax.axvline(thr, color="tab:red", lw=2, label=f"routing threshold: top {rho:.0%} (H = {thr:.2f})")
    ax.set(
        title=f"Teacher entropy on response tokens ({r.label} calibration sample, n={sample.numel()})",
        xlabel="entropy H (nats)",
        ylabel="tokens",
    )
    ax.legend()
    return _save(fig, out / "entropy_hist.png")


def plan_curve(cfg: ObjectiveConfig, entropy: Tensor, *, knots: Tensor | None, progress: float, vocab: int) -> dict:
    """The KD weight and temperature that training's own per-token plan (egad.objective.token_plan.token_plan) gives
    tokens of these teacher entropies at this progress, for a student that matches the teacher (its entropy equal to the
    teacher's, Hellinger distance 0), which is all the plot can know of the student. -> weight, tau (N,), lambda."""
    h = entropy.detach().float()
    sig = {"entropy": h, "student_entropy": h, "hellinger": torch.zeros_like(h)}
    plan = token_plan(sig, cfg, progress=progress, vocab=vocab, state=curve_state(knots))
    return {"weight": plan["weight"], "tau": plan["tau"], "lambda": float(plan["lambda"])}


def curve_state(knots: Tensor | None) -> PlanState:
    """The run-level state of `plan_curve`'s student that matches the teacher: its entropy CDF is the teacher's, and
    its Hellinger distance is 0 on every token."""
    zero = None if knots is None else torch.zeros(2, dtype=knots.dtype)
    return PlanState(knots=knots, student_knots=knots, hellinger_knots=zero)


def _run_vocab(r: Run) -> int | None:
    return next((int(m["vocab"]) for m in r.metrics if m.get("event") == "setup" and "vocab" in m), None)


def plot_curriculum(runs: list[Run], out: Path) -> Path | None:
    """Weight and temperature against teacher entropy at several points of training, computed by `plan_curve` over
    the run's calibration knots (points spread like the real entropies, so batch-level rules act as in training)."""
    r = _knots_run(runs)
    vocab = _run_vocab(r) if r is not None else None
    if r is None or vocab is None:
        return None
    knots = load_file(str(r.path / "entropy_knots.safetensors"))["knots"]
    obj = dict(r.config.get("objective", {}))
    cfg = preset(obj.pop("preset", "egad"), **obj)
    h = knots.float()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        curve = plan_curve(cfg, h, knots=knots, progress=s, vocab=vocab)
        a.plot(h.numpy(), curve["weight"].numpy(), label=f"s = {s:.2f} (λ = {curve['lambda']:.2f})")
    tau = plan_curve(cfg, h, knots=knots, progress=0.5, vocab=vocab)["tau"]
    b.plot(h.numpy(), tau.numpy(), color="tab:purple")
    student_note = (
        " (student = teacher)" if cfg.weighting in ("ea_kd", "select_student_entropy", "select_hellinger") else ""
    )
    a.set(
        title=f"KD weight vs teacher entropy ({r.label}, {cfg.weighting}){student_note}",
        xlabel="teacher entropy H (nats)",
        ylabel="KD weight w",
    )
    b.set(title=f"Per-token temperature ({cfg.temp_mode})", xlabel="teacher entropy H (nats)", ylabel="τ")
    a.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _save(fig, out / "curriculum.png")


def plot_routing_temperature(runs: list[Run], out: Path) -> Path | None:
    with_stats = [r for r in runs if r.series("routed_frac")[0]]
    if not with_stats:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in with_stats:
        a.plot(*r.train_series("routed_frac"), label=r.label)
        b.plot(*r.train_series("tau_mean"), label=r.label)
    a.set(title="Fraction of tokens routed to the feature branch", xlabel="step", ylabel="routed fraction")
    b.set(title="Mean per-token temperature", xlabel="step", ylabel="mean τ")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out / "routing_temperature.png")


def plot_rouge(runs: list[Run], out: Path) -> Path | None:
    sets = rouge_sets(runs)
    if not sets:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) * len(runs) / 2), 4))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(sets))]
        means = [r.evals.get(s, {}).get("rouge_l_mean", 0.0) for s in sets]
        # An error bar only where there is a spread to show: a single sampling seed has none (std 0 is not "no
        # spread", it is no measurement of it).
        stds = [r.evals[s]["rouge_l_std"] if _seeds(r.evals.get(s)) > 1 else math.nan for s in sets]
        shown = None if all(math.isnan(x) for x in stds) else stds
        ax.bar(xs, means, width, yerr=shown, capsize=3 if shown else 0, label=r.label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    ax.set(title=f"ROUGE-L by method ({_seed_note(runs)})", ylabel="ROUGE-L")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "rouge_by_method.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    run_dirs: list[str | Path], out_dir: str | Path, *, command: str | None = None
) -> tuple[str, list[Path]]:
    """Write report.md (the table, the setup, each plot with its caption) and the PNG plots into out_dir; returns
    the table and the plot paths. `command` is the command line shown in the setup (default: the `egad report`
    call that rebuilds this report)."""
    runs = [load_run(p) for p in run_dirs]
    empty = [str(r.path) for r in runs if not any((r.path / f).is_file() for f in RUN_FILES)]
    if empty:
        raise ReportError(
            f"{', '.join(empty)}: not a run folder (holds none of {', '.join(RUN_FILES)}); pass folders written by "
            "`egad train`, with RUN/eval from `egad eval --out RUN/eval`"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(runs)
    plots = [
        p
        for p in (
            plot_training_curves(runs, out),
            plot_entropy_histogram(runs, out),
            plot_curriculum(runs, out),
            plot_routing_temperature(runs, out),
            plot_rouge(runs, out),
        )
        if p is not None
    ]
    command = command or shlex.join(["egad", "report", *map(str, run_dirs), "--out", str(out_dir)])
    md = ["# egad report", "", table, "", "## Setup", "", *setup_lines(runs, command), "", "## Figures", ""]
    for p in plots:
        md += [f"![{p.stem}]({p.name})", "", f"*{caption(p.stem, runs)}*", ""]
    (out / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return table, plots


# ------------------------------------------------------------------------------------------------ setup and captions
def _model_text(cfg: dict, side: str) -> str:
    """One model of a run config as a reader needs it: a path or hub id, a from-config size, or a cut's layers."""
    m = cfg.get("model", {})
    built, cut = m.get(f"{side}_config"), m.get("student_cut") if side == "student" else None
    if m.get(side):
        return str(m[side])
    if cut is not None:
        return f"cut of the teacher: {cut} layers" if isinstance(cut, int) else f"cut of the teacher: layers {cut}"
    if built:
        return f"{built.get('model_type')} {built.get('hidden_size')} wide x {built.get('num_hidden_layers')} layers"
    return "—"


def setup_lines(runs: list[Run], command: str) -> list[str]:
    """The setup the table's numbers come from: each run's models, training data, steps, batch and seed (config.yaml
    and the training log's setup event), then the evaluation settings (eval/summary.json)."""
    head = "| run | method | teacher | student | train examples | steps x batch | lr | seed |"
    lines = [f"Command: `{command}`", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        if not r.config:  # a model that egad did not train here (the real teacher, an untrained cut)
            lines.append(f"| {r.label} | — | evaluated as is, not trained here: {r.evaluated or '?'} | | | | | |")
            continue
        t, d, m = r.config.get("train", {}), r.config.get("data", {}), r.config.get("model", {})
        ev = next((x for x in r.metrics if x.get("event") == "setup"), {})
        teacher = _model_text(r.config, "teacher") + (
            f" (cache {m['teacher_cache']})" if m.get("teacher_cache") else ""
        )
        examples = ev.get("train_examples", d.get("max_train_examples") or "all")
        steps = ev.get("total_steps", t.get("max_steps") or f"{t.get('epochs', 1)} epochs of")
        batch = t.get("per_device_batch_size", 0) * t.get("grad_accum", 1) * ev.get("processes", 1)
        lines.append(
            f"| {r.label} | {r.method} | {teacher} | {_model_text(r.config, 'student')} | {examples} of "
            f"{d.get('train')} | {steps} x {batch} | {t.get('lr')} | {t.get('seed', 0)} |"
        )
    evals: dict[tuple, list[str]] = {}  # one line per eval set and setting, naming the runs that share it
    for r in runs:
        for name, e in r.evals.items():
            st = e.get("settings", {})
            how = "teacher-forced NLL only"
            if "rouge_l_mean" in e:
                how = "greedy" if st.get("greedy") else f"sampled with seeds {', '.join(map(str, st.get('seeds', [])))}"
                how += f", at most {st.get('max_new_tokens') or st.get('max_len')} new tokens"
            evals.setdefault((name, e.get("examples"), how, st.get("template")), []).append(r.label)
    lines.append("")
    for (name, n, how, template), labels in evals.items():
        who = "every run" if len(labels) == len(runs) else ", ".join(labels)
        lines.append(f"- Evaluation on {name}: {n} examples, {how}, template {template} ({who}).")
    return lines if evals else lines + ["- No run has an evaluation (RUN/eval/summary.json from `egad eval`)."]


def caption(stem: str, runs: list[Run]) -> str:
    """What a figure shows and how to read it."""
    dev = (
        "right: the dev response NLL at each evaluation (the teacher's dashed, when logged)"
        if any(r.series("dev_nll")[0] for r in runs)
        else "right: the dev response NLL of each model, scored once after training"
    )
    knots = _knots_run(runs)
    return {
        "training_curves": "Left: training cross-entropy on the reference tokens, each point the mean of one logging "
        f"window drawn at the window's mean step; {dev}. Lower is better.",
        "entropy_hist": f"The teacher's entropy on response tokens ({knots.label if knots else '?'}'s calibration "
        "sample); the red line is the threshold above which EGAD routes a token to its feature branch.",
        "curriculum": "The KD weight (left, at five points of training) and the temperature (right, mid-training) "
        "that the run's objective gives a token of each teacher entropy, from training's own per-token plan.",
        "routing_temperature": "The fraction of tokens routed to the feature branch and the mean per-token "
        "temperature, each point the mean of one logging window.",
        "rouge_by_method": f"ROUGE-L of each model's answers against the references per set ({_seed_note(runs)}).",
    }.get(stem, stem)
