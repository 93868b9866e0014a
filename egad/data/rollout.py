"""On-policy data: batches whose responses the student samples itself from the batch's prompts (GKD's lambda).

Which micro-batches are on-policy, and what the student samples, are pure functions of (seed, step, micro-batch,
process) and the student's weights, so a resumed run samples exactly what an uninterrupted one would. A sampled
response ends with the stop token when the student emits one (so it learns to stop, as the dataset responses end
with the end of turn); the prompt stays masked (-100) in the labels.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from egad.data import batches as D
from egad.eval.generate import generate_ids


def _unit(*parts: int) -> float:
    # The salt is frozen (the module moved from egad/rollout.py): it fixes which batches are sampled on-policy.
    digest = hashlib.sha256(("egad.rollout:" + ":".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def is_on_policy(seed: int, step: int, micro: int, fraction: float) -> bool:
    """Whether micro-batch `micro` of optimizer step `step` takes student samples: true for a `fraction` of them,
    the same on every process (the global micro-batch is one unit) and after a resume."""
    return fraction >= 1.0 or (fraction > 0.0 and _unit(seed, step, micro) < fraction)


def sampling_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(_unit(seed, step, micro, rank, 1) * 2**62)


def prompts_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first labelled position (the labels are HF's, unshifted)."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        labelled = (labels != D.IGNORE_INDEX).nonzero()
        end = int(labelled[0]) if labelled.numel() else int(mask.sum())
        out.append(ids[:end].tolist())
    return out


@torch.no_grad()
def sample_batch(
    model,
    batch: dict[str, Tensor],
    *,
    seed: int,
    pad_id: int,
    stop_ids: list[int],
    max_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """The batch with its responses replaced by the student's own samples (prompt kept, masked in the labels), collated
    like any training batch, on the batch's device; keys other than input_ids / labels / attention_mask are kept."""
    prompts = prompts_of(batch)
    responses = generate_ids(
        model,
        prompts,
        seed=seed,
        stop_ids=stop_ids,
        pad_id=pad_id,
        temperature=temperature,
        max_len=max_len,
        max_new_tokens=max_new_tokens,
        batch_size=len(prompts),
    )
    items = []
    for prompt, response in zip(prompts, responses, strict=True):
        response = response or [stop_ids[0]]  # a budget of 0 new tokens still gives one target
        items.append({"input_ids": prompt + response, "labels": [D.IGNORE_INDEX] * len(prompt) + response})
    out = {k: v.to(batch["input_ids"].device) for k, v in D.collate(items, pad_id).items()}
    out.update({k: v for k, v in batch.items() if k not in out})
    return out


__all__ = ["is_on_policy", "prompts_of", "sample_batch", "sampling_seed"]


def on_policy_batch(student, batch: dict[str, Tensor], tokenizer, data_cfg, train_cfg, *, step: int, micro: int,
                    rank: int) -> dict[str, Tensor]:  # fmt: skip
    """`batch` with the student's own responses to its prompts (train.on_policy), sampled with the seed of
    (run seed, step, micro-batch, process): the same samples whatever else runs, and again on resume."""
    return sample_batch(
        student,
        batch,
        seed=sampling_seed(train_cfg.seed, step, micro, rank),
        pad_id=tokenizer.pad_token_id,
        stop_ids=[D.end_of_turn_id(tokenizer, data_cfg.template)],
        max_len=data_cfg.max_len,
        max_new_tokens=train_cfg.on_policy_max_new_tokens,
        temperature=train_cfg.on_policy_temperature,
    )
