"""The calibration pass: teacher entropies of response tokens, before training, for the global entropy CDF."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from egad import data as D
from egad.entropy_stream import EntropyQuantileCalibrator
from egad.teacher.signal import TeacherSource


@torch.no_grad()
def response_entropies(teacher: TeacherSource, batch: dict[str, Tensor], vocab: int) -> Tensor:
    """Teacher entropy (tau = 1, nats) at every response token of a collated batch. -> (N,)"""
    rows = (D.shift_labels(batch["labels"]).reshape(-1) != D.IGNORE_INDEX).nonzero().squeeze(-1)
    sig = teacher.signal(batch)
    step = max(16, 2**24 // vocab)
    parts = [sig.chunk(rows[i : i + step], vocab).entropy() for i in range(0, rows.numel(), step)]
    return torch.cat(parts) if parts else torch.zeros(0, device=rows.device)


def calibrate_entropy(
    teacher: TeacherSource,
    examples: list[dict],
    accelerator,
    *,
    pad_id: int,
    batch_size: int,
    vocab: int,
    max_samples: int = 2_000_000,
) -> Tensor:
    """Run the frozen teacher over `examples` (split across processes, gathered back) and return the response-token
    entropies, subsampled to at most `max_samples` (identical on every process)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = examples[rank::world]
    calib = EntropyQuantileCalibrator(max_samples=max_samples)
    # Every process takes part in each gather, and runs the teacher as often as the others (a sharded teacher gathers
    # its weights collectively in every forward): one whose share has run out scores a stand-in and drops it.
    n_batches = -(-((len(examples) + world - 1) // world) // batch_size)
    for b in tqdm(range(n_batches), desc="calibrating teacher entropy", disable=not accelerator.is_main_process):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        batch = {k: v.to(accelerator.device) for k, v in D.collate(chunk or examples[:1], pad_id).items()}
        with accelerator.autocast():
            h = response_entropies(teacher, batch, vocab)
        if not chunk:
            h = h[:0]
        gathered = accelerator.gather(accelerator.pad_across_processes(h, pad_index=-1.0))
        calib.update(gathered[gathered >= 0].float().cpu())
    return torch.as_tensor(calib.samples)
