"""Response generation for ROUGE-L evaluation, following MiniLLM's protocol.

MiniLLM samples with temperature 1.0, top-p 1.0 and top-k 0 (no top-k filter), prompts left-truncated to 256 tokens
and prompt + response capped at 512 tokens, over seeds 10, 20, 30, 40, 50; `greedy=True` is the deterministic option.

**A prompt's sample is a function of the model, the prompt and the seed alone**, not of the other prompts, their
number, order or batching. `generate()` samples from the global torch RNG, one stream for the whole batch, so a row's
draws would depend on its batch-mates and on how many batches came before it. Instead each prompt gets its own
`torch.Generator`, seeded from (seed, the prompt's token ids, how many identical prompts precede it in the call), and
sampling is done as greedy decoding of perturbed scores (the Gumbel-max trick, `_RowSampler`): the token
`argmax(logits / T + G)`, with G standard Gumbel noise drawn from the row's own generator, is a draw from
softmax(logits / T) (after the top-k / top-p filters). Each row draws one vocabulary-sized noise vector per step,
whatever else is in its batch, so batching keeps its speed. The draw costs about what the library's own
multinomial draw did (batch 16, one CPU thread, per step: 10 ms against 16 ms for SmolLM2's 49,152 tokens, 69 ms
against 56 ms for Qwen2.5's 151,936).

What is left of the batch is floating-point rounding: a batched, padded forward pass can round a logit differently
from the same prompt alone, which flips a token only when two perturbed scores tie to within that rounding. In
float32 the padding width is the only such source (SmolLM2-135M: last-position logits within 4e-5 of the prompt
alone), and the issue's check holds: `egad eval --model smollm2-135m-instruct --sets dolly_test --seeds 10
--template alpaca --max-new-tokens 64` gives the first 12 prompts the same 12 generations and ROUGE-L with
`--max-examples 12` and `24`. Under bf16 autocast the CPU's bf16 matmuls round differently for different batch
shapes (logits move by up to 0.4 between a prompt alone and in a batch, even a batch of copies of itself), and 1 of
those 12 generations diverged after 75 characters (ROUGE-L 10.24 against 10.94 over the 12). Under bf16,
`batch_size=1` is batch-invariant by construction, and 3.4x slower there (56 s against 16 s for the 12 prompts;
float32 batched took 22 s).

Two transformers 5.x behaviours shape the implementation:

- `generate()` fills every generation field left at None first from `model.generation_config` (a checkpoint's
  `generation_config.json`: top_k=20, repetition_penalty=1.05, ...) and then from library defaults, which include
  top_k=50. Passing a fresh `GenerationConfig` is therefore not enough: the model's config is swapped for a blank one
  for the duration of the call, and every sampling knob is applied by `_RowSampler` rather than by the library.
- With `do_sample=False` the library takes the argmax of the processed scores and draws nothing from the global RNG,
  so a seeded call leaves the caller's RNG streams (a training loop's, say) untouched.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

logger = logging.getLogger("egad.eval")


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return None if value is None else int(value)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _generation_config(*, stop_ids: list[int], pad_id: int, max_new_tokens: int) -> GenerationConfig:
    # Greedy in the library's eyes: sampling, when asked for, is the argmax of `_RowSampler`'s perturbed scores. The
    # sampling knobs stay unset (the library would otherwise warn that they are ignored without do_sample).
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=pad_id,
        num_beams=1,
        num_return_sequences=1,
    )


def prompt_seeds(ids: list[list[int]], seed: int) -> list[int]:
    """One generator seed per prompt, from (seed, the prompt's token ids, how many identical prompts come before it in
    `ids`): a prompt's seed depends on no other prompt, except that repeats of one prompt get distinct draws."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for row in ids:
        key = tuple(row)
        repeat = seen.get(key, 0)
        seen[key] = repeat + 1
        text = f"egad.generate:{seed}:{repeat}:" + ",".join(map(str, row))
        out.append(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1)  # < 2**63
    return out


class _RowSampler(LogitsProcessor):
    """Sampling as the argmax of perturbed scores, one generator per row (the Gumbel-max trick).

    Each call turns a (B, V) batch of next-token logits into logits / T, filters them with top-k then top-p (the
    library's own row-wise warpers, in the library's order), and adds standard Gumbel noise -log(-log U), U uniform
    in [0, 1) drawn in float64 from row b's own generator. The argmax of row b is then a draw from its filtered
    softmax, and row b's draws at step t are the t-th (V,) block of its generator's stream, whatever the other rows
    are. Finished rows keep drawing (the library pads their tokens), which changes nothing for the others."""

    def __init__(self, seeds: list[int], *, temperature: float, top_p: float, top_k: int) -> None:
        self.seeds = seeds
        self.temperature = temperature
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + (
            [TopPLogitsWarper(top_p)] if top_p < 1 else []
        )
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert scores.shape[0] == len(self.seeds), (scores.shape, len(self.seeds))  # (B, V)
        if self.generators is None:  # on the device the scores live on: a CUDA run draws CUDA's own stream
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scores = scores.float() / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        vocab = scores.shape[1]
        u = torch.stack(
            [torch.rand(vocab, generator=g, dtype=torch.float64, device=scores.device) for g in self.generators]
        )  # (B, V)
        # u = 0 (probability 2**-53 per entry) gives -inf: that token is not chosen; u < 1, so no +inf.
        return scores.double() - torch.log(-torch.log(u))


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
    share a batch, and an out-of-memory batch fails at once), and left-padded. Each prompt gets at most
    `min(max_new_tokens, max_len - its own length)` new tokens, at least 1. (MiniLLM takes the batch's padded width
    instead of the prompt's own length, which ties a prompt's budget to its batch-mates; the two agree whenever
    `max_prompt_len + max_new_tokens <= max_len`, as in every egad scale.) A sequence stops at eos or any of
    `stop_ids` (a chat template's end-of-turn token, see `egad.data.batches.end_of_turn_id`). Each response is the new
    tokens up to (not including) the first stop token, decoded with special tokens skipped and surrounding whitespace
    stripped.

    `greedy=True` decodes greedily and ignores the sampling arguments and `seed`. Otherwise tokens are sampled with
    `temperature`, `top_p` (1.0: off) and `top_k` (0: off), each prompt from its own generator seeded by
    `prompt_seeds` (see the module docstring): the same model, prompt and `seed` give the same response whatever
    the other prompts, their order and `batch_size` (on the same hardware and library versions, up to floating-point
    ties). The global RNG is not touched. `seed=None` draws a seed from the global torch RNG and so advances it,
    like any unseeded torch sampling.

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
    `generate_responses`, which decodes these: prompt i's tokens depend on the model, `ids[i]` and `seed` only."""
    # Stable sort, so equal-length prompts keep their input order and the batching is a function of the inputs alone.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    budget = math.inf if max_new_tokens is None else max_new_tokens
    room = [int(max(1, min(budget, max_len - len(row)))) for row in ids]  # each prompt's own new-token budget
    if not greedy and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))  # unseeded: from the global RNG, which it advances
    seeds = None if greedy else prompt_seeds(ids, seed)
    device = _model_device(model)
    was_training = model.training
    saved_config = model.generation_config
    outputs: list[list[int]] = [[] for _ in ids]
    try:
        model.eval()
        # A blank config, so no checkpoint default (top_k, repetition_penalty, min_p, ...) fills the fields we leave
        # unset; see the module docstring.
        model.generation_config = GenerationConfig()
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                width = len(ids[batch[0]])  # the longest: batches follow the length-descending order
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(ids[i])
                    input_ids[row, width - n :] = torch.as_tensor(ids[i], dtype=torch.long)
                    attention_mask[row, width - n :] = 1
                config = _generation_config(
                    stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=max(room[i] for i in batch)
                )
                processors = LogitsProcessorList()
                if seeds is not None:
                    rows = [seeds[i] for i in batch]
                    processors.append(_RowSampler(rows, temperature=temperature, top_p=top_p, top_k=top_k))
                sequences = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    logits_processor=processors,
                )
                for row, i in enumerate(batch):
                    generated = sequences[row, width:].tolist()[: room[i]]  # its own budget, not its batch-mates'
                    end = _first_stop(generated, stop_ids)
                    outputs[i] = generated[: end + 1]  # the stop token too, when there is one
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    return outputs
