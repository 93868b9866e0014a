"""The cross-vocabulary losses of `egad.losses.cross_vocab` against a cached teacher: its top-k ids and log-probs over
its own vocabulary, the tail mass beyond them, the exact entropy and (format 2) a sample of the tail, as the offline
cache stores them (`egad.teacher.cache`). Same signature as the dense ones, the teacher given as `TopKRows`:
``fn(student_logits, teacher, vmap, *, temperature, **hyper) -> (N,)`` fp32, no tau^2 factor.

TEMPERING. The teacher at tau is softmax((log p_1..k, log T_tau) / tau) over its top-k and one tail pseudo-token whose
tempered weight is the tail's power sum sum_tail p^(1/tau) (`egad.losses.sparse_tail.tempered_tail`: read from the
sample, else matched to the exact entropy). Exact at tau = 1 and at k = V_T (no tail); otherwise the tail's power sum
is an estimate, as in the same-tokenizer sparse path. The student is tempered over its full vocabulary, exactly.

EXACT MATCHING (`exact`). The outcomes are the teacher's top-k ids that the vocabulary map matches (G_k <= k per row,
mapped to their student ids) plus one bucket for everything else: on the teacher's side its unmatched top-k ids and
its whole tail (matched tokens outside the top-k included: the cache does not know them one by one); on the student's
side every id that is not one of the row's G_k matched ids, as a logsumexp. That is the dense `exact` on a coarser
partition, so it never exceeds it (data processing); at k = V_T the partition is the dense one and the two are equal.

ULD (`uld`). sum_{i<=k} | p_(i) - q_(i) | + | P_tail - Q_rest |: the teacher's sorted top-k against the student's k
largest probabilities, then the teacher's tail mass against the student's remaining mass. By the triangle inequality
it is at most the full ULD (Boizard et al. 2024) over both whole vocabularies, and equal to it at k = V_T.

HYBRID (`hybrid`). w * exact + (1 - w) * the ULD part over what is not matched: the teacher's unmatched top-k
probabilities (known one by one) against the student's k largest probabilities outside the row's matched ids, then
the teacher's tail mass against the student's remaining unmatched mass. Equal to the dense `hybrid` at k = V_T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from egad.losses.cross_vocab import VocabMap, _divergence, _sorted_l1, _tail, _tempered
from egad.losses.sparse_buckets import teacher_bucket_logprobs
from egad.losses.sparse_tail import TailSample, tempered_tail

__all__ = ["CROSS_VOCAB_TOPK_LOSSES", "TopKRows", "exact_topk", "hybrid_topk", "uld_topk"]


@dataclass
class TopKRows:
    """A cached teacher at N rows, over its own vocabulary of `vocab_size` tokens: top-k ids (N, k) long, most likely
    first, their log-probs (N, k) and the tail log-mass (N,) at tau = 1, the exact entropy (N,), and the tail sample
    at these rows or None."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    entropy: Tensor
    vocab_size: int
    sample: TailSample | None = None

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if self.ids.dim() != 2 or self.logprobs.shape != self.ids.shape or self.tail.shape != (n,):
            raise ValueError(
                f"TopKRows expects ids (N, k), logprobs (N, k) and tail (N,); got {tuple(self.ids.shape)}, "
                f"{tuple(self.logprobs.shape)}, {tuple(self.tail.shape)}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def rows(self, sl: slice | Tensor) -> TopKRows:
        """The same teacher at a slice (or an index) of its rows."""
        sample = None
        if self.sample is not None:
            index = torch.arange(self.ids.shape[0], device=self.ids.device)[sl]
            sample = self.sample.rows(index)
        return TopKRows(self.ids[sl], self.logprobs[sl], self.tail[sl], self.entropy[sl], self.vocab_size, sample)

    def buckets(self, temperature: float | Tensor = 1.0) -> Tensor:
        """log softmax over (the top-k, the tail pseudo-token) at `temperature` (module docstring). -> (N, k+1) fp32"""
        logp, tail = self.logprobs.float(), self.tail.float()
        if not (isinstance(temperature, float) and temperature == 1.0):
            a = 1.0 / temperature if isinstance(temperature, float) else 1.0 / temperature.float()
            tail = tempered_tail(logp, tail, self.entropy.float(), a, vocab_size=self.vocab_size, sample=self.sample)
        return teacher_bucket_logprobs(logp, tail, temperature=temperature)


def _matched(teacher: TopKRows, vmap: VocabMap, v_s: int) -> tuple[Tensor, Tensor, Tensor]:
    """(student ids of the teacher's top-k (N, k), -1 where unmatched; matched (N, k) bool; the student's matched
    columns (N, V_S) bool)."""
    s_idx = vmap.student_of(teacher.ids.device)[teacher.ids]  # (N, k)
    matched = s_idx >= 0
    cols = torch.zeros(s_idx.shape[0], v_s, dtype=torch.bool, device=s_idx.device)
    r, c = matched.nonzero().unbind(-1)
    cols[r, s_idx[r, c]] = True
    return s_idx, matched, cols


def _check(student_logits: Tensor, teacher: TopKRows, vmap: VocabMap | None) -> Tensor:
    if student_logits.dim() != 2 or student_logits.shape[0] != teacher.ids.shape[0]:
        raise ValueError(
            f"expected student logits (N, V_S) for the teacher's N = {teacher.ids.shape[0]} rows; got "
            f"{tuple(student_logits.shape)}"
        )
    if vmap is not None and (student_logits.shape[1], teacher.vocab_size) != (vmap.student_vocab, vmap.teacher_vocab):
        raise ValueError(
            f"student logits have {student_logits.shape[1]} columns and the teacher {teacher.vocab_size} tokens, the "
            f"vocabulary map {vmap.student_vocab} and {vmap.teacher_vocab}: slice padded rows away first"
        )
    return student_logits.float()


def _exact_parts(logq: Tensor, teacher: TopKRows, vmap: VocabMap, temperature) -> tuple[Tensor, Tensor, dict]:
    """(log q, log p) over the row's matched top-k ids plus one bucket (N, k+1) each, and what hybrid reuses."""
    k = teacher.k
    s_idx, matched, cols = _matched(teacher, vmap, logq.shape[1])
    q_m = logq.gather(1, s_idx.clamp_min(0)).masked_fill(~matched, -math.inf)  # (N, k)
    q_b = torch.cat([q_m, _tail(logq.masked_fill(cols, -math.inf))[:, None]], dim=-1)
    tb = teacher.buckets(temperature)  # (N, k+1)
    p_m = tb[:, :k].masked_fill(~matched, -math.inf)
    p_rest = torch.cat([tb[:, :k].masked_fill(matched, -math.inf), tb[:, k:]], dim=-1)
    p_b = torch.cat([p_m, torch.logsumexp(p_rest, dim=-1)[:, None]], dim=-1)
    return q_b, p_b, {"matched": matched, "cols": cols, "tb": tb}


def exact_topk(
    student_logits: Tensor,
    teacher: TopKRows,
    vmap: VocabMap,
    *,
    temperature: float | Tensor = 1.0,
    divergence: str = "forward_kl",
    **hyper: float,
) -> Tensor:
    """`divergence` over the row's matched top-k ids plus one bucket (module docstring). (N, V_S) -> (N,)"""
    fn = _divergence(divergence)
    logq = torch.log_softmax(_tempered(_check(student_logits, teacher, vmap), temperature), dim=-1)
    q_b, p_b, _ = _exact_parts(logq, teacher, vmap, temperature)
    return fn(q_b, p_b, temperature=1.0, **hyper)


def _head_and_rest(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(the k largest entries of each row, descending (N, min(k, V)); the sum of the others (N,))."""
    qs = torch.sort(q, dim=-1, descending=True).values
    return qs[:, :k], qs[:, k:].sum(-1)


def uld_topk(
    student_logits: Tensor, teacher: TopKRows, vmap: VocabMap | None = None, *, temperature: float | Tensor = 1.0
) -> Tensor:
    """ULD over the teacher's sorted top-k and its tail mass (module docstring). (N, V_S) -> (N,)"""
    q = torch.softmax(_tempered(_check(student_logits, teacher, vmap), temperature), dim=-1)
    p = teacher.buckets(temperature).exp()  # (N, k+1)
    head, rest = _head_and_rest(q, teacher.k)
    return _sorted_l1(p[:, : teacher.k], head) + (p[:, teacher.k] - rest).abs()


def hybrid_topk(
    student_logits: Tensor,
    teacher: TopKRows,
    vmap: VocabMap,
    *,
    temperature: float | Tensor = 1.0,
    matched_weight: float = 0.5,
    divergence: str = "forward_kl",
    **hyper: float,
) -> Tensor:
    """matched_weight * exact_topk + (1 - matched_weight) * ULD over the unmatched part (module docstring)."""
    if not 0.0 <= matched_weight <= 1.0:
        raise ValueError(f"matched_weight must be in [0, 1], got {matched_weight}")
    fn = _divergence(divergence)
    logq = torch.log_softmax(_tempered(_check(student_logits, teacher, vmap), temperature), dim=-1)
    q_b, p_b, got = _exact_parts(logq, teacher, vmap, temperature)
    k = teacher.k
    p = got["tb"].exp()
    p_u = p[:, :k].masked_fill(got["matched"], 0.0)  # (N, k) the teacher's unmatched top-k, zeros elsewhere
    head, rest = _head_and_rest(logq.exp().masked_fill(got["cols"], 0.0), k)
    rest_term = _sorted_l1(p_u, head) + (p[:, k] - rest).abs()
    return matched_weight * fn(q_b, p_b, temperature=1.0, **hyper) + (1.0 - matched_weight) * rest_term


CROSS_VOCAB_TOPK_LOSSES: dict[str, Callable[..., Tensor]] = {"exact": exact_topk, "uld": uld_topk,
                                                             "hybrid": hybrid_topk}  # fmt: skip
