"""Teacher and student positions paired at shared token boundaries of the response text.

THE SETTING. egad's data layer (`egad.data.batches.tokenize_example`) formats the prompt with each model's own template
(alpaca, or each tokenizer's own chat template: its special tokens, its system text), encodes prompt and response
separately (no special tokens added) and appends each model's own end-of-turn token. Only response targets are
distilled (prompt labels are -100), so the two sequences are aligned over the response text alone: the prompts are
never compared, and their lengths only shift positions (`Alignment.logit_positions`).

TARGETS. A response that encodes to n tokens gives n + 1 targets, k = 0..n, the last one the end of turn. Target k is
predicted at logit position P + k - 1 (P the prompt length) after reading the prompt and the response tokens < k.

CUTS. The cut of target k is the character offset c_k with the tokens < k covering text[:c_k] and the tokens >= k
covering text[c_k:]. From the offsets, E_k = max end of the tokens < k and S_k = min start of the tokens >= k:
  * E_k == S_k: c_k = E_k;
  * E_k > S_k: the tokens overlap, which is what byte pieces of one character look like (byte-level BPE or SentencePiece
    byte fallback splitting a multi-byte character give each piece the whole character's offsets): no clean cut, -1;
  * E_k < S_k: text[E_k:S_k] belongs to no token (the whitespace that a WordPiece or Whitespace pre-tokenizer drops);
    it goes to the next token, as the leading space of a byte-level or SentencePiece token does: c_k = E_k.
c_0 = 0 and c_n = len(text) hold by construction: each model's prompt ends where the response starts, each end of
turn follows the whole text. A cut value held by several targets of one side (zero-width tokens) keeps the last.

TRIMMED OFFSETS. A byte-level post-processor with trim_offsets=True (`processors.ByteLevel`, `RobertaProcessing`)
moves the start of a 'Ġ' token past its leading spaces and the end of a whitespace token before its trailing ones,
so the same text would cut differently by a flag: in "\\n\\n  x", 'ĊĊĠ' + 'Ġx' give (0, 3), (3, 5) untrimmed and
(0, 2), (4, 5) trimmed, and the gap rule puts the cut at 2, not 3. `OffsetEncoder` encodes with trimming off (the
ids do not change; it checks), so a cut never depends on the flag.

ALIGNMENT. Teacher target k_T and student target k_S pair when c^T_{k_T} = c^S_{k_S} >= 0: both models have read the
same text and predict the token that starts at the same character, each over its own vocabulary. Between two
aligned cuts either side may hold any number of tokens. The first target (c = 0) and the end of turn (c = len(text))
always align.

WHAT AN UNALIGNED STUDENT TARGET LEARNS. Its cut falls inside a teacher token (or inside a character): the teacher has
no distribution over the student's next piece there, only over pieces that start at the teacher's own cuts. Such a
target is masked out of every distillation term (KD, and the feature loss that pairs hidden states) and keeps the
cross-entropy on its true next token: it counts in the CE's token count and acts as KD weight 0. (GOLD instead merges
a span's probabilities by the chain rule so that no target is dropped; that is a possible later refinement.) Unaligned
teacher targets are simply not used. `Alignment.share`, and `AlignmentStats` over a data set, report the share of
student targets that are aligned.

REFUSALS (`AlignmentError`, an `egad.errors.EgadError`, naming the tokenizer and the fix):
  * a tokenizer without offsets: a slow (Python) tokenizer;
  * offsets that do not tile the response: out of range, starts going backwards, or a non-whitespace character that
    no token covers (offsets all (0, 0) look like that): the tokenizer drops or rewrites text;
  * a response of several words whose two tokenisations share no boundary inside it (`strict=True`): byte-level,
    SentencePiece and WordPiece pre-tokenizers all cut where the whitespace before a word begins, so disagreeing on
    every word boundary means the offsets are not comparable (byte offsets against character offsets, or two
    different texts). A one-word response may legitimately share none ('Lib|eria' against 'L|iber|ia').
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from egad.errors import EgadError

__all__ = [
    "Alignment",
    "AlignmentError",
    "AlignmentStats",
    "OffsetEncoder",
    "align_offsets",
    "align_responses",
    "token_cuts",
]

Offsets = Sequence[tuple[int, int]]


class AlignmentError(EgadError):
    """Two tokenisations that cannot be aligned; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------------- encoding
def _untrimmed(spec: Any) -> bool:
    """Turn trim_offsets off in a post-processor spec (in place); True when something changed."""
    if not isinstance(spec, dict):
        return False
    changed = False
    if spec.get("type") in ("ByteLevel", "RobertaProcessing") and spec.get("trim_offsets"):
        spec["trim_offsets"] = False
        changed = True
    for sub in spec.get("processors") or []:
        changed |= _untrimmed(sub)
    return changed


class OffsetEncoder:
    """A fast tokenizer's ids and untrimmed character offsets for texts encoded without special tokens (the way
    `egad.data.batches` encodes a response). Refuses a tokenizer without offsets. `role` names it in errors."""

    def __init__(self, tokenizer: Any, role: str = "tokenizer"):
        self.tokenizer, self.role = tokenizer, role
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.name = f"{role} tokenizer {name!r}"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not getattr(tokenizer, "is_fast", False) or backend is None:
            raise AlignmentError(
                f"the {self.name} ({type(tokenizer).__name__}) is a slow (Python) tokenizer: it gives no character "
                "offsets, so its tokens cannot be placed in the text. Load the fast one "
                "(AutoTokenizer.from_pretrained(..., use_fast=True)), or save it with a tokenizer.json"
            )
        spec = json.loads(backend.to_str())
        self._backend = None
        if _untrimmed(spec.get("post_processor")):
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(json.dumps(spec))

    def __call__(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """[(ids, offsets)] per text; offsets are (start, end) character offsets into the text."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if self._backend is None:
            return [(list(i), [tuple(o) for o in offs]) for i, offs in zip(ids, enc["offset_mapping"], strict=True)]
        out = []
        for i, e in zip(ids, self._backend.encode_batch(list(texts), add_special_tokens=False), strict=True):
            if list(i) != e.ids:
                raise AlignmentError(
                    f"the {self.name}: re-encoding with trim_offsets off changed the ids; its offsets cannot be "
                    "untrimmed. Save the tokenizer with trim_offsets=False in its post-processor"
                )
            out.append((list(i), [tuple(o) for o in e.offsets]))
        return out


# ----------------------------------------------------------------------------------------------------------- cuts
def _check_offsets(offsets: Offsets, text: str, who: str) -> None:
    n_text, last_start = len(text), 0
    covered = [0] * (n_text + 1)  # a difference array of the covered characters
    for k, (s, e) in enumerate(offsets):
        if not 0 <= s <= e <= n_text or s < last_start:
            raise AlignmentError(
                f"{who}: token {k} has offsets ({s}, {e}) in a {n_text}-character response (previous start "
                f"{last_start}); offsets must lie in the text in reading order. Encode the response text alone, "
                "with character (not byte) offsets"
            )
        last_start = s
        if s < e:
            covered[s] += 1
            covered[e] -= 1
    depth = 0
    for i, ch in enumerate(text):
        depth += covered[i]
        if depth == 0 and not ch.isspace():
            raise AlignmentError(
                f"{who}: character {i} ({ch!r}) of the response is covered by no token: the tokenizer's offsets do "
                "not tile the text (they drop or rewrite it, or are all (0, 0)), so its tokens cannot be aligned. "
                "Use a fast tokenizer whose offsets map to the original text"
            )


def token_cuts(offsets: Offsets, text_len: int) -> list[int]:
    """The cut of every target k = 0..n (n = len(offsets); k = n is the end of turn): the character offset before
    the token that target k predicts, or -1 where the tokens overlap (byte pieces of one character). See the module
    docstring for the rule. -> list of n + 1 ints"""
    n = len(offsets)
    suffix_start = [text_len] * (n + 1)
    for k in range(n - 1, -1, -1):
        suffix_start[k] = min(offsets[k][0], suffix_start[k + 1])
    cuts, end = [0] * (n + 1), 0
    for k in range(1, n):
        end = max(end, offsets[k - 1][1])
        cuts[k] = end if end <= suffix_start[k] else -1
    if n:
        cuts[n] = text_len
    return cuts


def _word_boundary(text: str) -> bool:
    """True when a word follows whitespace after some non-space text: every common pre-tokenizer cuts there."""
    seen_word, in_space = False, False
    for ch in text:
        if ch.isspace():
            in_space = seen_word
        elif in_space:
            return True
        else:
            seen_word = True
    return False


def _last_per_cut(cuts: list[int]) -> dict[int, int]:
    """cut -> the last target holding it (clean cuts only)."""
    return {c: k for k, c in enumerate(cuts) if c >= 0}


# ------------------------------------------------------------------------------------------------------ alignment
@dataclass(frozen=True)
class Alignment:
    """Aligned targets of one response. `teacher[i]` and `student[i]` are target indices (0..n_teacher - 1 and
    0..n_student - 1, increasing) at the same cut `cuts[i]` (a character offset). n_*: targets on each side (response
    tokens + the end of turn when `end_token`)."""

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    cuts: tuple[int, ...]
    n_teacher: int
    n_student: int

    @property
    def aligned(self) -> int:
        return len(self.student)

    @property
    def share(self) -> float:
        """Aligned student targets / student targets (1.0 for an empty response)."""
        return self.aligned / self.n_student if self.n_student else 1.0

    def student_mask(self) -> Tensor:
        """(n_student,) bool: True where the student target has a teacher counterpart (it gets the KD term)."""
        mask = torch.zeros(self.n_student, dtype=torch.bool)
        mask[list(self.student)] = True
        return mask

    def teacher_for_student(self) -> Tensor:
        """(n_student,) long: the teacher target paired with each student target, -1 where none."""
        out = torch.full((self.n_student,), -1, dtype=torch.long)
        out[list(self.student)] = torch.tensor(self.teacher, dtype=torch.long)
        return out

    def clip(self, n_teacher: int, n_student: int) -> Alignment:
        """The alignment after truncation kept the first n_teacher and n_student targets of each side."""
        pairs = zip(self.teacher, self.student, strict=True)
        keep = [i for i, (t, s) in enumerate(pairs) if t < n_teacher and s < n_student]
        return Alignment(
            tuple(self.teacher[i] for i in keep),
            tuple(self.student[i] for i in keep),
            tuple(self.cuts[i] for i in keep),
            min(n_teacher, self.n_teacher),
            min(n_student, self.n_student),
        )

    def logit_positions(self, teacher_prompt_len: int, student_prompt_len: int) -> tuple[Tensor, Tensor]:
        """(teacher, student) logit positions in each model's sequence (prompt + targets): target k is predicted at
        prompt_len + k - 1. Both (aligned,) long."""
        if teacher_prompt_len < 1 or student_prompt_len < 1:
            raise ValueError("each side needs a prompt of at least one token: the first target is predicted from it")
        t = torch.tensor(self.teacher, dtype=torch.long) + (teacher_prompt_len - 1)
        s = torch.tensor(self.student, dtype=torch.long) + (student_prompt_len - 1)
        return t, s


def align_offsets(
    teacher_offsets: Offsets,
    student_offsets: Offsets,
    text: str,
    *,
    end_token: bool = True,
    strict: bool = True,
    where: str = "the response",
) -> Alignment:
    """Align two tokenisations of `text` (offsets: untrimmed (start, end) character offsets of each token, as
    `OffsetEncoder` gives them). `end_token`: each side's targets end with an end-of-turn token after the text (as
    `egad.data.batches` builds them). `strict`: refuse a response with no shared boundary inside it although both sides
    cut it (module docstring, REFUSALS); otherwise such a response keeps only its trivial cuts. `where` names the
    response in errors."""
    _check_offsets(teacher_offsets, text, f"{where}, teacher")
    _check_offsets(student_offsets, text, f"{where}, student")
    n_text = len(text)
    cut_t, cut_s = token_cuts(teacher_offsets, n_text), token_cuts(student_offsets, n_text)
    if not end_token:
        cut_t, cut_s = cut_t[:-1], cut_s[:-1]
    last_t = _last_per_cut(cut_t)
    pairs = [(last_t[c], k, c) for c, k in _last_per_cut(cut_s).items() if c in last_t]
    if strict and not any(0 < c < n_text for _, _, c in pairs) and _word_boundary(text):
        raise AlignmentError(
            f"{where}: the teacher's and the student's tokens share no boundary inside the text although it has "
            f"several words (teacher cuts {sorted(c for c in last_t if 0 < c < n_text)[:8]}, student cuts "
            f"{sorted(c for c in cut_s if 0 < c < n_text)[:8]}, text {text[:60]!r}): the offsets are not "
            "comparable. Encode the same response text with both tokenizers, with character offsets "
            "(OffsetEncoder); pass strict=False to keep such a response with its first and last targets only"
        )
    pairs.sort(key=lambda p: p[2])
    return Alignment(
        tuple(p[0] for p in pairs),
        tuple(p[1] for p in pairs),
        tuple(p[2] for p in pairs),
        len(cut_t),
        len(cut_s),
    )


@dataclass
class AlignmentStats:
    """Totals over many responses: targets on each side and aligned targets."""

    responses: int = 0
    teacher_targets: int = 0
    student_targets: int = 0
    aligned: int = 0

    def add(self, a: Alignment) -> None:
        self.responses += 1
        self.teacher_targets += a.n_teacher
        self.student_targets += a.n_student
        self.aligned += a.aligned

    @property
    def share(self) -> float:
        """Aligned student targets / student targets."""
        return self.aligned / self.student_targets if self.student_targets else 1.0

    @property
    def teacher_share(self) -> float:
        """Aligned teacher targets / teacher targets."""
        return self.aligned / self.teacher_targets if self.teacher_targets else 1.0

    def summary(self) -> str:
        return (
            f"{self.responses} responses: {self.aligned} aligned targets = {self.share:.1%} of the student's "
            f"{self.student_targets} and {self.teacher_share:.1%} of the teacher's {self.teacher_targets}"
        )


def align_responses(
    teacher: Any,
    student: Any,
    responses: Sequence[str],
    *,
    end_token: bool = True,
    strict: bool = True,
) -> tuple[list[Alignment], AlignmentStats]:
    """Encode each response with both tokenizers (or `OffsetEncoder`s) and align them: ([Alignment], totals). Two
    identical token sequences align one to one, byte pieces inside a character included (their cut is -1 in
    `Alignment.cuts`); otherwise such pieces stay unaligned."""
    enc_t = teacher if isinstance(teacher, OffsetEncoder) else OffsetEncoder(teacher, "teacher")
    enc_s = student if isinstance(student, OffsetEncoder) else OffsetEncoder(student, "student")
    stats, out = AlignmentStats(), []
    rows = zip(responses, enc_t(responses), enc_s(responses), strict=True)
    for i, (text, (ids_t, off_t), (ids_s, off_s)) in enumerate(rows):
        a = align_offsets(off_t, off_s, text, end_token=end_token, strict=strict, where=f"response {i}")
        if ids_t == ids_s and a.aligned < a.n_student:
            # The same tokens: the same text before every target, byte pieces of a character included.
            k = tuple(range(a.n_student))
            a = Alignment(k, k, tuple(token_cuts(off_s, len(text))[: a.n_student]), a.n_teacher, a.n_student)
        stats.add(a)
        out.append(a)
    return out, stats
