"""`egad demo --quick` end to end, the report built from run files, and what the demo leaves on disk."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from egad.cli import app
from egad.eval.report import results_table
from egad.eval.runs import load_run

slow = pytest.mark.slow  # the quick demo trains a teacher and three students (~35 s)

PLOTS = ("training_curves.png", "entropy_hist.png", "curriculum.png", "routing_temperature.png", "rouge_by_method.png")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, dolly_path, egad_cache_dir):
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("EGAD_CACHE_DIR", str(egad_cache_dir))
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--out", str(out / "run"), "--data", str(dolly_path.parent.parent)]
    )
    mp.undo()
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out / "run", result.output


@slow
def test_quick_demo_writes_table_and_every_plot(quick_demo):
    out, output = quick_demo
    for label in ("teacher", "sft", "kd", "egad"):
        assert f"| {label} |" in output
        summary = json.loads((out / label / "eval" / "summary.json").read_text())
        assert 0 <= summary["sets"]["dolly_test"]["rouge_l_mean"] <= 100
        assert (out / label / "eval" / "dolly_test" / "generations-seed10.jsonl").is_file()
    for name in PLOTS:
        assert (out / "report" / name).stat().st_size > 5000, name
    assert "dolly_test ROUGE-L" in (out / "report" / "report.md").read_text()
    students = json.loads((out / "egad" / "eval" / "summary.json").read_text())["sets"]["dolly_test"]
    assert "kl" in students and "top1_agree" in students
    for label in ("sft", "kd", "egad"):  # a finished student keeps final/, not the step checkpoint beside it
        assert (out / label / "final" / "config.json").is_file() and not list((out / label).glob("checkpoint-*"))
    assert f"[demo] {out} holds " in output and "report/" in output


@slow
def test_report_table_is_built_from_the_files(quick_demo, tmp_path):
    import shutil

    out, _ = quick_demo
    run = tmp_path / "kd"
    shutil.copytree(out / "kd", run)
    path = run / "eval" / "summary.json"
    summary = json.loads(path.read_text())
    summary["sets"]["dolly_test"].update(
        rouge_l_mean=12.3456, rouge_l_std=0.789, rouge_l_per_seed={"seed10": 11.79, "seed20": 12.90}
    )
    path.write_text(json.dumps(summary))
    table = results_table([load_run(run)])
    assert "12.35 ± 0.79" in table
    best = min(r["dev_nll"] for r in load_run(run).metrics if "dev_nll" in r)
    assert f"{best:.3f}" in table


def test_a_finished_students_step_checkpoints_are_dropped_and_the_disk_use_is_told(tmp_path, monkeypatch):
    from egad.demo import disk_summary, drop_step_checkpoints

    monkeypatch.setenv("EGAD_CACHE_DIR", str(tmp_path / "cache-root"))
    out = tmp_path / "demo"
    run = out / "kd"
    for folder in ("checkpoint-30", "checkpoint-36", "final", "best"):
        (run / folder).mkdir(parents=True)
        (run / folder / "config.json").write_text("{}")
    (run / "checkpoint-36" / "optimizer.bin").write_bytes(b"\0" * 5000)
    (run / "metrics.jsonl").write_text("{}\n")
    unfinished = out / "sft"  # no final/ yet: its checkpoints are what a resume needs
    (unfinished / "checkpoint-10").mkdir(parents=True)
    assert drop_step_checkpoints(run) == run and drop_step_checkpoints(unfinished) == unfinished
    assert sorted(p.name for p in run.iterdir()) == ["best", "final", "metrics.jsonl"]
    assert (unfinished / "checkpoint-10").is_dir()
    (tmp_path / "cache-root").mkdir()
    (tmp_path / "cache-root" / "teacher.bin").write_bytes(b"\0" * 2_000_000)
    lines = disk_summary(out)
    assert lines[0] == f"[demo] {out} holds 7 B:"  # final/ and best/ config.json, metrics.jsonl
    assert any(line.split()[:3] == ["kd/", "7", "B"] and "student" in line for line in lines)
    assert lines[-1].startswith(f"[demo] reused by later runs, outside it: {tmp_path / 'cache-root'} (2.0 MB")
