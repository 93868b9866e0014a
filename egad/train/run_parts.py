"""A run's parts, built once from its config: the student (cut, built or loaded; LoRA; checkpointing), the teacher and
where it runs (replicated or sharded), the teacher signal's source (online or a cache), the feature branch and the
student-side module the loss runs in. `Trainer.setup` calls `build_parts`; nothing here trains."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from egad.config.run_config import RunConfig
from egad.config.schema import ConfigError, ObjectiveConfig
from egad.models import engines
from egad.models.heads import output_head
from egad.models.load import (
    build_model,
    check_tokenizer_roundtrip,
    cut_layers,
    cut_student,
    decoder_layers,
    freeze,
    model_dims,
    resolve_dtype,
    shared_vocab,
)
from egad.models.lora import add_lora
from egad.objective.plan_runtime import feature_branch
from egad.objective.student import DistillationModule
from egad.teacher.cache import TeacherCache, run_identity
from egad.teacher.online import OnlineTeacher
from egad.teacher.signal import TeacherSource
from egad.xtok.pairing import is_cross
from egad.xtok.run import cross_cache_source, cross_source

log = logging.getLogger("egad.train.trainer")


@dataclass
class RunParts:
    module: DistillationModule  # the student, its projector and mapped layers: what the optimizer trains
    teacher_model: nn.Module | None  # None when a cache serves the signal or no objective term needs a teacher
    cache: TeacherCache | None
    source: TeacherSource | None  # what `signal(batch)` is asked each micro-batch: the cache or the online teacher
    pairs: list[tuple[int, int]]  # the feature branch's (student, teacher) layers
    vocab: int
    placement: str  # 'replicate' or 'shard' (the teacher's placement under a sharding engine)
    teacher_engine: object | None  # the engine that holds a sharded teacher
    route_threshold: float | None  # the cache's hidden-state threshold, when the router reads it


def build_model_side(cfg: RunConfig, side: str, tokenizer, device) -> nn.Module:
    m = cfg.model
    dtype = m.teacher_dtype if side == "teacher" else m.student_dtype
    return build_model(
        getattr(m, side),
        getattr(m, f"{side}_config"),
        dtype=resolve_dtype(dtype, device),
        tokenizer=tokenizer,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        seed=cfg.train.seed + (1 if side == "teacher" else 0),
    )


def cache_route_threshold(obj: ObjectiveConfig, cache: TeacherCache) -> float | None:
    """The router reads the cache's hidden-state threshold when the two select the same share, so that every routed
    token has its stored hidden state; a router asking for more than the cache stores is refused here."""
    man = cache.manifest
    hq, thr = man.get("hidden_quantile"), man.get("hidden_threshold")
    if not obj.uses_features or obj.route_mode == "none" or not hq:
        return None  # no features needed, or hidden states stored for every token
    stored = 1.0 - hq
    if obj.route_mode != "global_quantile":
        raise ConfigError(
            f"{cache.path} stores hidden states for the top {stored:.0%} of tokens by entropy "
            f"(hidden_quantile {hq}, threshold {thr:.4f} nats); route_mode={obj.route_mode!r} may route "
            "others. Use route_mode global_quantile, or rebuild the cache with --hidden-quantile 0 (every token)"
        )
    if obj.rho > stored + 1e-9:
        raise ConfigError(
            f"objective.rho={obj.rho} routes the top {obj.rho:.0%} of tokens to the feature branch, but "
            f"{cache.path} stores hidden states for the top {stored:.0%} only (hidden_quantile {hq}, "
            f"threshold {thr:.4f} nats). Set objective.rho <= {stored:g}, or rebuild the cache with "
            f"--hidden-quantile {1 - obj.rho:g}"
        )
    return float(thr) if abs(obj.rho - stored) <= 1e-9 else None


def _student_and_teacher(cfg: RunConfig, acc, tokenizer, teacher_tok=None) -> tuple[nn.Module, nn.Module | None]:
    """The student (cut from the teacher, or built) and the teacher when it must be loaded (to run, or to cut)."""
    m, dev, obj = cfg.model, acc.device, cfg.objective
    teacher = None
    if (obj.uses_teacher and not m.teacher_cache) or m.student_cut is not None:
        if not (m.teacher or m.teacher_config):
            raise ConfigError(
                f"objective preset {cfg.method!r} distils from a teacher: set model.teacher (a folder, hub "
                "id, .gguf file or shortcut), model.teacher_config or model.teacher_cache, or use preset sft"
            )
        with engines.whole_models(acc):
            teacher = freeze(build_model_side(cfg, "teacher", teacher_tok or tokenizer, dev)).to(dev)
    if m.student_cut is not None:
        layers = cut_layers(m.student_cut, len(decoder_layers(teacher)))
        student = cut_student(teacher, layers, dtype=resolve_dtype(m.student_dtype, dev))
        cfg.model.student_cut = layers  # the resolved indices go into config.yaml
    else:
        with engines.whole_models(acc):
            student = build_model_side(cfg, "student", tokenizer, dev)
    if m.student is None:  # built here: its saved tokenizer must reload identically
        check_tokenizer_roundtrip(tokenizer, student)
    return student, teacher


def _online_source(cfg: RunConfig, teacher: nn.Module, placement: str, layers: list[int], vocab: int):
    t = cfg.train
    fused = t.fused_lm_head if t.fused_teacher is None else t.fused_teacher
    if placement == "shard" and fused:
        if t.fused_teacher:
            raise ConfigError(
                "train.fused_teacher reads the teacher's head outside its forward, which a sharded teacher "
                "cannot serve: set train.fused_teacher false or model.teacher_placement replicate"
            )
        log.info("the sharded teacher hands over its logits: its fused head is off")
        fused = False
    return OnlineTeacher(teacher, layers, fused=fused, vocab=vocab)


def build_parts(cfg: RunConfig, acc, engine: str, tokenizer, train_set, teacher_tokenizer=None) -> RunParts:
    """Every part of a run, on `acc`'s device, under `engine`; `train_set` is the tokenized split a cache is checked
    against. `teacher_tokenizer`: the teacher's own, in a cross-tokenizer run (egad.xtok.run)."""
    m, obj = cfg.model, cfg.objective
    cross = is_cross(cfg)
    student, teacher = _student_and_teacher(cfg, acc, tokenizer, teacher_tokenizer if cross else None)
    if m.teacher_cache:
        teacher = None  # loaded only to cut the student from: with a cache the teacher never runs
    vocab = shared_vocab(tokenizer, student, *([teacher] if teacher is not None and not cross else []))
    cache, route_threshold, cross_cache = None, None, None
    if obj.uses_teacher and m.teacher_cache and cross:
        # The cache stays in the teacher's token space; read for this student through the alignment (egad.xtok).
        cross_cache = cross_cache_source(cfg, m.teacher_cache, teacher_tokenizer, tokenizer, train_set)
        route_threshold = cache_route_threshold(obj, cross_cache.cache)
    elif obj.uses_teacher and m.teacher_cache:
        # Checked once, by the cache, against this run's tokenizer, tokenized data, template and vocabulary.
        cache = TeacherCache(m.teacher_cache, expect=run_identity(tokenizer, train_set, cfg.data, vocab))
        route_threshold = cache_route_threshold(obj, cache)
    stored = cache if cross_cache is None else cross_cache.cache
    if m.lora is not None:
        student = add_lora(student, m.lora)
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        if m.lora is not None:
            student.enable_input_require_grads()  # the frozen embeddings would cut the checkpointed graph
    pairs, projector = [], None
    if stored is not None and not obj.uses_features:
        stored.require_layers([])  # no hidden state is read for an objective without the feature branch
    if obj.uses_features:
        dims = model_dims(teacher) if teacher is not None else stored.teacher_dims()
        pairs, projector = feature_branch(obj, student, dims, acc.device)
        if stored is not None:
            stored.require_layers([p[1] for p in pairs])
    placement = engines.resolve_placement(m.teacher_placement, engine)
    teacher_engine = None
    if teacher is not None and placement == "shard":
        teacher, teacher_engine = engines.shard_teacher(teacher, acc, decoder_layers(teacher), engine)
    source: TeacherSource | None = cache if cross_cache is None else cross_cache  # calibrated through, as online
    if teacher is not None and obj.uses_teacher and cross:
        layers = [p[1] for p in pairs]
        source = cross_source(cfg, teacher, teacher_tokenizer, tokenizer, train_set, layers, placement)[0]
    elif teacher is not None and obj.uses_teacher:
        source = _online_source(cfg, teacher, placement, [p[1] for p in pairs], vocab)
    fused = cfg.train.fused_lm_head or cross  # across tokenizers the loss projects the student's aligned rows
    module = DistillationModule(student, projector, [p[0] for p in pairs], fused, vocab=vocab)
    if fused:
        engines.share_head(module, output_head(student), engine)
    return RunParts(module, teacher, cache, source, pairs, vocab, placement, teacher_engine, route_threshold)
