"""An engine the machine cannot run is refused with its reason, never replaced by another one in silence."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO, tiny_run_overrides

from egad.config.schema import ConfigError
from egad.models.engines import check_engine_runs_here, requested_engine, resolve_placement

ENGINE_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP", "FSDP_VERSION")
# A DeepSpeed engine is accepted only where deepspeed is installed (without it, it is refused: see below).
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra: pip install -e '.[deepspeed]'"
)


@pytest.mark.parametrize(
    ("env", "engine"),
    [
        ({}, "ddp"),
        pytest.param(
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "deepspeed-zero3",
            marks=needs_deepspeed,
        ),
        pytest.param(
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
            "deepspeed-zero2",
            marks=needs_deepspeed,
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true"}, "fsdp1"),
    ],
)
def test_requested_engine_is_read_from_the_launcher(monkeypatch, env, engine):
    for key in ENGINE_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert requested_engine() == engine
    check_engine_runs_here(True)
    if engine == "fsdp1":  # the one engine with no CPU path
        with pytest.raises(ConfigError, match="asks for fsdp1, which cannot run on a CPU.*fsdp_version: 2"):
            check_engine_runs_here(False)
    else:
        check_engine_runs_here(False)


@needs_deepspeed
def test_an_unsupported_deepspeed_stage_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ConfigError, match="deepspeed-zero1; egad supports DeepSpeed ZeRO stages 2 and 3"):
        check_engine_runs_here(True)


def test_a_deepspeed_engine_without_deepspeed_is_refused_naming_the_install(monkeypatch):
    """Where deepspeed cannot be imported (as with only the dev extra), asking for it stops with the install line."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now fails, installed or not
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"deepspeed-zero3, but deepspeed is not installed: pip install"):
        check_engine_runs_here(True)


@pytest.mark.parametrize(
    ("placement", "engine", "expected"),
    [
        ("auto", "ddp-cpu", "replicate"),
        ("auto", "single-process", "replicate"),
        ("auto", "deepspeed-zero2", "replicate"),
        ("auto", "deepspeed-zero3", "shard"),
        ("auto", "fsdp2", "shard"),
        ("replicate", "fsdp2", "replicate"),
        ("shard", "deepspeed-zero3", "shard"),
    ],
)
def test_teacher_placement_follows_the_engine(placement, engine, expected):
    assert resolve_placement(placement, engine) == expected


@pytest.mark.parametrize("engine", ["ddp-cpu", "deepspeed-zero2", "single-process"])
def test_sharding_the_teacher_needs_a_sharding_engine(engine):
    with pytest.raises(ConfigError, match=f"teacher_placement=shard needs a sharding engine.*uses {engine}"):
        resolve_placement("shard", engine)


def test_an_unknown_placement_is_refused_by_the_config():
    from egad.config.run_config import ModelConfig

    with pytest.raises(ConfigError, match="teacher_placement='sharded' is not one of"):
        ModelConfig(teacher_config={"model_type": "llama"}, student_cut=1, teacher_placement="sharded")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"train.on_policy": 0.5}, "train.on_policy"),
        ({"model.lora": {"r": 4}}, "model.lora"),
    ],
)
def test_what_a_sharded_student_cannot_do_is_refused_up_front(override, named, tiny_tokenizer_dir, tmp_path):
    from egad.config.run_config import load_config
    from egad.models.engines import check_support

    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_run_overrides(tiny_tokenizer_dir, tmp_path, **override))
    with pytest.raises(ConfigError, match=f"fsdp2 shards the student.*{named}"):
        check_support("fsdp2", cfg.train, cfg.model)
    check_support("deepspeed-zero2", cfg.train, cfg.model)
