"""The teacher cache across tokenizers (issue 22): `egad cache` for a cross-tokenizer config writes the teacher's
signal in the teacher's own token space, and `egad train` reads it for a student with another tokenizer. The oracle:
with the whole teacher vocabulary cached (k = V_T, fp16 log-probs, every hidden state) cached training follows online
training step by step, KD and EGAD. Then resume, the checkpoint, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_run_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from egad.config.run_config import load_config
from egad.experiment import run_training
from egad.teacher.cache import CacheError
from egad.teacher.cache_job import run_cache_job
from egad.train.trainer import Trainer

TINY = REPO / "configs" / "tiny.yaml"


def _over(tok, teacher_tok, out, **extra):
    o = {
        "train.max_steps": 4,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.lr": 3e-3,
        "train.log_every": 1,
        "train.eval_at_start": False,
        "data.max_train_examples": 96,
        "data.dev": None,
        "objective.feat_layers": 1,
        "model.teacher_tokenizer": str(teacher_tok),
        "objective.cross_vocab": "exact",
    }
    o.update(extra)
    return tiny_run_overrides(tok, out, **o)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, tiny_tokenizer_dir, teacher_tok_dir):
    """The whole teacher vocabulary at fp16, every token's hidden states: the cache that loses nothing but fp16."""
    out = tmp_path_factory.mktemp("xcache") / "cache"
    v_t = len(AutoTokenizer.from_pretrained(teacher_tok_dir))
    cfg = load_config(TINY, _over(tiny_tokenizer_dir, teacher_tok_dir, out.parent / "unused"))
    m = run_cache_job(cfg, out, k=v_t, tail_samples=0, logprob_bits=16, hidden_quantile=0.0)
    assert m["complete"] and m["vocab_size"] == v_t and "teacher-tok" in m["tokenizer_name"]
    return out


def _steps(out) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "kd" in r and "step" in r]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["kd", "egad"])
def test_cached_training_equals_online_training_with_the_whole_vocabulary(
    tmp_path, tiny_tokenizer_dir, teacher_tok_dir, full_cache, preset
):
    got = {}
    for name, extra in (("online", {}), ("cached", {"model.teacher_cache": str(full_cache)})):
        out = tmp_path / name
        trainer = run_training(load_config(TINY, _over(tiny_tokenizer_dir, teacher_tok_dir, out,
                                                       **{"objective.preset": preset}, **extra)))  # fmt: skip
        got[name] = _steps(out)
        assert (trainer.teacher_model is None) == (name == "cached")
    assert len(got["online"]) == len(got["cached"]) == 4
    for a, b in zip(got["online"], got["cached"], strict=True):
        assert a["aligned_frac"] == b["aligned_frac"]
        for key in ("loss", "ce", "kd", "feat", "tau_mean", "weight_mean", "routed_frac"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (key, a, b)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cached" / "final")
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path / "cached" / "final"))


@pytest.mark.slow
def test_a_cached_cross_run_resumes_to_the_same_weights(tmp_path, tiny_tokenizer_dir, teacher_tok_dir, full_cache):
    common = {"objective.preset": "egad", "model.teacher_cache": str(full_cache), "train.save_every": 2}
    run_training(load_config(TINY, _over(tiny_tokenizer_dir, teacher_tok_dir, tmp_path / "straight", **common)))
    split = tmp_path / "split"
    over = _over(tiny_tokenizer_dir, teacher_tok_dir, split, **common)
    assert run_training(load_config(TINY, over), stop_at=2).step == 2
    assert run_training(load_config(TINY, over), resume=True).step == 4
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(split / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_refusals(tmp_path, tiny_tokenizer_dir, teacher_tok_dir, full_cache):
    base = _over(tiny_tokenizer_dir, teacher_tok_dir, tmp_path / "r", **{"model.teacher_cache": str(full_cache)})
    # Read by a teacher tokenizer it was not written for (here the student's): both named.
    wrong = {**base, "model.teacher_tokenizer": str(tiny_tokenizer_dir)}
    with pytest.raises(CacheError, match=r"written with '.*teacher-tok.*' .* teacher reads with '.*tok"):
        Trainer(load_config(TINY, wrong)).setup()
    # Other records than the cache's: the teacher side's fingerprint differs.
    with pytest.raises(CacheError, match="data_fingerprint"):
        Trainer(load_config(TINY, {**base, "data.max_train_examples": 64})).setup()
    # The feature branch at a teacher layer the cache does not store.
    with pytest.raises(CacheError, match="stores teacher layers"):
        Trainer(load_config(TINY, {**base, "objective.preset": "egad", "objective.layer_map": "uniform",
                                   "objective.feat_layers": 2, "model.student_config": {
                                       **base["model.student_config"], "num_hidden_layers": 4}})).setup()  # fmt: skip
