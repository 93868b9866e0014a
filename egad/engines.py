"""Which distributed engine a run asked for (through `accelerate launch --config_file ...`) and which one it got.

accelerate turns DeepSpeed and FSDP on only for accelerator devices: on a CPU the same configs silently train as
plain DDP (or one process). A user who asks for an engine and silently gets another is the worst outcome, so egad
refuses such a run and names the reason, and every run logs the engine it really uses.
"""

from __future__ import annotations

import os

from egad.config import ConfigError


def requested_engine() -> str:
    """The engine the launcher's environment asks for: deepspeed-zero<N>, fsdp<version>, or ddp."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"deepspeed-zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return "ddp"


def check_engine_runs_here(has_accelerator: bool) -> None:
    """Refuse a sharding engine where accelerate would replace it by DDP without a word."""
    engine = requested_engine()
    if engine != "ddp" and not has_accelerator:
        raise ConfigError(
            f"the accelerate config asks for {engine}, but this machine has no GPU: accelerate enables DeepSpeed and "
            "FSDP on accelerators only and would silently train plain DDP instead. Launch without that config "
            "(ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m egad.cli train ...) for "
            "data-parallel training on CPUs, or run it on GPUs"
        )


def engine_in_use(accelerator) -> str:
    """What the run really trains with, for the setup line of metrics.jsonl."""
    kind = str(accelerator.distributed_type.value).lower()
    state = accelerator.state
    if kind == "deepspeed":
        return f"deepspeed-zero{state.deepspeed_plugin.zero_stage}"
    if kind == "fsdp":
        return f"fsdp{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    if accelerator.num_processes > 1:
        return f"ddp-{kind.replace('multi_', '')}"
    return "single-process"


__all__ = ["check_engine_runs_here", "engine_in_use", "requested_engine"]
