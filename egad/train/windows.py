"""A run's optimizer windows: each step consumes `grad_accum` global micro-batches, drawn in an order fixed by the
seed and the epoch (egad.data.batches.global_batches), each process taking its slice. A window is a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would, and every split of the same
global batch sees the same examples."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from egad.config.schema import ConfigError
from egad.data import batches as D


class Windows:
    def __init__(
        self,
        train_set: list,
        *,
        per_device_batch: int,
        grad_accum: int,
        world: int,
        rank: int,
        seed: int,
        pad_id: int,
        device,
        max_steps: int = 0,
        epochs: float = 1.0,
    ) -> None:
        self.train_set, self.per_device_batch, self.grad_accum = train_set, per_device_batch, grad_accum
        self.world, self.rank, self.seed, self.pad_id, self.device = world, rank, seed, pad_id, device
        self.global_micro = per_device_batch * world
        self.global_batch = self.global_micro * grad_accum
        self.steps_per_epoch = len(train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(train_set)} training examples cannot fill one step of {self.global_batch} (batch x "
                "accumulation x processes): lower train.per_device_batch_size or train.grad_accum, or use more data"
            )
        self.total_steps = max_steps or math.ceil(epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> list[dict[str, Tensor]]:
        """This process's micro-batches for optimizer step `step`, on the device, each with `train_index` (the
        examples' positions in the training split: a cache is keyed by them)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        batches = D.global_batches(len(self.train_set), self.global_micro, seed=self.seed, epoch=epoch)
        window = batches[offset * self.grad_accum : (offset + 1) * self.grad_accum]
        out = []
        for b in window:
            ix = D.shard(b, self.rank, self.world, self.per_device_batch)
            batch = D.collate([self.train_set[i] for i in ix], self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["train_index"] = torch.tensor(ix)
            out.append(batch)
        return out


def token_keys(batch: dict[str, Tensor]) -> Tensor:
    """(B, L) int64: a key per token that names it whatever batch it is in, its example's position in the training
    split and its position in the sequence (right padding keeps positions fixed)."""
    ids = batch["input_ids"]
    index = batch["train_index"].to(ids.device).long()
    return index[:, None] * 2**24 + torch.arange(ids.shape[1], device=ids.device)[None, :]
