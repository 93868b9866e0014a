"""The trainer's dev evaluation: the student's response NLL (perplexity) on the dev split, and with a teacher its
NLL, KL(teacher || student) and top-1 agreement; each process scores its share, the sums are reduced, then divided."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from egad.data import batches as D
from egad.eval.metrics import response_sums
from egad.eval.suite import scorer

Scorer = Callable[[dict[str, Tensor]], Tensor]


def teacher_scorer(teacher, placement: str | None, vocab: int, *, cross: bool) -> Scorer | None:
    """The teacher's dev scorer: None without a teacher, or across tokenizers (the student's NLL only: the two
    models' dev targets differ); a sharded teacher through its own forward, which gathers its weights."""
    if teacher is None or cross:
        return None
    if placement == "shard":
        return lambda b: teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return scorer(teacher, vocab)


@torch.no_grad()
def dev_metrics(
    score: Scorer,
    score_teacher: Scorer | None,
    dev_set: list,
    acc,
    *,
    batch_size: int,
    pad_id: int,
    vocab: int,
) -> dict[str, float]:
    """`score(batch)` gives the student's logits, `score_teacher` the teacher's (or None). Every process runs the
    same number of forwards (a sharding engine gathers weights collectively in each): one whose share has run out
    scores a stand-in batch and drops the result."""
    world, rank = acc.num_processes, acc.process_index
    idx = list(range(rank, len(dev_set), world))
    n_batches = math.ceil(math.ceil(len(dev_set) / world) / batch_size)
    totals: dict[str, Tensor] = {}
    for b in range(n_batches):
        part = idx[b * batch_size : (b + 1) * batch_size]
        batch = D.collate([dev_set[i] for i in part or [0]], pad_id)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        targets = D.shift_labels(batch["labels"])
        with acc.autocast():
            logits = score(batch)
            t_logits = score_teacher(batch) if score_teacher is not None else None
        if not part:
            continue
        for k, v in response_sums(logits, targets, vocab_size=vocab, teacher_logits=t_logits).items():
            totals[k] = totals.get(k, 0) + v
    keys = sorted(totals) or ["tokens"]
    vec = torch.stack([torch.as_tensor(totals.get(k, 0.0), dtype=torch.float64, device=acc.device) for k in keys])
    tot = dict(zip(keys, acc.reduce(vec, "sum").tolist(), strict=True))
    n = max(tot.get("tokens", 0.0), 1.0)
    out = {"dev_nll": tot.get("nll", 0.0) / n}
    out["dev_ppl"] = math.exp(min(out["dev_nll"], 50))
    if "kl" in tot:
        out.update(dev_teacher_nll=tot["teacher_nll"] / n, dev_kl=tot["kl"] / n, dev_top1_agree=tot["agree"] / n)
    return out
