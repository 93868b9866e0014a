"""Checkpoints that `transformers` loads, written atomically: a half-written folder is never taken as complete.

Layout of a run folder:
    checkpoint-<step>/   HF model + tokenizer + feature_projector.safetensors + trainer_state.json + state/ (accelerate)
    best/                HF model + tokenizer (+ projector) with the lowest dev NLL
    final/               HF model + tokenizer at the end of training
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save_file

from egad.losses.features import FeatureProjector
from egad.models.lora import is_lora, merged_copy

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write into a temporary sibling folder, then rename it over `final` only once everything is written."""
    tmp = staging_dir(final)
    yield tmp
    commit_dir(tmp, final)


def staging_dir(final: Path) -> Path:
    """A fresh, empty sibling folder to write `final`'s content into."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished `tmp` with renames, so readers see the old or the new folder, never half."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


PROMPT_FILE = "egad_prompt.json"


def save_model_dir(
    path: Path,
    model,
    tokenizer,
    projector: FeatureProjector | None,
    pairs,
    prompt: dict | None = None,
    state: dict | None = None,
) -> None:
    """HF `save_pretrained` files (safetensors) + tokenizer, the feature projections beside them, and `prompt`
    (template and lengths the model was trained with), which `egad eval` then uses by default. `state`: the
    training module's full state dict (keys `student.*`, `projector.*`) where the live parameters are shards."""
    student_state = projector_state = None
    if state is not None:
        # A gathered state holds tied weights under every name (the head and the embeddings); keep the name that
        # save_pretrained keeps, the first one registered, so the files equal an unsharded run's.
        unique = {n for n, _ in model.named_parameters()}
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique
        student_state = {
            k.removeprefix("student."): v
            for k, v in state.items()
            if k.startswith("student.") and k.removeprefix("student.") not in tied
        }
        projector_state = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    if is_lora(model):
        merged_copy(model).save_pretrained(path, safe_serialization=True)
        model.save_pretrained(path / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=student_state)
    tokenizer.save_pretrained(path)
    if prompt:
        (path / PROMPT_FILE).write_text(json.dumps(prompt, indent=1))
    if projector is not None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in (projector_state or projector.state_dict()).items()},
            str(path / "feature_projector.safetensors"),
        )
        (path / "feature_projector.json").write_text(
            json.dumps(
                {
                    "layer_pairs": [list(p) for p in pairs],
                    "student_dim": projector.student_dim,
                    "teacher_dim": projector.teacher_dim,
                },
                indent=1,
            )
        )


def saved_prompt(path: str | Path) -> dict:
    """The prompt settings saved with a model folder by egad ({} for any other model)."""
    file = Path(path) / PROMPT_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / "trainer_state.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def prune(out_dir: Path, keep: int) -> None:
    for _, p in checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
