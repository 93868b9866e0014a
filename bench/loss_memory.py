"""Peak memory and forward+backward time of the EGAD objective: chunked (and fused) vs a naive dense twin.

Qwen2.5 shapes: V = 151,936 logit rows (151,665 real tokens), student hidden 896, teacher hidden 3584, K = 4 mapped
layers with features on. Everything runs in this one process; the naive dense implementation is the baseline and
the script prints ratios against it. Memory is the peak above the pre-run level: on CUDA from the allocator's
counters, on CPU from the kernel's resident high-water mark (VmHWM, reset through /proc/self/clear_refs).

Then, against TRL's chunked generalized-JSD loss (`trl.trainer.distillation_trainer._chunked_divergence_loss`,
TRL >= 1.10, `pip install 'egad[bench]'`), both heads fused on both sides: the student's final hidden state (d 896)
and head, the teacher's final hidden state (d 1536) and head, forward KL at tau = 1 over V = 151,936 rows, forward +
backward; egad runs its KD objective at alpha = 1 (pure forward KL) with the fused teacher signal. Prints egad/TRL
memory and time and both loss values.

    python bench/loss_memory.py                              # N = 1024 and 4096, then egad vs TRL at 1024-4096
    python bench/loss_memory.py --tokens 1024 --trl-tokens   # one size, no TRL part
    python bench/loss_memory.py --clock cpu --threads 1      # times as CPU seconds, on a busy machine
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time

import torch
import torch.nn.functional as F

from egad.config.presets import preset
from egad.losses.divergences import forward_kl
from egad.losses.features import FeatureProjector
from egad.models.heads import OutputHead
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.plan.entropy import fit_quantile_knots, token_entropy
from egad.teacher.signal import DenseSignal, FusedSignal

V_ROWS, V_REAL, D_S, D_T, K = 151_936, 151_665, 896, 3584, 4
D_T_TRL = 1536  # the teacher of the TRL comparison: Qwen2.5-1.5B's hidden size


class PeakMemory:
    """Peak bytes allocated during a block, above the level at its start."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = _proc_field("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _proc_field("VmHWM") - self.start


# wall seconds, or (--clock cpu) this process's CPU seconds: with --threads 1 they hardly move when other jobs share
# the machine, where wall seconds do. Memory peaks are per process either way.
CLOCK = [time.perf_counter]


def _proc_field(key: str, path: str = "/proc/self/status") -> int:
    """A 'Key: value kB' line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in {path}")


def naive_egad(h_s, w_lm, zt, targets_flat, fs, ft, proj, knots, cfg, progress):
    """The same EGAD loss written the obvious way: full (N, V) fp32 tensors, plain autograd, no chunks."""
    mask = targets_flat != -100
    zs = (h_s @ w_lm.t())[:, :V_REAL].float()  # (N, V)
    t = zt[:, :V_REAL].float()
    y = targets_flat[mask]
    n = int(mask.sum())
    with torch.no_grad():
        h = token_entropy(t, chunk_size=None)
        from egad.plan.entropy import quantile_cdf

        d = quantile_cdf(h, knots)
        lam = progress
        w = cfg.w_min + (1 - cfg.w_min) * 2 * ((1 - lam) * (1 - d) + lam * d)
        tau = cfg.tau_max - (cfg.tau_max - cfg.tau_min) * d
        k_r = math.ceil(cfg.rho * n)
        routed = torch.topk(d, k_r).indices
    ce = F.cross_entropy(zs, y, reduction="sum") / n
    kd = (w * tau**2 * forward_kl(zs, t, temperature=tau)).sum() / n
    feat = 0.0
    for k in range(len(fs)):
        feat = feat + (1 - F.cosine_similarity(proj.proj[k](fs[k][routed]), ft[k][routed].float(), dim=-1))
    loss = (1 - cfg.alpha) * ce + cfg.alpha * kd + cfg.beta_f * (feat / len(fs)).sum() / k_r
    return loss


def make_inputs(n: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h_s = (torch.randn(n, D_S, generator=g) * 0.5).to(device)
    w_lm = (torch.randn(V_ROWS, D_S, generator=g) * 0.03).to(device)
    # Teacher logits arrive in bf16, as from a bf16 teacher; a per-token scale spreads the entropy.
    scale = torch.exp(torch.randn(n, 1, generator=g))
    zt = (torch.randn(n, V_ROWS, generator=g) * scale).to(torch.bfloat16).to(device)
    targets = torch.randint(0, V_REAL, (n,), generator=g).to(device)
    fs = [torch.randn(n, D_S, generator=g).to(device) for _ in range(K)]
    ft = [torch.randn(n, D_T, generator=g).to(torch.bfloat16).to(device) for _ in range(K)]
    return h_s, w_lm, zt, targets, fs, ft


def run_variant(kind, inputs, cfg, proj, knots, device, repeats):
    h_s0, w0, zt, targets, fs0, ft = inputs
    times, peak = [], 0
    for _ in range(repeats):
        h_s = h_s0.clone().requires_grad_()
        w_lm = w0.clone().requires_grad_()
        fs = [f.clone().requires_grad_() for f in fs0]
        proj.zero_grad(set_to_none=True)
        with PeakMemory(device) as mem:
            t0 = CLOCK[0]()
            if kind == "naive":
                loss = naive_egad(h_s, w_lm, zt, targets, fs, ft, proj, knots, cfg, 0.5)
            else:
                if kind == "fused":
                    student = StudentOutputs(hidden=h_s[None], lm_head_weight=w_lm, features=[f[None] for f in fs])
                else:
                    student = StudentOutputs(logits=(h_s @ w_lm.t())[None], features=[f[None] for f in fs])
                loss = distillation_loss(
                    student,
                    DenseSignal(zt[None], [f[None] for f in ft]),
                    targets[None],
                    cfg,
                    progress=0.5,
                    vocab_size=V_REAL,
                    knots=knots,
                    projector=proj,
                ).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(CLOCK[0]() - t0)
        peak = max(peak, mem.peak)
        grad = h_s.grad.clone()
        del h_s, w_lm, fs, loss
    return min(times), peak, grad


def _measure(kind: str, n: int, cfg, device: torch.device, repeats: int):
    inputs = make_inputs(n, device)
    knots = fit_quantile_knots(token_entropy(inputs[2][:, :V_REAL]), 1001)
    proj = FeatureProjector(D_S, D_T, K).to(device)
    return run_variant(kind, inputs, cfg, proj, knots, device, repeats)


def _naive_fits(n: int, seen: dict[int, tuple[float, int]]) -> bool:
    """Predict the dense twin's peak from the largest size measured so far (it grows linearly in N)."""
    if not seen:
        return True
    m, (_, peak) = max(seen.items())
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else _proc_field("MemAvailable", "/proc/meminfo")
    return peak * n / m < 0.8 * free


def _both_fused_inputs(n: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    h_s0 = (torch.randn(1, n, D_S, generator=g) * 0.5).to(device)
    w_s0 = (torch.randn(V_ROWS, D_S, generator=g) * 0.03).to(device)
    h_t = (torch.randn(1, n, D_T_TRL, generator=g) * torch.exp(torch.randn(1, n, 1, generator=g))).to(device)
    w_t = (torch.randn(V_ROWS, D_T_TRL, generator=g) * 0.03).to(device)
    targets = torch.randint(0, V_REAL, (1, n), generator=g).to(device)
    with torch.no_grad():
        h = torch.cat([token_entropy(OutputHead(w_t).logits(h_t[0, i : i + 512], V_REAL)) for i in range(0, n, 512)])
    return h_s0, w_s0, h_t, w_t, targets, fit_quantile_knots(h, 1001)


def _both_fused(kind: str, inputs, device: torch.device):
    """One timed forward + backward: egad's KD or full EGAD (fused student + fused teacher), or TRL's chunked loss
    on the same hidden states and heads. -> (seconds, peak bytes, loss value, teacher GEMMs per chunk)."""
    h_s0, w_s0, h_t, w_t, targets, knots = inputs
    n = h_s0.shape[1]
    h_s, w_s = h_s0.clone().requires_grad_(), w_s0.clone().requires_grad_()
    gemms = float("nan")
    with PeakMemory(device) as mem:
        t0 = CLOCK[0]()
        if kind in ("egad_kd", "egad_full"):
            # KD at alpha 1 (pure forward KL), or the full EGAD preset with its feature branch off.
            cfg = preset("kd", alpha=1.0) if kind == "egad_kd" else preset("egad", alpha=1.0, beta_f=0.0)
            teacher = FusedSignal(h_t, OutputHead(w_t))
            out = distillation_loss(
                StudentOutputs(hidden=h_s, lm_head_weight=w_s), teacher, targets, cfg, vocab_size=V_REAL, knots=knots
            )
            loss = out.loss
            gemms = teacher.projections / max(float(out.metrics["teacher_chunks"]), 1.0)
        else:
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            # TRL projects all V rows (it has no real-vocabulary slice): give both sides the same rows.
            mask = torch.ones(1, n, device=device)
            loss = _chunked_divergence_loss(h_s, h_t, w_s[:V_REAL], w_t[:V_REAL], mask, beta=0.0)[0]
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = CLOCK[0]() - t0
    return seconds, mem.peak, float(loss.detach()), gemms


def trl_section(tokens: list[int], device: torch.device, repeats: int) -> None:
    try:
        import trl
    except ImportError:
        print("\nTRL is not installed, so the egad-vs-TRL part is skipped: pip install 'egad[bench]'")
        return
    print(f"\negad vs TRL {trl.__version__} _chunked_divergence_loss, both heads fused, d_S={D_S} d_T={D_T_TRL}, "
          f"V={V_REAL} rows; TRL: forward KL (beta 0) at tau 1; interleaved, fastest of {repeats} each")  # fmt: skip
    print(f"{'N':>6} {'egad':>9} {'egad MiB':>9} {'TRL MiB':>8} {'egad s':>7} {'TRL s':>6} {'mem ratio':>10} "
          f"{'time ratio':>11} {'egad loss':>10} {'TRL loss':>10} {'rel diff':>9} {'T GEMM/chunk':>13}")  # fmt: skip
    for n in tokens:
        inputs = _both_fused_inputs(n, device)
        best: dict[str, tuple] = {}
        for _ in range(repeats):  # interleaved, so a load that drifts reaches every variant alike
            for kind in ("egad_kd", "egad_full", "trl"):
                r = _both_fused(kind, inputs, device)
                best[kind] = min(best.get(kind, r), r, key=lambda x: x[0])
                best[kind] = (best[kind][0], max(best[kind][1], r[1]), r[2], r[3])
        tt, mt, lt, _ = best["trl"]
        for kind, label in (("egad_kd", "KD"), ("egad_full", "EGAD")):
            te, me, le, gm = best[kind]
            diff = f"{abs(le - lt) / abs(lt):>9.1e}" if kind == "egad_kd" else f"{'-':>9}"
            print(f"{n:>6} {label:>9} {me / 2**20:>9.0f} {mt / 2**20:>8.0f} {te:>7.2f} {tt:>6.2f} {me / mt:>10.3f} "
                  f"{te / tt:>11.3f} {le:>10.5f} {lt:>10.5f} {diff} {gm:>13.1f}")  # fmt: skip
        del inputs
        gc.collect()
    print(
        "goals (KD row): time ratio <= 0.9; memory ratio <= 0.35 at N=2048 and <= 0.2 at N=4096; loss rel diff "
        "<= 1e-5; one teacher GEMM per chunk. The EGAD row (curriculum, per-token temperature, no features) has "
        "another loss, so only its cost compares"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1024, 4096], help="N of the naive-vs-chunked part")
    ap.add_argument("--trl-tokens", type=int, nargs="*", default=[1024, 2048, 4096], help="N of the TRL part")
    ap.add_argument("--chunk-size", type=int, default=0, help="0 = the objective's automatic choice")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the fastest is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall, or this process's CPU seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--autocast", action="store_true", help="run every variant under bf16 autocast (GPU check)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.autocast:
        torch.autocast(device.type, dtype=torch.bfloat16).__enter__()  # for the whole run
    print(f"device={device} threads={torch.get_num_threads()} V={V_ROWS} (real {V_REAL}) d_S={D_S} d_T={D_T} K={K}")
    print(f"{'N':>6} {'variant':>8} {'peak MiB':>10} {'time s':>8} {'mem ratio':>10} {'time ratio':>11}")
    naive_seen: dict[int, tuple[float, int]] = {}
    for n in args.tokens:
        cfg = preset("egad", chunk_size=args.chunk_size)
        results, extrapolated = {}, False
        if _naive_fits(n, naive_seen):
            results["naive"] = _measure("naive", n, cfg, device, args.repeats)
            naive_seen[n] = results["naive"][:2]
        else:
            # The dense twin would not fit in this machine's memory: measure it at N/4 and N/2 and extrapolate the
            # (affine in N) time and peak memory. Chunked and fused are always measured for real.
            for m in (n // 4, n // 2):
                if m not in naive_seen:
                    naive_seen[m] = _measure("naive", m, cfg, device, args.repeats)[:2]
            (n1, (t1, m1)), (n2, (t2, m2)) = sorted(naive_seen.items())[-2:]
            frac = (n - n1) / (n2 - n1)
            results["naive"] = (t1 + frac * (t2 - t1), int(m1 + frac * (m2 - m1)), None)
            extrapolated = True
        for kind in ("chunked", "fused"):
            results[kind] = _measure(kind, n, cfg, device, args.repeats)
        t_base, m_base, g_base = results["naive"]
        for kind, (t, m, g) in results.items():
            if kind == "naive":
                note = f"  (extrapolated from N={n1}, {n2}: does not fit in memory)" if extrapolated else ""
            elif g_base is not None:
                note = f"  (max |grad diff| vs naive {(g - g_base).abs().max().item():.1e})"
            else:
                note = ""
            print(f"{n:>6} {kind:>8} {m / 2**20:>10.0f} {t:>8.2f} {m / m_base:>10.3f} {t / t_base:>11.3f}{note}")
        del results
        gc.collect()
    print("ratios are chunked/naive in the same process; goals: memory <= 0.25 at N=4096, time <= 1.2")
    if device.type == "cpu":
        print(f"(CPU: peak = resident high-water mark above the start; pid {os.getpid()})")
    if args.trl_tokens:
        trl_section(args.trl_tokens, device, args.repeats)


if __name__ == "__main__":
    main()
