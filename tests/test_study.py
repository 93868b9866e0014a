"""The study machinery in --quick mode: grid cells from one teacher cache, aggregation, paired test, results.md."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def _study():
    spec = importlib.util.spec_from_file_location("study", REPO / "bench" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    study = _study()
    a = [float(i % 7) for i in range(200)]
    diff, p = study.paired_bootstrap([x + 1.0 for x in a], a, n=2000)
    assert diff == 1.0 and p < 0.01
    _, p_same = study.paired_bootstrap(a, list(reversed(a)), n=2000)
    assert p_same > 0.05


def test_quick_study_runs_and_writes_results(tmp_path, monkeypatch, dolly_path, egad_cache_dir):
    study = _study()
    monkeypatch.setenv("EGAD_CACHE_DIR", str(egad_cache_dir))
    out = tmp_path / "study"
    study.main(["--quick", "--out", str(out), "--data", str(dolly_path.parent.parent)])
    text = (out / "results.md").read_text()
    for cell in study.QUICK_CELLS:
        assert f"| {cell} |" in text
        assert (out / cell / "seed0" / "eval" / "summary.json").is_file()
    assert "EGAD - kd:" in text and "p = " in text
    assert (out / "results_rouge.png").stat().st_size > 5000
    # Resumable: a second run skips finished cells (no new training, same table).
    mtime = (out / "egad" / "seed0" / "eval" / "summary.json").stat().st_mtime
    study.main(["--quick", "--out", str(out), "--data", str(dolly_path.parent.parent)])
    assert (out / "egad" / "seed0" / "eval" / "summary.json").stat().st_mtime == mtime
