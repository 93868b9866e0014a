"""The teacher's side of a cross-tokenizer run's data: each example encoded with the teacher's tokenizer and its own
prompt template, and the (student, teacher) logit positions of the aligned response targets.

The student's items come from `egad.data.batches.tokenized_split` as in any run; `teacher_side` encodes the same records
for the teacher (`format_prompt` with the teacher's tokenizer, so a chat template is each model's own; the response
encoded alone, its end of turn the teacher's `end_of_turn_id`; the same `max_prompt_len` / `max_len` truncation) and
aligns the two responses (`egad.xtok.align`): only the response is distilled, and a student target whose cut has no
teacher counterpart keeps the cross-entropy only. `collate_teacher` batches the teacher's side of a student batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from egad.config.schema import ConfigError
from egad.data import batches as D
from egad.models.load import try_load_tokenizer
from egad.xtok.align import Alignment, AlignmentError, AlignmentStats, OffsetEncoder, align_offsets, token_cuts

log = logging.getLogger("egad.xtok")

__all__ = ["TeacherSide", "collate_teacher", "is_cross", "teacher_side", "teacher_tokenizer"]


@dataclass
class TeacherSide:
    """Per item of the student's split (same order): the teacher's input ids, and the aligned targets' logit
    positions in each model's sequence (`student_pos[i][j]` pairs with `teacher_pos[i][j]`)."""

    input_ids: list[list[int]] = field(default_factory=list)
    student_pos: list[list[int]] = field(default_factory=list)
    teacher_pos: list[list[int]] = field(default_factory=list)
    stats: AlignmentStats = field(default_factory=AlignmentStats)


def _targets(item: dict) -> tuple[int, int]:
    """(prompt length, response targets kept) of a tokenized item."""
    labels = item["labels"]
    prompt = sum(1 for x in labels if x == D.IGNORE_INDEX)
    return prompt, len(labels) - prompt


def _align(off_t, off_s, ids_t, ids_s, text: str, where: str) -> Alignment:
    a = align_offsets(off_t, off_s, text, end_token=True, strict=True, where=where)
    if ids_t == ids_s and a.aligned < a.n_student:  # the same tokens: one to one, byte pieces included
        k = tuple(range(a.n_student))
        a = Alignment(k, k, tuple(token_cuts(off_s, len(text))[: a.n_student]), a.n_teacher, a.n_student)
    return a


def teacher_side(
    data_cfg: Any, which: str, student_items: list[dict], teacher_tok: Any, student_tok: Any
) -> TeacherSide:
    """The teacher's side of the student's tokenized `which` split ('train' or 'dev') of `data_cfg`. Refuses
    (`AlignmentError`) a tokenizer without offsets, offsets that do not tile a response, and a response whose two
    tokenisations share no boundary; the message names the data line."""
    d = data_cfg
    source, split, n = (d.train, d.train_split, d.max_train_examples) if which == "train" else (
        d.dev, d.dev_split, d.max_dev_examples)  # fmt: skip
    records, _ = D.load_records(source, split, max_examples=n)
    enc_t, enc_s = OffsetEncoder(teacher_tok, "teacher"), OffsetEncoder(student_tok, "student")
    eos_t, eos_s = D.end_of_turn_id(teacher_tok, d.template), D.end_of_turn_id(student_tok, d.template)
    out = TeacherSide()
    step = 512
    for start in range(0, len(student_items), step):
        items = student_items[start : start + step]
        exs = [records[it["index"]] for it in items]
        texts = [ex.response for ex in exs]
        prompts = teacher_tok([D.format_prompt(ex, d.template, teacher_tok) for ex in exs], add_special_tokens=False)
        rows = zip(items, exs, texts, prompts["input_ids"], enc_t(texts), enc_s(texts), strict=True)
        for item, ex, text, p_ids, (ids_t, off_t), (ids_s, off_s) in rows:
            where = f"{source}:{ex.source_line}: the response"
            p_s, n_s = _targets(item)
            if item["labels"][p_s:] != (list(ids_s) + [eos_s])[:n_s]:
                raise AlignmentError(
                    f"{where}: the student tokenizer {enc_s.name} encodes it differently with offsets than without; "
                    "save it with a tokenizer.json (a fast tokenizer) and retry"
                )
            t_item = D._assemble(p_ids, ids_t, eos_t, d.max_prompt_len, d.max_len)
            p_t, n_t = _targets(t_item)
            a = _align(off_t, off_s, list(ids_t), list(ids_s), text, where).clip(n_t, n_s)
            out.stats.add(a)
            t_pos, s_pos = a.logit_positions(p_t, p_s) if a.aligned else (torch.zeros(0), torch.zeros(0))
            out.input_ids.append(t_item["input_ids"])
            out.student_pos.append([int(x) for x in s_pos])
            out.teacher_pos.append([int(x) for x in t_pos])
    log.info("cross-tokenizer %s split: %s", which, out.stats.summary())
    return out


def collate_teacher(side: TeacherSide, positions: list[int], student_width: int, pad_id: int) -> dict[str, Tensor]:
    """The teacher's side of the student batch made of split items `positions` (in batch order; the student's batch
    is (B, student_width)): teacher_input_ids and teacher_attention_mask (B, L_T), right-padded, and the aligned
    rows as flat indices, student_rows into (B * student_width) and teacher_rows into (B * L_T), both (A,)."""
    batch = D.collate([{"input_ids": side.input_ids[i], "labels": side.input_ids[i]} for i in positions], pad_id)
    width = batch["input_ids"].shape[1]
    s_rows, t_rows = [], []
    for b, i in enumerate(positions):
        s_rows += [b * student_width + p for p in side.student_pos[i]]
        t_rows += [b * width + p for p in side.teacher_pos[i]]
    return {
        "teacher_input_ids": batch["input_ids"],
        "teacher_attention_mask": batch["attention_mask"],
        "student_rows": torch.tensor(s_rows, dtype=torch.long),
        "teacher_rows": torch.tensor(t_rows, dtype=torch.long),
    }


def is_cross(cfg) -> bool:
    """True when the run distils across tokenizers (objective.cross_vocab set and a teacher term on)."""
    return cfg.objective.cross_vocab != "none" and cfg.objective.uses_teacher


def teacher_tokenizer(cfg, run_tokenizer):
    """The teacher's own tokenizer in a cross-tokenizer run: model.teacher_tokenizer, else the teacher model's, else
    (a teacher built from model.teacher_config) the run's, as in a same-tokenizer run. None in any other run."""
    if not is_cross(cfg):
        return None
    m = cfg.model
    source = m.teacher_tokenizer or m.teacher
    if not source:
        return run_tokenizer
    tok = try_load_tokenizer(source, m.revision, m.trust_remote_code)
    if tok is None:
        raise ConfigError(
            f"objective.cross_vocab={cfg.objective.cross_vocab!r} needs the teacher's own tokenizer and none could be "
            f"loaded from {source!r}: set model.teacher_tokenizer to a tokenizer folder or hub id"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
