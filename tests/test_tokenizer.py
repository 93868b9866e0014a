"""The toy byte-level BPE: save/reload round trip, determinism, and the atomic on-disk cache."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import egad.models.tokenizer as tokmod
from egad.models.tokenizer import EOS_TOKEN, PAD_TOKEN, cached_bpe_tokenizer, train_bpe_tokenizer

DOLLY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dolly" / "dolly.jsonl"
VOCAB = 512


def corpus(n: int = 500) -> list[str]:
    """~500 Dolly train records; a synthetic corpus where the shared data is absent, so these tests always run."""
    if not DOLLY.is_file():
        return [f"Instruction {i}: explain the number {i * 7}.\nThe answer is {i * 7}, naïvely." for i in range(n)]
    with DOLLY.open(encoding="utf-8") as fh:
        rows = (json.loads(line) for line in fh)
        train = (r for r in rows if r["split"] == "train")
        return [f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in islice(train, n)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_bpe_tokenizer(texts, VOCAB, out), out


def test_save_reload_round_trip(trained):
    tok, out = trained
    assert (out / "tokenizer.json").is_file()
    again = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == len(again) == VOCAB
    assert again.eos_token == again.bos_token == EOS_TOKEN and again.pad_token == PAD_TOKEN
    assert again.eos_token_id != again.pad_token_id
    text = "Héllo  wörld!\n\n### Response:\n 日本語 [3]\ttabs"
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    # Byte-level: any text, including characters never seen in training, decodes back exactly.
    assert again.decode(ids, clean_up_tokenization_spaces=False) == text
    # No special tokens are inserted implicitly: the data module appends eos itself.
    assert again(text)["input_ids"] == ids


def test_deterministic(texts, trained, tmp_path):
    _, out = trained
    train_bpe_tokenizer(texts, VOCAB, tmp_path)
    first = json.loads((out / "tokenizer.json").read_text())["model"]
    second = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    assert first["vocab"] == second["vocab"] and first["merges"] == second["merges"]


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(["abc"], 100, tmp_path)


def test_cache_trains_once_then_loads(texts, tmp_path, monkeypatch):
    calls = {"texts_fn": 0}

    def texts_fn():
        calls["texts_fn"] += 1
        return iter(texts)

    first = cached_bpe_tokenizer(texts_fn, VOCAB, tmp_path, "0123456789abcdef")
    final = tmp_path / f"bpe-{VOCAB}-0123456789ab"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary directory left behind
    assert calls["texts_fn"] == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer must be loaded, not retrained")

    monkeypatch.setattr(tokmod, "train_bpe_tokenizer", no_training)
    mtime = (final / "tokenizer.json").stat().st_mtime_ns
    second = cached_bpe_tokenizer(texts_fn, VOCAB, tmp_path, "0123456789abcdef")
    assert calls["texts_fn"] == 1
    assert (final / "tokenizer.json").stat().st_mtime_ns == mtime
    sample = texts[0]
    assert first(sample)["input_ids"] == second(sample)["input_ids"]


def test_cache_interrupted_training_leaves_nothing(tmp_path):
    def broken():
        yield "some text"
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through reading the corpus

    with pytest.raises(KeyboardInterrupt):
        cached_bpe_tokenizer(broken, VOCAB, tmp_path, "abc")
    assert list(tmp_path.iterdir()) == []


def test_cache_rejects_unsafe_fingerprint(tmp_path):
    with pytest.raises(ValueError, match="fingerprint"):
        cached_bpe_tokenizer(lambda: ["x"], VOCAB, tmp_path, "../escape")
    with pytest.raises(ValueError, match="fingerprint"):
        cached_bpe_tokenizer(lambda: ["x"], VOCAB, tmp_path, "")
