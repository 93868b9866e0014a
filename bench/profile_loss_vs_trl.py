"""Where the time of egad's fused loss and TRL's chunked loss goes: `torch.profiler` tables of both, on the inputs of
`bench/loss_memory.py`'s TRL part (forward KL, both heads fused, V = 151,936 rows, d_S = 896, d_T = 1,536).

    python bench/profile_loss_vs_trl.py            # N = 1024, one thread, about 2 minutes
    python bench/profile_loss_vs_trl.py --tokens 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_memory as LM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=14, help="ops listed per table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    for kind in ("egad", "trl"):
        LM._both_fused(kind, 256, device, 1)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds, peak, value = LM._both_fused(kind, args.tokens, device, 1)
        print(f"=== {kind}: {seconds:.2f} s, peak {peak / 2**20:.0f} MiB, loss {value:.5f}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
