"""Per-token distillation losses between a teacher and a student whose vocabularies differ.

The rows compared are aligned positions (`egad.xtok.align`): the teacher's logits z_T (N, V_T) and the student's z_S
(N, V_S) predict the token that starts at the same character of the same text, each over its own vocabulary.
Signatures follow `egad.losses`: ``fn(student_logits, teacher_logits, vmap, *, temperature, **hyper) -> (N,)`` fp32,
``temperature`` a float or an (N,) tensor dividing both sides' logits, no tau^2 factor (the caller applies it). Logits
arrive sliced to each tokenizer's real vocabulary (padded rows away), which `vmap` records.

EXACT MATCHING (`exact`). `VocabMap` pairs G teacher ids with G student ids whose tokens decode to the same bytes
(`egad.xtok.vocab.build_vocab_map`; each string once per side). Both models are mapped to G + 1 outcomes: the G
matched tokens, and one tail bucket holding everything else: log p_tail = logsumexp of the teacher's unmatched
log-probs, log q_tail the same over the student's unmatched ids (a logsumexp, so it stays exact when the matched mass
is ~1; -inf with nothing unmatched). The dense divergence of `egad.losses.divergences` then runs on the bucket
log-probs at temperature 1, tempering having been applied to the full vocabularies first, as the sparse path does
(`egad.losses.sparse`). The teacher's and the student's unmatched tokens are different strings; the one shared tail
bucket is the coarsening that keeps the loss a divergence between two distributions over the same outcomes (a lower
bound of any finer comparison, by data processing). With identical vocabularies and the identity map the tail is
empty on both sides and `exact` equals the same-tokenizer divergence. TTM, WTTM and BiLD temper or rank logits in
their own way and are not offered here.

ULD (`uld`). Universal Logit Distillation, Boizard, El Haddad, Hudelot & Colombo, 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs" (arXiv:2402.12030): the closed-form Wasserstein-1
distance between the two distributions once their supports are put in rank order,
    ULD = sum_i | p_(i) - q_(i) |,   p_(1) >= p_(2) >= ... sorted, the shorter vector padded with zeros,
p = softmax(z_T / tau), q = softmax(z_S / tau). It needs no vocabulary map; it ignores which token carries which
probability (only the shape of the distribution is taught). The paper adds it to the CE with a weight; here it is
a per-token value like any divergence. Its gradient flows through the sort (a permutation; ties are measure zero).

HYBRID (`hybrid`), as in TRL's GOLD trainer (ULD "hybrid" mode): the matched part exactly, the rest by ULD,
    hybrid = w * exact(divergence) + (1 - w) * sum_i | p^u_(i) - q^u_(i) |,
with p^u, q^u the probabilities of the unmatched teacher and student tokens (not renormalised), sorted and
zero-padded. `exact` already matches the total unmatched mass through its tail bucket; the ULD term teaches its
shape. w = `matched_weight`, default 0.5 (GOLD's default is G / V_T, the teacher's matched share; pass it).

CHUNKED (`egad.losses.cross_vocab_chunked.chunked_cross_vocab_loss`). From the final hidden states and the heads,
chunk by chunk: neither (N, V_T) nor (N, V_S) logits are ever alive, only (C, V) ones for a chunk of C rows; the
student's gradient is accumulated into (N, d_S) and (V_S, d_S) buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from egad.losses.divergences import _NEG, DIVERGENCES, _tempered

__all__ = [
    "CROSS_VOCAB_LOSSES",
    "EXACT_DIVERGENCES",
    "VocabMap",
    "exact",
    "hybrid",
    "matched_logprobs",
    "uld",
]

# The dense divergences that temper both sides by tau and read probabilities only: they run on the buckets.
EXACT_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl", "todi")


# ------------------------------------------------------------------------------------------------------ the map
@dataclass(frozen=True)
class VocabMap:
    """G matched pairs: teacher id `teacher_ids[g]` and student id `student_ids[g]` are the same token (each id at
    most once). teacher_vocab, student_vocab: the real vocabulary sizes (logit columns beyond are padding)."""

    teacher_ids: Tensor  # (G,) long
    student_ids: Tensor  # (G,) long
    teacher_vocab: int
    student_vocab: int
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        t, s = self.teacher_ids, self.student_ids
        if t.dim() != 1 or t.shape != s.shape:
            raise ValueError(f"VocabMap ids must both be (G,), got {tuple(t.shape)} and {tuple(s.shape)}")
        for name, ids, v in (("teacher", t, self.teacher_vocab), ("student", s, self.student_vocab)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
                raise ValueError(f"VocabMap {name}_ids must lie in [0, {v})")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"VocabMap {name}_ids must be distinct (one bucket per token)")

    @classmethod
    def identity(cls, vocab: int) -> VocabMap:
        """The map of two identical vocabularies: every id to itself."""
        ids = torch.arange(vocab)
        return cls(ids, ids.clone(), vocab, vocab)

    @property
    def size(self) -> int:
        return self.teacher_ids.numel()

    def student_of(self, device: torch.device) -> Tensor:
        """(V_T,) long: the student id matched to each teacher id, -1 where none; cached per device."""
        key = ("student_of", str(device))
        if key not in self._on:
            lookup = torch.full((self.teacher_vocab,), -1, dtype=torch.long)
            lookup[self.teacher_ids] = self.student_ids
            self._on[key] = lookup.to(device)
        return self._on[key]

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(teacher ids, student ids, teacher unmatched ids, student unmatched ids) on `device`, cached."""
        key = str(device)
        if key not in self._on:
            rest = []
            for ids, v in ((self.teacher_ids, self.teacher_vocab), (self.student_ids, self.student_vocab)):
                keep = torch.ones(v, dtype=torch.bool)
                keep[ids] = False
                rest.append(keep.nonzero().squeeze(1))
            self._on[key] = tuple(x.to(device) for x in (self.teacher_ids, self.student_ids, *rest))
        return self._on[key]


def _check(student_logits: Tensor, teacher_logits: Tensor, vmap: VocabMap | None) -> tuple[Tensor, Tensor]:
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            "expected student logits (N, V_S) and teacher logits (N, V_T) for the same N aligned rows; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    widths = (student_logits.shape[1], teacher_logits.shape[1])
    if vmap is not None and widths != (vmap.student_vocab, vmap.teacher_vocab):
        raise ValueError(
            f"logits have {student_logits.shape[1]} (student) and {teacher_logits.shape[1]} (teacher) columns, the "
            f"vocabulary map {vmap.student_vocab} and {vmap.teacher_vocab}: slice padded rows away first "
            "(logits[..., :len(tokenizer)])"
        )
    return student_logits.float(), teacher_logits.float()


# ------------------------------------------------------------------------------------------------ exact matching
def _tail(rest: Tensor) -> Tensor:
    """log of the mass of the `rest` log-prob columns, (N, R) -> (N,); -inf (zero gradient) where there is none."""
    if not rest.requires_grad:
        return torch.logsumexp(rest, dim=-1)  # -inf for an all -inf (or empty) row
    # A finite floor keeps logsumexp's backward finite when every remaining entry is -inf (masked vocabulary).
    lse = torch.logsumexp(rest.clamp_min(_NEG), dim=-1)
    return torch.where(lse > _NEG / 2, lse, -math.inf)


def _side(logx: Tensor, ids: Tensor, rest_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs over the matched ids and the tail bucket (N, G+1), the unmatched log-probs). Without a gradient
    (the teacher) the unmatched part is `logx` itself with the matched columns set to -inf in place (no (N, V) copy;
    the extra zeros change neither the tail nor a sorted, zero-padded comparison); with one, a gathered copy."""
    matched = logx.index_select(-1, ids)  # (N, G)
    rest = logx.index_fill_(-1, ids, -math.inf) if not logx.requires_grad else logx.index_select(-1, rest_ids)
    return torch.cat([matched, _tail(rest)[:, None]], dim=-1), rest


def _buckets(logq: Tensor, logp: Tensor, vmap: VocabMap) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log q, log p) over the G + 1 outcomes, and each side's unmatched log-probs (see `_side`)."""
    t_ids, s_ids, t_rest, s_rest = vmap.on(logq.device)
    q, q_rest = _side(logq, s_ids, s_rest)
    p, p_rest = _side(logp, t_ids, t_rest)
    return q, p, q_rest, p_rest


def _log_probs(student_logits, teacher_logits, vmap, temperature) -> tuple[Tensor, Tensor]:
    zs, zt = _check(student_logits, teacher_logits, vmap)
    return torch.log_softmax(_tempered(zs, temperature), dim=-1), torch.log_softmax(_tempered(zt, temperature), dim=-1)


def matched_logprobs(
    student_logits: Tensor, teacher_logits: Tensor, vmap: VocabMap, *, temperature: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """(log q, log p) over the G matched tokens and the tail bucket, at `temperature`. (N, V_S), (N, V_T) ->
    (N, G+1) each; each row sums to 1 exactly (both come from the full-vocabulary softmax)."""
    return _buckets(*_log_probs(student_logits, teacher_logits, vmap, temperature), vmap)[:2]


def _divergence(name: str) -> Callable[..., Tensor]:
    if name not in EXACT_DIVERGENCES:
        raise ValueError(f"divergence={name!r} is not offered across vocabularies; expected one of {EXACT_DIVERGENCES}")
    return DIVERGENCES[name]


def exact(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vmap: VocabMap,
    *,
    temperature: float | Tensor = 1.0,
    divergence: str = "forward_kl",
    **hyper: float,
) -> Tensor:
    """`divergence` (forward_kl = KL(teacher || student) by default) between the two models' distributions over the
    matched tokens plus one tail bucket (module docstring). Hyper-parameters (beta, lam, mu) are the dense
    function's. (N, V_S), (N, V_T) -> (N,)"""
    fn = _divergence(divergence)
    logq, logp = matched_logprobs(student_logits, teacher_logits, vmap, temperature=temperature)
    return fn(logq, logp, temperature=1.0, **hyper)


# ------------------------------------------------------------------------------------------------------------- ULD
def _sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """sum_i |p_(i) - q_(i)| of descending-sorted rows, the shorter one zero-padded. (N, A), (N, B) -> (N,)"""
    p = torch.sort(p, dim=-1, descending=True).values if p.shape[-1] else p
    q = torch.sort(q, dim=-1, descending=True).values if q.shape[-1] else q
    m = min(p.shape[-1], q.shape[-1])
    # Beyond the shorter length the padding is 0: |x - 0| = x, summed directly (no padded copy).
    return (p[:, :m] - q[:, :m]).abs().sum(-1) + p[:, m:].sum(-1) + q[:, m:].sum(-1)


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vmap: VocabMap | None = None,
    *,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Universal Logit Distillation: sum_i |p_(i) - q_(i)| over the sorted, zero-padded probabilities (module
    docstring; Boizard et al. 2024, arXiv:2402.12030). `vmap` only checks the vocabulary sizes. (N, V_S), (N, V_T)
    -> (N,)"""
    logq, logp = _log_probs(student_logits, teacher_logits, vmap, temperature)
    return _sorted_l1(logp.exp(), logq.exp())


def hybrid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vmap: VocabMap,
    *,
    temperature: float | Tensor = 1.0,
    matched_weight: float = 0.5,
    divergence: str = "forward_kl",
    **hyper: float,
) -> Tensor:
    """GOLD-style hybrid: matched_weight * exact + (1 - matched_weight) * ULD over the unmatched tokens (module
    docstring). (N, V_S), (N, V_T) -> (N,)"""
    if not 0.0 <= matched_weight <= 1.0:
        raise ValueError(f"matched_weight must be in [0, 1], got {matched_weight}")
    fn = _divergence(divergence)
    bq, bp, q_rest, p_rest = _buckets(*_log_probs(student_logits, teacher_logits, vmap, temperature), vmap)
    rest = _sorted_l1(p_rest.exp(), q_rest.exp())
    return matched_weight * fn(bq, bp, temperature=1.0, **hyper) + (1.0 - matched_weight) * rest


CROSS_VOCAB_LOSSES: dict[str, Callable[..., Tensor]] = {"exact": exact, "uld": uld, "hybrid": hybrid}
