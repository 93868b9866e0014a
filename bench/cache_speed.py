"""Online teacher vs the offline cache: one epoch of distillation on Dolly train, in one process.

Prints the wall-time ratio of the two training runs (cache / online), the cache's bytes per token, the time to
build the cache, and the dev NLL of both students after the same steps.

    python bench/cache_speed.py                       # teacher: the demo's (runs/demo/teacher/final) if present
    python bench/cache_speed.py --teacher DIR --max-examples 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from egad.config.run_config import build_config
from egad.experiment import run_training
from egad.teacher.cache_job import run_cache_job

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly" / "dolly.jsonl"


def _count_params(cfg) -> int:
    h, n, v, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return v * h + n * (2 * h * h + 2 * h * kv + 3 * h * ff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(REPO / "runs" / "demo" / "teacher" / "final"))
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-cache"))
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--max-examples", type=int, default=None, help="training examples (default: all of train)")
    ap.add_argument("--preset", default="egad_no_c3", help="objective preset (features off: the logit path)")
    args = ap.parse_args()
    teacher = Path(args.teacher)
    if not (teacher / "config.json").is_file():
        raise SystemExit(f"no teacher at {teacher}: run `egad demo` first (it trains and caches one) or pass --teacher")
    t_cfg = AutoConfig.from_pretrained(teacher)
    student = {
        "model_type": "llama",
        "hidden_size": t_cfg.hidden_size // 2,
        "intermediate_size": t_cfg.intermediate_size // 2,
        "num_hidden_layers": max(1, t_cfg.num_hidden_layers // 2),
        "num_attention_heads": max(1, t_cfg.num_attention_heads // 2),
        "num_key_value_heads": 1,
        "max_position_embeddings": t_cfg.max_position_embeddings,
        "tie_word_embeddings": True,
    }
    s_params = _count_params(AutoConfig.for_model(**{**student, "vocab_size": t_cfg.vocab_size}))
    ratio = _count_params(t_cfg) / s_params
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    raw = {
        "model": {"teacher": str(teacher), "student_config": student},
        "data": {
            "train": str(DOLLY),
            "dev": str(DOLLY),
            "max_prompt_len": 96,
            "max_len": 192,
            "max_train_examples": args.max_examples,
            "max_dev_examples": 200,
        },
        "objective": {"preset": args.preset},
        "train": {
            "epochs": 1,
            "per_device_batch_size": 16,
            "lr": 2e-3,
            "warmup_ratio": 0.05,
            "log_every": 20,
            "eval_every": 0,
            "eval_at_start": False,
            "save_every": 0,
            "calib_examples": 512,
            "tensorboard": False,
        },
    }
    results = {}
    t0 = time.perf_counter()
    manifest = run_cache_job(build_config(raw), out / "cache", k=args.k)
    build_s = time.perf_counter() - t0
    for name, extra in (("online", {}), ("cache", {"teacher_cache": str(out / "cache")})):
        cfg = build_config(
            {**raw, "model": {**raw["model"], **extra}, "train": {**raw["train"], "output_dir": str(out / name)}}
        )
        t0 = time.perf_counter()
        trainer = run_training(cfg)
        results[name] = {
            "seconds": time.perf_counter() - t0,
            "steps": trainer.step,
            "dev_nll": trainer.last_eval["dev_nll"],
        }
    on, ca = results["online"], results["cache"]
    # How much of the teacher's mass lies outside the top-k: what the cache can only summarise.
    from safetensors.torch import load_file

    tails = [load_file(str(out / "cache" / sh["file"]))["tail_logmass"].exp() for sh in manifest["shards"]]
    tail_mass = float(torch.cat(tails).mean())
    report = {
        "teacher_params_over_student": round(ratio, 2),
        "k": args.k,
        "steps": on["steps"],
        "online_s": round(on["seconds"], 1),
        "cache_s": round(ca["seconds"], 1),
        "speedup_online_over_cache": round(on["seconds"] / ca["seconds"], 3),
        "cache_build_s": round(build_s, 1),
        "bytes_per_token": round(manifest["bytes_per_token"], 1),
        "dev_nll_online": round(on["dev_nll"], 4),
        "dev_nll_cache": round(ca["dev_nll"], 4),
        "dev_nll_rel_diff": round(abs(ca["dev_nll"] - on["dev_nll"]) / on["dev_nll"], 5),
        "mean_teacher_mass_outside_topk": round(tail_mass, 4),
    }
    print(json.dumps(report, indent=1))
    print("goals: speedup >= 1.5 with teacher >= 4x student; <= 400 bytes/token; dev-NLL difference < 1%")


if __name__ == "__main__":
    main()
