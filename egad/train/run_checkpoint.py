"""The trainer's checkpoint I/O: model folders that `from_pretrained` loads (final/, best/), step checkpoints with the
whole training state, and resuming from them. Each function takes the running `Trainer`; every process calls it
(the sharded weights are gathered collectively), only the main process writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from egad.config.schema import ConfigError
from egad.models import checkpoint as ckpt
from egad.models import engines

if TYPE_CHECKING:
    from egad.train.trainer import Trainer


def _gathered_state(tr: Trainer) -> dict | None:
    """Under a sharding engine, the full weights of the student and projector, gathered from every process (a
    collective: all must call it); None where each process already holds them whole."""
    if not tr.sharded:
        return None
    state = tr.acc.get_state_dict(tr.module)
    return {k: v.detach().cpu() for k, v in state.items()} if tr.main else None


def _write_model(tr: Trainer, path: Path, state: dict | None) -> None:
    unwrapped = tr.acc.unwrap_model(tr.module)
    d = tr.cfg.data
    prompt = {"template": d.template, "max_prompt_len": d.max_prompt_len, "max_len": d.max_len}
    ckpt.save_model_dir(path, unwrapped.student, tr.tokenizer, unwrapped.projector, tr.pairs, prompt, state=state)


def save_model_dir(tr: Trainer, path: Path, extra: dict | None = None) -> None:
    """An HF model folder of the student (+ projector) at `path`, written atomically, with `extra` as eval.json."""
    tr.acc.wait_for_everyone()
    state = _gathered_state(tr)
    if tr.main:
        with ckpt.atomic_dir(path) as tmp:
            _write_model(tr, tmp, state)
            if extra:
                (tmp / "eval.json").write_text(json.dumps(extra, indent=1))
    tr.acc.wait_for_everyone()


def save_checkpoint(tr: Trainer) -> Path:
    """checkpoint-<step>/: HF model + tokenizer + projector, and the full training state (optimizer, scheduler, RNG,
    step, best dev NLL, the plan's knots and streams) so that `--resume` continues the same run."""
    final = tr.out / f"checkpoint-{tr.step}"
    tmp = final.with_name(f".tmp-{final.name}")
    if tr.main:
        ckpt.staging_dir(final)
    tr.acc.wait_for_everyone()
    # Every process writes its RNG state. Pickled weights here: the tied lm_head makes safetensors drop (and warn
    # about) the shared tensor, and the loadable HF copy is written beside it anyway.
    tr.acc.save_state(str(tmp / "state"), safe_serialization=False)
    tr.acc.wait_for_everyone()
    state = _gathered_state(tr)
    if tr.main:
        _write_model(tr, tmp, state)
        meta = {
            "step": tr.step,
            "best_dev_nll": tr.best_dev_nll,
            "total_steps": tr.total_steps,
            "method": tr.cfg.method,
            "engine": tr.engine,
            "processes": tr.world,
            "global_batch": tr.global_batch,
        }
        if tr.plan.knots is not None:
            save_file({"knots": tr.plan.knots.contiguous().cpu()}, str(tmp / "entropy_knots.safetensors"))
        if tr.plan.streams:
            torch.save(tr.plan.streams_state(), tmp / "signal_streams.pt")
        # trainer_state.json is written last: its presence marks the checkpoint complete.
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        ckpt.commit_dir(tmp, final)
        ckpt.prune(tr.out, tr.cfg.train.keep_checkpoints)
    tr.acc.wait_for_everyone()
    return final


def resume(tr: Trainer) -> Path:
    """Load the latest complete checkpoint of the run folder into `tr`; returns its path."""
    step, path = ckpt.checkpoints(tr.out)[-1]
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("total_steps") != tr.total_steps:
        raise ConfigError(
            f"{path} was written by a run of {state.get('total_steps')} steps; this config gives "
            f"{tr.total_steps}. Resume with the same train.max_steps / epochs / batch sizes"
        )
    _check_resumable(tr, path, state)
    tr.acc.load_state(str(path / "state"))
    tr.step, tr.best_dev_nll = step, state["best_dev_nll"]
    if (path / "entropy_knots.safetensors").is_file():
        tr.plan.knots = load_file(str(path / "entropy_knots.safetensors"))["knots"].to(tr.acc.device)
    if (path / "signal_streams.pt").is_file():
        tr.plan.load_streams(torch.load(path / "signal_streams.pt"))
    elif (path / "entropy_hist.pt").is_file():  # written before the student-side streams existed
        tr.plan.load_streams({"entropy": torch.load(path / "entropy_hist.pt")})
    return path


def _check_resumable(tr: Trainer, path: Path, state: dict) -> None:
    """A checkpoint resumes only under the launch that wrote it: the same global batch (else the data windows
    differ), and for a sharding engine the same engine and process count (its state is stored in shards)."""
    batch = tr.global_batch
    if state.get("global_batch", batch) != batch:
        raise ConfigError(
            f"{path} was written with a global batch of {state['global_batch']} (batch x accumulation x "
            f"processes); this launch gives {batch}. Resume with the same batch size, accumulation and processes"
        )
    engine, world = state.get("engine", tr.engine), state.get("processes", tr.world)
    sharded = engines.stores_shards(engine) or engines.stores_shards(tr.engine)
    if sharded and (engine != tr.engine or world != tr.world):
        raise ConfigError(
            f"{path} holds the sharded state of {engine} on {world} processes; this launch is {tr.engine} on "
            f"{tr.world}. Resume with the accelerate config and process count that wrote it"
        )
