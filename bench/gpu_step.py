"""One EGAD training step at Qwen2.5 shapes: a 0.5B-shaped student and a 1.5B-shaped teacher built from configs
(random weights, nothing downloaded), the student's head fused and not, bf16 autocast; tokens/s and peak memory.

Each variant runs a warm-up step and `--steps` timed ones (forward of the teacher, forward + backward of the
student with the EGAD objective and features, AdamW). Meant for one GPU (bench/gpu_check.sh); `--small` shrinks the
models so the script can be checked on a CPU.

    python bench/gpu_step.py                     # on a GPU
    python bench/gpu_step.py --small --device cpu
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from egad.config.presets import preset
from egad.losses.features import FeatureProjector, feature_pairs
from egad.models.load import model_dims
from egad.objective.student import DistillationModule
from egad.plan.entropy import fit_quantile_knots, token_entropy
from egad.teacher.online import OnlineTeacher

QWEN = {  # Qwen2.5 config.json values
    "student": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "teacher": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),  # fmt: skip
}
V_ROWS, V_REAL = 151_936, 151_665


def build(side: str, small: bool, device: torch.device) -> torch.nn.Module:
    kw = dict(QWEN[side])
    if small:
        kw.update(num_hidden_layers=2, intermediate_size=256, hidden_size=kw["hidden_size"] // 8)
    cfg = AutoConfig.for_model("qwen2", vocab_size=V_ROWS if not small else 5003, max_position_embeddings=4096, **kw)
    torch.manual_seed(0 if side == "student" else 1)
    return AutoModelForCausalLM.from_config(cfg).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny models, to check the script on a CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    teacher = build("teacher", args.small, device).eval().requires_grad_(False).to(torch.bfloat16)
    vocab = V_REAL if not args.small else 5000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=g).to(device)
    mask = torch.ones_like(ids)
    targets = ids.roll(-1, dims=1)
    targets[:, : args.length // 4] = -100  # a prompt part, as in instruction data
    tokens = int((targets != -100).sum())
    lt, dt = model_dims(teacher)
    k = 2 if args.small else 4
    cfg = preset("egad", feat_layers=k)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):  # the calibration pass, untimed
        logits = teacher(input_ids=ids, attention_mask=mask).logits[targets != -100][:, :vocab]
        knots = fit_quantile_knots(torch.cat([token_entropy(c) for c in logits.split(512)]).float().cpu())
        del logits
    report = {"device": str(device), "tokens_per_step": args.batch * args.length, "response_tokens": tokens}
    for fused in (False, True):
        student = build("student", args.small, device).train()
        ls, ds = model_dims(student)
        pairs = feature_pairs("uniform", ls, lt, k)
        projector = FeatureProjector(ds, dt, len(pairs)).to(device)
        module = DistillationModule(student, projector, [s for s, _ in pairs], fused, vocab=vocab)
        source = OnlineTeacher(teacher, [t for _, t in pairs], fused=fused, vocab=vocab)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                signal = source.signal({"input_ids": ids, "attention_mask": mask})
                loss, _, _ = module(ids, mask, targets, signal, cfg, progress=0.5, vocab_size=vocab, knots=knots)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t0)
        tag = "fused" if fused else "unfused"
        report[f"{tag}_tokens_per_s"] = args.batch * args.length / min(times)
        if device.type == "cuda":
            report[f"{tag}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del module, student, opt, source
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}, indent=1))


if __name__ == "__main__":
    main()
