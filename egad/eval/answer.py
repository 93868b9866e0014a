"""`egad generate`: a model (the teacher, for sequence-level KD) answers a dataset's prompts, written as training data.

The output is JSONL in the Dolly fields (instruction, context, response, split) or the MiniLLM ones (instruction,
input, output), which `egad train` reads like any data file. Prompts are answered in blocks of `block` records, each
block with its own seed (sampled) or greedily, and appended to OUT.partial as it finishes; an interrupted run resumes
after the last complete block, and OUT appears (renamed) only when every record is answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from egad.config.schema import ConfigError
from egad.data import batches as D
from egad.eval.generate import generate_responses
from egad.eval.suite import load_model

FIELDS = ("dolly", "minillm")
logger = logging.getLogger("egad.eval")


def _row(ex: D.Example, answer: str, fields: str, split: str) -> dict:
    if fields == "dolly":
        return {"instruction": ex.instruction, "context": ex.input, "response": answer, "split": split}
    return {"instruction": ex.instruction, "input": ex.input, "output": answer, "split": split}


def answer_dataset(
    model_path: str,
    data: str,
    out: str | Path,
    *,
    split: str | None = "train",
    out_split: str = "train",
    fields: str = "dolly",
    template: str = "alpaca",
    greedy: bool = False,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_len: int = 256,
    max_len: int = 512,
    max_new_tokens: int | None = 256,
    batch_size: int = 16,
    max_examples: int | None = None,
    block: int = 256,
    mixed_precision: str = "no",
    device: str | None = None,
) -> Path:
    """Answer every record of `data` (a JSONL file or hub id, filtered by `split`) with `model_path` and write OUT."""
    if fields not in FIELDS:
        raise ConfigError(f"fields={fields!r} is not one of {list(FIELDS)}")
    if block < 1:
        raise ConfigError(f"block={block} must be >= 1")
    out = Path(out)
    examples, _ = D.load_records(data, split, max_examples=max_examples)
    partial = out.with_name(out.name + ".partial")
    done = 0
    if partial.is_file():
        lines = partial.read_text().splitlines()
        done = len(lines) - len(lines) % block if len(lines) < len(examples) else len(lines)
        partial.write_text("".join(line + "\n" for line in lines[:done]))  # drop a half-written block
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_path, device)
    stop = [D.end_of_turn_id(tokenizer, template)]
    autocast = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if mixed_precision == "bf16"
        else contextlib.nullcontext()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    starts = range(done, len(examples), block)
    for start in tqdm(starts, desc=f"answering {len(examples)} prompts", unit="block", initial=0):
        chunk = examples[start : start + block]
        prompts = [D.format_prompt(ex, template, tokenizer) for ex in chunk]
        with autocast:
            answers = generate_responses(
                model,
                tokenizer,
                prompts,
                seed=None if greedy else seed * 1_000_003 + start // block,
                greedy=greedy,
                temperature=temperature,
                top_p=top_p,
                max_prompt_len=max_prompt_len,
                max_len=max_len,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=False,
                stop_ids=stop,
            )
        with partial.open("a") as f:
            for ex, answer in zip(chunk, answers, strict=True):
                f.write(json.dumps(_row(ex, answer, fields, out_split)) + "\n")
            f.flush()
            os.fsync(f.fileno())
    if not partial.is_file():  # nothing to answer: an empty split is an error of the data, not an empty file
        partial.write_text("")
    _finish(partial, out, fields)
    return out


def _finish(partial: Path, out: Path, fields: str) -> None:
    """OUT from the partial file, without the empty answers: the data reader refuses an empty response, and an
    answer that ends the turn at once teaches nothing but the end. The partial file keeps them, because resuming
    counts its lines."""
    lines = partial.read_text().splitlines()
    key = "response" if fields == "dolly" else "output"
    kept = [line for line in lines if json.loads(line)[key].strip()]
    if len(kept) < len(lines):
        logger.warning(
            "%d of %d answers were empty (the model ended its turn at once) and are left out of %s",
            len(lines) - len(kept), len(lines), out,
        )  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, out)
    partial.unlink()


__all__ = ["FIELDS", "answer_dataset"]
