"""A cross-tokenizer run's parts (objective.cross_vocab): the teacher's tokenizer, the teacher's side of the training
data with its alignment, the vocabulary map and the online `CrossTeacher`. `egad.train.run_parts.build_parts` calls
them."""

from __future__ import annotations

import logging

from egad.config.run_config import RunConfig
from egad.config.schema import ConfigError
from egad.data import batches as D
from egad.models.load import shared_vocab, tokenizer_name, try_load_tokenizer
from egad.teacher.online import OnlineTeacher
from egad.xtok.pairing import teacher_side
from egad.xtok.source import CrossTeacher
from egad.xtok.vocab import build_vocab_map

log = logging.getLogger("egad.xtok")

__all__ = ["cross_source", "is_cross", "teacher_tokenizer"]


def is_cross(cfg: RunConfig) -> bool:
    """True when the run distils across tokenizers (objective.cross_vocab set and a teacher term on)."""
    return cfg.objective.cross_vocab != "none" and cfg.objective.uses_teacher


def teacher_tokenizer(cfg: RunConfig, run_tokenizer):
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


def cross_source(
    cfg: RunConfig, teacher, teacher_tok, student_tok, train_set: list[dict], layers: list[int], placement: str
) -> tuple[CrossTeacher, int]:
    """The online teacher of a cross-tokenizer run and its real vocabulary V_T. Refuses a sharded teacher (its head
    is read outside its forward) and a pair that cannot be aligned (egad.xtok.AlignmentError)."""
    if placement == "shard":
        raise ConfigError(
            "objective.cross_vocab projects the teacher's aligned rows from its last hidden state, which a sharded "
            "teacher cannot hand over: set model.teacher_placement replicate"
        )
    v_t = shared_vocab(teacher_tok, teacher)
    side = teacher_side(cfg.data, "train", train_set, teacher_tok, student_tok)
    log.info(
        "distilling across tokenizers: teacher %r (%d tokens), student %r (%d tokens)",
        tokenizer_name(teacher_tok), len(teacher_tok), tokenizer_name(student_tok), len(student_tok),
    )  # fmt: skip
    loss, vmap = cfg.objective.cross_vocab, None
    if loss != "uld":
        eot = {D.end_of_turn_id(teacher_tok, cfg.data.template): D.end_of_turn_id(student_tok, cfg.data.template)}
        vmap = build_vocab_map(teacher_tok, student_tok, pairs=eot)
        log.info("exact vocabulary map: %d of %d teacher tokens matched", vmap.size, len(teacher_tok))
    online = OnlineTeacher(teacher, layers, fused=True, vocab=v_t)
    return CrossTeacher(online, side, pad_id=teacher_tok.pad_token_id, vocab=v_t, loss=loss, vmap=vmap), v_t
