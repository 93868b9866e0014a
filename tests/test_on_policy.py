"""On-policy training (train.on_policy): the student trains on its own samples of the batch's prompts, scored by the
online teacher; prompts stay masked, and a resumed run samples exactly what an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_run_overrides
from safetensors.torch import load_file

from egad.config.run_config import load_config
from egad.config.schema import ConfigError
from egad.data import rollout
from egad.experiment import run_training
from egad.train.trainer import Trainer

TINY = REPO / "configs" / "tiny.yaml"


def _over(tok, out, **extra):
    common = {
        "train.on_policy": 1.0,
        "train.on_policy_max_new_tokens": 6,
        "train.max_steps": 4,
        "train.per_device_batch_size": 4,
        "train.eval_every": 0,
        "train.eval_at_start": False,
        "train.save_every": 2,
        "data.dev": None,
        "objective.preset": "kd",
    }
    return tiny_run_overrides(tok, out, **{**common, **extra})


def test_the_student_trains_on_its_own_samples_with_the_prompt_masked(tmp_path, tiny_tokenizer_dir, monkeypatch):
    trainer = Trainer(load_config(TINY, _over(tiny_tokenizer_dir, tmp_path / "r", **{"train.max_steps": 1}))).setup()
    dataset = trainer.windows(0)[0]
    student = trainer.acc.unwrap_model(trainer.module).student
    # What the student samples from these prompts with the step's seed, computed here before training touches it.
    want = rollout.sample_batch(
        student,
        dataset,
        seed=rollout.sampling_seed(0, 0, 0, 0),
        pad_id=trainer.tokenizer.pad_token_id,
        stop_ids=[trainer.tokenizer.eos_token_id],
        max_len=128,
        max_new_tokens=6,
    )
    seen = []
    forward = type(trainer.module).forward

    def spy(self, input_ids, attention_mask, targets, *a, **k):
        seen.append((input_ids.clone(), targets.clone()))
        return forward(self, input_ids, attention_mask, targets, *a, **k)

    monkeypatch.setattr(type(trainer.module), "forward", spy)
    trainer.train()
    trainer.cleanup()
    ((ids, targets),) = seen
    assert torch.equal(ids, want["input_ids"])
    prompts = rollout.prompts_of(dataset)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        assert ids[row, :n].tolist() == prompt  # the dataset's prompt ...
        assert (targets[row, : n - 1] == -100).all()  # ... masked
        response = want["labels"][row, n:]
        response = response[response != -100]
        assert (
            1 <= response.numel() <= 6 and targets[row, n - 1 : n - 1 + response.numel()].tolist() == response.tolist()
        )
    assert not torch.equal(ids, dataset["input_ids"][:, : ids.shape[1]])  # not the dataset's responses


def test_resume_samples_what_an_uninterrupted_run_samples(tmp_path, tiny_tokenizer_dir):
    straight = run_training(load_config(TINY, _over(tiny_tokenizer_dir, tmp_path / "a")))
    first = run_training(load_config(TINY, _over(tiny_tokenizer_dir, tmp_path / "b")), stop_at=2)
    assert first.step == 2
    resumed = run_training(load_config(TINY, _over(tiny_tokenizer_dir, tmp_path / "b")), resume=True)
    assert straight.step == resumed.step == 4
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def test_mixed_fraction_and_refusals(tmp_path, tiny_tokenizer_dir):
    picks = [rollout.is_on_policy(0, step, 0, 0.5) for step in range(400)]
    assert 0.4 < sum(picks) / len(picks) < 0.6 and picks == [rollout.is_on_policy(0, s, 0, 0.5) for s in range(400)]
    assert not any(rollout.is_on_policy(0, s, 0, 0.0) for s in range(50))
    with pytest.raises(ConfigError, match="teacher cache"):
        load_config(TINY, _over(tiny_tokenizer_dir, tmp_path, **{"model.teacher_cache": str(tmp_path)}))
    with pytest.raises(ConfigError, match="train.on_policy"):
        load_config(TINY, _over(tiny_tokenizer_dir, tmp_path, **{"train.on_policy": 1.5}))


def test_the_on_policy_draw_is_frozen_across_versions():
    """The draw's salt is a fixed string ("egad.rollout"), not the module's path, so moving code keeps every run's
    choice of on-policy batches; re-derived here from the contract: sha256, first 8 bytes as a uniform in [0, 1)."""
    import hashlib

    for step in range(40):
        digest = hashlib.sha256(f"egad.rollout:3:{step}:1".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2**64
        assert rollout.is_on_policy(3, step, 1, 0.5) == (u < 0.5)
