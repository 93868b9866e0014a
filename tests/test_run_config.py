"""Typed config values (CLI and YAML), their error messages, `egad train --help`, and clean CLI exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from egad.cli import app
from egad.config.coerce import coerce
from egad.config.run_config import SECTIONS, build_config, load_config, parse_overrides
from egad.config.schema import ConfigError, field_docs
from egad.data.records import DataError
from egad.errors import EgadError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BASE = {"model": {"student_config": {"model_type": "llama"}}}


def _get(cfg, dotted: str):
    section, name = dotted.split(".")
    return cfg.method if dotted == "objective.preset" else getattr(getattr(cfg, section), name)


def _from_cli(args: list[str]):
    return build_config(BASE, parse_overrides(args))


@pytest.mark.parametrize(
    ("args", "key", "expected"),
    [
        (["--train.lr=1e-4"], "train.lr", 1e-4),
        (["--train.lr", "1e-4"], "train.lr", 1e-4),
        (["--train.lr", "3"], "train.lr", 3.0),
        (["--train.max_steps", "100"], "train.max_steps", 100),
        (["--train.max_steps", "1e2"], "train.max_steps", 100),
        (["--train.max_steps=2.0"], "train.max_steps", 2),
        (["--train.seed", "0123"], "train.seed", 123),
        (["--train.tensorboard", "false"], "train.tensorboard", False),
        (["--train.tensorboard", "TRUE"], "train.tensorboard", True),
        (["--train.tensorboard", "Yes"], "train.tensorboard", True),
        (["--train.tensorboard", "no"], "train.tensorboard", False),
        (["--train.tensorboard", "1"], "train.tensorboard", True),
        (["--train.tensorboard", "0"], "train.tensorboard", False),
        (["--data.max_train_examples", "null"], "data.max_train_examples", None),
        (["--data.max_dev_examples", "~"], "data.max_dev_examples", None),
        (["--data.max_dev_examples", "None"], "data.max_dev_examples", None),
        (["--data.max_dev_examples", "7"], "data.max_dev_examples", 7),
        (["--data.dev", "null"], "data.dev", None),
        (["--data.dev", ""], "data.dev", None),
        (["--train.adam_betas", "[0.9, 0.95]"], "train.adam_betas", (0.9, 0.95)),
        (["--train.adam_betas", "[9e-1, 1]"], "train.adam_betas", (0.9, 1.0)),
        (["--model.teacher_config", "{vocab_size: 512}"], "model.teacher_config", {"vocab_size": 512}),
        (["--model.train_tokenizer", "null"], "model.train_tokenizer", None),
        (["--model.student", "0123", "--model.student_config", "null"], "model.student", "0123"),
        (["--model.revision", "1e-4"], "model.revision", "1e-4"),
        (["--train.output_dir", "true"], "train.output_dir", "true"),
        (["--objective.alpha", "0.3"], "objective.alpha", 0.3),
        (["--objective.fixed_lambda", "null"], "objective.fixed_lambda", None),
        (["--objective.fixed_lambda", "0"], "objective.fixed_lambda", 0.0),
        (["--objective.bild_top_k", "4e0"], "objective.bild_top_k", 4),
        (["--objective.preset", "kd"], "objective.preset", "kd"),
    ],
)
def test_cli_values_get_their_fields_types(args, key, expected):
    value = _get(_from_cli(args), key)
    assert value == expected
    assert type(value) is type(expected), (key, value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train.max_steps", "abc"], "train.max_steps='abc' is not an int"),
        (["--train.max_steps", "1.5"], "train.max_steps='1.5' is not an int"),
        (["--train.max_steps", "true"], "train.max_steps='true' is not an int"),
        (["--train.lr", "[1]"], "train.lr='[1]' is not a float"),
        (["--train.lr=yes"], "train.lr='yes' is not a float"),
        (["--train.tensorboard", "2"], "train.tensorboard='2' is not a bool"),
        (["--train.adam_betas", "[0.9]"], "train.adam_betas='[0.9]' is not a list of 2 floats"),
        (["--train.adam_betas", "[0.9, x]"], "train.adam_betas='[0.9, x]' is not a list of 2 floats"),
        (["--data.max_prompt_len", "null"], "data.max_prompt_len='null' is not an int"),
        (["--data.max_dev_examples", "many"], "data.max_dev_examples='many' is not an int or null"),
        (["--model.teacher_config", "[1, 2]"], "model.teacher_config='[1, 2]' is not a dict"),
        (["--objective.alpha", "high"], "objective.alpha='high' is not a float"),
        (["--objective.fixed_lambda", "false"], "objective.fixed_lambda='false' is not a float or null"),
    ],
)
def test_bad_cli_values_name_field_value_and_type(args, message):
    with pytest.raises(ConfigError) as e:
        _from_cli(args)
    assert message in str(e.value)


def test_load_config_with_cli_overrides_gives_a_float_lr():
    cfg = load_config(TINY, parse_overrides(["--train.lr=1e-4", "--train.max_steps", "2"]))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 2 and isinstance(cfg.train.max_steps, int)


def test_overrides_stay_text_until_their_field_is_known():
    assert parse_overrides(["--train.lr=1e-4", "--model.student", "0123"]) == {
        "train.lr": "1e-4",
        "model.student": "0123",
    }


def _yaml_run(tmp_path: Path, key: str, value: str) -> Path:
    """A run config with a student and one `section.field: value` line, written as given."""
    section, name = key.split(".")
    head = "" if section == "model" else f"{section}:\n"
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  student_config: {{model_type: llama}}\n{head}  {name}: {value}\n")
    return path


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("train.lr", "1e-4", 1e-4),
        ("train.lr", "1.0e-3", 1e-3),
        ("train.lr", "'5e-5'", 5e-5),
        ("train.epochs", "2", 2.0),
        ("train.max_steps", "1e2", 100),
        ("train.max_steps", "'40'", 40),
        ("train.tensorboard", "no", False),
        ("train.tensorboard", "'True'", True),
        ("train.adam_betas", "[0.9, 0.95]", (0.9, 0.95)),
        ("data.max_dev_examples", "null", None),
        ("data.dev", "none", None),
        ("model.revision", "'0123'", "0123"),
        ("objective.fixed_lambda", "~", None),
        ("objective.tau_max", "3", 3.0),
    ],
)
def test_yaml_values_get_their_fields_types(tmp_path, key, text, expected):
    value = _get(load_config(_yaml_run(tmp_path, key, text)), key)
    assert value == expected
    assert type(value) is type(expected), (key, value)


def test_yaml_reads_exponent_floats_inside_dicts_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  student_config: {model_type: llama, rope_theta: 1e6, rms_norm_eps: 1.0e-5}\n")
    sc = load_config(path).model.student_config
    assert sc == {"model_type": "llama", "rope_theta": 1e6, "rms_norm_eps": 1e-5}
    assert isinstance(sc["rope_theta"], float)


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("train.max_steps", "abc", "train.max_steps='abc' is not an int"),
        ("train.max_steps", "1.5", "train.max_steps=1.5 is not an int"),
        ("train.max_steps", "true", "train.max_steps=True is not an int"),
        ("train.max_steps", "null", "train.max_steps=None is not an int"),
        ("train.lr", "[1]", "train.lr=[1] is not a float"),
        ("train.lr", "false", "train.lr=False is not a float"),
        ("train.tensorboard", "2", "train.tensorboard=2 is not a bool"),
        ("model.revision", "123", "model.revision=123 is not a str or null"),
    ],
)
def test_bad_yaml_values_name_file_field_value_and_type(tmp_path, key, text, message):
    path = _yaml_run(tmp_path, key, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_build_config_keeps_its_other_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['train.lrr'\]"):
        build_config(BASE, {"train.lrr": "1"})
    with pytest.raises(ConfigError, match="unknown section"):
        build_config({**BASE, "optim": {}})
    with pytest.raises(ConfigError, match="objective.preset='egda' is unknown"):
        build_config(BASE, {"objective.preset": "egda"})
    with pytest.raises(ConfigError, match="section.*must be mappings"):
        build_config({**BASE, "train": [1]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_booleans_and_numbers_do_not_pass_for_each_other():
    assert coerce(1, bool, "x") is True and coerce(0, bool, "x") is False
    assert coerce(2, float, "x") == 2.0 and isinstance(coerce(2, float, "x"), float)
    for value, tp in ((True, int), (False, float), (1.0, bool), ("true", int), ("1.0", bool)):
        with pytest.raises(ConfigError, match=f"x={value!r} is not"):
            coerce(value, tp, "x")


def test_train_help_prints_every_field_doc_as_written():
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "weights lie in [w_min, 2 - w_min]." in flat
    assert "[--section.field VALUE ...]" in flat
    for cls in SECTIONS.values():
        for name, doc in field_docs(cls).items():
            assert " ".join(doc.split()) in flat, name


# --- the command line: an EgadError is one message and status 2 ---


def _assert_clean_exit(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output
    assert "Traceback" not in result.output


def test_bad_override_exits_2_without_traceback():
    result = CliRunner().invoke(app, ["train", "-c", str(TINY), "--train.max_steps", "abc"])
    _assert_clean_exit(result, "command-line override --train.max_steps: train.max_steps='abc' is not an int")
    assert "train.max_steps='abc'" in result.stderr and str(TINY) not in result.stderr  # not the file's fault


def test_missing_config_file_exits_2_without_traceback(tmp_path):
    result = CliRunner().invoke(app, ["train", "-c", str(tmp_path / "nope.yaml")])
    _assert_clean_exit(result, "config file")


def test_bad_data_line_exits_2_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "split": "train"}\n')
    run = tmp_path / "run"
    args = ["train", "-c", str(TINY), "--data.train", str(bad), f"--train.output_dir={run}"]
    result = CliRunner().invoke(app, args)
    _assert_clean_exit(result, f"{bad}:1: field 'response' is missing")
    assert "done:" not in result.output and not (run / "metrics.jsonl").exists()  # stopped in setup


@pytest.fixture
def extra_command():
    """Register a command on the app the way a later one would be, and remove it afterwards."""
    before = list(app.registered_commands)

    def add(name: str, error: Exception) -> None:
        @app.command(name)
        def _cmd() -> None:
            raise error

    yield add
    app.registered_commands[:] = before


def test_commands_added_later_exit_cleanly_too(extra_command):
    extra_command("later", DataError("x.jsonl", 3, "is missing", "response"))
    _assert_clean_exit(CliRunner().invoke(app, ["later"]), "x.jsonl:3: field 'response' is missing")


def test_other_exceptions_keep_their_traceback(extra_command):
    extra_command("bug", RuntimeError("a bug"))
    result = CliRunner().invoke(app, ["bug"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    assert not isinstance(result.exception, EgadError)


def test_python_dash_m_exits_2_with_the_message():
    """`accelerate launch -m egad.cli` starts each rank this way."""
    proc = subprocess.run(
        [sys.executable, "-m", "egad.cli", "losses", "--tokens", "8", "--vocab", "20", "--presets", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: unknown objective preset 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
