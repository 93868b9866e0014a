"""`egad cache`: run the teacher of a run config over its training split once and write the cache.

The tokenized examples come from the same function the trainer uses (egad.data.batches.tokenized_split), so the cache's
rows line up with the training batches; the trainer also checks the manifest's data fingerprint. For a config that
distils across tokenizers (objective.cross_vocab) the cache is written with the teacher's own tokenizer, over the
teacher's tokenisation of the same records: the cross-tokenizer reader (egad.xtok.source.open_cross_cache) aligns it
to the student's tokens at training time, so one teacher cache serves students of any tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from egad.config.run_config import RunConfig
from egad.config.schema import ConfigError
from egad.data.batches import tokenized_split
from egad.losses.features import feature_pairs
from egad.models.load import (
    build_model,
    cut_layers,
    freeze,
    model_dims,
    resolve_dtype,
    resolve_tokenizer,
    shared_vocab,
    tokenizer_name,
)
from egad.models.model_files import resolve_model_source
from egad.teacher.cache import write_cache
from egad.xtok.pairing import teacher_tokenizer


def student_layout(cfg: RunConfig, teacher_layers: int) -> tuple[int, list[int] | None]:
    """(student layer count, the teacher layers its blocks were copied from or None), without building the student:
    what the feature map needs to know which teacher hidden states to store."""
    m = cfg.model
    if m.student_cut is not None:
        layers = cut_layers(m.student_cut, teacher_layers)
        return len(layers), layers
    if m.student:
        config = AutoConfig.from_pretrained(resolve_model_source(m.student), revision=m.revision)
        cut = getattr(config, "egad_cut", None)
        copied = cut.get("layers") if isinstance(cut, dict) and cut.get("teacher_layers") == teacher_layers else None
        return config.num_hidden_layers, copied
    return int(m.student_config["num_hidden_layers"]), None


def run_cache_job(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    k: int = 64,
    tail_samples: int = 56,
    logprob_bits: int = 8,
    hidden_quantile: float | None = None,
    examples_per_shard: int = 512,
    batch_size: int | None = None,
    hash_weights: bool | None = None,
):
    """Write (or resume) the teacher cache of `cfg`'s training split into out_dir; returns the manifest. `k`,
    `tail_samples` and `logprob_bits` set the encoding (see `write_cache`)."""
    m = cfg.model
    if not (m.teacher or m.teacher_config):
        raise ConfigError(
            "egad cache needs a teacher: set model.teacher (a folder, hub id, .gguf file or shortcut) or "
            "model.teacher_config"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cross = cfg.objective.cross_vocab != "none"
    tokenizer = resolve_tokenizer(m, cfg.data, cross=cross)
    if cross:  # the cache stays in the teacher's token space; a student with another tokenizer reads it (egad.xtok)
        tokenizer = teacher_tokenizer(cfg, tokenizer) or tokenizer
    teacher = build_model(
        m.teacher,
        m.teacher_config,
        dtype=resolve_dtype(m.teacher_dtype, device),
        tokenizer=tokenizer,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        seed=cfg.train.seed + 1,
    )
    freeze(teacher).to(device)
    vocab = shared_vocab(tokenizer, teacher)
    items, _ = tokenized_split(cfg.data, tokenizer, "train")
    lt, dt = model_dims(teacher)
    layers = None
    if hidden_quantile is not None:
        obj = cfg.objective
        ls, copied = student_layout(cfg, lt)
        layers = [t for _, t in feature_pairs(obj.layer_map, ls, lt, min(obj.feat_layers, ls), copied_from=copied)]
    # Weights of a hub model are identified by id + revision; hashing them is only cheap for local small models.
    hash_w = hash_weights if hash_weights is not None else sum(p.numel() for p in teacher.parameters()) < 2e8
    return write_cache(
        teacher,
        tokenizer,
        items,
        out_dir,
        k=k,
        tail_samples=tail_samples,
        logprob_bits=logprob_bits,
        vocab_size=vocab,
        layers=layers,
        hidden_quantile=hidden_quantile,
        examples_per_shard=examples_per_shard,
        batch_size=batch_size or cfg.train.per_device_batch_size,
        calib_examples=min(cfg.train.calib_examples, 256),
        precision="bf16" if cfg.train.mixed_precision == "bf16" else "fp32",  # the run's autocast, for its teacher
        teacher_id=m.teacher or "from_config",
        revision=m.revision,
        template=cfg.data.template,
        max_prompt_len=cfg.data.max_prompt_len,
        max_len=cfg.data.max_len,
        hash_weights=hash_w,
        extra={"teacher_num_layers": lt, "teacher_hidden_size": dt, "tokenizer_name": tokenizer_name(tokenizer)},
    )
