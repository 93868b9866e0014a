"""Where egad reads data and keeps what it caches between runs (tokenizers, toy teachers, converted models), and
how a file is identified in a cache key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """$EGAD_CACHE_DIR, else ~/.cache/egad."""
    return Path(os.environ.get("EGAD_CACHE_DIR", Path.home() / ".cache" / "egad"))


def default_data_dir() -> Path | None:
    """$EGAD_DATA_DIR, else ../shared/data when it exists (the project layout), else None."""
    env = os.environ.get("EGAD_DATA_DIR")
    if env:
        return Path(env)
    local = Path("..") / "shared" / "data"
    return local if local.is_dir() else None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["cache_root", "default_data_dir", "sha256_file"]
