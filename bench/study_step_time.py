"""The quiet step time of each method of the pre-registered study (docs/preregistration.md), for its compute table.

Each method takes its steps at the study's setting: SmolLM2-135M's shapes (a 30-layer teacher built from its config,
random weights: the time does not depend on them) cut to the study's 6-layer student, batches of 8 Dolly train
examples, the student's head fused, bf16 autocast, AdamW (with the anchor's pull for `kd_anchor`), the teacher signal
read from a cache that stores the hidden states of every token (as the study's does). The methods take their steps
in turn (step i of each, then step i + 1), so a load that drifts reaches them all alike; run it on a quiet machine
(pause the study: it resumes). Prints each method's median step time and its ratio to SFT, and writes the seconds as
JSON for `egad study --step-times`.

    python bench/study_step_time.py --out runs/prereg/step_times.json          # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from step_cost import SHAPES, _Tok, autocast, batches, llama

from egad.config.methods import method
from egad.config.run_config import TrainConfig
from egad.data import batches as D
from egad.losses.features import feature_pairs
from egad.models.load import cut_student, model_dims
from egad.objective.plan_runtime import feature_branch
from egad.objective.student import DistillationModule
from egad.objective.token_plan import PlanState
from egad.study.grid import PREREG_CELLS
from egad.teacher.cache import TeacherCache, write_cache
from egad.train.optim import build_optimizer, pull_to_anchor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(PREREG_CELLS))
    ap.add_argument("--steps", type=int, default=6, help="timed steps per method (plus one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", default=None, help="write {method: seconds} here")
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "compiled", "eager"],
        help="objective.kernels; eager for the pinned study (f25dd9c), whose code predates the kernels",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SHAPES["smollm2"]
    vocab, cut = spec["vocab"], spec["student_layers"]
    teacher = llama(vocab, **spec["teacher"]).eval().requires_grad_(False)
    lt, dt = model_dims(teacher)
    items, groups = batches(vocab, args.steps + 1, args.batch)
    tmp = Path(tempfile.mkdtemp(prefix="egad-study-step-"))
    try:
        stored = [t for _, t in feature_pairs("uniform", len(cut), lt, 2, copied_from=cut)]
        kw = {"batch_size": args.batch, "hash_weights": False, "progress": False, "max_len": 256}
        write_cache(teacher, _Tok(), items, tmp, k=64, vocab_size=vocab, layers=stored, hidden_quantile=0.0, **kw)
        cache = TeacherCache(tmp)
        # Timing only: every signal's CDF is read through the same knots.
        state = PlanState(knots=cache.knots, student_knots=cache.knots, hellinger_knots=torch.linspace(0, 1, 101))
        runs = {}
        for name in args.methods.split(","):
            m = method(name)
            cfg = m.objective_config(feat_layers=2, kernels=args.kernels)
            student = cut_student(teacher, cut, dtype=torch.float32).train()
            pairs, projector = feature_branch(cfg, student, (lt, dt), "cpu")  # as the trainer pairs a cut's layers
            module = DistillationModule(student, projector, [s for s, _ in pairs], True, vocab=vocab)
            train = TrainConfig(lr=1e-5, anchor_l2=float(m.run.get("train.anchor_l2", 0.0)))
            opt, _, anchor = build_optimizer(student, projector, train, total_steps=args.steps + 1)
            runs[name] = (module, opt, anchor, cfg, train.anchor_l2, [t for _, t in pairs])
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i, group in enumerate(groups):
            batch = D.collate(group, 0)
            batch["train_index"] = torch.tensor([it["index"] for it in group])
            for name, (module, opt, anchor, cfg, gamma, layers) in runs.items():
                cache.require_layers(layers)  # each method reads only the hidden states it maps
                t0 = time.perf_counter()
                with autocast(True):
                    signal = cache.signal(batch) if cfg.uses_teacher else None
                    loss, _, _ = module(batch["input_ids"], batch["attention_mask"], D.shift_labels(batch["labels"]),
                                        signal, cfg, progress=0.5, vocab_size=vocab, state=state)  # fmt: skip
                loss.backward()
                if anchor:
                    pull_to_anchor(anchor, gamma)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step warms up the kernels
                    times[name].append(time.perf_counter() - t0)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        base = seconds.get("sft")
        print(f"{'method':<16}{'step s':>9}{'/ SFT':>8}")
        for name, s in seconds.items():
            print(f"{name:<16}{s:>9.3f}{(s / base if base else float('nan')):>8.3f}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({k: round(v, 4) for k, v in seconds.items()}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
