"""Records, templates, tokenisation, collation and the global batch order, on the real data where it is present."""

from __future__ import annotations

import json
import logging
import sys
import types
from itertools import islice
from pathlib import Path

import pytest
import torch

from egad.data.batches import (
    IGNORE_INDEX,
    collate,
    fingerprint,
    format_prompt,
    global_batches,
    shard,
    texts_for_tokenizer,
    tokenize_dataset,
    tokenize_example,
)
from egad.data.records import DataError, Example, load_records
from egad.models.tokenizer import train_bpe_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DOLLY = DATA / "dolly" / "dolly.jsonl"
EVAL_FILES = ["self_inst", "vicuna", "sinst", "uinst"]
needs_data = pytest.mark.skipif(not DOLLY.is_file(), reason="shared data not present at ../shared/data")

GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi."}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if DOLLY.is_file():
        with DOLLY.open(encoding="utf-8") as fh:
            train = (r for r in map(json.loads, fh) if r["split"] == "train")
            texts = [f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in islice(train, 500)]
    else:
        texts = [f"Instruction {i}: what is {i} + {i}? The answer is {2 * i}." for i in range(500)]
    return train_bpe_tokenizer(texts, 512, tmp_path_factory.mktemp("bpe"))


# ---------------------------------------------------------------- records


def test_documented_error_message(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [GOOD] * 16 + [{**GOOD, "response": "  \n"}])
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(err.value) == f"{path}:17: field 'response' is empty; remove the record or fill it"
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 17, "response")


@pytest.mark.parametrize(
    ("bad", "field", "fragment"),
    [
        ('{"instruction": "x", "response": ', None, "malformed JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        ({"context": "", "response": "r"}, "instruction", "is missing"),
        ({"instruction": "   ", "response": "r"}, "instruction", "is empty"),
        ({"instruction": "x", "context": "c"}, "response", "is missing"),
        ({"instruction": "x", "response": ""}, "response", "is empty"),
        ({"instruction": "x", "input": "", "output": "\t"}, "output", "is empty"),
        ({"instruction": 3, "response": "r"}, "instruction", "must be a string, got int"),
        ({"instruction": "x", "context": ["c"], "response": "r"}, "context", "must be a string, got list"),
        ({"instruction": "x", "response": {"text": "r"}}, "response", "must be a string, got dict"),
        ({"instruction": "x", "output": []}, "output", "empty list"),
        ({"instruction": "x", "output": ["ok", 5]}, "output[1]", "must be a string"),
        ({"instruction": "x", "output": ["ok", " "]}, "output[1]", "is empty"),
        ({"instruction": "x", "response": "r", "output": "o"}, None, "both"),
        ({"instruction": "x", "response": "r", "split": 1}, "split", "must be a string"),
    ],
)
def test_bad_line_names_file_line_field(tmp_path, bad, field, fragment):
    # Line 3: a blank line still counts, so the number matches what an editor shows.
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as err:
        load_records(path)
    e = err.value
    assert (e.file, e.line, e.field) == (str(path), 3, field)
    assert str(e).startswith(f"{path}:3: ")
    assert fragment in str(e)
    if field is not None:
        assert f"field '{field}'" in str(e)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match=r"enc\.jsonl:2: is not valid UTF-8"):
        load_records(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="contains no records"):
        load_records(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_schemas_and_stats(tmp_path, caplog):
    rows = [
        {"instruction": "a", "context": "ctx", "response": "r1", "split": "train"},
        {"instruction": "b", "input": "", "output": "r2", "split": "dev"},
        {"instruction": "c", "output": ["r3", "r3b"], "split": "train"},  # no input field: empty input
        {"instruction": "d", "context": None, "response": "r4", "split": "train"},
        {"instruction": "e", "response": "r5", "split": "train"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", [*rows[:2], "", *rows[2:]])
    with caplog.at_level(logging.INFO, logger="egad.data.batches"):
        recs, s = load_records(path, "train", max_examples=3)
    assert [r.instruction for r in recs] == ["a", "c", "d"]
    assert [r.source_line for r in recs] == [1, 4, 5]
    assert recs[0].input == "ctx" and recs[1].input == "" and recs[2].input == ""
    assert recs[1].output == ["r3", "r3b"] and recs[1].response == "r3"
    assert (s.records, s.blank_lines, s.kept, s.dropped_split, s.dropped_max) == (5, 1, 3, 1, 1)
    assert s.records == s.kept + s.dropped_split + s.dropped_max
    assert s.splits == {"train": 4, "dev": 1}
    assert s.summary() in caplog.text


def test_split_none_warns_when_splits_mix(tmp_path, caplog):
    path = write_jsonl(tmp_path / "both.jsonl", [{**GOOD, "split": "train"}, {**GOOD, "split": "test"}])
    with caplog.at_level(logging.WARNING, logger="egad.data.batches"):
        assert len(load_records(path)[0]) == 2
    assert "split=None loads every split" in caplog.text


def test_split_errors(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [GOOD, GOOD])
    assert len(load_records(plain)[0]) == 2
    with pytest.raises(DataError, match="no record has a 'split' field"):
        load_records(plain, "train")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{**GOOD, "split": "train"}, GOOD])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: field 'split' is missing"):
        load_records(mixed, "train")
    train_only = write_jsonl(tmp_path / "train.jsonl", [{**GOOD, "split": "train"}])
    with pytest.raises(DataError, match=r"no record has split 'validation' \(found: train\)"):
        load_records(train_only, "validation")
    with pytest.raises(ValueError, match="max_examples"):
        load_records(plain, max_examples=0)


@needs_data
@pytest.mark.parametrize(("split", "n"), [("train", 11435), ("dev", 1000), ("test", 500)])
def test_dolly_split_counts(split, n):
    recs, stats = load_records(str(DOLLY), split)
    assert len(recs) == stats.kept == n
    assert stats.splits == {"train": 11435, "dev": 1000, "test": 500}
    assert stats.dropped_split == 12935 - n and stats.records == 12935


def test_hub_path(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": "Name a fish.", "context": "", "response": "Tope", "category": "open_qa"}] * 3

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    recs, stats = load_records("databricks/databricks-dolly-15k", max_examples=2)
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert [(r.instruction, r.response, r.source_line) for r in recs] == [
        ("Name a fish.", "Tope", 1),
        ("Name a fish.", "Tope", 2),
    ]
    assert (stats.source, stats.records, stats.dropped_max) == ("databricks/databricks-dolly-15k[train]", 3, 1)
    load_records("org/ds", "test")
    assert calls[-1] == ("org/ds", "test")

    def bad_rows(name, split):
        return [{"instruction": "x", "response": "ok"}, {"instruction": "y", "response": ""}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=bad_rows))
    with pytest.raises(DataError, match=r"^org/ds\[train\]:2: field 'response' is empty"):
        load_records("org/ds")


def test_fingerprint_follows_file_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    first = fingerprint([str(path), "train", 100, 4096])
    assert first == fingerprint([str(path), "train", 100, 4096]) and len(first) == 64
    assert first != fingerprint([str(path), "train", 100, 512])
    write_jsonl(path, [GOOD, GOOD])
    assert first != fingerprint([str(path), "train", 100, 4096])


def test_texts_for_tokenizer():
    texts = list(texts_for_tokenizer([Example("Say hi.", "", ["Hi.", "Hello."], 1)]))
    assert texts == [format_prompt(Example("Say hi.", "", "Hi.", 1)) + "Hi."]


# ---------------------------------------------------------------- templates


@needs_data
@pytest.mark.parametrize("name", EVAL_FILES)
def test_alpaca_prompt_equals_eval_prompt(name):
    path = DATA / "eval" / f"{name}.jsonl"
    with path.open(encoding="utf-8") as fh:
        published = [json.loads(line)["prompt"] for line in fh]
    recs, _ = load_records(path)
    assert len(recs) == len(published) > 0
    mismatches = [r.source_line for r in recs if format_prompt(r) != published[r.source_line - 1]]
    assert mismatches == []


def test_alpaca_variants():
    with_input = format_prompt(Example("Summarise.", "Some text.", "Short.", 1))
    assert with_input.endswith("### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\n")
    no_input = format_prompt(Example("Say hi.", "", "Hi.", 1))
    assert no_input.startswith("Below is an instruction that describes a task. Write")
    assert "### Input" not in no_input and no_input.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt(Example("a", "", "b", 1), "vicuna")


def test_chat_template(tok):
    ex = Example("Summarise.", "Some text.", "Short.", 1)
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(ex, "chat", tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        assert format_prompt(ex, "chat", tok) == "<|user|>Summarise.\n\nSome text.\n<|assistant|>"
        assert format_prompt(Example("Hi?", "", "Hi.", 1), "chat", tok) == "<|user|>Hi?\n<|assistant|>"
    finally:
        tok.chat_template = None


# ---------------------------------------------------------------- tokenisation


def test_labels_mask_exactly_the_prompt(tok):
    ex = Example("Which is a species of fish? Tope or Rope", "", "Tope is a fish.", 1)
    item = tokenize_example(ex, tok, template="alpaca")
    n_prompt = len(tok(format_prompt(ex), add_special_tokens=False)["input_ids"])
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(labels[n_prompt:], clean_up_tokenization_spaces=False) == ex.response + tok.eos_token
    assert tok.decode(ids[:n_prompt], clean_up_tokenization_spaces=False) == format_prompt(ex)
    assert not item["truncated_prompt"] and not item["truncated_response"]


def test_sinst_trains_on_first_reference(tok):
    ex = Example("Title this.", "text", ["First title", "Second title"], 1)
    item = tokenize_example(ex, tok, template="alpaca")
    response = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert tok.decode(response, clean_up_tokenization_spaces=False) == "First title" + tok.eos_token


def test_truncation(tok):
    ex = Example("word " * 200 + "Final question?", "", "answer " * 50, 1)
    full_prompt = tok(format_prompt(ex), add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 32
    item = tokenize_example(ex, tok, template="alpaca", max_prompt_len=32, max_len=48)
    assert item["truncated_prompt"] and item["truncated_response"]
    assert len(item["input_ids"]) == 48
    # Left truncation keeps the end of the prompt, so "### Response:" survives.
    assert item["input_ids"][:32] == full_prompt[-32:]
    assert tok.decode(item["input_ids"][:32]).endswith("Final question?\n\n### Response:\n")
    assert item["labels"][:32] == [IGNORE_INDEX] * 32 and IGNORE_INDEX not in item["labels"][32:]
    assert tok.eos_token_id not in item["input_ids"][32:]  # eos is cut with the response tail


def test_tokenize_dataset_counts(tok, caplog):
    short = Example("Say hi.", "", "Hi.", 1)
    long_prompt = Example("word " * 100, "", "Hi.", 2)
    long_response = Example("Say hi.", "", "hi " * 100, 3)
    examples = [short, long_prompt, long_response, short]
    # Budgets relative to the short prompt, so the test holds for any tokenizer (the alpaca preamble alone is long).
    p_len = len(tok(format_prompt(short), add_special_tokens=False)["input_ids"]) + 10
    items, stats = tokenize_dataset(
        examples, tok, template="alpaca", max_prompt_len=p_len, max_len=p_len + 20, batch_size=3
    )
    assert (stats.examples, stats.kept, stats.truncated_prompt, stats.truncated_response) == (4, 4, 1, 1)
    assert stats.dropped_no_response == 0
    assert [it["index"] for it in items] == [0, 1, 2, 3]
    single = tokenize_example(short, tok, template="alpaca", max_prompt_len=p_len, max_len=p_len + 20)
    assert items[0] == {**single, "index": 0}
    # A prompt budget that fills max_len leaves no response token: dropped, and counted.
    with caplog.at_level(logging.WARNING, logger="egad.data.batches"):
        items, stats = tokenize_dataset(examples, tok, template="alpaca", max_prompt_len=p_len, max_len=p_len)
    assert stats.dropped_no_response == 1 and stats.kept == 3 and [it["index"] for it in items] == [0, 2, 3]
    assert "dropped with no response token left 1" in caplog.text


def test_tokenizer_without_eos():
    class NoEos:
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_example(Example("a", "", "b", 1), NoEos(), template="alpaca")
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_dataset([Example("a", "", "b", 1)], NoEos())


# ---------------------------------------------------------------- batching


def test_collate_pads_right():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "index": 4},
        {"input_ids": [8], "labels": [8], "index": 9},
    ]
    out = collate(batch, pad_id=1)
    assert set(out) == {"input_ids", "labels", "attention_mask", "index"}
    for key in ("input_ids", "labels", "attention_mask"):
        assert out[key].shape == (2, 3) and out[key].dtype == torch.long
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["index"].tolist() == [4, 9]
    assert "index" not in collate([{"input_ids": [1], "labels": [1]}], pad_id=0)
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_collate_real_items(tok):
    items, _ = tokenize_dataset([Example("Say hi.", "", "Hi.", 1), Example("Count.", "1 2", "3 4 5", 2)], tok)
    out = collate(items, tok.pad_token_id)
    lengths = out["attention_mask"].sum(1).tolist()
    assert lengths == [len(it["input_ids"]) for it in items]
    assert out["input_ids"].shape[1] == max(lengths)


def test_global_batches_deterministic_and_complete():
    a = global_batches(103, 8, seed=7, epoch=2)
    assert a == global_batches(103, 8, seed=7, epoch=2)
    assert a != global_batches(103, 8, seed=7, epoch=3) and a != global_batches(103, 8, seed=8, epoch=2)
    assert len(a) == 12 and all(len(b) == 8 for b in a)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 96 and set(flat) <= set(range(103))
    full = global_batches(103, 8, seed=7, epoch=2, drop_last=False)
    assert full[:12] == a and len(full[12]) == 7
    assert sorted(i for b in full for i in b) == list(range(103))
    # Resume: skipping k batches is slicing, since the list depends only on (seed, epoch).
    assert global_batches(103, 8, seed=7, epoch=2)[5:] == a[5:]


def test_shard_matches_single_process():
    batches = global_batches(64, 8, seed=0, epoch=0)
    for batch in batches:
        parts = [shard(batch, rank, 4, 2) for rank in range(4)]
        assert [i for p in parts for i in p] == batch  # 4 processes x 2 see exactly the 1-process batch
        assert shard(batch, 0, 1, 8) == batch
    assert shard([1, 2, 3], 1, 2, 2) == [3]  # short last batch (drop_last=False)
    with pytest.raises(ValueError, match="does not fit"):
        shard(list(range(9)), 0, 4, 2)
    with pytest.raises(ValueError):
        shard(batches[0], 4, 4, 2)


def test_the_data_order_is_frozen_across_versions():
    """The permutation's salt is a fixed string, not a module path: moving code must not change any run's batches
    (a reorganisation once did). An independent re-derivation of the contract: sha256 of the salt, torch.randperm."""
    import hashlib

    for seed, epoch in [(0, 0), (7, 2)]:
        digest = hashlib.sha256(f"egad.data.global_batches:{seed}:{epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        order = torch.randperm(50, generator=g).tolist()
        assert global_batches(50, 5, seed=seed, epoch=epoch) == [order[i : i + 5] for i in range(0, 50, 5)]
