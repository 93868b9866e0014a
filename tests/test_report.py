"""The report draws the curriculum with the plan that training applies: for every preset, its weight and temperature
curves equal the per-token weight and temperature that the objective computes on the same tokens."""

from __future__ import annotations

import pytest
import torch

from egad.entropy import fit_quantile_knots, token_entropy
from egad.eval.report import curve_state, plan_curve
from egad.losses.features import FeatureProjector
from egad.objective import StudentOutputs, distillation_loss
from egad.presets import PRESETS, preset
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
