"""Teacher-forced metrics on reference responses: response NLL, teacher-student KL and top-1 agreement.

`token_metrics` gives per-token values (for entropy-decile breakdowns); `response_sums` adds them up with a token
count, so that batches and processes add up before the division. Either model may be given as its logits (B, L, V)
or as `HiddenLogits` (its last hidden state and head): then only the response positions are projected, chunk by
chunk, and the (B, L, V) logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from egad.losses.divergences import forward_kl
from egad.models.heads import OutputHead
from egad.plan.entropy import token_entropy


@dataclass
class HiddenLogits:
    """A model's logits as its last hidden state (B, L, d) and its checked head (egad.models.heads)."""

    hidden: Tensor
    head: OutputHead

    def rows(self, flat_index: Tensor, vocab_size: int) -> Tensor:
        h = self.hidden.reshape(-1, self.hidden.shape[-1])[flat_index]
        return self.head.logits(h, vocab_size).float()


Logits = Tensor | HiddenLogits


def _rows(x: Logits, flat_index: Tensor, vocab_size: int) -> Tensor:
    if isinstance(x, HiddenLogits):
        return x.rows(flat_index, vocab_size)
    return x.reshape(-1, x.shape[-1])[flat_index][:, :vocab_size].float()


@torch.no_grad()
def response_sums(
    student_logits: Logits,
    targets: Tensor,
    *,
    vocab_size: int,
    teacher_logits: Logits | None = None,
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
    student_logits: Logits,
    targets: Tensor,
    *,
    vocab_size: int,
    teacher_logits: Logits | None = None,
    chunk_size: int = 0,
) -> dict[str, Tensor]:
    """Per response token (targets != -100), fp32 on the CPU: student `nll`; with a teacher also `teacher_entropy`,
    `teacher_nll`, `kl` = KL(teacher || student) at tau = 1 and `agree` (top-1 match). For entropy-bucket breakdowns.
    On the logits' device; vocabulary-sized work runs in chunks (default 2^24 / V tokens)."""
    flat_t = targets.reshape(-1)
    rows = (flat_t != -100).nonzero().squeeze(-1)
    step = chunk_size or max(16, 2**24 // vocab_size)
    out: dict[str, list[Tensor]] = {"nll": [], "teacher_entropy": [], "teacher_nll": [], "kl": [], "agree": []}
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        y = flat_t[idx]
        zs = _rows(student_logits, idx, vocab_size)
        out["nll"].append(F.cross_entropy(zs, y, reduction="none"))
        if teacher_logits is not None:
            zt = _rows(teacher_logits, idx, vocab_size)
            out["teacher_entropy"].append(token_entropy(zt))
            out["teacher_nll"].append(F.cross_entropy(zt, y, reduction="none"))
            out["kl"].append(forward_kl(zs, zt))
            out["agree"].append((zs.argmax(-1) == zt.argmax(-1)).float())
    empty = targets.new_zeros(0, dtype=torch.float32)
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
