"""The cache's on-disk format: constants, identity fingerprints and the manifest (see egad.teacher.cache)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from egad.errors import EgadError

FORMAT_VERSION = 2
# Format 1 (int32 ids, fp16 log-probs, no tail sample) still reads, and gives the signal it always gave.
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
NUM_KNOTS = 1001
# Entropies kept for the knots: every token up to this many, a uniform reservoir sample beyond (4 bytes each).
KNOT_SAMPLES = 8_000_000
IDENTITY = ("teacher_id", "revision", "weights_sha256", "tokenizer_sha256", "data_fingerprint", "template", "k",
            "vocab_size", "layers", "hidden_quantile")  # fmt: skip
_FP16_MAX = 65504.0


class CacheError(EgadError):
    """A cache that cannot be used or resumed; the message names the file or field and the fix."""


# ------------------------------------------------------------------------------------------------------- fingerprints
def fingerprint_examples(items: list[dict], template: str, max_prompt_len: int, max_len: int) -> str:
    """sha256 over every item's input_ids and labels, the template and the lengths (what the cache rows depend on)."""
    digest = hashlib.sha256(json.dumps([template, max_prompt_len, max_len, len(items)]).encode())
    for item in items:
        for key in ("input_ids", "labels"):
            ids = torch.as_tensor(item[key], dtype=torch.int64)
            digest.update(ids.numel().to_bytes(8, "little"))
            digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the vocabulary, the special-token ids and the backend tokenizer's JSON (normaliser, merges, ...)."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    special = {name: getattr(tokenizer, name, None) for name in names}
    special["all"] = sorted(getattr(tokenizer, "all_special_ids", None) or [])
    digest.update(json.dumps(special, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes, bytes). Reads every weight: for a large teacher pass
    `hash_weights=False` to `write_cache` and pin a `revision` instead."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------- manifest
def _identity(m: dict) -> dict:
    teacher = m.get("teacher") or {}
    flat = {"teacher_id": teacher.get("id"), "revision": teacher.get("revision")}
    flat["weights_sha256"] = teacher.get("weights_sha256")
    flat.update({f: m.get(f) for f in IDENTITY[3:]})
    return flat


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _first_difference(have: dict, want: dict) -> tuple[str, Any, Any] | None:
    for field, value in want.items():
        if _norm(have.get(field)) != _norm(value):
            return field, have.get(field), value
    return None


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise CacheError(f"{file}: no cache manifest; run `egad cache` to build the cache in {path}")
    try:
        m = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{file}: unreadable ({e}); delete {path} and rerun `egad cache`") from None
    if m.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(
            f"{file}: format_version {m.get('format_version')!r}, this egad reads {list(READABLE_VERSIONS)}; "
            f"delete {path} and rerun `egad cache` to rebuild it in format {FORMAT_VERSION}"
        )
    return m


def _write_json_atomic(file: Path, obj: dict) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    with tmp.open("w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, file)


def run_identity(tokenizer: Any, items: list[dict], data_cfg: Any, vocab_size: int) -> dict:
    """The identity fields a training run needs of its cache: the tokenizer, the tokenized data (with the template
    and lengths that made it) and the shared vocabulary. `data_cfg` is the run's `data` section."""
    d = data_cfg
    return {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "template": d.template,
        "data_fingerprint": fingerprint_examples(items, d.template, d.max_prompt_len, d.max_len),
        "vocab_size": vocab_size,
    }
