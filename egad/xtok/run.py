"""A cross-tokenizer run's parts (objective.cross_vocab): the teacher's tokenizer, the teacher's side of the training
data with its alignment, the vocabulary map and the online `CrossTeacher` or the cached `CrossCacheTeacher`.
`egad.train.run_parts.build_parts` calls them."""

from __future__ import annotations

import logging

from egad.config.run_config import RunConfig
from egad.config.schema import ConfigError
from egad.data import batches as D
from egad.losses.cross_vocab import VocabMap
from egad.models.load import shared_vocab, tokenizer_name
from egad.teacher.online import OnlineTeacher
from egad.xtok.pairing import TeacherSide, teacher_side
from egad.xtok.source import CrossCacheTeacher, CrossTeacher, open_cross_cache
from egad.xtok.vocab import build_vocab_map

log = logging.getLogger("egad.xtok")

__all__ = ["cross_cache_source", "cross_source"]


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
    side, vmap = _side_and_map(cfg, teacher_tok, student_tok, train_set)
    online = OnlineTeacher(teacher, layers, fused=True, vocab=v_t)
    loss = cfg.objective.cross_vocab
    return CrossTeacher(online, side, pad_id=teacher_tok.pad_token_id, vocab=v_t, loss=loss, vmap=vmap), v_t


def cross_cache_source(cfg: RunConfig, path, teacher_tok, student_tok, train_set: list[dict]) -> CrossCacheTeacher:
    """The cached teacher of a cross-tokenizer run: the cache at `path`, written by `egad cache` with the teacher's
    tokenizer (for this config, or any run of the same teacher, data, template and lengths), read for this student
    (egad.xtok.source.open_cross_cache: the refusals)."""
    side, vmap = _side_and_map(cfg, teacher_tok, student_tok, train_set)
    return open_cross_cache(path, cfg.data, teacher_tok, side, train_set, loss=cfg.objective.cross_vocab, vmap=vmap)


def _side_and_map(cfg: RunConfig, teacher_tok, student_tok, train_set) -> tuple[TeacherSide, VocabMap | None]:
    side = teacher_side(cfg.data, "train", train_set, teacher_tok, student_tok)
    log.info(
        "distilling across tokenizers: teacher %r (%d tokens), student %r (%d tokens)",
        tokenizer_name(teacher_tok), len(teacher_tok), tokenizer_name(student_tok), len(student_tok),
    )  # fmt: skip
    vmap = None
    if cfg.objective.cross_vocab != "uld":
        eot = {D.end_of_turn_id(teacher_tok, cfg.data.template): D.end_of_turn_id(student_tok, cfg.data.template)}
        vmap = build_vocab_map(teacher_tok, student_tok, pairs=eot)
        log.info("exact vocabulary map: %d of %d teacher tokens matched", vmap.size, len(teacher_tok))
    return side, vmap
