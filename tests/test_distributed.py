"""Two CPU processes (gloo) must train as one data-parallel job: the same losses and weights as one process that
sees the same global batch. Two unsynchronised copies would each see half the batch and drift apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, tiny_run_overrides
from safetensors.torch import load_file

# The launch line documented in the README. With accelerate 1.x, `--cpu --num_processes 2` (or a MULTI_CPU config)
# starts a single process; `--multi_gpu` with ACCELERATE_USE_CPU=1 starts two gloo processes.
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "egad.cli",
]


def _cli_args(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()]
    return args


def _train(out: Path, tok: Path, *, processes: int) -> list[dict]:
    # EGAD's defaults: each token's plan is its own, whatever the split. Peaked random models (a wider init), since at
    # the default init every entropy sits within 0.01 nats of log V, where the route threshold flips on float noise.
    overrides = tiny_run_overrides(
        tok,
        out,
        **{
            "train.max_steps": 5,
            "train.per_device_batch_size": 8 // processes,
            "train.grad_accum": 2,
            "train.log_every": 1,
            "train.eval_every": 0,
            "train.eval_at_start": False,
            "data.dev": None,
            "train.lr": 3e-3,
        },
    )
    for side in ("model.teacher_config", "model.student_config"):
        overrides[side] = {**overrides[side], "initializer_range": 0.3}
    cmd = LAUNCH if processes > 1 else [sys.executable, "-m", "egad.cli"]
    cmd = cmd + ["train", "-c", str(REPO / "configs" / "tiny.yaml")] + _cli_args(overrides)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_tokenizer_dir):
    one = _train(tmp_path / "one", tiny_tokenizer_dir, processes=1)
    two = _train(tmp_path / "two", tiny_tokenizer_dir, processes=2)
    assert one[0]["processes"] == 1 and two[0]["processes"] == 2
    loss1 = torch.tensor([r["loss"] for r in one if "loss" in r])
    loss2 = torch.tensor([r["loss"] for r in two if "loss" in r])
    assert len(loss1) == len(loss2) == 5
    torch.testing.assert_close(loss2, loss1, atol=1e-4, rtol=1e-4)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
    # The weights moved: a run that did nothing would pass the comparison trivially.
    init = tiny_run_overrides(tiny_tokenizer_dir, tmp_path)["model.student_config"]
    assert init and (loss1[0] - loss1[-1]).abs() > 1e-3
