from __future__ import annotations

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
