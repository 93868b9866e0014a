"""Online KD against online EGAD at SmolLM2-135M's shapes (from a config, no weights), fused head: the time of each
part of a step (teacher signal, student forward + loss, backward + AdamW) and a `torch.profiler` table per method.

    python bench/profile_online_step.py            # 1 warm-up + 2 profiled steps per method, about 3 minutes
    python bench/profile_online_step.py --shape tiny --steps 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost as S  # noqa: E402

from egad.config.presets import preset  # noqa: E402
from egad.data import batches as D  # noqa: E402
from egad.losses.features import FeatureProjector, feature_pairs  # noqa: E402
from egad.models.load import cut_student, model_dims  # noqa: E402
from egad.objective.student import DistillationModule  # noqa: E402
from egad.teacher.online import OnlineTeacher  # noqa: E402


def step(run, group) -> tuple[float, float, float]:
    """One training step; seconds of (teacher signal, student forward + loss, backward + AdamW)."""
    module, source, cfg, opt, vocab, knots = run
    batch = D.collate(group, 0)
    t0 = time.perf_counter()
    signal = source.signal(batch)
    t1 = time.perf_counter()
    loss, _, _ = module(batch["input_ids"], batch["attention_mask"], D.shift_labels(batch["labels"]), signal, cfg,
                        progress=0.5, vocab_size=vocab, knots=knots)  # fmt: skip
    t2 = time.perf_counter()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(S.SHAPES), default="smollm2")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per method (after one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    spec = S.SHAPES[args.shape]
    vocab = spec["vocab"]
    teacher = S.llama(vocab, **spec["teacher"]).eval().requires_grad_(False)
    _, groups = S.batches(vocab, args.steps + 1, args.batch)
    lt, dt = model_dims(teacher)
    cut = spec["student_layers"]
    ls = len(cut) if cut else spec["student"]["num_hidden_layers"]
    pairs = feature_pairs("uniform", ls, lt, 2, copied_from=cut)
    knots = torch.linspace(0, 8, 1001)  # EGAD's plan needs entropy knots; their values do not change the cost
    for method in ("kd", "egad"):
        student = cut_student(teacher, cut, dtype=torch.float32) if cut else S.llama(vocab, **spec["student"])
        feats = method == "egad"
        projector = FeatureProjector(model_dims(student)[1], dt, len(pairs)) if feats else None
        layers = [s for s, _ in pairs] if feats else []
        module = DistillationModule(student.train(), projector, layers, True, vocab=vocab)
        source = OnlineTeacher(teacher, [t for _, t in pairs] if feats else [], fused=True, vocab=vocab)
        cfg = preset(method, feat_layers=2)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

        run = (module, source, cfg, opt, vocab, knots)
        step(run, groups[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            parts = [step(run, g) for g in groups[1:]]
        mean = [sum(p[i] for p in parts) / len(parts) for i in range(3)]
        print(f"=== {method}: teacher {mean[0]:.2f} s, student forward + loss {mean[1]:.2f} s, backward + AdamW "
              f"{mean[2]:.2f} s, step {sum(mean):.2f} s")  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=38))


if __name__ == "__main__":
    main()
