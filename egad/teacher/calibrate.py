"""The calibration pass: teacher entropies of response tokens, before training, for the global entropy CDF."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from egad import data as D
from egad.entropy_stream import EntropyQuantileCalibrator
from egad.teacher.signal import TeacherSource, chunk_signals


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


# The student-side signals a rule may rank tokens by; their CDFs move as the student learns, so they are streamed.
STUDENT_SIGNALS = ("student_entropy", "hellinger")


@torch.no_grad()
def calibrate_signals(
    teacher: TeacherSource,
    student_logits,
    examples: list[dict],
    accelerator,
    *,
    signals: list[str],
    pad_id: int,
    batch_size: int,
    vocab: int,
) -> dict[str, Tensor]:
    """The student-side signals (`student_entropy`, `hellinger`) of the response tokens of `examples` (the first
    items of the training split, so that a cache finds them by position), from the
    untrained student and the teacher, gathered from every process: the start of their streamed CDFs.

    student_logits: batch -> the student's logits (a tensor, or an egad.eval.metrics.HiddenLogits)."""
    from egad.eval.metrics import _rows

    rank, world = accelerator.process_index, accelerator.num_processes
    positions = list(range(len(examples)))[rank::world]
    out: dict[str, list[Tensor]] = {s: [] for s in signals}
    n_batches = -(-((len(examples) + world - 1) // world) // batch_size)
    for b in tqdm(range(n_batches), desc="calibrating student signals", disable=not accelerator.is_main_process):
        ix = positions[b * batch_size : (b + 1) * batch_size]
        chunk = [examples[i] for i in ix]
        batch = {k: v.to(accelerator.device) for k, v in D.collate(chunk or examples[:1], pad_id).items()}
        batch["train_index"] = torch.tensor(ix or [0])  # a cache is keyed by the positions in the training split
        rows = (D.shift_labels(batch["labels"]).reshape(-1) != D.IGNORE_INDEX).nonzero().squeeze(-1)
        with accelerator.autocast():
            sig = teacher.signal(batch)
            logits = student_logits(batch)
            step = max(16, 2**24 // vocab)
            parts: dict[str, list[Tensor]] = {s: [] for s in signals}
            for i in range(0, rows.numel(), step):
                idx = rows[i : i + step]
                got = chunk_signals(sig.chunk(idx, vocab), _rows(logits, idx, vocab), set(signals), 1.0)
                for s in signals:
                    parts[s].append(got[s].float())
        for s in signals:
            v = torch.cat(parts[s]) if parts[s] else torch.zeros(0, device=accelerator.device)
            if not chunk:
                v = v[:0]
            gathered = accelerator.gather(accelerator.pad_across_processes(v, pad_index=-1.0))
            out[s].append(gathered[gathered >= 0].float().cpu())
    return {s: torch.cat(v) for s, v in out.items()}
