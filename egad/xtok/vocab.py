"""The exact vocabulary map between two tokenizers: tokens that stand for the same bytes.

Token strings are compared as the bytes they decode to, not as vocabulary strings: 'Ġthe' (byte-level BPE), '▁the'
(SentencePiece) and ' the' (an added token) are all b" the". Per family, read from the tokenizer's decoder:

* byte-level (GPT-2, Llama 3, Qwen, SmolLM2, egad's own BPE): each character of the token string stands for one byte
  through GPT-2's bytes-to-unicode table;
* SentencePiece-style (a Metaspace decoder, or Replace '▁' -> ' ' with ByteFallback: Llama 2, Gemma, Mistral): '▁' is
  a space and a '<0xHH>' piece is the byte HH;
* otherwise the token string itself, as UTF-8, when the tokenizer has no decoder; a WordPiece vocabulary ('##'
  continuations, spaces implied) has no byte form and is refused (use the `uld` loss, which needs no map).

Added tokens that are not special map to their content's bytes. Special tokens (bos, eos, pad, chat markers) never
match by string; the caller pairs the ones that play the same role (each model's end of turn: `pairs`). When several
ids of one vocabulary give the same bytes (SentencePiece's '▁' and '<0x20>'), the ordinary piece represents them
(before a byte-fallback piece, then the lowest id); the others stay unmatched and fall into the tail bucket.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from egad.losses.cross_vocab import VocabMap
from egad.xtok.align import AlignmentError

__all__ = ["build_vocab_map", "token_bytes"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: printable bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_DECODER = _byte_decoder()


def _family(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignmentError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer: load the fast one (use_fast=True) to map "
            "its vocabulary"
        )
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"))
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"Metaspace"' in decoder or "\u2581" in decoder or "\\u2581" in decoder or '"ByteFallback"' in decoder:
        return "sentencepiece"
    if '"WordPiece"' in decoder:
        raise AlignmentError(
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} is a WordPiece tokenizer: its "
            "tokens have no byte form ('##' continuations, implied spaces), so no exact vocabulary map exists. Use "
            "the 'uld' cross-vocabulary loss, which needs none"
        )
    return "raw"


def _piece_bytes(piece: str, family: str) -> tuple[bytes | None, bool]:
    """(bytes, is a byte-fallback piece) of one vocabulary string."""
    if family == "byte_level":
        try:
            return bytes(_BYTE_DECODER[c] for c in piece), False
        except KeyError:
            return None, False
    if family == "sentencepiece":
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)]), True
        return piece.replace("\u2581", " ").encode("utf-8"), False
    return piece.encode("utf-8"), False


def token_bytes(tokenizer: Any) -> list[tuple[bytes | None, int]]:
    """For every id 0..len(tokenizer) - 1: (the bytes it stands for or None, rank), rank 0 for an ordinary piece,
    1 for a byte-fallback piece, 2 for a non-special added token. Special tokens and unknown ids give None."""
    family = _family(tokenizer)
    out: list[tuple[bytes | None, int]] = [(None, 0)] * len(tokenizer)
    for piece, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        if i < len(out):
            b, fallback = _piece_bytes(piece, family)
            out[i] = (b or None, 1 if fallback else 0)
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if int(i) < len(out):
            content = getattr(tok, "content", str(tok))
            out[int(i)] = (None, 0) if getattr(tok, "special", True) else (content.encode("utf-8") or None, 2)
    return out


def _representatives(tokenizer: Any) -> dict[bytes, int]:
    """bytes -> the id that represents them (lowest rank, then lowest id)."""
    best: dict[bytes, tuple[int, int]] = {}
    for i, (b, rank) in enumerate(token_bytes(tokenizer)):
        if b is not None and (b not in best or (rank, i) < best[b]):
            best[b] = (rank, i)
    return {b: i for b, (_, i) in best.items()}


def build_vocab_map(teacher: Any, student: Any, *, pairs: dict[int, int] | None = None) -> VocabMap:
    """The `VocabMap` of two fast tokenizers: ids whose tokens stand for the same bytes, plus the explicit `pairs`
    {teacher id: student id} (each model's end of turn, say: `egad.data.batches.end_of_turn_id` of each), which take
    precedence over a string match of either id."""
    rep_t, rep_s = _representatives(teacher), _representatives(student)
    matched = {rep_t[b]: rep_s[b] for b in rep_t.keys() & rep_s.keys()}
    pairs = {int(t): int(s) for t, s in (pairs or {}).items()}
    for t, s in pairs.items():
        if not (0 <= t < len(teacher) and 0 <= s < len(student)):
            raise ValueError(f"pair ({t}, {s}) lies outside the vocabularies ({len(teacher)}, {len(student)})")
    taken_s = set(pairs.values())
    if len(taken_s) != len(pairs):
        raise ValueError(f"pairs map two teacher ids to one student id: {pairs}")
    matched = {t: s for t, s in matched.items() if t not in pairs and s not in taken_s}
    matched.update(pairs)
    t_ids = sorted(matched)
    return VocabMap(
        torch.tensor(t_ids, dtype=torch.long),
        torch.tensor([matched[t] for t in t_ids], dtype=torch.long),
        len(teacher),
        len(student),
    )
