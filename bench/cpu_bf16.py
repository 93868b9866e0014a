"""bf16 autocast on the CPU against fp32, on the real teacher (SmolLM2-135M-Instruct) and a student cut from it.

Prints tokens/s and the bf16/fp32 speed-up for: the teacher's forward (what the cache pass and the online teacher
do), one training step of the cut student (forward + backward + AdamW, the EGAD objective from the cache), and
batched sampling (evaluation). Then trains the same KD student twice for a few steps, fp32 and bf16 autocast with fp32
master weights, and prints both dev NLLs. All runs are in this process, one after another.

    python bench/cpu_bf16.py                    # about 10 minutes on 2 cores
    python bench/cpu_bf16.py --layers 4 --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path

import torch

from egad.config.presets import preset
from egad.data import batches as D
from egad.data.batches import shift_labels
from egad.eval.generate import generate_responses
from egad.eval.suite import load_model
from egad.losses.features import FeatureProjector, feature_pairs
from egad.models.load import copied_layers, cut_student, even_layers, model_dims
from egad.objective.student import DistillationModule
from egad.teacher.online import OnlineTeacher

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly" / "dolly.jsonl"


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def batch_of(tokenizer, n: int, template: str) -> dict[str, torch.Tensor]:
    records, _ = D.load_records(DOLLY, "train", max_examples=n)
    items, _ = D.tokenize_dataset(records, tokenizer, template=template, max_prompt_len=128, max_len=256)
    return D.collate(items[:n], tokenizer.pad_token_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the cut student")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="training steps of each dev-NLL run (0 skips them)")
    ap.add_argument("--template", default="chat")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-bf16"))
    args = ap.parse_args()
    teacher, tok = load_model(args.teacher)
    teacher.requires_grad_(False)
    batch = batch_of(tok, args.batch, args.template)
    tokens = int(batch["attention_mask"].sum())
    targets = shift_labels(batch["labels"])
    layers = even_layers(model_dims(teacher)[0], args.layers)
    report: dict[str, float] = {"tokens_per_batch": tokens, "student_layers": args.layers}
    source = OnlineTeacher(teacher)
    cfg = preset("egad", feat_layers=2, cdf_mode="batch", route_mode="batch_topk")  # no calibration pass
    prompts = [D.format_prompt(ex, args.template, tok) for ex in D.load_records(DOLLY, "dev", max_examples=16)[0]]
    stop = [D.end_of_turn_id(tok, args.template)]
    n_teacher, d_teacher = model_dims(teacher)
    for bf16 in (False, True):
        name = "bf16" if bf16 else "fp32"

        def fwd(bf16=bf16):
            with torch.no_grad(), autocast(bf16):
                source.signal(batch)

        report[f"teacher_forward_tok_s_{name}"] = tokens / timed(fwd, args.repeats)
        student = cut_student(teacher, layers, dtype=torch.float32).train()
        ls, ds = model_dims(student)
        pairs = feature_pairs("uniform", ls, model_dims(teacher)[0], 2, copied_from=copied_layers(student, 30))
        module = DistillationModule(
            student, FeatureProjector(ds, model_dims(teacher)[1], 2), [p[0] for p in pairs], False
        )
        online = OnlineTeacher(teacher, [p[1] for p in pairs])
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
        with torch.no_grad(), autocast(bf16):
            signal = online.signal(batch)

        def step(bf16=bf16, module=module, opt=opt, signal=signal):
            with autocast(bf16):
                loss, _, _ = module(batch["input_ids"], batch["attention_mask"], targets, signal, cfg, progress=0.5)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        report[f"student_step_tok_s_{name}"] = tokens / timed(step, args.repeats)
        for who, model in (("student", student), ("teacher", teacher)):
            new = 0

            def sample(model=model, bf16=bf16):
                nonlocal new
                with autocast(bf16):
                    outs = generate_responses(
                        model, tok, prompts, seed=0, max_new_tokens=48, batch_size=16, progress=False,
                        stop_ids=stop,
                    )  # fmt: skip
                new = sum(len(tok(o, add_special_tokens=False)["input_ids"]) + 1 for o in outs)

            seconds = timed(sample, 1)
            report[f"{who}_sampling_new_tok_s_{name}"] = new / seconds
    for key in ("teacher_forward", "student_step", "student_sampling_new", "teacher_sampling_new"):
        report[f"{key}_speedup_bf16"] = report[f"{key}_tok_s_bf16"] / report[f"{key}_tok_s_fp32"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}, indent=1), flush=True)
    if args.steps:
        report.update(dev_nll_runs(args))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}, indent=1))


def dev_nll_runs(args) -> dict[str, float]:
    """The same KD run from the online teacher, fp32 and bf16 autocast; dev NLL at the end of each."""
    from egad.config.run_config import build_config
    from egad.experiment import run_training

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    result = {}
    for mp in ("no", "bf16"):
        raw = {
            "model": {"teacher": args.teacher, "student_cut": args.layers},
            "data": {
                "train": str(DOLLY),
                "dev": str(DOLLY),
                "template": args.template,
                "max_prompt_len": 128,
                "max_len": 256,
                "max_train_examples": 2000,
                "max_dev_examples": 100,
            },  # fmt: skip
            "objective": {"preset": "kd"},
            "train": {
                "output_dir": str(out / mp),
                "max_steps": args.steps,
                "per_device_batch_size": args.batch,
                "lr": 1e-4,
                "mixed_precision": mp,
                "eval_every": 0,
                "eval_at_start": False,
                "save_every": 0,
                "tensorboard": False,
                "log_every": 10,
            },  # fmt: skip
        }
        t0 = time.perf_counter()
        trainer = run_training(build_config(raw))
        result[f"kd_{args.steps}_steps_minutes_{mp}"] = (time.perf_counter() - t0) / 60
        result[f"kd_{args.steps}_steps_dev_nll_{mp}"] = trainer.last_eval["dev_nll"]
    result["dev_nll_bf16_minus_fp32"] = (
        result[f"kd_{args.steps}_steps_dev_nll_bf16"] - result[f"kd_{args.steps}_steps_dev_nll_no"]
    )
    return result


if __name__ == "__main__":
    main()
