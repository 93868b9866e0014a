"""Response generation for ROUGE-L evaluation, following MiniLLM's protocol.

MiniLLM samples with temperature 1.0, top-p 1.0 and top-k 0 (no top-k filter), prompts left-truncated to 256 tokens
and prompt + response capped at 512 tokens, over seeds 10, 20, 30, 40, 50; `greedy=True` is the deterministic option.

Two transformers 5.x behaviours shape the implementation:

- `generate()` fills every generation field left at None first from `model.generation_config` (a checkpoint's
  `generation_config.json`: top_k=20, repetition_penalty=1.05, ...) and then from library defaults, which include
  top_k=50. Passing a fresh `GenerationConfig` is therefore not enough: the model's config is swapped for a blank one
  for the duration of the call, and top-k is passed as 0, the value its sampler treats as "no top-k filter" (None
  would become 50).
- Sampling draws from the global torch RNG (there is no generator argument), so reproducibility comes from seeding
  it once before the first batch. A seeded call runs inside `torch.random.fork_rng`, so the caller's RNG streams (a
  training loop's, say) continue unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

logger = logging.getLogger("egad.eval")


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return None if value is None else int(value)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _cuda_indices(model: torch.nn.Module) -> list[int]:
    # Only the CUDA devices the model lives on: fork_rng saves and restores each listed device's RNG state.
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _generation_config(
    *,
    greedy: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
) -> GenerationConfig:
    common: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0],
        "pad_token_id": pad_id,
        "num_beams": 1,
        "num_return_sequences": 1,
    }
    if greedy:
        # Sampling knobs left unset: the library would otherwise warn that they are ignored without do_sample.
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, **common)


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    seed: int | None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_prompt_len: int = 256,
    max_len: int = 512,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generating",
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Generate one response per prompt with a decoder-only HF model; returns the decoded responses in input order.

    Prompts are tokenised without special tokens and left-truncated to their last `max_prompt_len` tokens (the end,
    "### Response:", is what the response hangs on). Prompts are sorted by length, longest first (similar lengths
    share a batch, and an out-of-memory batch fails at once), and left-padded. A batch generates at most
    `min(max_new_tokens, max_len - longest prompt in the batch)` new tokens, at least 1, as MiniLLM computes it from
    the padded width; a sequence stops at eos or any of `stop_ids` (a chat template's end-of-turn token, see
    `egad.data.end_of_turn_id`). Each response is the new tokens up to (not including) the first stop token,
    decoded with special tokens skipped and surrounding whitespace stripped.

    `greedy=True` decodes greedily and ignores the sampling arguments and `seed`. Otherwise tokens are sampled with
    `temperature`, `top_p` (1.0: off) and `top_k` (0: off). With an integer `seed` the RNG is seeded once before
    the first batch, so the same model, prompts, seed and `batch_size` give identical responses (on the same
    hardware and library versions); a different `batch_size` groups the prompts differently and so draws different
    samples. Seeding happens inside `torch.random.fork_rng`, so the caller's RNG state is the same afterwards.
    `seed=None` samples from the current RNG state and advances it, like any unseeded torch sampling.

    The model runs where its parameters are, in eval mode under no_grad; its training mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompt_len < 1 or max_len < 2:
        raise ValueError(f"need max_prompt_len >= 1 and max_len >= 2, got {max_prompt_len}, {max_len}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
    if not greedy:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use greedy=True instead")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not prompts:
        return []

    eos_id = _special_id(tokenizer, "eos_token_id")
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; generation would never stop before the length limit")
    pad_id = _special_id(tokenizer, "pad_token_id")
    pad_id = eos_id if pad_id is None else pad_id
    stops = list(dict.fromkeys([eos_id, *(int(i) for i in stop_ids or [])]))

    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ids: list[list[int]] = []
    truncated = 0
    for i, row in enumerate(encoded):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenisation; generation needs at least one prompt token")
        truncated += len(row) > max_prompt_len
        ids.append(list(row[-max_prompt_len:]))
    if truncated:
        logger.info("%s: %d of %d prompts left-truncated to %d tokens", desc, truncated, len(ids), max_prompt_len)

    new = generate_ids(
        model,
        ids,
        seed=seed,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_len=max_len,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_ids=stops,
        pad_id=pad_id,
        progress=progress,
        desc=desc,
    )
    # Each response is the new tokens before the first stop token.
    return [tokenizer.decode(row[: _first_stop(row, stops)], skip_special_tokens=True).strip() for row in new]


def _first_stop(row: list[int], stops: list[int]) -> int:
    return next((j for j, t in enumerate(row) if t in stops), len(row))


def generate_ids(
    model: Any,
    ids: list[list[int]],
    *,
    seed: int | None,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_len: int = 512,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """The new token ids for each prompt (token ids, already truncated), in input order, up to and including the first
    of `stop_ids` (a sequence that hits the length budget has none). Batching, budgets and seeding as in
    `generate_responses`, which decodes these."""
    # Stable sort, so equal-length prompts keep their input order and the batching is a function of the inputs alone.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    budget = math.inf if max_new_tokens is None else max_new_tokens
    device = _model_device(model)
    was_training = model.training
    saved_config = model.generation_config
    outputs: list[list[int]] = [[] for _ in ids]
    seeded = seed is not None and not greedy
    # Forking the RNG only when seeding: an unseeded call must advance the caller's RNG, or repeated unseeded calls
    # would all draw the same samples.
    rng = torch.random.fork_rng(devices=_cuda_indices(model)) if seeded else contextlib.nullcontext()
    try:
        model.eval()
        # A blank config, so no checkpoint default (top_k, repetition_penalty, min_p, ...) fills the fields we leave
        # unset; see the module docstring.
        model.generation_config = GenerationConfig()
        with rng, torch.no_grad():
            if seeded:
                # torch.manual_seed seeds the CPU and every CUDA device's generator.
                torch.manual_seed(seed)
            for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                width = len(ids[batch[0]])  # the longest: batches follow the length-descending order
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(ids[i])
                    input_ids[row, width - n :] = torch.as_tensor(ids[i], dtype=torch.long)
                    attention_mask[row, width - n :] = 1
                new_tokens = int(max(1, min(budget, max_len - width)))
                config = _generation_config(
                    greedy=greedy,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    stop_ids=stop_ids,
                    pad_id=pad_id,
                    max_new_tokens=new_tokens,
                )
                sequences = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
                for row, i in enumerate(batch):
                    generated = sequences[row, width:].tolist()
                    end = _first_stop(generated, stop_ids)
                    outputs[i] = generated[: end + 1]  # the stop token too, when there is one
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    return outputs
