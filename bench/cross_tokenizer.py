"""Cross-tokenizer distillation: the chunked cross-vocabulary loss against egad's same-tokenizer chunked loss, and
the share of Dolly response tokens that two real tokenizers align.

LOSS. N = 2,048 aligned tokens, a teacher with a 262,144-row vocabulary (Gemma 3 1B's: d_T = 1,152) and a student
with a 49,152-row one (SmolLM2-135M's: d_S = 576), both given as final hidden states and heads, forward + backward
in this one process. `egad.losses.cross_vocab.chunked_cross_vocab_loss` (exact matching over G matched pairs, forward
KL at tau = 1, with the objective's reduction weights so the gradient is made in the forward pass; optionally the
ULD and hybrid losses, which sort both vocabularies) is compared with egad's same-tokenizer fused KD loss
(`egad.objective.compose.distillation_loss`, student and teacher fused, forward KL at tau = 1) on a pair that shares the
student's vocabulary (V = 49,152) and on one that shares the teacher's (V = 262,144). Memory is the peak above the
level at the start of each variant (CUDA allocator counters, or the CPU resident high-water mark, as in
`bench/loss_memory.py`, whose helpers this reuses); times are the fastest of --repeats.

ALIGN. The SmolLM2-135M-Instruct tokenizer (teacher) against egad's byte-level BPE trained on Dolly train (student,
--vocab entries, cached like the toy pipeline's): every Dolly train response encoded by both, aligned at shared
boundaries (`egad.xtok.align_responses`), and the exact vocabulary map's size.

    python bench/cross_tokenizer.py                              # both parts, exact loss (a few minutes on CPU)
    python bench/cross_tokenizer.py --part align                 # only the Dolly alignment share (~20 s)
    python bench/cross_tokenizer.py --part loss --losses exact hybrid uld --tokens 1024
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_memory as LM  # noqa: E402

from egad.config.presets import preset  # noqa: E402
from egad.losses.cross_vocab import VocabMap  # noqa: E402
from egad.losses.cross_vocab_chunked import chunked_cross_vocab_loss  # noqa: E402
from egad.models.heads import OutputHead  # noqa: E402
from egad.objective.compose import StudentOutputs, distillation_loss  # noqa: E402
from egad.teacher.signal import FusedSignal  # noqa: E402

V_T, V_S, D_T, D_S = 262_144, 49_152, 1_152, 576


# ---------------------------------------------------------------------------------------------------------- loss
def _inputs(n: int, v_t: int, v_s: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, D_S, generator=g) * 0.5
    w_s = torch.randn(v_s, D_S, generator=g) * 0.03
    # A per-token scale spreads the teacher's entropy, as in bench/loss_memory.py.
    h_t = torch.randn(n, D_T, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    w_t = torch.randn(v_t, D_T, generator=g) * 0.03
    targets = torch.randint(0, min(v_t, v_s), (n,), generator=g)
    return [t.to(device) for t in (h_s, w_s, h_t, w_t, targets)]


def _vocab_map(matched: int, seed: int = 1) -> VocabMap:
    g = torch.Generator().manual_seed(seed)
    return VocabMap(torch.randperm(V_T, generator=g)[:matched], torch.randperm(V_S, generator=g)[:matched], V_T, V_S)


def _run(kind: str, inputs, vmap: VocabMap | None, device: torch.device) -> tuple[float, int, float]:
    """One timed forward + backward. -> (seconds, peak bytes, loss value)"""
    h_s0, w_s0, h_t, w_t, targets = inputs
    n = h_s0.shape[0]
    h_s, w_s = h_s0.clone().requires_grad_(), w_s0.clone().requires_grad_()
    with LM.PeakMemory(device) as mem:
        t0 = LM.CLOCK[0]()
        if kind.startswith("same"):
            loss = distillation_loss(StudentOutputs(hidden=h_s[None], lm_head_weight=w_s), FusedSignal(h_t[None],
                                     OutputHead(w_t)), targets[None], preset("kd", alpha=1.0)).loss  # fmt: skip
        else:
            weights = torch.full((n,), 1.0 / n, device=device)
            per_token = chunked_cross_vocab_loss(h_s, w_s, h_t, w_t, vmap, loss=kind, token_weights=weights)
            loss = (per_token * weights).sum()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = LM.CLOCK[0]() - t0
    value = float(loss.detach())
    del h_s, w_s, loss
    return seconds, mem.peak, value


def loss_part(args, device: torch.device) -> None:
    n = args.tokens
    vmap = _vocab_map(args.matched)
    print(f"\nLOSS: N={n}, teacher V={V_T} d={D_T}, student V={V_S} d={D_S}, {args.matched} matched pairs; forward + "
          f"backward, fastest of {args.repeats}; device={device} threads={torch.get_num_threads()}")  # fmt: skip
    results: dict[str, tuple[float, int, float]] = {}
    plan = [("same@49152", V_S, V_S), ("same@262144", V_T, V_T)] + [(k, V_T, V_S) for k in args.losses]
    for kind, v_t, v_s in plan:
        inputs = _inputs(n, v_t, v_s, device)
        best = None
        for _ in range(args.repeats):
            r = _run(kind, inputs, vmap, device)
            best = r if best is None else (min(best[0], r[0]), max(best[1], r[1]), r[2])
        results[kind] = best  # type: ignore[assignment]
        print(f"  measured {kind}: {best[0]:.2f} s, {best[1] / 2**20:.0f} MiB", flush=True)  # type: ignore[index]
        del inputs
        gc.collect()
    base_s, base_t = results["same@49152"], results["same@262144"]
    print(f"{'variant':>12} {'peak MiB':>9} {'time s':>7} {'mem/same49k':>12} {'time/same49k':>13} "
          f"{'mem/same262k':>13} {'time/same262k':>14} {'loss':>9}")  # fmt: skip
    for kind, (t, m, value) in results.items():
        print(f"{kind:>12} {m / 2**20:>9.0f} {t:>7.2f} {m / base_s[1]:>12.3f} {t / base_s[0]:>13.3f} "
              f"{m / base_t[1]:>13.3f} {t / base_t[0]:>14.3f} {value:>9.4f}")  # fmt: skip
    full = n * (V_T + V_S) * 4 / 2**20
    print(f"(the two full fp32 logit tensors alone would take {full:.0f} MiB; 'same@V' is egad's fused KD on a pair "
          "sharing a V-row vocabulary, the cross rows run teacher V=262,144 against student V=49,152)")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- align
def align_part(args) -> None:
    from transformers import AutoTokenizer

    from egad.data import batches as D
    from egad.models.model_files import resolve_model_source
    from egad.models.tokenizer import cached_bpe_tokenizer
    from egad.paths import cache_root, default_data_dir
    from egad.xtok import align_responses, build_vocab_map

    dolly = Path(args.dolly) if args.dolly else (default_data_dir() or Path("data")) / "dolly" / "dolly.jsonl"
    records, _ = D.load_records(dolly, "train")
    fp = D.fingerprint([dolly, "train", args.vocab])  # the toy pipeline's key (egad.experiment.cached_tokenizer)
    student = cached_bpe_tokenizer(lambda: D.texts_for_tokenizer(records), args.vocab,
                                   cache_root() / "demo" / "tokenizers", fp)  # fmt: skip
    teacher = AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m-instruct"))
    texts = [r.response for r in records][: args.max_responses or None]
    t0 = time.perf_counter()
    alignments, stats = align_responses(teacher, student, texts)
    seconds = time.perf_counter() - t0
    vm = build_vocab_map(teacher, student)
    one = sum(a.share == 1.0 for a in alignments)
    print(f"\nALIGN: teacher SmolLM2-135M-Instruct ({len(teacher)} entries), student egad BPE on Dolly train "
          f"({len(student)} entries), {dolly}")  # fmt: skip
    print(f"  {stats.summary()}")
    print(f"  student tokens aligned: {stats.share:.4f}; teacher tokens aligned: {stats.teacher_share:.4f}; responses "
          f"fully aligned: {one}/{stats.responses}; encode + align {seconds:.1f} s")  # fmt: skip
    r = stats.responses  # every response's end-of-turn target is aligned by construction
    print(f"  without the end-of-turn targets: student {(stats.aligned - r) / (stats.student_targets - r):.4f}, "
          f"teacher {(stats.aligned - r) / (stats.teacher_targets - r):.4f}")  # fmt: skip
    print(f"  exact vocabulary map: {vm.size} pairs = {vm.size / len(student):.1%} of the student's vocabulary, "
          f"{vm.size / len(teacher):.1%} of the teacher's")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["both", "loss", "align"], default="both")
    ap.add_argument("--tokens", type=int, default=2048, help="aligned tokens N of the loss part")
    ap.add_argument(
        "--losses",
        nargs="+",
        default=["exact"],
        choices=["exact", "hybrid", "uld"],
        help="cross-vocabulary losses to time (hybrid and uld sort 262,144 entries a row: slow on CPU)",
    )
    ap.add_argument("--matched", type=int, default=32_768, help="matched vocabulary pairs G of the synthetic map")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the fastest is reported")
    ap.add_argument("--vocab", type=int, default=8192, help="entries of egad's BPE in the align part")
    ap.add_argument("--max-responses", type=int, default=0, help="align only the first n responses (0 = all)")
    ap.add_argument("--dolly", default=None, help="the Dolly JSONL (default: the shared data folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall, or this process's CPU seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()  # fmt: skip
    if args.clock == "cpu":
        LM.CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"python {' '.join(sys.argv)}  (load average {load[0]:.2f} on {os.cpu_count()} CPUs at the start)")
    if args.part in ("both", "loss"):
        loss_part(args, torch.device(args.device))
    if args.part in ("both", "align"):
        align_part(args)


if __name__ == "__main__":
    main()
