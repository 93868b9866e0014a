"""The student's optimizer and schedule: AdamW with decay on matrices only, the projector at its own learning rate,
linear warm-up then cosine decay; and the anchor control's L2 pull towards the initial weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import get_cosine_schedule_with_warmup

from egad.config.run_config import TrainConfig


def adamw(groups: list[dict], **kw) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (CPU and CUDA): measured 7x faster than the default per-tensor loop
    for 50M fp32 parameters on one CPU thread, which is ~5% of a cut-SmolLM2 student's step."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these devices or dtypes
        return torch.optim.AdamW(groups, **kw)


def build_optimizer(
    student: nn.Module, projector: nn.Module | None, t: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, list[tuple[Tensor, Tensor]]]:
    """(optimizer, scheduler, anchor). The anchor pairs each trainable student parameter with a copy of its value
    now, before any checkpoint is loaded, so a resumed run pulls towards the same initial weights (a cut is copied,
    a from-scratch init seeded); empty unless train.anchor_l2 > 0."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: read the full shape
            (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if projector is not None:
        groups.append({"params": list(projector.parameters()), "weight_decay": 0.0, "lr": t.lr * t.proj_lr_mult})
    anchor = [(p, p.detach().clone()) for p in decay + no_decay] if t.anchor_l2 > 0 else []
    opt = adamw(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(t.warmup_ratio * total_steps), total_steps)
    return opt, sched, anchor


@torch.no_grad()
def pull_to_anchor(anchor: list[tuple[Tensor, Tensor]], gamma: float) -> float:
    """Add gamma * (theta - theta_0) to every anchored gradient, once per window (after DDP's averaging, so every
    process adds the same); returns the pull's loss gamma/2 * ||theta - theta_0||^2."""
    dist2 = 0.0
    for p, p0 in anchor:
        d = p.detach() - p0
        dist2 += float(d.float().pow(2).sum())
        if p.grad is None:
            p.grad = d.mul(gamma)
        else:
            p.grad.add_(d, alpha=gamma)
    return 0.5 * gamma * dist2
