"""The report draws the curriculum with the plan that training applies: for every preset, its weight and temperature
curves equal the per-token weight and temperature that the objective computes on the same tokens."""

from __future__ import annotations

import pytest
import torch

from egad.config.presets import PRESETS, preset
from egad.eval.report import curve_state, plan_curve
from egad.losses.features import FeatureProjector
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.plan.entropy import fit_quantile_knots, token_entropy
from egad.teacher.signal import DenseSignal

N, V = 97, 61


def _teacher(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(1, N, 1, generator=g) * 1.3 + 0.5)  # confident to uncertain tokens
    return torch.randn(1, N, V, generator=g) * scale


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_report_curve_equals_the_trained_plan(name, progress):
    zt = _teacher()
    targets = torch.randint(0, V, (1, N), generator=torch.Generator().manual_seed(1))
    h = token_entropy(zt[0])
    knots = fit_quantile_knots(h, 101)
    cfg = preset(name, chunk_size=17, feat_layers=1)
    feats = [torch.randn(1, N, 8, generator=torch.Generator().manual_seed(2))]
    # A student equal to the teacher: the report's stated assumption about the student side of a rule.
    out = distillation_loss(
        StudentOutputs(logits=zt.clone(), features=feats),
        DenseSignal(zt, feats),
        targets,
        cfg,
        progress=progress,
        state=curve_state(knots),
        vocab_size=V,
        projector=FeatureProjector(8, 8, 1),
    )
    if not cfg.uses_teacher:
        return  # SFT has no plan to draw
    curve = plan_curve(cfg, h, knots=knots, progress=progress, vocab=V)
    torch.testing.assert_close(curve["weight"], out.tokens["weight"], atol=0, rtol=0)
    torch.testing.assert_close(curve["tau"], out.tokens["tau"], atol=0, rtol=0)
    assert curve["lambda"] == pytest.approx(float(out.metrics["lambda"]))


def test_the_curve_follows_fixed_lambda_and_competence():
    """The drift that motivated this: AT-KD freezes lambda at 0 and competence gating uses the sqrt pacing."""
    h = token_entropy(_teacher()[0])
    knots = fit_quantile_knots(h, 101)
    at_kd = [plan_curve(preset("at_kd"), h, knots=knots, progress=s, vocab=V)["weight"] for s in (0.0, 1.0)]
    torch.testing.assert_close(at_kd[0], at_kd[1])
    assert torch.corrcoef(torch.stack([at_kd[1], h]))[0, 1] < 0  # confident tokens weigh more, at every step
    comp = plan_curve(preset("egad_competence"), h, knots=knots, progress=0.0, vocab=V)
    assert comp["lambda"] == pytest.approx(0.3) and set(comp["weight"].unique().tolist()) <= {0.0, 1.0}


def test_plot_curriculum_draws_plan_curve(tmp_path, monkeypatch):
    import json

    import yaml
    from safetensors.torch import save_file

    from egad.eval import report

    run = tmp_path / "at_kd"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": {"preset": "at_kd"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"event": "setup", "step": 0, "vocab": V}) + "\n")
    h = token_entropy(_teacher()[0])
    save_file({"knots": fit_quantile_knots(h, 101), "sample": h}, str(run / "entropy_knots.safetensors"))
    calls = []
    real = report.plan_curve
    monkeypatch.setattr(report, "plan_curve", lambda *a, **k: calls.append(k["progress"]) or real(*a, **k))
    path = report.plot_curriculum([report.load_run(run)], tmp_path)
    assert path is not None and path.stat().st_size > 5000
    assert sorted(set(calls)) == [0.0, 0.25, 0.5, 0.75, 1.0]


# --- the report of a small synthetic run folder: honest curves, error bars only with seeds, setup and captions ---


def _synthetic_run(root, name: str, *, seeds: tuple[int, ...], max_steps: int = 36, log_every: int = 5):
    """A run folder as `egad train` + `egad eval` leave it: config.yaml, a training log whose last window is partial
    (max_steps not a multiple of log_every), an evaluation at the end, eval/summary.json."""
    import json

    import yaml

    run = root / name
    (run / "eval").mkdir(parents=True)
    config = {
        "model": {"teacher": "smollm2-135m-instruct", "student_cut": [0, 1, 2], "teacher_cache": "runs/demo/cache"},
        "data": {"train": "dolly.jsonl", "max_train_examples": 400},
        "objective": {"preset": name},
        "train": {"max_steps": max_steps, "per_device_batch_size": 8, "grad_accum": 1, "lr": 1e-3, "seed": 0},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"event": "setup", "step": 0, "train_examples": 400, "total_steps": max_steps, "processes": 1}]
    logged = [s for s in range(1, max_steps + 1) if s % log_every == 0 or s == max_steps]
    rows += [{"step": s, "lr": 1e-3, "loss": 5.0 - s / 10, "ce": 5.0 - s / 10, "kd": 1.0} for s in logged]
    rows.append({"step": max_steps, "dev_nll": 4.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_seed = {f"seed{s}": 8.0 + i for i, s in enumerate(seeds)}
    dolly_test = {
        "set": "dolly_test",
        "examples": 100,
        "rouge_l_mean": sum(per_seed.values()) / len(per_seed),
        "rouge_l_std": 0.0 if len(seeds) == 1 else 1.0,
        "rouge_l_per_seed": per_seed,
        "nll": 4.4,
        "settings": {"seeds": list(seeds), "greedy": False, "max_new_tokens": 64, "template": "alpaca"},
    }
    summary = {"model": str(run / "final"), "sets": {"dolly_test": dolly_test}}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    return run


def _captured_figures(monkeypatch):
    from egad.eval import report

    figs = {}
    real = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.__setitem__(path.stem, fig) or real(fig, path))
    return figs


def test_training_curve_points_sit_at_their_windows_mean_step(tmp_path, monkeypatch):
    """Steps 1-5, ..., 31-35 are 5-step means and step 36 a one-step window: each is drawn at its mean step, so the
    line ends where training ended without the lag jump of plotting a window mean at its last step."""
    from egad.eval import report

    run = report.load_run(_synthetic_run(tmp_path, "kd", seeds=(10,)))
    xs, ys = run.train_series("ce")
    assert xs == [3, 8, 13, 18, 23, 28, 33, 36]
    assert len(ys) == len(xs)
    figs = _captured_figures(monkeypatch)
    report.plot_training_curves([run], tmp_path)
    line = figs["training_curves"].axes[0].lines[0]
    assert list(line.get_xdata()) == xs


def _bars(ax):
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_rouge_error_bars_only_with_more_than_one_seed(tmp_path, monkeypatch):
    from egad.eval import report

    figs = _captured_figures(monkeypatch)
    one = [report.load_run(_synthetic_run(tmp_path / "one", m, seeds=(10,))) for m in ("kd", "egad")]
    report.plot_rouge(one, tmp_path)
    ax = figs["rouge_by_method"].axes[0]
    assert all(c.errorbar is None for c in _bars(ax))
    assert "±" not in ax.get_title() and "one sampling seed" in ax.get_title()
    three = [report.load_run(_synthetic_run(tmp_path / "three", m, seeds=(10, 20, 30))) for m in ("kd", "egad")]
    report.plot_rouge(three, tmp_path)
    ax = figs["rouge_by_method"].axes[0]
    assert len(_bars(ax)) == 2 and all(c.errorbar is not None for c in _bars(ax))
    assert "mean ± std over 3 sampling seeds" in ax.get_title()


def test_report_md_has_its_setup_and_a_caption_under_each_figure(tmp_path):
    from egad.eval import report

    runs = [_synthetic_run(tmp_path, m, seeds=(10,)) for m in ("sft", "egad")]
    teacher = tmp_path / "teacher" / "eval"  # a model egad did not train: only its evaluation
    teacher.mkdir(parents=True)
    (teacher / "summary.json").write_text((runs[0] / "eval" / "summary.json").read_text())
    _, plots = report.write_report([tmp_path / "teacher", *runs], tmp_path / "out", command="egad demo --out x")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Setup" in md and "Command: `egad demo --out x`" in md
    assert "| sft | sft | smollm2-135m-instruct (cache runs/demo/cache) | cut of the teacher: layers [0, 1, 2] |" in md
    assert "| 400 of dolly.jsonl | 36 x 8 | 0.001 | 0 |" in md
    assert f"| teacher | — | evaluated as is, not trained here: {runs[0] / 'final'} |" in md
    assert "Evaluation on dolly_test: 100 examples, sampled with seeds 10, at most 64 new tokens" in md
    lines = md.splitlines()
    for p in plots:
        i = lines.index(f"![{p.stem}]({p.name})")
        assert lines[i + 2].startswith("*") and lines[i + 2].endswith("*") and len(lines[i + 2]) > 40, p.stem
    default = report.write_report(runs, tmp_path / "again")  # without a command: the `egad report` that rebuilds it
    assert (
        default
        and f"Command: `egad report {runs[0]} {runs[1]} --out {tmp_path / 'again'}`"
        in (tmp_path / "again" / "report.md").read_text()
    )


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    from egad.eval import report

    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="empty: not a run folder"):
        report.write_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(report.ReportError, match="does not exist"):
        report.load_run(tmp_path / "nothing")
