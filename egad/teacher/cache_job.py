"""`egad cache`: run the teacher of a run config over its training split once and write the cache.

The tokenized examples come from the same function the trainer uses (egad.data.tokenized_split), so the cache's
rows line up with the training batches; the trainer also checks the manifest's data fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from egad.data import tokenized_split
from egad.losses.features import layer_map
from egad.models import build_model, freeze, model_dims, resolve_dtype, resolve_tokenizer, shared_vocab
from egad.run_config import RunConfig
from egad.teacher.cache import write_cache


def _student_layers(cfg: RunConfig) -> int:
    m = cfg.model
    if m.student:
        return AutoConfig.from_pretrained(m.student, revision=m.revision).num_hidden_layers
    return int(m.student_config["num_hidden_layers"])


def run_cache_job(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    k: int = 64,
    hidden_quantile: float | None = None,
    examples_per_shard: int = 512,
    batch_size: int | None = None,
    hash_weights: bool | None = None,
):
    """Write (or resume) the teacher cache of `cfg`'s training split into out_dir; returns the manifest."""
    m = cfg.model
    if not (m.teacher or m.teacher_config):
        raise ValueError("egad cache needs a teacher: set model.teacher (a folder or hub id) or model.teacher_config")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = resolve_tokenizer(m, cfg.data)
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
        ls = _student_layers(cfg)
        layers = [t for _, t in layer_map(obj.layer_map, ls, lt, min(obj.feat_layers, ls))]
    # Weights of a hub model are identified by id + revision; hashing them is only cheap for local small models.
    hash_w = hash_weights if hash_weights is not None else sum(p.numel() for p in teacher.parameters()) < 2e8
    return write_cache(
        teacher,
        tokenizer,
        items,
        out_dir,
        k=k,
        vocab_size=vocab,
        layers=layers,
        hidden_quantile=hidden_quantile,
        examples_per_shard=examples_per_shard,
        batch_size=batch_size or cfg.train.per_device_batch_size,
        teacher_id=m.teacher or "from_config",
        revision=m.revision,
        template=cfg.data.template,
        max_prompt_len=cfg.data.max_prompt_len,
        max_len=cfg.data.max_len,
        hash_weights=hash_w,
        extra={"teacher_num_layers": lt, "teacher_hidden_size": dt},
    )
