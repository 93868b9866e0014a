"""Instruction records: JSONL files or hub datasets read into `Example`s, with every bad record named.

Two record schemas are read, detected per record:

    Dolly    instruction, context (optional), response
    MiniLLM  instruction, input (optional),   output   (a string, or a list of references as in sinst)

Bad data fails loudly: every problem raises `DataError` naming the file, the 1-based line and the field. Nothing is
dropped silently either: records left out by the split filter or `max_examples` are counted in `LoadStats` and
logged on the `egad.data.batches` logger. Prompt templates, tokenisation and batching are in `egad.data.batches`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egad.errors import EgadError

logger = logging.getLogger("egad.data.batches")


class DataError(EgadError):
    """A problem in the data, located as `file:line: field 'name' ...` (hub rows: `id[split]:row`)."""

    def __init__(self, file: str, line: int | None, message: str, field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = f"{file}:{line}" if line is not None else file
        subject = f"field '{field}' " if field is not None else ""
        super().__init__(f"{where}: {subject}{message}")


@dataclass(frozen=True)
class Example:
    """One instruction example. `output` is the reference, or the list of references (sinst); `source_line` is the
    1-based line of the JSONL file (or row of the hub split) it came from, for error messages."""

    instruction: str
    input: str
    output: str | list[str]
    source_line: int

    @property
    def response(self) -> str:
        """The training target: the reference, or the first of several (scoring uses them all)."""
        return self.output if isinstance(self.output, str) else self.output[0]


@dataclass
class LoadStats:
    """What `load_records` read and what it left out. `records` = kept + dropped_split + dropped_max."""

    source: str
    records: int = 0
    blank_lines: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    dropped_split: int = 0
    dropped_max: int = 0
    kept: int = 0

    def summary(self) -> str:
        splits = ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items())) or "none"
        return (
            f"{self.source}: {self.records} records (splits: {splits}); kept {self.kept}, left out "
            f"{self.dropped_split} by the split filter and {self.dropped_max} by max_examples; "
            f"{self.blank_lines} blank lines"
        )


def _looks_like_hub_id(source: str) -> bool:
    return "/" in source and not source.endswith(".jsonl")


def load_records(
    source: str | Path, split: str | None = None, *, max_examples: int | None = None
) -> tuple[list[Example], LoadStats]:
    """Read instruction records from a JSONL file or, if `source` is not an existing path but looks like a hub id
    (`owner/name`), from `datasets.load_dataset(source, split=split or "train")`.

    For JSONL, `split` keeps the records whose `split` field equals it; asking for a split from a file without
    `split` fields is an error rather than a silent "everything". `max_examples` keeps the first n (file order)
    after the split filter. Returns (examples, stats); the stats are also logged.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    path = Path(source)
    if path.is_file():
        examples, stats = _load_jsonl(path, split)
    elif path.exists():
        raise DataError(str(source), None, "is not a file (expected a .jsonl file or a hub dataset id)")
    elif _looks_like_hub_id(str(source)):
        examples, stats = _load_hub(str(source), split or "train")
    else:
        raise DataError(str(source), None, "no such file (and not a hub dataset id of the form owner/name)")
    if max_examples is not None and len(examples) > max_examples:
        stats.dropped_max = len(examples) - max_examples
        examples = examples[:max_examples]
    stats.kept = len(examples)
    logger.info(stats.summary())
    return examples, stats


def _load_jsonl(path: Path, split: str | None) -> tuple[list[Example], LoadStats]:
    file = str(path)
    stats = LoadStats(source=file)
    parsed: list[tuple[Example, str | None]] = []
    first_without_split: int | None = None
    # Bytes, decoded line by line, so an encoding error still points at its line.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(file, line_no, f"is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                stats.blank_lines += 1
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(file, line_no, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(file, line_no, f"expected a JSON object, got {type(row).__name__}")
            example = _parse_record(row, file, line_no)
            rec_split = row.get("split")
            if rec_split is not None and not isinstance(rec_split, str):
                raise DataError(file, line_no, f"must be a string, got {type(rec_split).__name__}", "split")
            if rec_split is None and first_without_split is None:
                first_without_split = line_no
            stats.records += 1
            if rec_split is not None:
                stats.splits[rec_split] = stats.splits.get(rec_split, 0) + 1
            parsed.append((example, rec_split))
    if not parsed:
        raise DataError(file, None, "contains no records")
    if split is None:
        if len(stats.splits) > 1:
            # Not an error (a whole-file read is legitimate for inspection), but training on it would mix in test.
            logger.warning("%s: split=None loads every split (%s); pass split= to select one", file, stats.splits)
        return [ex for ex, _ in parsed], stats
    if not stats.splits:
        raise DataError(file, None, f"split={split!r} was requested but no record has a 'split' field; pass split=None")
    if first_without_split is not None:
        raise DataError(file, first_without_split, "is missing while other records have one", "split")
    if split not in stats.splits:
        found = ", ".join(sorted(stats.splits))
        raise DataError(file, None, f"no record has split {split!r} (found: {found})")
    kept = [ex for ex, s in parsed if s == split]
    stats.dropped_split = len(parsed) - len(kept)
    return kept, stats


def _load_hub(source: str, split: str) -> tuple[list[Example], LoadStats]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading {source!r} from the hub needs `pip install datasets`") from e
    where = f"{source}[{split}]"
    stats = LoadStats(source=where)
    examples = []
    for row_no, row in enumerate(datasets.load_dataset(source, split=split), start=1):
        examples.append(_parse_record(dict(row), where, row_no))
    if not examples:
        raise DataError(where, None, "contains no records")
    stats.records = len(examples)
    stats.splits = {split: len(examples)}
    return examples, stats


def _string_field(row: dict[str, Any], name: str, file: str, line: int, *, required: bool) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(file, line, "is missing", name)
        return ""
    if not isinstance(value, str):
        raise DataError(file, line, f"must be a string, got {type(value).__name__}", name)
    return value


def _parse_record(row: dict[str, Any], file: str, line: int) -> Example:
    if "response" in row and "output" in row:
        raise DataError(file, line, "record has both 'response' (Dolly) and 'output' (MiniLLM); keep one")
    if "response" in row:
        target_name, input_name = "response", "context"
    elif "output" in row:
        target_name, input_name = "output", "input"
    else:
        raise DataError(file, line, "is missing (a record needs 'response' (Dolly) or 'output' (MiniLLM))", "response")
    instruction = _string_field(row, "instruction", file, line, required=True)
    if not instruction.strip():
        raise DataError(file, line, "is empty; remove the record or fill it", "instruction")
    # Optional input: no stripping anywhere, the eval prompts keep surrounding whitespace verbatim.
    input_text = _string_field(row, input_name, file, line, required=False)
    target = row[target_name]
    if isinstance(target, list):
        if not target:
            raise DataError(file, line, "is an empty list of references", target_name)
        for i, ref in enumerate(target):
            if not isinstance(ref, str):
                raise DataError(file, line, f"must be a string, got {type(ref).__name__}", f"{target_name}[{i}]")
            if not ref.strip():
                raise DataError(file, line, "is empty; remove the reference or fill it", f"{target_name}[{i}]")
        output: str | list[str] = list(target)
    else:
        output = _string_field(row, target_name, file, line, required=True)
        if not output.strip():
            raise DataError(file, line, "is empty; remove the record or fill it", target_name)
    return Example(instruction=instruction, input=input_text, output=output, source_line=line)
