"""The cached teacher's student passes (`egad.losses.student_atoms`) under `objective.kernels`: eager against
compiled, in one process, on the same inputs.

One call is the forward and backward of `student_atom_logprobs_and_ce`: log softmax(z / tau) at the top-k and
sampled ids, and the CE at tau = 1, with per-token temperatures (EGAD's case: two normalisers) or tau = 1 (KD's: one).
The modes alternate call by call, so a load that drifts reaches both alike. Prints the median time of each and the
compiled / eager ratio.

    python bench/atoms_kernels.py                      # the tiny shape's chunk (N = 1,200, V = 4,096)
    python bench/atoms_kernels.py --rows 341 --vocab 49152   # one SmolLM2 chunk
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from egad.losses import kernels
from egad.losses.student_atoms import student_atom_logprobs_and_ce


def one_call(z: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, tau, g: torch.Tensor, g_ce: torch.Tensor):
    x = z.clone().requires_grad_()
    logq, ce = student_atom_logprobs_and_ce(x, ids, targets, temperature=tau)
    torch.autograd.backward([logq, ce], [g, g_ce])
    return x.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--atoms", type=int, default=120, help="top-k + sampled tail ids per row (64 + 56)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, v = args.rows, args.vocab
    z = torch.randn(n, v, generator=gen) * 3
    ids = torch.randint(0, v, (n, args.atoms), generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    g, g_ce = torch.randn(n, args.atoms, generator=gen), torch.randn(n, generator=gen)
    cases = {"per-token tau (EGAD)": 1.0 + torch.rand(n, generator=gen), "tau = 1 (KD)": 1.0}
    for name, tau in cases.items():
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        grads = {}
        for i in range(args.calls + 1):
            for mode in times:
                with kernels.using(mode):
                    t0 = time.perf_counter()
                    grads[mode] = one_call(z, ids, targets, tau, g, g_ce)
                    if i:  # the first call compiles
                        times[mode].append(time.perf_counter() - t0)
        err = (grads["compiled"] - grads["eager"]).abs().max().item()
        eager, compiled = (statistics.median(times[m]) * 1e3 for m in ("eager", "compiled"))
        print(f"{name:<22} eager {eager:7.2f} ms  compiled {compiled:7.2f} ms  compiled / eager {compiled / eager:.3f}"
              f"  max |grad difference| {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
