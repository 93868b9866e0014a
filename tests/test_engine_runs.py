"""Each distributed engine, launched the way the README says, on 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-2 and
ZeRO-3, FSDP2. 2 processes x batch 4 with 2-step accumulation must train as 1 process x batch 8: the same losses and
dev NLL at every step and the same final weights. Each run's log names the engine it used; its checkpoints load
with `from_pretrained`; a run resumed from its step-2 checkpoint ends where the uninterrupted run ended; and where
the teacher is sharded, each process holds about half of it.

The calibration (17 examples) and dev (9 examples) sets split unevenly over the two processes, so these runs also
check that no process skips a teacher forward the other one runs (a sharded teacher would hang)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_overrides
from safetensors.torch import load_file
from test_distributed import _cli_args
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow
ACC = REPO / "configs" / "accelerate"
CONFIGS = {
    "ddp": None,
    "deepspeed-zero2": ACC / "deepspeed_zero2.yaml",
    "deepspeed-zero3": ACC / "deepspeed_zero3.yaml",
    "fsdp2": ACC / "fsdp.yaml",
}
STEPS = 4
# Weights after 4 AdamW steps at lr 3e-3 from the same start: the engines reorder float sums (bucketed reductions,
# flat partitions), which moves a weight by a few 1e-7 per step; a missed or doubled update moves it by ~lr.
WEIGHT_ATOL = 1e-5


def _overrides(tok: Path, out: Path, processes: int) -> dict:
    return tiny_run_overrides(
        tok,
        out,
        **{
            "train.max_steps": STEPS,
            "train.per_device_batch_size": 8 // processes,
            "train.grad_accum": 2,
            "train.log_every": 1,
            "train.eval_every": 2,
            "train.eval_at_start": False,
            "train.save_every": 2,
            "train.keep_checkpoints": 3,
            "train.calib_examples": 17,
            "train.grad_clip": 0.5,
            "data.max_dev_examples": 9,
            "train.lr": 3e-3,
        },
    )


def _launch(engine: str, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "egad.cli"]
    head = [sys.executable, "-m", "accelerate.commands.launch"]
    cfg = CONFIGS[engine]
    head += ["--multi_gpu"] if cfg is None else ["--config_file", str(cfg)]
    return head + ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "-m", "egad.cli"]  # fmt: skip


def _train(out: Path, tok: Path, engine: str, processes: int, resume: bool = False, **extra) -> list[dict]:
    cmd = _launch(engine, processes) + ["train", "-c", str(REPO / "configs" / "tiny.yaml")]
    cmd += _cli_args({**_overrides(tok, out, processes), **extra}) + (["--resume"] if resume else [])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1" if engine == "ddp" else "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _series(rows: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in rows if key in r], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("one") / "run"
    return out, _train(out, tiny_tokenizer_dir, "ddp", 1)


def _needs(engine: str) -> None:
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]'")


@pytest.mark.parametrize("engine", list(CONFIGS))
def test_two_processes_under_each_engine_equal_one_process(engine, reference, tmp_path, tiny_tokenizer_dir):
    _needs(engine)
    one_dir, one = reference
    out = tmp_path / "two"
    two = _train(out, tiny_tokenizer_dir, engine, 2)
    setup = two[0]
    assert setup["event"] == "setup" and setup["processes"] == 2
    assert setup["engine"] == ("ddp-cpu" if engine == "ddp" else engine)
    for key in ("loss", "ce", "kd", "feat", "grad_norm", "dev_nll", "dev_kl"):
        a, b = _series(one, key), _series(two, key)
        assert len(a) == len(b) > 0, key
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"{engine}: {key} differs")
    assert len(_series(two, "loss")) == STEPS and (_series(one, "loss")[0] - _series(one, "loss")[-1]).abs() > 1e-3

    ref = load_file(str(one_dir / "final" / "model.safetensors"))
    got = load_file(str(out / "final" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{engine}: {k}")
    proj_ref = load_file(str(one_dir / "final" / "feature_projector.safetensors"))
    proj = load_file(str(out / "final" / "feature_projector.safetensors"))
    for k in proj_ref:
        torch.testing.assert_close(proj[k], proj_ref[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{engine}: projector {k}")

    # The checkpoints load as HF models and hold the trained weights, not empty shards.
    for folder in ("final", "best", "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(out / folder)
        assert all(p.numel() > 0 for p in model.parameters())
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    torch.testing.assert_close(final["model.norm.weight"], ref["model.norm.weight"], atol=WEIGHT_ATOL, rtol=0)

    # Resume from step 2: the same steps 3-4 and the same final weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for gone in ("final", "checkpoint-4"):
        shutil.rmtree(resumed / gone)
    again = _train(resumed, tiny_tokenizer_dir, engine, 2, resume=True)
    torch.testing.assert_close(_series(again, "loss"), _series(two, "loss"), atol=1e-6, rtol=1e-6)
    end = load_file(str(resumed / "final" / "model.safetensors"))
    for k in got:
        torch.testing.assert_close(end[k], got[k], atol=1e-6, rtol=0, msg=f"{engine} resumed: {k}")

    if engine in ("deepspeed-zero3", "fsdp2"):  # teacher_placement auto shards the teacher there
        assert setup["teacher_placement"] == "shard"
        share = setup["teacher_params_local"] / setup["teacher_params"]
        assert 0.45 <= share <= 0.55, f"{engine}: this process holds {share:.2f} of the teacher"
    else:
        assert setup["teacher_placement"] == "replicate"
        assert setup["teacher_params_local"] == setup["teacher_params"]


def test_fsdp1_on_the_cpu_exits_with_the_reason(tmp_path, tiny_tokenizer_dir):
    over = _overrides(tiny_tokenizer_dir, tmp_path / "r", 2)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS["fsdp2"]),
           "--fsdp_version", "1", "--num_processes", "2", "-m", "egad.cli", "train",
           "-c", str(REPO / "configs" / "tiny.yaml"), *_cli_args(over)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "asks for fsdp1, which cannot run on a CPU" in proc.stderr
    assert not (tmp_path / "r" / "final").exists()


def test_a_teacher_cache_under_zero3_equals_one_process(tmp_path, tiny_tokenizer_dir):
    """The cached signals (top-k and hidden states), read by each process for its own examples only."""
    _needs("deepspeed-zero3")
    cache = tmp_path / "cache"
    over = _overrides(tiny_tokenizer_dir, tmp_path / "unused", 1)
    cmd = [sys.executable, "-m", "egad.cli", "cache", "-c", str(REPO / "configs" / "tiny.yaml"), "--out", str(cache),
           "--k", "16", "--hidden-quantile", "0.5", "--examples-per-shard", "100", *_cli_args(over)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _train(tmp_path / "one", tiny_tokenizer_dir, "ddp", 1, **{"model.teacher_cache": str(cache)})
    two = _train(tmp_path / "two", tiny_tokenizer_dir, "deepspeed-zero3", 2, **{"model.teacher_cache": str(cache)})
    assert two[0]["teacher_source"] == "TeacherCache" and two[0]["engine"] == "deepspeed-zero3"
    for key in ("loss", "kd", "feat", "grad_norm", "dev_nll"):
        torch.testing.assert_close(_series(two, key), _series(one, key), atol=1e-4, rtol=1e-4, msg=key)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


@pytest.fixture(scope="module")
def fused_reference(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("one-fused") / "run"
    return out, _train(out, tiny_tokenizer_dir, "ddp", 1, **{"train.fused_lm_head": True})


@pytest.mark.parametrize("engine", ["deepspeed-zero3", "fsdp2"])
def test_the_fused_head_under_a_sharded_student_equals_one_process(engine, fused_reference, tmp_path,
                                                                   tiny_tokenizer_dir):  # fmt: skip
    """The fused loss reads the head's weights outside the head's forward: the engine must gather them for it."""
    _needs(engine)
    one_dir, one = fused_reference
    two = _train(tmp_path / "two", tiny_tokenizer_dir, engine, 2, **{"train.fused_lm_head": True})
    for key in ("loss", "kd", "grad_norm", "dev_nll"):
        torch.testing.assert_close(_series(two, key), _series(one, key), atol=1e-4, rtol=1e-4, msg=f"{engine}: {key}")
    a = load_file(str(one_dir / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{engine}: {k}")
