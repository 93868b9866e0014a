"""The calibration pass: teacher entropies of response tokens, before training, for the global entropy CDF."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from egad.data import batches as D
from egad.plan.entropy_stream import EntropyQuantileCalibrator
from egad.teacher.signal import TeacherSource, chunk_signals


@torch.no_grad()
def response_entropies(teacher: TeacherSource, batch: dict[str, Tensor], vocab: int) -> Tensor:
    """Teacher entropy (tau = 1, nats) at every response token of a collated batch. -> (N,)"""
    rows = (D.shift_labels(batch["labels"]).reshape(-1) != D.IGNORE_INDEX).nonzero().squeeze(-1)
    sig = teacher.signal(batch)
    if hasattr(sig, "response_entropies"):  # a teacher with its own tokenizer: at its aligned rows (egad.xtok)
        return sig.response_entropies()
    step = max(16, 2**24 // vocab)
    parts = [sig.chunk(rows[i : i + step], vocab).entropy() for i in range(0, rows.numel(), step)]
    return torch.cat(parts) if parts else torch.zeros(0, device=rows.device)


def _passes(examples: list[dict], accelerator, *, pad_id: int, batch_size: int, desc: str):
    """This process's share of `examples` as collated batches on its device: (batch, real). Every process yields as
    many batches as the others (a sharded teacher gathers its weights collectively in every forward, and every
    gather needs every process): one whose share has run out gets a stand-in with real = False, to drop."""
    rank, world = accelerator.process_index, accelerator.num_processes
    positions = list(range(len(examples)))[rank::world]
    n_batches = -(-((len(examples) + world - 1) // world) // batch_size)
    for b in tqdm(range(n_batches), desc=desc, disable=not accelerator.is_main_process):
        ix = positions[b * batch_size : (b + 1) * batch_size]
        items = [examples[i] for i in ix] or examples[:1]
        batch = {k: v.to(accelerator.device) for k, v in D.collate(items, pad_id).items()}
        batch["train_index"] = torch.tensor(ix or [0])  # a cache is keyed by the positions in the training split
        yield batch, bool(ix)


def _gathered(values: Tensor, real: bool, accelerator) -> Tensor:
    """Non-negative values of every process, on the CPU (a stand-in batch contributes none)."""
    v = values if real else values[:0]
    out = accelerator.gather(accelerator.pad_across_processes(v, pad_index=-1.0))
    return out[out >= 0].float().cpu()


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
    calib = EntropyQuantileCalibrator(max_samples=max_samples)
    kw = {"pad_id": pad_id, "batch_size": batch_size, "desc": "calibrating teacher entropy"}
    for batch, real in _passes(examples, accelerator, **kw):
        with accelerator.autocast():
            h = response_entropies(teacher, batch, vocab)
        calib.update(_gathered(h, real, accelerator))
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
    items of the training split, so that a cache finds them by position), from the untrained student and the
    teacher, gathered from every process: the start of their streamed CDFs.

    student_logits: batch -> the student's logits (a tensor, or an egad.eval.metrics.HiddenLogits)."""
    from egad.eval.metrics import _rows

    out: dict[str, list[Tensor]] = {s: [] for s in signals}
    kw = {"pad_id": pad_id, "batch_size": batch_size, "desc": "calibrating student signals"}
    for batch, real in _passes(examples, accelerator, **kw):
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
            out[s].append(_gathered(v, real, accelerator))
    return {s: torch.cat(v) for s, v in out.items()}
