"""Which distributed engine a run asked for (through `accelerate launch --config_file ...`), the Accelerator that
really runs it, and the engine-specific pieces the trainer needs: the DeepSpeed batch and accumulation settings,
models built whole before an engine shards them, a sharded teacher, and gathered checkpoints.

accelerate turns DeepSpeed and FSDP on only for accelerator devices: on a CPU the same configs silently train as
plain DDP. egad builds the process group itself there (gloo) so that DeepSpeed ZeRO-2/3 and FSDP2 engage on CPUs
too, refuses what cannot run (FSDP1 needs an accelerator), and every run logs the engine it really uses.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from egad.config.schema import ConfigError

SHARDING = ("deepspeed-zero3", "fsdp2")
log = logging.getLogger("egad.models.engines")


def requested_engine() -> str:
    """The engine the launcher's environment asks for: deepspeed-zero<N>, fsdp<version>, or ddp."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"deepspeed-zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return "ddp"


def check_engine_runs_here(has_accelerator: bool) -> None:
    """Refuse an engine this machine cannot run, with the reason, rather than let accelerate replace it."""
    engine = requested_engine()
    if engine == "fsdp1" and not has_accelerator:
        raise ConfigError(
            "the accelerate config asks for fsdp1, which cannot run on a CPU (its code requires an accelerator "
            "device), and accelerate would silently train plain DDP instead. Set `fsdp_version: 2` in the config's "
            "fsdp_config (FSDP2 runs on CPUs with gloo), or run it on GPUs"
        )
    if engine.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                f"the accelerate config asks for {engine}, but deepspeed is not installed: "
                "pip install 'egad[deepspeed]'"
            ) from e
        if engine not in ("deepspeed-zero2", "deepspeed-zero3"):
            raise ConfigError(f"the accelerate config asks for {engine}; egad supports DeepSpeed ZeRO stages 2 and 3")


def make_accelerator(mixed_precision: str):
    """The Accelerator for the launcher's engine. On a machine without CUDA, DDP runs as accelerate's MULTI_CPU; a
    sharding engine gets a gloo process group built here, since accelerate would otherwise drop the engine."""
    from accelerate import Accelerator

    has_gpu = torch.cuda.is_available()
    check_engine_runs_here(has_gpu)
    engine = requested_engine()
    if engine == "ddp" or has_gpu:
        return Accelerator(mixed_precision=mixed_precision, cpu=not has_gpu)
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if engine.startswith("fsdp") and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        # That mode loads weights on rank 0 only; egad cuts students from and shards the teacher's full weights on
        # every process, so it is switched off rather than leave the other ranks with empty (meta) models.
        log.warning("fsdp_cpu_ram_efficient_loading is switched off: egad builds its models whole on every process")
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    state = PartialState(cpu=False, backend="gloo")
    if engine.startswith("fsdp") and state.distributed_type == DistributedType.NO:
        # accelerate enables FSDP only for the device types it lists as multi-device; the CPU is not among them,
        # although FSDP2 itself runs there. Declaring the process group multi-device lets the plugin engage.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return Accelerator(mixed_precision=mixed_precision, cpu=False)


def backward(accelerator, engine: str, loss: torch.Tensor, *, sync: bool) -> None:
    """One micro-batch's backward. DeepSpeed steps inside backward at the window's end: tell it where the window ends
    (accelerate reads its sync flag), and keep it from dividing the loss by the window length, which egad's token
    count already does."""
    if not engine.startswith("deepspeed"):
        accelerator.backward(loss)
        return
    accelerator.gradient_state._set_sync_gradients(sync)
    accelerator.backward(loss, scale_wrt_gas=False)
    accelerator.gradient_state._set_sync_gradients(True)


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


def configure_deepspeed(accelerator, *, micro_batch: int, grad_accum: int, grad_clip: float) -> None:
    """egad owns the batch shape and clipping under DeepSpeed: the micro-batch, the accumulation window (so the
    engine steps once per egad step), the clipping norm (applied by the engine, once, at the window's end), and the
    gathering of ZeRO-3 weights for HF checkpoints."""
    ds = accelerator.state.deepspeed_plugin
    if ds is None:
        return
    cfg = ds.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * accelerator.num_processes
    cfg["gradient_clipping"] = grad_clip if grad_clip > 0 else 0.0
    cfg.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    cfg.setdefault("steps_per_print", 10**9)  # DeepSpeed's own progress lines would interleave with egad's log


@contextlib.contextmanager
def whole_models(accelerator):
    """A context in which models are built whole on every process: ZeRO-3's construction-time partitioning would
    leave egad's setup (vocabulary check, student cut, head check, parameter groups) reading empty tensors. The
    engine partitions them when they are prepared. (accelerate registers its DeepSpeed config with transformers,
    which then partitions every model it builds, whatever zero3_init_flag says.)"""
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        ds.set_deepspeed_weakref()


def resolve_placement(placement: str, engine: str) -> str:
    """model.teacher_placement (validated by the config): `auto` shards the teacher where the engine shards the
    student."""
    if placement == "auto":
        return "shard" if engine in SHARDING else "replicate"
    if placement == "shard" and engine not in SHARDING:
        raise ConfigError(
            f"model.teacher_placement=shard needs a sharding engine (DeepSpeed ZeRO-3 or FSDP2); this run uses "
            f"{engine}. Launch with configs/accelerate/deepspeed_zero3.yaml or fsdp.yaml, or use replicate"
        )
    return placement


def shard_teacher(teacher: nn.Module, accelerator, layers: nn.ModuleList, engine: str) -> tuple[nn.Module, object]:
    """Spread the frozen teacher's parameters over the processes. ZeRO-3: a DeepSpeed inference engine (no
    optimizer), which gathers each block's weights for its forward. FSDP2: `fully_shard` per decoder block, then the
    whole model. Returns (the module to call, the object that keeps the engine alive)."""
    if engine == "deepspeed-zero3":
        import deepspeed

        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        cfg = {
            "train_micro_batch_size_per_gpu": ds_cfg["train_micro_batch_size_per_gpu"],
            "zero_optimization": {"stage": 3},
            "steps_per_print": 10**9,
        }
        for key in ("bf16", "fp16"):
            if ds_cfg.get(key, {}).get("enabled") is True:
                cfg[key] = {"enabled": True}
        engine_obj, *_ = deepspeed.initialize(model=teacher, config=cfg)
        engine_obj.eval()
        return engine_obj.module, engine_obj
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in layers:
            fully_shard(block, reshard_after_forward=True)
        # The root keeps its weights gathered after a forward by default (for the backward that follows); a frozen
        # teacher has no backward, so they would stay whole for good.
        fully_shard(teacher, reshard_after_forward=True)
        return teacher, None
    raise ConfigError(f"cannot shard the teacher under {engine}")


def share_head(module: nn.Module, head, engine: str) -> None:
    """The fused loss reads the student's head weights inside the training module's forward but outside the head's
    own forward. ZeRO-3 gathers a parameter only for its owner's forward unless it is registered as used elsewhere.
    (FSDP2 needs nothing: the head belongs to the root module, whose weights are gathered for its whole forward.)"""
    if engine != "deepspeed-zero3":
        return
    import deepspeed

    for param in (head.weight, head.bias):
        if param is not None:
            deepspeed.zero.register_external_parameter(module, param)


def stores_shards(engine: str) -> bool:
    """Whether the engine's checkpoint state is written per process (DeepSpeed, FSDP), so that only the same engine
    on the same number of processes can load it."""
    return engine.startswith(("deepspeed", "fsdp"))


def local_numel(model: nn.Module) -> int:
    """Parameter elements this process holds: its shard under ZeRO-3 or FSDP2, everything otherwise."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            total += p.to_local().numel()
        else:
            total += p.numel()
    return total


def full_numel(model: nn.Module) -> int:
    """Parameter elements of the whole model, whether sharded or not."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())


__all__ = [
    "SHARDING",
    "check_engine_runs_here",
    "configure_deepspeed",
    "engine_in_use",
    "full_numel",
    "local_numel",
    "make_accelerator",
    "requested_engine",
    "resolve_placement",
    "shard_teacher",
    "share_head",
    "stores_shards",
    "whole_models",
]


def check_support(engine: str, t, m) -> None:
    """What egad does not support under `engine`, refused before anything is loaded (`t`, `m`: the run's train and
    model configs)."""
    sharded = engine in SHARDING
    if t.anchor_l2 > 0 and (sharded or engine.startswith("deepspeed")):
        raise ConfigError(
            f"train.anchor_l2={t.anchor_l2} adds to each parameter's whole gradient, which {engine} "
            "partitions or applies inside backward: train the anchor control under DDP or on one process"
        )
    if not sharded:
        return
    unsupported = {
        "train.on_policy > 0 (sampling needs the whole student on each process)": t.on_policy > 0,
        "model.lora (the adapter is merged on save from full weights)": m.lora is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"{engine} shards the student across processes; this run also sets {'; '.join(bad)}. "
            "Turn those off, or train under DDP / DeepSpeed ZeRO-2"
        )


def teacher_sizes(teacher: nn.Module | None) -> dict:
    """The teacher's parameter counts, whole and on this process, for the setup line of metrics.jsonl."""
    if teacher is None:
        return {}
    return {"teacher_params": full_numel(teacher), "teacher_params_local": local_numel(teacher)}
