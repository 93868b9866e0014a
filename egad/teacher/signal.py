"""What the objective receives from the teacher. The objective never knows where the teacher ran.

`DenseSignal` wraps a live teacher forward: full logits (B, L, V_T) and, optionally, the hidden states of the mapped
layers. A cached top-k signal (issue: offline teacher cache) will implement the same `rows` / `features_at` methods.

`TopKSignal` is that cached signal: per token the teacher's top-k ids and log-probs at tau=1, the log of the mass
left outside them, and the exact entropy. It serves `rows_topk` / `entropy_at` in place of `rows`; the sparse losses
in `egad.losses.sparse` consume what `rows_topk` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
        return flat.index_select(0, flat_index)[:, :vocab_size].float()

    def features_at(self, flat_index: Tensor) -> list[Tensor]:
        """Mapped-layer hidden states at flattened positions. -> K tensors of (C, d_T)."""
        if not self.features:
            raise ValueError(
                "the objective routes tokens to the feature branch but the teacher signal has no "
                "hidden states; run the teacher with the mapped layers captured, or set beta_f=0"
            )
        return [h.reshape(-1, h.shape[-1]).index_select(0, flat_index) for h in self.features]


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
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    entropy: Tensor
    features: list[Tensor] | None = None
    vocab_rows: int | None = None
    feature_mask: Tensor | None = None

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def rows_topk(self, flat_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k ids (C, k) long, log-probs (C, k) fp32 and tail log-mass (C,) fp32 at flattened (B*L) positions."""
        k = self.k
        ids = self.ids.reshape(-1, k).index_select(0, flat_index).long()
        logprobs = self.logprobs.reshape(-1, k).index_select(0, flat_index).float()
        tail = self.tail_logmass.reshape(-1).index_select(0, flat_index).float()
        return ids, logprobs, tail

    def entropy_at(self, flat_index: Tensor) -> Tensor:
        """Exact teacher entropy at tau=1 at flattened positions, fp32. -> (C,)."""
        return self.entropy.reshape(-1).index_select(0, flat_index).float()

    # The hidden states are stored exactly as in the dense signal, so the dense accessor applies unchanged.
    features_at = DenseSignal.features_at
