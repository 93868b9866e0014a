"""The losses' full-vocabulary passes under `objective.kernels` (`egad.losses.kernels`): eager against compiled, in
one process, on the same inputs.

One call is a forward and backward of one chunk's loss:
* cached teacher (`student_atom_logprobs_and_ce`): log softmax(z / tau) at the top-k and sampled ids and the CE at
  tau = 1, with per-token temperatures (EGAD's case: two normalisers) or tau = 1 (KD's: one);
* online teacher (`egad.losses.fused_kl`): the forward KL against the teacher chunk's logits, with per-token
  temperatures (EGAD's), or at tau = 1 with the CE from the same normaliser (KD's).
The modes alternate call by call, so a load that drifts reaches both alike. Prints the median time of each and the
compiled / eager ratio.

    python bench/loss_kernels.py                      # the tiny shape's chunk (N = 1,200, V = 4,096)
    python bench/loss_kernels.py --rows 341 --vocab 49152   # one SmolLM2 chunk
    python bench/loss_kernels.py --device cuda --rows 110 --vocab 151936   # one Qwen2.5 chunk on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from egad.losses import kernels
from egad.losses.fused_kl import forward_kl_and_ce_fast, forward_kl_fast
from egad.losses.student_atoms import student_atom_logprobs_and_ce


def cached_call(z: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, tau, g: torch.Tensor, g_ce: torch.Tensor):
    x = z.clone().requires_grad_()
    logq, ce = student_atom_logprobs_and_ce(x, ids, targets, temperature=tau)
    torch.autograd.backward([logq, ce], [g, g_ce])
    return x.grad


def online_call(z: torch.Tensor, zt: torch.Tensor, targets: torch.Tensor, tau, g: torch.Tensor, g_ce: torch.Tensor):
    x = z.clone().requires_grad_()
    if isinstance(tau, float):
        kl, ce = forward_kl_and_ce_fast(x, zt, targets)
        torch.autograd.backward([kl, ce], [g, g_ce])
    else:
        forward_kl_fast(x, zt, temperature=tau).backward(g)
    return x.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--atoms", type=int, default=120, help="top-k + sampled tail ids per row (64 + 56)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the kernels are then built by Triton)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, v = args.rows, args.vocab
    z = torch.randn(n, v, generator=gen) * 3
    ids = torch.randint(0, v, (n, args.atoms), generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    zt = torch.randn(n, v, generator=gen) * 3
    g, g_ce = torch.randn(n, args.atoms, generator=gen), torch.randn(n, generator=gen)
    g_row = torch.randn(n, generator=gen)
    per_token = 1.0 + torch.rand(n, generator=gen)
    z, ids, targets, zt, g, g_ce, g_row, per_token = (
        t.to(args.device) for t in (z, ids, targets, zt, g, g_ce, g_row, per_token)
    )
    sync = torch.cuda.synchronize if z.is_cuda else lambda: None
    cases = {
        "cached, per-token tau (EGAD)": lambda: cached_call(z, ids, targets, per_token, g, g_ce),
        "cached, tau = 1 (KD)": lambda: cached_call(z, ids, targets, 1.0, g, g_ce),
        "online, per-token tau (EGAD)": lambda: online_call(z, zt, targets, per_token, g_row, g_ce),
        "online, tau = 1 (KD)": lambda: online_call(z, zt, targets, 1.0, g_row, g_ce),
    }
    for name, call in cases.items():
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        grads = {}
        for i in range(args.calls + 1):
            for mode in times:
                with kernels.using(mode):
                    sync()
                    t0 = time.perf_counter()
                    grads[mode] = call()
                    sync()
                    if i:  # the first call compiles
                        times[mode].append(time.perf_counter() - t0)
        err = (grads["compiled"] - grads["eager"]).abs().max().item()
        eager, compiled = (statistics.median(times[m]) * 1e3 for m in ("eager", "compiled"))
        print(f"{name:<30} eager {eager:7.2f} ms  compiled {compiled:7.2f} ms  compiled / eager {compiled / eager:.3f}"
              f"  max |grad difference| {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
