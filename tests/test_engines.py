"""An engine the machine cannot run is refused with its reason, never replaced by another one in silence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_run_overrides

from egad.config import ConfigError
from egad.engines import check_engine_runs_here, requested_engine


@pytest.mark.parametrize(
    ("env", "engine"),
    [
        ({}, "ddp"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed-zero3"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true"}, "fsdp1"),
    ],
)
def test_requested_engine_is_read_from_the_launcher(monkeypatch, env, engine):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert requested_engine() == engine
    if engine == "ddp":
        check_engine_runs_here(False)
    else:
        with pytest.raises(ConfigError, match=f"asks for {engine}.*silently train plain DDP"):
            check_engine_runs_here(False)
        check_engine_runs_here(True)


@pytest.mark.slow
def test_an_fsdp_launch_on_the_cpu_exits_with_the_reason(tmp_path, tiny_tokenizer_dir):
    over = tiny_run_overrides(tiny_tokenizer_dir, tmp_path / "r", **{"train.max_steps": 1, "data.dev": None})
    args = [f"--{k}={v}" for k, v in over.items() if not isinstance(v, dict) and v is not None]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "-m", "egad.cli", "train",
           "-c", str(REPO / "configs" / "tiny.yaml"), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asks for fsdp2" in proc.stderr and "Traceback" not in proc.stderr.split("asks for fsdp2")[0][-200:]
    assert not (tmp_path / "r" / "final").exists()
