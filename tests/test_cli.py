from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from egad.cli import app


def test_losses_demo_runs_every_requested_preset():
    result = CliRunner().invoke(app, ["losses", "--tokens", "96", "--vocab", "301", "--presets", "sft,kd,egad,bild"])
    assert result.exit_code == 0, result.output
    rows = [
        line.split()[0]
        for line in result.output.splitlines()
        if line.split()[:1] in (["sft"], ["kd"], ["egad"], ["bild"])
    ]
    assert rows == ["sft", "kd", "egad", "bild"]
    egad_row = next(line for line in result.output.splitlines() if line.startswith("egad"))
    corr_start, corr_end = (float(x) for x in egad_row.split()[6:8])
    # The curriculum favours confident tokens at s=0 and uncertain ones at s=1.
    assert corr_start < 0 < corr_end


def test_unknown_preset_is_reported():
    result = CliRunner().invoke(app, ["losses", "--tokens", "16", "--vocab", "50", "--presets", "nope"])
    assert result.exit_code == 2, result.output
    assert "error: unknown objective preset 'nope'" in result.output
    assert "Traceback" not in result.output


# --- every command's bad input: one line naming it and the fix, status 2, no traceback ---

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _one_line_error(args: list[str], *named: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def test_eval_of_a_missing_model_folder(tmp_path):
    line = _one_line_error(["eval", "--model", "runs/nothing/best", "--out", str(tmp_path)], "runs/nothing/best")
    assert "no such model folder" in line and "final/ or best/" in line  # the input and the fix


def test_eval_of_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(["eval", "--model", str(tmp_path / "notes.txt"), "--out", str(tmp_path)], "is a file")


def test_eval_with_a_missing_teacher_stops_before_loading_the_model(tmp_path):
    # tmp_path is a folder, so the model passes the path check; the teacher is refused before either is loaded
    args = ["eval", "--model", str(tmp_path), "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "e")]
    _one_line_error(args, str(tmp_path / "teacher"), "no such model folder")


def test_eval_of_an_unknown_set(tmp_path):
    args = ["eval", "--model", str(tmp_path), "--sets", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "e")]
    _one_line_error(args, "nope.jsonl", "neither a known name")


def test_eval_with_seeds_that_are_not_integers(tmp_path):
    _one_line_error(["eval", "--model", str(tmp_path), "--seeds", "a,b", "--out", str(tmp_path)], "--seeds 'a,b'")


def test_eval_of_a_folder_without_a_model(tmp_path):
    """A folder that exists but holds no config.json: transformers' OSError becomes one line naming the folder."""
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"instruction": "a", "context": "", "response": "b"}) + "\n")
    args = ["eval", "--model", str(tmp_path), "--sets", str(data), "--out", str(tmp_path / "e")]
    _one_line_error(args, f"model {str(tmp_path)!r} could not be loaded")


def test_train_and_cache_with_a_missing_config(tmp_path):
    _one_line_error(["train", "-c", str(tmp_path / "missing.yaml")], "missing.yaml does not exist")
    _one_line_error(["cache", "-c", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)], "missing.yaml")


def test_cache_with_a_missing_teacher(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"teacher": str(tmp_path / "no-teacher"), "student_cut": 2}}))
    _one_line_error(["cache", "-c", str(cfg), "--out", str(tmp_path / "c")], "no-teacher: no such model folder")


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file():
    line = _one_line_error(["train", "-c", str(TINY), "--objective.preset", "foo"])
    assert line.startswith("error: command-line override --objective.preset: objective.preset='foo' is unknown")
    assert str(TINY) not in line
    line = _one_line_error(["train", "-c", str(TINY), "--train.foo", "1"], "command-line override", "'train.foo'")
    assert str(TINY) not in line
    line = _one_line_error(["train", "-c", str(TINY), "--data.template", "foo"], "--data.template", "'foo'")
    assert str(TINY) not in line


def test_a_bad_file_value_is_still_blamed_on_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY.read_text().replace("preset: egad", "preset: foo"))
    _one_line_error(["train", "-c", str(cfg)], f"{cfg}: objective.preset='foo' is unknown")
    cfg.write_text(TINY.read_text().replace("max_len: 256", "max_len: 256\n  template: foo"))
    _one_line_error(["train", "-c", str(cfg)], f"{cfg}: data.template='foo'")


def test_report_of_a_missing_or_empty_run_folder(tmp_path):
    _one_line_error(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")], "nothing does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")], "empty: not a run folder")
    assert not (tmp_path / "r" / "report.md").exists()


def test_generate_with_a_missing_model_or_data(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"instruction": "a", "context": "", "response": "b", "split": "train"}) + "\n")
    out = str(tmp_path / "out.jsonl")
    _one_line_error(["generate", "--model", "runs/x/final", "--data", str(data), "--out", out], "runs/x/final")
    _one_line_error(
        ["generate", "--model", "runs/x/final", "--data", str(tmp_path / "no.jsonl"), "--out", out], "no.jsonl"
    )


def test_demo_with_a_missing_data_folder(tmp_path):
    _one_line_error(["demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], "nope")


def test_the_installed_command_prints_one_line_too(tmp_path):
    """The console entry point, as a user runs it: no rich traceback, one line on stderr, status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "egad.cli", "eval", "--model", "runs/nothing/best", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "runs/nothing/best: no such model folder" in done.stderr
