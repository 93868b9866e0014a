"""Teacher-forced metrics on reference responses: response NLL, teacher-student KL and top-1 agreement.

`token_metrics` gives per-token values (for entropy-decile breakdowns); `response_sums` adds them up with a token
count, so that batches and processes add up before the division.
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
    """Sums over response tokens (targets != -100) of `token_metrics` (float64), plus the token count: student
    NLL, and with a teacher its NLL, KL(teacher || student) at tau = 1 and top-1 agreement."""
    tok = token_metrics(
        student_logits, targets, vocab_size=vocab_size, teacher_logits=teacher_logits, chunk_size=chunk_size
    )
    sums = {k: v.double().sum() for k, v in tok.items() if k != "teacher_entropy"}
    sums["tokens"] = torch.tensor(float(tok["nll"].numel()), dtype=torch.float64, device=tok["nll"].device)
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
    `teacher_nll`, `kl` = KL(teacher || student) at tau = 1 and `agree` (top-1 match). For entropy-bucket breakdowns.
    On the logits' device; vocabulary-sized work runs in chunks (default 2^24 / V tokens)."""
    flat_t = targets.reshape(-1)
    rows = (flat_t != -100).nonzero().squeeze(-1)
    zs_all = student_logits.reshape(-1, student_logits.shape[-1])
    zt_all = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if teacher_logits is not None else None
    step = chunk_size or max(16, 2**24 // vocab_size)
    out: dict[str, list[Tensor]] = {"nll": [], "teacher_entropy": [], "teacher_nll": [], "kl": [], "agree": []}
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        y = flat_t[idx]
        zs = zs_all[idx][:, :vocab_size].float()
        out["nll"].append(F.cross_entropy(zs, y, reduction="none"))
        if zt_all is not None:
            zt = zt_all[idx][:, :vocab_size].float()
            out["teacher_entropy"].append(token_entropy(zt))
            out["teacher_nll"].append(F.cross_entropy(zt, y, reduction="none"))
            out["kl"].append(forward_kl(zs, zt))
            out["agree"].append((zs.argmax(-1) == zt.argmax(-1)).float())
    empty = student_logits.new_zeros(0, dtype=torch.float32)
    return {k: torch.cat(v) if v else empty for k, v in out.items() if v or k == "nll"}


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
