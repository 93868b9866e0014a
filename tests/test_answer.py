"""`egad generate`: a model answers a dataset's prompts as training data, resumably; `egad train` reads the file."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from egad.cli import app
from egad.data import batches as D
from egad.eval.answer import answer_dataset


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("answerer")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_answers_are_training_data_and_an_interrupted_run_resumes(tmp_path, tiny_model_dir, dolly_path):
    kw = dict(split="train", max_examples=10, max_new_tokens=5, block=4, max_prompt_len=48, max_len=96)
    whole = answer_dataset(str(tiny_model_dir), str(dolly_path), tmp_path / "whole.jsonl", **kw)
    rows = [json.loads(x) for x in whole.read_text().splitlines()]
    records, _ = D.load_records(dolly_path, "train", max_examples=10)
    assert len(rows) == 10 and [r["instruction"] for r in rows] == [ex.instruction for ex in records]
    assert all(r["split"] == "train" and set(r) == {"instruction", "context", "response", "split"} for r in rows)
    assert any(r["response"] != ex.response for r, ex in zip(rows, records, strict=True))  # the model's, not Dolly's
    # A kill after one block and part of the next: the partial block is dropped and redone, the result is the same.
    out = tmp_path / "again.jsonl"
    lines = whole.read_text().splitlines()
    (tmp_path / "again.jsonl.partial").write_text("".join(x + "\n" for x in lines[:6]))
    answer_dataset(str(tiny_model_dir), str(dolly_path), out, **kw)
    assert out.read_text() == whole.read_text() and not (tmp_path / "again.jsonl.partial").exists()
    trained_on, _ = D.load_records(out, "train")  # what `egad train --data.train OUT` reads
    assert len(trained_on) == 10


def test_cli_writes_minillm_fields_greedy(tmp_path, tiny_model_dir, dolly_path):
    out = tmp_path / "seqkd.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--data", str(dolly_path), "--out", str(out),
            "--max-examples", "3", "--max-new-tokens", "4", "--greedy", "--fields", "minillm",
            "--out-split", "seqkd"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all({"instruction", "input", "output"} <= set(r) and r["split"] == "seqkd" for r in rows)
    bad = CliRunner().invoke(app, [*args[:7], "--fields", "csv"])
    assert bad.exit_code == 2 and "fields" in bad.output


def test_empty_answers_are_left_out_and_resume_still_counts_them(tmp_path, tiny_model_dir, dolly_path, monkeypatch):
    import egad.eval.answer as A

    def every_other_empty(model, tokenizer, prompts, **kw):
        return ["" if i % 2 else " \n" if i % 3 == 0 else f"answer {i}" for i in range(len(prompts))]

    monkeypatch.setattr(A, "generate_responses", every_other_empty)
    kw = dict(split="train", max_examples=7, max_new_tokens=5, block=4, max_prompt_len=48, max_len=96)
    out = answer_dataset(str(tiny_model_dir), str(dolly_path), tmp_path / "a.jsonl", **kw)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # block 1 answers i = 0..3, block 2 i = 0..2: only the non-blank ones (i = 2 in each block) stay
    assert [r["response"] for r in rows] == ["answer 2", "answer 2"]
    assert len(D.load_records(out, "train")[0]) == 2
    # a run stopped after the first block resumes from its 4 lines, blanks included, and answers only the rest
    calls = []
    monkeypatch.setattr(A, "generate_responses", lambda m, t, prompts, **k: calls.append(len(prompts)) or
                        every_other_empty(m, t, prompts))  # fmt: skip
    partial = tmp_path / "b.jsonl.partial"
    partial.write_text("".join(json.dumps({"instruction": "x", "context": "", "response": r, "split": "train"}) + "\n"
                               for r in ["", "", "kept", ""]))  # fmt: skip
    again = answer_dataset(str(tiny_model_dir), str(dolly_path), tmp_path / "b.jsonl", **kw)
    assert calls == [3] and len(again.read_text().splitlines()) == 2 and not partial.exists()
