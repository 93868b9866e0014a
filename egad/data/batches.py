"""Instruction data: prompt templates, tokenisation, batching and the global batch order.

Pipeline: `load_records` (egad.data.records: a JSONL file or hub id, every bad record named) -> `format_prompt` ->
`tokenize_dataset` -> `global_batches` + `shard` -> `collate`. Examples truncated or left without response tokens are
counted in `TruncationStats` and logged on the `egad.data.batches` logger; nothing is dropped silently.

The `alpaca` template is MiniLLM's, character for character (the tests compare it with the `prompt` field of every
record of the MiniLLM evaluation files), so scores are comparable with the published protocol.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from egad.config.schema import ConfigError
from egad.data.records import Example, load_records

logger = logging.getLogger("egad.data.batches")

IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "chat")

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(ex: Example, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text for `ex`. `alpaca`: MiniLLM's template (no-input variant when `input` is the empty string,
    exactly as MiniLLM decides). `chat`: the tokenizer's chat template with one user turn and the generation prompt."""
    if template == "alpaca":
        if ex.input:
            return ALPACA_WITH_INPUT.format(instruction=ex.instruction, input=ex.input)
        return ALPACA_NO_INPUT.format(instruction=ex.instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template='chat' needs a tokenizer with a chat template; use template='alpaca'")
        content = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ConfigError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def texts_for_tokenizer(examples: list[Example]) -> Iterator[str]:
    """Training text for a BPE: each example as the student will see it (alpaca prompt + response), so the template's
    boilerplate gets merged into few tokens."""
    for ex in examples:
        yield format_prompt(ex) + ex.response


def fingerprint(parts: list[Any]) -> str:
    """A hex digest identifying `parts` for cache keys. A part naming an existing file contributes its bytes, not
    just its name, so an edited data file invalidates what was cached from it."""
    digest = hashlib.sha256()
    for part in parts:
        path = Path(part) if isinstance(part, (str, Path)) else None
        if path is not None and path.is_file():
            digest.update(b"file:" + hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(b"value:" + repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class TruncationStats:
    """Counts over all tokenised examples (dropped ones included): prompts cut on the left to `max_prompt_len`,
    responses cut on the right to fit `max_len`, and examples dropped because no response token survived."""

    examples: int = 0
    kept: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    dropped_no_response: int = 0

    def summary(self) -> str:
        return (
            f"tokenised {self.examples} examples: kept {self.kept}; truncated prompts {self.truncated_prompt}, "
            f"truncated responses {self.truncated_response}, dropped with no response token left "
            f"{self.dropped_no_response}"
        )


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the student must learn where a response ends")
    return int(eos)


_TURN_PROBE = "EGAD-END-OF-TURN-PROBE"


def end_of_turn_id(tokenizer: Any, template: str = "alpaca") -> int:
    """The token that ends a response, which training appends to every target and generation stops at. With the chat
    template: the first token the template writes after an assistant message when that is a special token (ChatML,
    as in Qwen2.5 and SmolLM2: <|im_end|>; Llama 3: <|eot_id|>; Gemma: <end_of_turn>); otherwise the eos token."""
    eos = _eos_id(tokenizer)
    if template != "chat" or not getattr(tokenizer, "chat_template", None):
        return eos
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_PROBE}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    tail = text.split(_TURN_PROBE, 1)[1] if _TURN_PROBE in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    return int(ids[0]) if ids and (ids[0] in special or ids[0] in added) else eos


def _assemble(prompt_ids: list[int], response_ids: list[int], eos_id: int, max_prompt_len: int, max_len: int) -> dict:
    truncated_prompt = len(prompt_ids) > max_prompt_len
    if truncated_prompt:
        # Keep the end: the instruction's last words and "### Response:" are what the response depends on.
        prompt_ids = prompt_ids[-max_prompt_len:]
    target = list(response_ids) + [eos_id]
    room = max(max_len - len(prompt_ids), 0)
    truncated_response = len(target) > room
    target = target[:room]
    prompt_ids = prompt_ids[:max_len]
    return {
        "input_ids": list(prompt_ids) + target,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target,
        "truncated_prompt": truncated_prompt,
        "truncated_response": truncated_response,
    }


def _check_lengths(max_prompt_len: int, max_len: int) -> None:
    if max_prompt_len < 1 or max_len < 1:
        raise ValueError(f"max_prompt_len and max_len must be >= 1, got {max_prompt_len}, {max_len}")


def tokenize_example(
    ex: Example, tokenizer: Any, *, template: str = "alpaca", max_prompt_len: int = 256, max_len: int = 512
) -> dict:
    """Token ids and labels for one example: prompt (left-truncated to `max_prompt_len`) + response + the end of turn
    (`end_of_turn_id`: eos, or the chat template's end-of-turn token), cut on
    the right to `max_len`. Labels are -100 on prompt positions and the ids on response positions (unshifted, HF
    causal-LM convention). Returns input_ids, labels, truncated_prompt, truncated_response."""
    _check_lengths(max_prompt_len, max_len)
    eos = end_of_turn_id(tokenizer, template)
    prompt_ids = tokenizer(format_prompt(ex, template, tokenizer), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    return _assemble(prompt_ids, response_ids, eos, max_prompt_len, max_len)


def tokenize_dataset(
    examples: list[Example],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_len: int = 256,
    max_len: int = 512,
    batch_size: int = 1024,
) -> tuple[list[dict], TruncationStats]:
    """`tokenize_example` over `examples` (batched through the fast tokenizer). Each kept item also carries `index`,
    its position in `examples`. Examples left with no response token are dropped and counted."""
    _check_lengths(max_prompt_len, max_len)
    eos = end_of_turn_id(tokenizer, template)
    stats = TruncationStats(examples=len(examples))
    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = tokenizer([format_prompt(ex, template, tokenizer) for ex in chunk], add_special_tokens=False)
        responses = tokenizer([ex.response for ex in chunk], add_special_tokens=False)
        for offset, (p_ids, r_ids) in enumerate(zip(prompts["input_ids"], responses["input_ids"], strict=True)):
            item = _assemble(p_ids, r_ids, eos, max_prompt_len, max_len)
            stats.truncated_prompt += item["truncated_prompt"]
            stats.truncated_response += item["truncated_response"]
            if all(label == IGNORE_INDEX for label in item["labels"]):
                stats.dropped_no_response += 1
                continue
            item["index"] = start + offset
            out.append(item)
    stats.kept = len(out)
    log = logger.warning if stats.dropped_no_response else logger.info
    log(stats.summary())
    return out, stats


def tokenized_split(data_cfg: Any, tokenizer: Any, which: str = "train") -> tuple[list[dict], TruncationStats]:
    """The tokenized train or dev split of a run's `data` section (egad.config.run_config.DataConfig). Training, the
    teacher cache and its validation all call this one function, so cache rows and training batches line up."""
    d = data_cfg
    if which not in ("train", "dev"):
        raise ValueError(f"which={which!r} must be 'train' or 'dev'")
    if which == "train":
        source, split, n = d.train, d.train_split, d.max_train_examples
    else:
        source, split, n = d.dev, d.dev_split, d.max_dev_examples
    records, _ = load_records(source, split, max_examples=n)
    return tokenize_dataset(records, tokenizer, template=d.template, max_prompt_len=d.max_prompt_len, max_len=d.max_len)


def shift_labels(labels: Tensor) -> Tensor:
    """HF causal-LM labels (B, L) -> targets aligned with the logits: targets[:, t] = labels[:, t + 1]."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def collate(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of tokenised items into long tensors (B, L_max): input_ids (pad_id), labels (-100),
    attention_mask (1 on tokens, 0 on padding), and `index` (B,) when the items carry one."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        if len(item["labels"]) != n:
            raise ValueError(f"batch item {row}: {n} input_ids but {len(item['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    with_index = sum("index" in item for item in batch)
    if with_index == len(batch):
        out["index"] = torch.tensor([item["index"] for item in batch], dtype=torch.long)
    elif with_index:
        raise ValueError("some batch items carry 'index' and some do not")
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash rather than seed + epoch, so (seed, epoch) pairs never share a permutation (seed 1 epoch 0 would
    # otherwise equal seed 0 epoch 1). The salt is frozen, not this module's path: it fixes every run's data order.
    digest = hashlib.sha256(f"egad.data.global_batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def global_batches(
    n_examples: int, global_batch: int, *, seed: int, epoch: int, drop_last: bool = True
) -> list[list[int]]:
    """The epoch's global micro-batches: a permutation of range(n_examples) fixed by (seed, epoch), cut into
    consecutive groups of `global_batch` indices. Every process computes the same list and takes its `shard`, so one
    and many processes see the same global batches, and resuming after k batches is `global_batches(...)[k:]`."""
    if n_examples < 0 or global_batch < 1:
        raise ValueError(f"need n_examples >= 0 and global_batch >= 1, got {n_examples}, {global_batch}")
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(n_examples, generator=generator).tolist()
    end = n_examples - n_examples % global_batch if drop_last else n_examples
    return [order[i : i + global_batch] for i in range(0, end, global_batch)]


def shard(batch_indices: list[int], rank: int, world: int, per_device: int) -> list[int]:
    """This process's slice of a global batch: batch_indices[rank*per_device:(rank+1)*per_device]. A short last
    batch (drop_last=False) can leave a rank fewer or no items; a batch larger than world*per_device is an error,
    since the excess would be silently skipped."""
    if world < 1 or not 0 <= rank < world or per_device < 1:
        raise ValueError(f"need world >= 1, 0 <= rank < world and per_device >= 1, got {rank}, {world}, {per_device}")
    if len(batch_indices) > world * per_device:
        raise ValueError(f"a batch of {len(batch_indices)} does not fit {world} processes x {per_device} per device")
    return list(batch_indices[rank * per_device : (rank + 1) * per_device])
