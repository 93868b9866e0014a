"""Teacher-forced metrics on reference responses: response NLL, teacher-student KL and top-1 agreement.

Returned as sums plus a token count so that batches and processes add up before the division.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from egad.entropy import token_entropy
from egad.losses.divergences import forward_kl


@torch.no_grad()
def response_sums(
    student_logits: Tensor,
    targets: Tensor,
    *,
    vocab_size: int,
    teacher_logits: Tensor | None = None,
    chunk_size: int = 0,
) -> dict[str, Tensor]:
    """Sums over response tokens (targets != -100): student NLL, and with a teacher its NLL, KL(teacher || student)
    at tau = 1 and top-1 agreement. Vocabulary-sized work runs in chunks (default 2^24 / V tokens)."""
    flat_t = targets.reshape(-1)
    rows = (flat_t != -100).nonzero().squeeze(-1)
    zs_all = student_logits.reshape(-1, student_logits.shape[-1])
    zt_all = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if teacher_logits is not None else None
    step = chunk_size or max(16, 2**24 // vocab_size)
    sums = {
        k: torch.zeros((), dtype=torch.float64, device=student_logits.device)
        for k in ("nll", "teacher_nll", "kl", "agree")
    }
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        y = flat_t.index_select(0, idx)
        zs = zs_all.index_select(0, idx)[:, :vocab_size].float()
        sums["nll"] += F.cross_entropy(zs, y, reduction="sum").double()
        if zt_all is not None:
            zt = zt_all.index_select(0, idx)[:, :vocab_size].float()
            sums["teacher_nll"] += F.cross_entropy(zt, y, reduction="sum").double()
            sums["kl"] += forward_kl(zs, zt).sum().double()
            sums["agree"] += (zs.argmax(-1) == zt.argmax(-1)).sum().double()
    sums["tokens"] = torch.tensor(float(rows.numel()), dtype=torch.float64, device=student_logits.device)
    if zt_all is None:
        for k in ("teacher_nll", "kl", "agree"):
            del sums[k]
    return sums


@torch.no_grad()
def token_metrics(
    student_logits: Tensor,
    targets: Tensor,
    *,
    vocab_size: int,
    teacher_logits: Tensor | None = None,
    chunk_size: int = 0,
) -> dict[str, Tensor]:
    """Per response token (targets != -100), fp32 on the CPU: student `nll`; with a teacher also `teacher_entropy`,
    `teacher_nll`, `kl` = KL(teacher || student) at tau = 1 and `agree` (top-1 match). For entropy-bucket breakdowns."""
    flat_t = targets.reshape(-1)
    rows = (flat_t != -100).nonzero().squeeze(-1)
    zs_all = student_logits.reshape(-1, student_logits.shape[-1])
    zt_all = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if teacher_logits is not None else None
    step = chunk_size or max(16, 2**24 // vocab_size)
    out: dict[str, list[Tensor]] = {"nll": [], "teacher_entropy": [], "teacher_nll": [], "kl": [], "agree": []}
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        y = flat_t.index_select(0, idx)
        zs = zs_all.index_select(0, idx)[:, :vocab_size].float()
        out["nll"].append(F.cross_entropy(zs, y, reduction="none"))
        if zt_all is not None:
            zt = zt_all.index_select(0, idx)[:, :vocab_size].float()
            out["teacher_entropy"].append(token_entropy(zt))
            out["teacher_nll"].append(F.cross_entropy(zt, y, reduction="none"))
            out["kl"].append(forward_kl(zs, zt))
            out["agree"].append((zs.argmax(-1) == zt.argmax(-1)).float())
    return {k: torch.cat(v).cpu() if v else torch.zeros(0) for k, v in out.items() if v or k == "nll"}


def entropy_buckets(tokens: dict[str, Tensor], n_buckets: int = 10) -> list[dict[str, float]]:
    """Split tokens into teacher-entropy quantile buckets (deciles by default) and average every metric in each:
    where along the teacher's confidence the student differs most."""
    h = tokens["teacher_entropy"]
    if h.numel() == 0:
        return []
    order = torch.argsort(h)
    rows = []
    for b, idx in enumerate(torch.tensor_split(order, n_buckets)):
        if idx.numel() == 0:
            continue
        row = {"bucket": b, "tokens": int(idx.numel()), "h_min": float(h[idx].min()), "h_max": float(h[idx].max())}
        for k, v in tokens.items():
            row[k] = float(v[idx].double().mean())
        rows.append(row)
    return rows
