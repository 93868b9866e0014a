"""Cross-tokenizer distillation: a teacher and a student whose tokenizers differ.

`align`: teacher and student positions paired at shared token boundaries of the response text.
`vocab`: the exact vocabulary map (tokens whose bytes coincide) that `egad.losses.cross_vocab` reads.
"""

from egad.xtok.align import (
    Alignment,
    AlignmentError,
    AlignmentStats,
    OffsetEncoder,
    align_offsets,
    align_responses,
    token_cuts,
)
from egad.xtok.vocab import build_vocab_map, token_bytes

__all__ = [
    "Alignment",
    "AlignmentError",
    "AlignmentStats",
    "OffsetEncoder",
    "align_offsets",
    "align_responses",
    "build_vocab_map",
    "token_bytes",
    "token_cuts",
]
