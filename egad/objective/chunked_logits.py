"""The chunked head-and-loss engine under egad's objective: (1 - alpha) CE + alpha KD over the response tokens,
chunk by chunk, with the gradient w.r.t. the logits (or the head's linear part) computed inside the forward, so no
(tokens x V) fp32 tensor of full size is ever alive. What a chunk's terms are is the caller's (`ChunkRun.chunk_terms`:
egad.objective.compose's per-token plan and divergence); this module only projects, differentiates and accumulates."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from egad.config.schema import ObjectiveConfig
from egad.losses import kernels
from egad.models.heads import OutputHead


class ChunkRun(Protocol):
    """What the engine reads of one objective call."""

    cfg: ObjectiveConfig  # its chunk size (cfg.chunk_tokens)
    rows: Tensor  # (N,) flat positions of the response tokens
    vocab: int
    head: OutputHead | None  # None: x holds logits rows; else hidden rows and this head
    ce_scale: float
    kd_scale: float
    need_grad: bool

    def chunk_terms(self, zs: Tensor, idx: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        """(CE sum, KD sum) of one chunk of student logits zs (C, V) fp32 at flat rows idx (slice sl of rows)."""
        ...


def _trains(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


class ChunkedLogitLoss(torch.autograd.Function):
    """(1 - alpha) CE + alpha KD summed over chunks; the input gradient is computed per chunk inside forward.

    Fused: the chunk's linear part (hidden @ W^T) is the autograd leaf and the rest of the head (bias, scale,
    soft-cap) is applied on it, so the weight, bias and hidden-state gradients are three small products per chunk,
    accumulated in place (no weight-sized temporary per chunk)."""

    @staticmethod
    def forward(ctx, x_flat: Tensor, lm_w: Tensor | None, lm_b: Tensor | None, run: ChunkRun):  # type: ignore[override]
        need_grad = run.need_grad
        head = run.head
        gx = torch.zeros_like(x_flat) if need_grad else None
        fp32 = {"dtype": torch.float32}
        # A frozen head (a LoRA student's) gets no weight-sized gradient buffer.
        gw = torch.zeros(lm_w.shape, device=lm_w.device, **fp32) if need_grad and _trains(lm_w) else None
        gb = torch.zeros(lm_b.shape, device=lm_b.device, **fp32) if need_grad and _trains(lm_b) else None
        ce_total = x_flat.new_zeros((), dtype=torch.float32)
        kd_total = x_flat.new_zeros((), dtype=torch.float32)
        # Only the real-vocabulary rows of the head take part; slicing before requires_grad avoids a full-size zero
        # gradient for the padded rows in every chunk.
        frozen = None
        if head is not None:
            frozen = OutputHead(
                lm_w.detach(),
                None if lm_b is None else lm_b.detach(),
                head.hidden_scale,
                head.logit_scale,
                head.softcap,
            )
        wv = frozen.weight[: run.vocab] if frozen is not None else None
        step = run.cfg.chunk_tokens(run.vocab)
        # The chunk terms run the cached teacher's student passes in the configured kernels (egad.losses.kernels).
        with kernels.using(run.cfg.kernels):
            for start in range(0, run.rows.numel(), step):
                sl = slice(start, start + step)
                idx = run.rows[sl]
                xc = x_flat[idx].detach()  # (C, V_S) logits or (C, d) hidden
                with torch.enable_grad():
                    if frozen is None:
                        leaf = zs = xc[:, : run.vocab].float().requires_grad_(need_grad)  # (C, V) fp32
                    else:
                        leaf = frozen.linear(xc, run.vocab).float().detach().requires_grad_(need_grad)
                        zs = frozen.finish(leaf, run.vocab)
                    ce_sum, kd_sum = run.chunk_terms(zs, idx, sl)
                    total = run.ce_scale * ce_sum + run.kd_scale * kd_sum
                    if need_grad and total.requires_grad:
                        (g,) = torch.autograd.grad(total, [leaf])  # (C, V): w.r.t. the logits, or the linear part
                        if frozen is None:
                            gx.index_add_(0, idx, F.pad(g, (0, gx.shape[1] - g.shape[1])).to(gx.dtype))
                        else:
                            gh = (g.to(wv.dtype) @ wv).float()
                            if frozen.hidden_scale != 1.0:
                                gh = gh * frozen.hidden_scale
                            gx.index_add_(0, idx, gh.to(gx.dtype))
                            xs = xc.float() * frozen.hidden_scale if frozen.hidden_scale != 1.0 else xc.float()
                            if gw is not None:
                                gw[: run.vocab].addmm_(g.t(), xs)
                            if gb is not None:
                                gb[: run.vocab] += g.sum(0)
                ce_total += ce_sum.detach()
                kd_total += kd_sum.detach()
        ctx.save_for_backward(*(t for t in (gx, gw, gb) if t is not None))
        ctx.has = (gx is not None, gw is not None, gb is not None)
        ctx.dtypes = (None, lm_w.dtype if lm_w is not None else None, lm_b.dtype if lm_b is not None else None)
        loss = run.ce_scale * ce_total + run.kd_scale * kd_total
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_ce, _g_kd):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        if not saved:
            return None, None, None, None
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "the chunked distillation loss hands out its gradient buffers once: backward twice "
                "through it (retain_graph=True) is not supported"
            )
        ctx.consumed = True
        # The usual upstream gradient is exactly 1: hand the buffers over instead of allocating scaled copies, which
        # would double the (tokens x V) gradient memory at this point.
        unit = bool(g_loss.item() == 1.0)
        grads = []
        for has, dtype in zip(ctx.has, ctx.dtypes, strict=True):
            if not has:
                grads.append(None)
                continue
            t = saved.pop(0)
            t = t if unit else t * g_loss.to(t.dtype)
            grads.append(t if dtype is None else t.to(dtype))
        return (*grads, None)


def apply_chunked(x_flat: Tensor, head: OutputHead | None, run: ChunkRun) -> tuple[Tensor, Tensor, Tensor]:
    w, b = (head.weight, head.bias) if head is not None else (None, None)
    if run.rows.numel() == 0:
        # A fully masked batch: 0 loss that still reaches the graph, so backward gives zero (not NaN) gradients.
        zero = x_flat.sum() * 0.0 + sum(t.sum() * 0.0 for t in (w, b) if t is not None)
        return zero.float(), zero.detach().float(), zero.detach().float()
    return ChunkedLogitLoss.apply(x_flat, w, b, run)
