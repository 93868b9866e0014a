"""What the objective receives from the teacher, whatever ran it: the one teacher-source interface.

A *source* (`TeacherSource`: the live `OnlineTeacher`, the offline `TeacherCache`) turns a collated batch into a
*signal* (`TeacherSignal`). The objective asks a signal only for chunks of response positions (`chunk`), the
hidden states of the mapped layers (`features_at`) and where those are valid (`feature_mask_at`); a chunk
(`TeacherChunk`) answers the exact entropy, the Hellinger distance to the student and any per-token divergence. So
the objective never branches on where the teacher came from, and a new source (a fused teacher head, a sharded
teacher) is one more implementation of these three small protocols.

Implementations here:

* `DenseSignal`: full teacher logits (B, L, V_T), from a live forward.
* `FusedSignal`: the teacher's final hidden state (B, L, d_T) and its head; each chunk's logits are projected when the
  chunk is asked for, under no_grad, so the teacher's full logits never exist.
* `TopKSignal`: the cached top-k ids and log-probs at tau = 1, the tail log-mass and the exact entropy, and, from a
  format-2 cache, a sample of the tail; its chunks run the sparse losses of `egad.losses.sparse`, the tail as one
  bucket or, for the losses that can use it (`SAMPLED_DIVERGENCES`), as its sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from egad.losses.divergences import DIVERGENCES, hellinger_from_logprobs
from egad.losses.fused_kl import forward_kl_and_ce_fast, forward_kl_fast
from egad.losses.sparse import (
    SAMPLED_DIVERGENCES,
    SPARSE_DIVERGENCES,
    TailSample,
    forward_kl_and_ce,
    tempered_tail,
)
from egad.losses.sparse_buckets import student_bucket_logprobs, teacher_bucket_logprobs
from egad.models.heads import OutputHead
from egad.plan.entropy import token_entropy


class TeacherChunk(Protocol):
    """The teacher at one chunk of C response positions."""

    def entropy(self, temperature: float = 1.0) -> Tensor:
        """Exact teacher entropy (nats, fp32) of softmax(z_T / temperature). -> (C,)"""
        ...

    def hellinger(self, student_logits: Tensor) -> Tensor:
        """Hellinger distance between the teacher and the student (C, V) at tau = 1. -> (C,)"""
        ...

    def divergence(self, name: str, student_logits: Tensor, temperature: Tensor, **hyper: float) -> Tensor:
        """Per-token divergence `name` of egad.losses.divergences between teacher and student at the per-token
        temperatures (C,), without the tau^2 factor. -> (C,), differentiable in student_logits."""
        ...


class TeacherSignal(Protocol):
    """The teacher over one micro-batch (B, L), read at flattened (B*L) positions."""

    @property
    def vocab_rows(self) -> int | None:
        """The teacher's logit row count (for the shared-vocabulary check), or None when unknown."""
        ...

    def chunk(self, flat_index: Tensor, vocab_size: int) -> TeacherChunk:
        """The teacher at these positions, over the first `vocab_size` (shared) vocabulary entries."""
        ...

    def features_at(self, flat_index: Tensor) -> list[Tensor]:
        """Mapped-layer hidden states at these positions: K tensors (C, d_T)."""
        ...

    def feature_mask_at(self, flat_index: Tensor) -> Tensor | None:
        """(C,) bool: where `features_at` holds a real hidden state; None when it does everywhere."""
        ...


class TeacherSource(Protocol):
    """Where signals come from: `signal(batch)` for a collated training batch (input_ids, attention_mask, labels,
    and `train_index`, the items' positions in the tokenized training split)."""

    def signal(self, batch: dict[str, Tensor]) -> TeacherSignal: ...


def _all_one(temperature: Tensor | float) -> bool:
    if isinstance(temperature, Tensor):
        return bool((temperature == 1.0).all())
    return float(temperature) == 1.0


def _no_features() -> ValueError:
    return ValueError(
        "the objective routes tokens to the feature branch but the teacher signal has no hidden states; run the "
        "teacher with the mapped layers captured (or cache them with --hidden-quantile), or set beta_f=0"
    )


def _gather_features(features: list[Tensor] | None, flat_index: Tensor) -> list[Tensor]:
    if not features:
        raise _no_features()
    return [h.reshape(-1, h.shape[-1])[flat_index] for h in features]


# --------------------------------------------------------------------------------------------------------------- dense
@dataclass
class DenseChunk:
    """Teacher logits of a chunk, fp32, shared vocabulary. (C, V)"""

    logits: Tensor

    def entropy(self, temperature: float = 1.0) -> Tensor:
        # Not a compiled kernel: the plan's decisions read these bits, which must not depend on the chunk a row lands
        # in. A torch.compile kernel was 12x faster at V = 49,152, but its variant for one row rounds differently.
        return token_entropy(self.logits, temperature=temperature)

    def hellinger(self, student_logits: Tensor) -> Tensor:
        return hellinger_from_logprobs(student_logits.log_softmax(-1), self.logits.log_softmax(-1))

    def divergence(self, name: str, student_logits: Tensor, temperature: Tensor, **hyper: float) -> Tensor:
        if name == "forward_kl":  # KD's default: the same maths with a hand-written backward, in fewer passes
            return forward_kl_fast(student_logits, self.logits, temperature=temperature)
        return DIVERGENCES[name](student_logits, self.logits, temperature=temperature, **hyper)

    def divergence_and_ce(
        self, name: str, student_logits: Tensor, temperature: Tensor, targets: Tensor, **hyper: float
    ) -> tuple[Tensor, Tensor | None]:
        """The divergence and, where it can share the student's normaliser (forward KL at tau = 1 on every token),
        the cross-entropy at `targets`; else (divergence, None)."""
        if name == "forward_kl" and _all_one(temperature):
            return forward_kl_and_ce_fast(student_logits, self.logits, targets)
        return self.divergence(name, student_logits, temperature, **hyper), None


@dataclass
class DenseSignal:
    """A dense teacher signal: logits (B, L, V_T) in any dtype, and mapped-layer hidden states (B, L, d_T)."""

    logits: Tensor
    features: list[Tensor] | None = None

    @property
    def vocab_rows(self) -> int:
        return self.logits.shape[-1]

    def rows(self, flat_index: Tensor, vocab_size: int) -> Tensor:
        """Teacher logits at flattened (B*L) positions, sliced to the shared vocabulary, fp32. -> (C, V)."""
        flat = self.logits.reshape(-1, self.logits.shape[-1])
        return flat[flat_index][:, :vocab_size].float()

    def chunk(self, flat_index: Tensor, vocab_size: int) -> DenseChunk:
        return DenseChunk(self.rows(flat_index, vocab_size))

    def features_at(self, flat_index: Tensor) -> list[Tensor]:
        return _gather_features(self.features, flat_index)

    def feature_mask_at(self, flat_index: Tensor) -> None:
        return None


@dataclass
class FusedSignal:
    """A live teacher given as its last hidden state (B, L, d_T) and its `OutputHead`: chunks are projected on demand
    (in fp32 from the chunk's hidden rows), never the whole (B, L, V_T) logits."""

    hidden: Tensor
    head: OutputHead
    features: list[Tensor] | None = None
    projections: int = field(default=0, init=False)
    """Chunks projected so far: the teacher head GEMMs this signal has run (benchmarks read it)."""

    def __post_init__(self) -> None:
        self._flat = self.hidden.reshape(-1, self.hidden.shape[-1])

    @property
    def vocab_rows(self) -> int:
        return self.head.rows

    @torch.no_grad()
    def chunk(self, flat_index: Tensor, vocab_size: int) -> DenseChunk:
        self.projections += 1
        h = self._flat[flat_index].float()
        head = self.head
        w = head.weight[:vocab_size].float()
        b = None if head.bias is None else head.bias[:vocab_size].float()
        return DenseChunk(OutputHead(w, b, head.hidden_scale, head.logit_scale, head.softcap).logits(h))

    def features_at(self, flat_index: Tensor) -> list[Tensor]:
        return _gather_features(self.features, flat_index)

    def feature_mask_at(self, flat_index: Tensor) -> None:
        return None


# --------------------------------------------------------------------------------------------------------------- top-k
@dataclass
class TopKChunk:
    """Cached teacher at a chunk: top-k ids (C, k), log-probs (C, k) and tail log-mass (C,) at tau = 1, the exact
    entropy (C,), all fp32 but the ids, and the tail sample at these rows (C, S) or None."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    exact_entropy: Tensor
    vocab_size: int
    sample: TailSample | None = None

    def entropy(self, temperature: float = 1.0) -> Tensor:
        if temperature != 1.0:
            raise ValueError(
                f"a cached teacher stores its entropy at tau=1 only, not at {temperature}; set ea_temperature=1.0"
            )
        return self.exact_entropy

    def hellinger(self, student_logits: Tensor) -> Tensor:
        logq = student_bucket_logprobs(student_logits, self.ids)
        return hellinger_from_logprobs(logq, teacher_bucket_logprobs(self.logprobs, self.tail))

    def divergence(self, name: str, student_logits: Tensor, temperature: Tensor, **hyper: float) -> Tensor:
        # TTM / WTTM power the teacher by gamma after tempering: the tail is matched at the total exponent gamma/tau.
        fn = SPARSE_DIVERGENCES[name]
        if self.sample is not None and name in SAMPLED_DIVERGENCES:
            return fn(student_logits, self.ids, self.logprobs, self.tail, temperature=temperature, sample=self.sample,
                      **hyper)  # fmt: skip
        exponent = hyper.get("gamma", 1.0) / temperature if name in ("ttm", "wttm") else 1.0 / temperature
        tail = tempered_tail(
            self.logprobs, self.tail, self.exact_entropy, exponent, vocab_size=self.vocab_size, sample=self.sample
        )
        return fn(student_logits, self.ids, self.logprobs, tail, temperature=temperature, **hyper)

    def divergence_and_ce(
        self, name: str, student_logits: Tensor, temperature: Tensor, targets: Tensor, **hyper: float
    ) -> tuple[Tensor, Tensor | None]:
        """As `DenseChunk.divergence_and_ce`, for the sampled forward KL at any temperature: at tau = 1 it reads the CE
        from its own atoms, elsewhere from one in-place pass of the same kind (`sparse.forward_kl_and_ce`)."""
        if name == "forward_kl" and self.sample is not None:
            tau = 1.0 if _all_one(temperature) else temperature
            args = (student_logits, self.ids, self.logprobs, self.tail, self.sample, targets)
            return forward_kl_and_ce(*args, temperature=tau)
        return self.divergence(name, student_logits, temperature, **hyper), None


@dataclass
class TopKSignal:
    """A cached (offline) teacher signal, teacher at temperature 1.

    ids: (B, L, k) long, the teacher's top-k token ids, sorted by probability, highest first.
    logprobs: (B, L, k) any float dtype, log p at those ids (descending).
    tail_logmass: (B, L), log(1 - sum of the top-k probabilities); -inf when k = V (nothing is left out).
    entropy: (B, L) fp32, the exact teacher entropy over the full vocabulary (the top-k cannot give it back).
    features: mapped-layer hidden states (B, L, d_T), or None; valid where `feature_mask` says so.
    vocab_rows: the teacher's logit row count (for the shared-vocabulary check), or None when unknown.
    feature_mask: (B, L) bool, True where `features` hold a stored hidden state, or None when stored everywhere. The
        offline cache keeps hidden states only for high-entropy tokens and leaves zeros elsewhere.
    tail_sample: ids (B, L, S) drawn from the tail, their log-probs (B, L, S) and log sum_tail p^b (B, L)
        (`egad.losses.sparse_tail.TailSample`), or None: the tail is then one bucket for every loss.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    entropy: Tensor
    features: list[Tensor] | None = None
    vocab_rows: int | None = None
    feature_mask: Tensor | None = None
    tail_sample: TailSample | None = None

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def rows_topk(self, flat_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k ids (C, k) long, log-probs (C, k) fp32 and tail log-mass (C,) fp32 at flattened (B*L) positions."""
        k = self.k
        ids = self.ids.reshape(-1, k)[flat_index].long()
        logprobs = self.logprobs.reshape(-1, k)[flat_index].float()
        tail = self.tail_logmass.reshape(-1)[flat_index].float()
        return ids, logprobs, tail

    def entropy_at(self, flat_index: Tensor) -> Tensor:
        """Exact teacher entropy at tau=1 at flattened positions, fp32. -> (C,)."""
        return self.entropy.reshape(-1)[flat_index].float()

    def chunk(self, flat_index: Tensor, vocab_size: int) -> TopKChunk:
        sample = None if self.tail_sample is None else self.tail_sample.rows(flat_index)
        return TopKChunk(*self.rows_topk(flat_index), self.entropy_at(flat_index), vocab_size, sample)

    def features_at(self, flat_index: Tensor) -> list[Tensor]:
        return _gather_features(self.features, flat_index)

    def feature_mask_at(self, flat_index: Tensor) -> Tensor | None:
        if self.feature_mask is None:
            return None
        return self.feature_mask.reshape(-1)[flat_index.to(self.feature_mask.device)]


@torch.no_grad()
def chunk_signals(t: TeacherChunk, zs: Tensor, need: set[str], ea_tau: float) -> dict[str, Tensor]:
    """The per-token signals of one chunk, from its teacher chunk and its student logits (C, V), no grad."""
    sig: dict[str, Tensor] = {}
    if "entropy" in need:
        sig["entropy"] = t.entropy()
    if "entropy_ea" in need:
        sig["entropy_ea"] = t.entropy(ea_tau)
    if "student_entropy" in need:
        sig["student_entropy"] = token_entropy(zs.detach())
    if "student_ea" in need:
        sig["student_ea"] = token_entropy(zs.detach(), temperature=ea_tau)
    if "hellinger" in need:
        sig["hellinger"] = t.hellinger(zs.detach())
    return sig
