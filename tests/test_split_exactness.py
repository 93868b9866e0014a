"""Exactness for every preset (issue 19): one process with batch 8 trains as one process with batch 4 and
`grad_accum 2`, and as two processes with batch 4 (gloo DDP): the same loss terms and grad norm at every step, the
same final weights. The per-token plan is a function of each token's own signals and of run-level state, never of
its batch-mates (docs/design.md, rule 3), so how the global batch is split must not matter.

The runs come from tests/split_driver.py, which trains every preset one after another in one process (both
one-process layouts) or in one 2-process `accelerate launch`, 3 steps each at lr 3e-3 so that a wrong update shows.
EGAD's defaults also run from an offline teacher cache (`egad@cache`), since the feature branch must be exact from
a cache too. Each preset is a test case of its own, so a failure names the preset and the size of the mismatch.
All of it takes about 65-90 s on 2 CPU cores: ~30 s for the one-process runs, ~30 s for the 2-process launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import split_driver as S
import torch
from conftest import REPO
from safetensors.torch import load_file

CASES = S.all_cases(cache=True)
DRIVER = Path(S.__file__)
# Per-step loss terms and grad norm: |a - b| <= 1e-4 + 1e-4 |a|, an absolute floor for the terms near 0 (kd, feat
# of some presets) plus a relative part for the ones of order 1-10 (ce, loss). Splitting a batch only reorders
# float sums (~1e-7 relative here); a token treated differently moves a term by far more.
TERM_TOL = {"atol": 1e-4, "rtol": 1e-4}
# Final weights after 3 AdamW steps at lr 3e-3: float reordering moves a weight by ~1e-7; a different update by
# up to ~lr per step.
WEIGHT_ATOL = 1e-5


def _env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _driver(cmd: list[str], tok: Path, out: Path, layouts: str, cache: Path) -> None:
    args = ["--layouts", layouts, "--tokenizer", str(tok), "--out", str(out), "--cache", str(cache)]
    proc = subprocess.run(cmd + args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _load(out: Path, layout: str) -> dict:
    results = json.loads((out / f"{layout}.json").read_text())["cases"]
    return {"cases": results, "weights": load_file(str(out / f"{layout}.safetensors"))}


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return S.build_cache(tiny_tokenizer_dir, tmp_path_factory.mktemp("split") / "cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_tokenizer_dir, teacher_cache) -> dict:
    """batch8 and accum2, every case, in one subprocess (on the CPU, as the gloo runs are)."""
    out = tmp_path_factory.mktemp("split-one")
    _driver([sys.executable, str(DRIVER)], tiny_tokenizer_dir, out, "batch8,accum2", teacher_cache)
    return {layout: _load(out, layout) for layout in ("batch8", "accum2")}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_tokenizer_dir, teacher_cache) -> dict:
    """procs2, every case, in one 2-process gloo launch."""
    out = tmp_path_factory.mktemp("split-two")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(DRIVER)]  # fmt: skip
    _driver(launch, tiny_tokenizer_dir, out, "procs2", teacher_cache)
    return _load(out, "procs2")


def _series(result: dict, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in result["rows"]], dtype=torch.float64)


def _mismatch(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> str | None:
    """None when |b - a| <= atol + rtol |a| at every step, else the largest difference and the first step over."""
    diff = (b - a).abs()
    bad = diff > atol + rtol * a.abs()
    if not bad.any():
        return None
    return f"max |diff| {diff.max().item():.3g}, first over at step {int(bad.nonzero()[0]) + 1}"


def _fmt(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in x.tolist()) + "]"


def assert_same_run(ref: dict, got: dict, case: str, what: str, processes: tuple[int, int]) -> None:
    """`got` trained as `ref`: every logged term at every step, then every final weight. All mismatches are listed."""
    a, b = ref["cases"][case], got["cases"][case]
    assert "error" not in a and "error" not in b, f"{case}: a run failed: {a.get('error') or b.get('error')}"
    assert (a["processes"], b["processes"]) == processes, f"{case}: ran on {a['processes']} / {b['processes']}"
    assert [r["step"] for r in a["rows"]] == [r["step"] for r in b["rows"]] == list(range(1, S.STEPS + 1))
    problems = []
    for key in S.KEYS:
        msg = _mismatch(_series(a, key), _series(b, key), **TERM_TOL)
        if msg:
            problems.append(f"{key} per step: {msg} ({_fmt(_series(a, key))} vs {_fmt(_series(b, key))})")
    names = sorted(k for k in ref["weights"] if k.startswith(f"{case}/"))
    assert names and names == sorted(k for k in got["weights"] if k.startswith(f"{case}/")), f"{case}: weight names"
    worst = max(((got["weights"][k] - ref["weights"][k]).abs().max().item(), k) for k in names)
    if worst[0] > WEIGHT_ATOL:
        problems.append(f"final weights: max |diff| {worst[0]:.3g} (in {worst[1].split('/', 1)[1]})")
    if problems:  # the message alone: the locals (every preset's weights) would bury it
        pytest.fail(f"{case}: {what} differs from one process with batch 8:\n  " + "\n  ".join(problems), False)


def test_the_runs_train(one_process):
    """The comparison is not vacuous: every preset logs each step and moves its weights (by about lr = 3e-3 a step),
    and the presets with a teacher have a KD term."""
    for case in CASES:
        result = one_process["batch8"]["cases"][case]
        assert "error" not in result, f"{case}: {result['error']}"
        assert len(result["rows"]) == S.STEPS, case
        assert result["moved"] > 1e-3, f"{case}: the weights moved by at most {result['moved']:.3g}"
        kd = _series(result, "kd")
        assert (kd > 0).all() or case == "sft", f"{case}: kd {_fmt(kd)}: the preset distils nothing here"


@pytest.mark.parametrize("case", CASES)
def test_accumulation_equals_one_batch(case, one_process):
    assert_same_run(one_process["batch8"], one_process["accum2"], case, "batch 4 x grad_accum 2", (1, 1))


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_batch(case, one_process, two_processes):
    assert_same_run(one_process["batch8"], two_processes, case, "2 processes x batch 4 (gloo)", (1, 2))
