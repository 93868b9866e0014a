"""What one distillation step costs against an SFT step of the same student, in one process.

Variants: SFT, KD and EGAD; online (the teacher runs every step) and cached (`egad cache` signals read from disk,
k = 64; EGAD's with the hidden states of the top-20% entropy tokens); the student's head unfused or fused (the
online teacher is then fused too). Each step is forward + backward + the trainer's optimizer (fused AdamW, its
parameter groups) on one batch of Dolly train, bf16 autocast optional. Two shapes: the tiny config's
(`configs/tiny.yaml`: V = 4,096, teacher 256 x 4, student 128 x 2) and SmolLM2-135M's (V = 49,152, hidden 576, a
30-layer teacher and a 6-layer student, both built from a config: no weights needed). The variants of one head take
their steps in turn, on the same batches (step i of each, then step i + 1), so a load that drifts over minutes
reaches them all alike. Prints the median step time of each
variant and its ratio to SFT (unfused and fused SFT, so the fused path is compared with its own baseline).

    python bench/step_cost.py                       # both shapes, about 10 minutes on 2 cores
    python bench/step_cost.py --shapes tiny --steps 6
    python bench/step_cost.py --clock cpu --threads 1   # a rough reading on a busy machine
    python bench/step_cost.py --shapes tiny --parts     # plus cached EGAD with one component off at a time
    python bench/step_cost.py --kernels eager           # the losses' passes in eager PyTorch (egad.losses.kernels)

`--parts` adds cached EGAD variants without the per-token temperature (`temp_mode const`: tau = 1, so the CE shares
the KD's normaliser), without the feature branch (`beta_f 0`), and with neither (the curriculum alone), so each
component's share of EGAD's cost over KD reads off the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from egad.config.presets import preset
from egad.config.run_config import TrainConfig
from egad.data import batches as D
from egad.losses.features import FeatureProjector, feature_pairs
from egad.models.load import cut_student, model_dims
from egad.objective.student import DistillationModule
from egad.objective.token_plan import PlanState
from egad.teacher.cache import TeacherCache, write_cache
from egad.teacher.online import OnlineTeacher
from egad.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly" / "dolly.jsonl"

SHAPES = {
    "tiny": {
        "teacher": dict(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        ),  # fmt: skip
        "student_layers": None,  # a separate from-config student, as configs/tiny.yaml
        "student": dict(
            hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),  # fmt: skip
        "vocab": 4096,
    },
    "smollm2": {
        "teacher": dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rope_theta=100000.0,
        ),  # fmt: skip
        "student_layers": [0, 1, 2, 27, 28, 29],  # a 6-layer cut, as `model.student_cut` builds it
        "student": None,
        "vocab": 49152,
    },
}


def llama(vocab: int, **kw) -> torch.nn.Module:
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def batches(tokenizer_vocab: int, n: int, batch: int, seed: int = 0) -> tuple[list[dict], list[list[dict]]]:
    """Dolly train, tokenized by a byte-level stand-in: the real lengths, ids spread over the vocabulary."""
    records, _ = D.load_records(DOLLY, "train", max_examples=n * batch)
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, ex in enumerate(records):
        prompt = min(len(D.format_prompt(ex).encode()) // 4, 128)
        resp = max(1, min(len(ex.response.encode()) // 4, 256 - prompt))
        ids = torch.randint(3, tokenizer_vocab, (prompt + resp,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "index": i})
    return items, [items[i : i + batch] for i in range(0, len(items), batch)]


class _Tok:
    """The tokenizer fields the cache writer reads (ids are synthetic here)."""

    pad_token_id = 0
    eos_token_id = 1

    def get_vocab(self):
        return {"<pad>": 0, "</s>": 1}

    all_special_ids = [0, 1]


def run_shape(name: str, args) -> dict[str, float]:
    spec = SHAPES[name]
    vocab = spec["vocab"]
    teacher = llama(vocab, **spec["teacher"]).eval().requires_grad_(False)
    items, groups = batches(vocab, args.steps + 1, args.batch)
    k = {"feat_layers": 2, "kernels": args.kernels}
    obj = {"kd": preset("kd", **k), "egad": preset("egad", **k)}
    parts = PARTS if args.parts else {}
    obj.update({name: preset("egad", **k, **over) for name, over in parts.items()})
    tmp = Path(tempfile.mkdtemp(prefix="egad-step-cost-"))
    try:
        caches = {}
        lt, dt = model_dims(teacher)
        student0 = cut_student(teacher, spec["student_layers"], dtype=torch.float32) if spec["student_layers"] else None
        ls = len(spec["student_layers"]) if student0 is not None else spec["student"]["num_hidden_layers"]
        copied = spec["student_layers"]
        pairs = feature_pairs("uniform", ls, lt, 2, copied_from=copied)
        for kind, layers, q in (("kd", None, None), ("egad", [t for _, t in pairs], 0.8)):
            kw = {"batch_size": args.batch, "hash_weights": False, "progress": False, "max_len": 256}
            write_cache(
                teacher, _Tok(), items, tmp / kind, k=64, vocab_size=vocab, layers=layers, hidden_quantile=q, **kw
            )
            caches[kind] = TeacherCache(tmp / kind)
        # The variants without the feature branch read EGAD's cache as the trainer would: no hidden states.
        caches["egad-no-hidden"] = TeacherCache(tmp / "egad")
        caches["egad-no-hidden"].require_layers([])
        knots = caches["kd"].knots
        results: dict[str, float] = {}
        for fused in (False, True):
            tag = "fused" if fused else "unfused"
            online = {
                "kd": OnlineTeacher(teacher, fused=fused, vocab=vocab),
                "egad": OnlineTeacher(teacher, [t for _, t in pairs], fused=fused, vocab=vocab),
            }
            variants = {}
            for method in ("sft", "kd", "egad", *parts):
                sources = ("none",) if method == "sft" else ("cached",) if method in parts else ("online", "cached")
                for source in sources:
                    if student0 is not None:
                        student = cut_student(teacher, spec["student_layers"], dtype=torch.float32)
                    else:
                        student = llama(vocab, **spec["student"])
                    _, ds = model_dims(student)
                    features = method != "sft" and obj[method].uses_features
                    projector = FeatureProjector(ds, dt, len(pairs)) if features else None
                    layers = [s for s, _ in pairs] if features else []
                    module = DistillationModule(student.train(), projector, layers, fused, vocab=vocab)
                    # The trainer's optimizer (fused AdamW, its parameter groups): the step a run takes.
                    opt, _, _ = build_optimizer(student, projector, TrainConfig(lr=1e-5), total_steps=args.steps + 1)
                    cfg = preset("sft") if method == "sft" else obj[method]
                    kind = "kd" if method == "kd" else "egad"  # the parts read EGAD's cache
                    reader = caches[kind if features or method == "kd" else "egad-no-hidden"]
                    src = online[kind] if source == "online" else reader if source == "cached" else None
                    # From a cache, the router reads the cache's hidden-state threshold (as the trainer does), so
                    # that every routed token has its stored hidden state.
                    thr = reader.manifest.get("hidden_threshold") if source == "cached" else None
                    state = PlanState(knots=knots, route_threshold=thr)
                    variants[f"{name}/{tag}/{method}/{source}"] = (module, opt, cfg, src, state)
            # Interleaved: step i of every variant, then step i + 1. On a shared machine the load drifts over
            # minutes; variants timed one after another would each see a different load, and their ratios with it.
            times: dict[str, list[float]] = {key: [] for key in variants}
            for i, group in enumerate(groups):
                batch = D.collate(group, 0)
                batch["train_index"] = torch.tensor([it["index"] for it in group])
                for key, (module, opt, cfg, src, state) in variants.items():
                    t0 = CLOCKS[args.clock]()
                    with autocast(args.bf16):
                        signal = src.signal(batch) if src is not None else None
                        loss, _, _ = module(batch["input_ids"], batch["attention_mask"],
                                            D.shift_labels(batch["labels"]), signal, cfg, progress=0.5,
                                            vocab_size=vocab, state=state)  # fmt: skip
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if i:  # the first step warms up the kernels
                        times[key].append(CLOCKS[args.clock]() - t0)
            for key in variants:
                results[key] = statistics.median(times[key])
                print(f"{key:<32} {results[key]:.3f} s", flush=True)
            del variants
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Cached EGAD with one component off (--parts): what each adds to the step.
PARTS = {
    "egad-no-temp": {"temp_mode": "const"},
    "egad-no-feat": {"beta_f": 0.0},
    "egad-curriculum-only": {"temp_mode": "const", "beta_f": 0.0},
}

# CPU seconds of this process: with --threads 1 they hardly move when other jobs share the machine, where wall
# seconds do (a rough reading while, say, a study runs; the recorded figures are wall time on a quiet machine).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,smollm2")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (plus one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall, or this process's CPU seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--parts", action="store_true", help="add cached EGAD with one component off at a time")
    ap.add_argument("--kernels", choices=["auto", "compiled", "eager"], default="auto", help="objective.kernels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for name in args.shapes.split(","):
        rows.update(run_shape(name, args))
    print("\nstep time / SFT step time (same shape, same head):")
    for key, seconds in rows.items():
        shape, tag, _, _ = key.split("/")
        base = rows[f"{shape}/{tag}/sft/none"]
        print(f"{key:<32} {seconds / base:.3f}")
    for shape in {k.split("/")[0] for k in rows}:
        for tag in ("unfused", "fused"):
            online = rows[f"{shape}/{tag}/egad/online"] / rows[f"{shape}/{tag}/kd/online"]
            print(f"{shape}/{tag}: online EGAD / online KD = {online:.3f}")
    print(json.dumps({k: round(v, 4) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
