"""End-to-end training on CPU with tiny from_config models and the real Dolly file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_run_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from egad.config.run_config import build_config, load_config
from egad.config.schema import ConfigError
from egad.data.records import DataError
from egad.experiment import run_training
from egad.models.load import ModelError, check_tokenizers
from egad.train.trainer import Trainer

TINY = REPO / "configs" / "tiny.yaml"


def run(overrides: dict, *, resume: bool = False, stop_at: int | None = None) -> Trainer:
    return run_training(load_config(TINY, overrides), resume=resume, stop_at=stop_at)


def test_end_to_end_tiny_run(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "run"
    run(
        tiny_run_overrides(
            tiny_tokenizer_dir,
            out,
            **{
                "train.max_steps": 24,
                "train.eval_every": 12,
                "train.save_every": 12,
                "train.tensorboard": True,
                "train.lr": 3e-3,
            },
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "dev_nll" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert evals[-1]["dev_nll"] < evals[0]["dev_nll"] - 0.2, evals
    train_rows = [r for r in rows if "ce" in r and "step" in r]
    for key in (
        "loss",
        "ce",
        "kd",
        "feat",
        "entropy_mean",
        "entropy_p90",
        "lambda",
        "weight_mean",
        "tau_mean",
        "routed_frac",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert key in train_rows[-1], key
    assert {"dev_kl", "dev_teacher_nll", "dev_top1_agree"} <= set(evals[-1])
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("### Instruction:\nSay hi\n\n### Response:\n", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] >= len(tok)
    assert (out / "best" / "model.safetensors").is_file() and (
        out / "final" / "feature_projector.safetensors"
    ).is_file()
    assert (out / "checkpoint-24" / "trainer_state.json").is_file()
    from egad.models.checkpoint import saved_prompt

    assert saved_prompt(out / "final") == {"template": "alpaca", "max_prompt_len": 64, "max_len": 128}
    assert (out / "entropy_knots.safetensors").is_file()
    assert list((out / "tb").iterdir())


@pytest.mark.parametrize(
    "objective",
    [
        {"objective.preset": "egad"},
        # Streamed CDFs: the Hellinger distance's (student-side, AdaKD) and the teacher entropy's (ema_hist), both
        # saved in the checkpoint and resumed.
        {"objective.preset": "adakd_idts", "objective.cdf_mode": "ema_hist", "objective.weighting": "curriculum"},
        # The anchor's reference weights are rebuilt, not loaded: a resumed run must pull towards the same ones.
        {"objective.preset": "kd", "train.anchor_l2": 0.5},
    ],
    ids=["egad", "streams", "anchor"],
)
def test_resume_continues_the_same_run(tmp_path, tiny_tokenizer_dir, objective):
    common = {
        "train.max_steps": 8,
        "train.save_every": 4,
        "train.eval_every": 0,
        "data.dev": None,
        **objective,
        "train.grad_accum": 2,
        "train.per_device_batch_size": 4,
    }
    straight = tmp_path / "straight"
    run(tiny_run_overrides(tiny_tokenizer_dir, straight, **common))
    split = tmp_path / "split"
    first = run(tiny_run_overrides(tiny_tokenizer_dir, split, **common), stop_at=4)
    assert first.step == 4 and not (split / "final").exists()
    if "objective.cdf_mode" in objective:
        saved = torch.load(split / "checkpoint-4" / "signal_streams.pt")
        assert set(saved) == {"entropy", "hellinger"} and saved["hellinger"]["num_updates"] == 5  # start + 4 windows
    other_batch = tiny_run_overrides(tiny_tokenizer_dir, split, **{**common, "train.grad_accum": 1})
    with pytest.raises(ConfigError, match="global batch of 8.*this launch gives 4"):
        run(other_batch, resume=True)
    second = run(tiny_run_overrides(tiny_tokenizer_dir, split, **common), resume=True)
    assert second.step == 8
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(split / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    losses = {}
    for name in ("straight", "split"):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["split"]) == len(losses["straight"])
    torch.testing.assert_close(torch.tensor(losses["split"]), torch.tensor(losses["straight"]), atol=1e-5, rtol=1e-4)


def test_every_config_parses():
    from egad.config.run_config import RunConfig

    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        assert isinstance(load_config(f), RunConfig), f
    import yaml

    for f in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        assert yaml.safe_load(f.read_text())["distributed_type"] in ("DEEPSPEED", "FSDP", "MULTI_GPU"), f
    from egad import experiment as X

    scales = sorted((REPO / "configs" / "study").glob("*.yaml"))
    assert len(scales) >= 3
    for f in scales:  # every study scale parses, and its run overrides build a run config
        size = X.load_scale(f, X.TOY)
        raw = X.base_run(size, REPO / "d.jsonl", REPO / "runs" / "x", "tok")
        raw["model"].update(X.model_fields("student", size.student), teacher="t")
        assert isinstance(size, X.Scale) and build_config(raw).train.per_device_batch_size == size.batch, f


def test_documented_errors(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ConfigError, match="objective.preset='egda' is unknown"):
        load_config(TINY, {"objective.preset": "egda"})
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(TINY, {"train.lrr": 1.0})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "response": "b", "split": "train"}\n{"instruction": "x",\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        Trainer(
            load_config(TINY, tiny_run_overrides(tiny_tokenizer_dir, tmp_path / "r", **{"data.train": str(bad)}))
        ).setup()
    other_dir = tmp_path / "tok2"
    from egad.data import batches as D
    from egad.models.tokenizer import train_bpe_tokenizer

    records, _ = D.load_records(REPO.parent / "shared" / "data" / "dolly" / "dolly.jsonl", "dev", max_examples=300)
    other = train_bpe_tokenizer(D.texts_for_tokenizer(records), 400, other_dir)
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_tokenizers(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), other)


def test_interrupt_saves_the_last_finished_step_and_resume_completes(tmp_path, tiny_tokenizer_dir, monkeypatch):
    over = tiny_run_overrides(
        tiny_tokenizer_dir,
        tmp_path / "r",
        **{"train.max_steps": 6, "train.save_every": 0, "train.eval_every": 0, "data.dev": None},
    )
    trainer = Trainer(load_config(TINY, over)).setup()
    real_step = trainer._train_step

    def flaky():
        if trainer.step == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "_train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.cleanup()
    assert (tmp_path / "r" / "checkpoint-3" / "trainer_state.json").is_file()
    resumed = run(over, resume=True)
    assert resumed.step == 6 and (tmp_path / "r" / "final" / "model.safetensors").is_file()


def test_train_from_teacher_cache_needs_no_teacher_and_refuses_a_foreign_cache(tmp_path, tiny_tokenizer_dir):
    from egad.teacher.cache import CacheError
    from egad.teacher.cache_job import run_cache_job

    over = tiny_run_overrides(
        tiny_tokenizer_dir,
        tmp_path / "r",
        **{"train.max_steps": 6, "train.eval_every": 0, "train.eval_at_start": False},
    )
    cfg = load_config(TINY, over)
    man = run_cache_job(cfg, tmp_path / "cache", k=16, hidden_quantile=0.8, examples_per_shard=128)
    assert man["complete"] and man["layers"] and man["bytes_per_token"] > 0
    trainer = Trainer(load_config(TINY, {**over, "model.teacher_cache": str(tmp_path / "cache")})).setup()
    assert trainer.teacher_model is None and trainer.source is trainer.cache is not None
    trainer.train()
    trainer.cleanup()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "kd" in r][-1]
    assert last["kd"] > 0 and last["feat"] > 0 and 0 < last["routed_frac"] <= 0.25
    with pytest.raises(CacheError, match="data_fingerprint"):
        Trainer(
            load_config(TINY, {**over, "model.teacher_cache": str(tmp_path / "cache"), "data.max_len": 120})
        ).setup()


def test_runs_with_other_mixed_precision_follow_in_one_process(tmp_path, tiny_tokenizer_dir):
    """accelerate's settings are process-wide singletons: a second run must still get the precision it asks for."""
    common = {"train.max_steps": 1, "train.eval_every": 0, "train.eval_at_start": False, "data.dev": None}
    for mp in ("no", "bf16"):
        run(tiny_run_overrides(tiny_tokenizer_dir, tmp_path / mp, **common, **{"train.mixed_precision": mp}))
        setup = json.loads((tmp_path / mp / "metrics.jsonl").read_text().splitlines()[0])
        assert setup["event"] == "setup" and setup["mixed_precision"] == mp
