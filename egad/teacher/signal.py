"""What the objective receives from the teacher. The objective never knows where the teacher ran.

`DenseSignal` wraps a live teacher forward: full logits (B, L, V_T) and, optionally, the hidden states of the mapped
layers. A cached top-k signal (issue: offline teacher cache) will implement the same `rows` / `features_at` methods.
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
