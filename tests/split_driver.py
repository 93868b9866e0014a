"""The runs behind tests/test_split_exactness.py: the tiny config trained for a few steps under every objective preset,
in one process (or in each process of one `accelerate launch`), one Trainer after another.

A layout is how the global batch of 8 examples per step is split: `batch8` (one process, one micro-batch of 8),
`accum2` (one process, two micro-batches of 4) and `procs2` (each of two processes one micro-batch of 4). Each run's
logged loss terms and grad norm per step go into `<out>/<layout>.json`, its final student and projector weights into
`<out>/<layout>.safetensors` as `<case>/<name>`. A case is a preset name, or `<preset>@cache` for a run that reads
the teacher from an offline cache.

    python tests/split_driver.py --layouts batch8,accum2 --tokenizer TOK --out DIR [--cases a,b] [--cache CACHE]
    accelerate launch --multi_gpu --num_processes 2 tests/split_driver.py --layouts procs2 ...  (ACCELERATE_USE_CPU=1)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # conftest's helpers, also when launched as a script

from conftest import REPO, tiny_run_overrides  # noqa: E402

from egad.config.presets import PRESETS  # noqa: E402
from egad.config.run_config import load_config  # noqa: E402
from egad.train.trainer import Trainer  # noqa: E402

STEPS = 3
# (per-device batch, grad_accum, processes): every layout steps on the same 8 examples.
LAYOUTS = {"batch8": (8, 1, 1), "accum2": (4, 2, 1), "procs2": (4, 1, 2)}
KEYS = ("loss", "ce", "kd", "feat", "grad_norm")
CACHE_SUFFIX = "@cache"


def run_overrides(tok: Path, out: Path, layout: str, preset: str, cache: Path | None = None) -> dict:
    """configs/tiny.yaml as the tests shrink it, STEPS steps on 24 examples, no dev set, every step logged."""
    batch, accum, _ = LAYOUTS[layout]
    o = tiny_run_overrides(
        tok,
        out,
        **{
            "objective.preset": preset,
            "data.max_train_examples": STEPS * 8,
            "data.dev": None,
            "train.max_steps": STEPS,
            "train.per_device_batch_size": batch,
            "train.grad_accum": accum,
            "train.calib_examples": 16,
            "train.lr": 3e-3,  # large enough that a wrong update shows in the weights
            "train.warmup_ratio": 0.0,
            # Adam divides by |g| + eps: at the default 1e-8, a weight whose gradient cancels to ~1e-10 turns the
            # ~1e-7 relative float noise of a split batch into a ~1e-5 change of its update (seen under sft). 1e-5
            # damps those near-zero gradients and leaves the others (rms ~5e-3 here) at full step.
            "train.adam_eps": 1e-5,
            "train.grad_clip": 1.0,  # on, so that grad_norm is logged
            "train.log_every": 1,
            "train.eval_at_start": False,
            "train.eval_every": 0,
            "train.save_every": 0,
        },
    )
    # Peaked random models (logit std ~2 rather than ~0.1): the teacher's entropies spread over 0.5-4.8 nats, as a
    # real teacher's do, and the student's too, so the curriculum, temperatures, selections (by teacher or student
    # entropy, Hellinger) and routes differ from token to token, and a threshold on them does not flip on float noise.
    # At the default init every entropy lies within 0.01 nats of log V, and se_kd_student, say, may select nothing.
    for side in ("teacher", "student"):
        o[f"model.{side}_config"] = {**o[f"model.{side}_config"], "initializer_range": 0.3}
    if cache is not None:
        o["model.teacher_cache"] = str(cache)
    return o


def build_cache(tok: Path, out: Path) -> Path:
    """The offline cache of the tiny teacher for the `@cache` case: top-16 log-probs, and the hidden states of the
    mapped layers for the top 20% of tokens by entropy (EGAD's rho), as `egad cache --hidden-quantile 0.8` writes."""
    from egad.teacher.cache_job import run_cache_job

    cfg = load_config(REPO / "configs" / "tiny.yaml", run_overrides(tok, out / "unused", "batch8", "egad"))
    run_cache_job(cfg, out, k=16, hidden_quantile=0.8, examples_per_shard=16)
    return out


def all_cases(cache: bool) -> list[str]:
    return list(PRESETS) + (["egad" + CACHE_SUFFIX] if cache else [])


def train_case(case: str, layout: str, tok: Path, work: Path, cache: Path | None) -> tuple[dict, dict]:
    """Train one case; returns its result (per-step rows of KEYS, the process count, the largest move of a weight)
    and its final weights (student and projector)."""
    preset, on_cache = case.removesuffix(CACHE_SUFFIX), case.endswith(CACHE_SUFFIX)
    if on_cache and cache is None:
        raise ValueError(f"case {case!r} needs --cache")
    out = work / case
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", run_overrides(tok, out, layout, preset, cache if on_cache else None)
    )
    trainer = Trainer(cfg)
    # Only the weights in memory are compared: skip writing checkpoints and the final folder.
    trainer.save_checkpoint = trainer.save_final = lambda: None
    try:
        trainer.setup()
        start = _weights(trainer)
        trainer.train()
        weights = _weights(trainer)
    finally:
        if hasattr(trainer, "acc"):  # the next run in this process needs accelerate's singletons reset
            trainer.cleanup()  # keeps the process group, so that the next run of a launch finds it
    rows = []
    if trainer.main:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        rows = [{k: r[k] for k in KEYS if k in r} | {"step": r["step"]} for r in map(json.loads, lines) if "loss" in r]
        shutil.rmtree(out, ignore_errors=True)
    moved = max((weights[k] - start[k]).abs().max().item() for k in weights)
    return {"rows": rows, "processes": trainer.world, "moved": moved}, weights


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.acc.unwrap_model(trainer.module).state_dict()
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in state.items()}


def run_layout(layout: str, cases: list[str], tok: Path, out: Path, cache: Path | None = None) -> dict:
    """Train every case under `layout`; the main process writes <out>/<layout>.json and .safetensors."""
    results: dict = {"layout": layout, "cases": {}}
    tensors: dict[str, torch.Tensor] = {}
    work = out / f"work-{layout}"
    main = int(os.environ.get("RANK", "0")) == 0
    for case in cases:
        t0 = time.perf_counter()
        try:
            result, weights = train_case(case, layout, tok, work, cache)
        except Exception as e:  # one broken preset must not hide the others' results
            logging.getLogger("split_driver").exception("%s under %s failed", case, layout)
            results["cases"][case] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results["cases"][case] = {**result, "seconds": round(time.perf_counter() - t0, 3)}
        tensors.update({f"{case}/{k}": v for k, v in weights.items()})
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"{layout}.safetensors"))
        (out / f"{layout}.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", required=True, help=f"comma-separated, of {list(LAYOUTS)}")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default="", help="comma-separated; default: every preset (+ egad@cache with --cache)")
    p.add_argument("--cache", type=Path, default=None, help="an `egad cache` folder of the tiny teacher")
    a = p.parse_args()
    cases = a.cases.split(",") if a.cases else all_cases(a.cache is not None)
    for layout in a.layouts.split(","):
        run_layout(layout, cases, a.tokenizer, a.out, a.cache)


if __name__ == "__main__":
    main()
