"""LoRA students (model.lora): only the adapters and the feature projections train; a checkpoint holds a merged model
that plain `from_pretrained` loads and the adapter that peft loads onto the base model, and the two agree."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_run_overrides
from transformers import AutoModelForCausalLM

from egad.config.run_config import load_config
from egad.config.schema import ConfigError
from egad.experiment import run_training
from egad.models.load import build_model

peft = pytest.importorskip("peft", reason="LoRA students need the lora extra (peft): pip install -e '.[lora]'")
TINY = REPO / "configs" / "tiny.yaml"


def test_lora_run_writes_a_merged_model_and_an_adapter(tmp_path, tiny_tokenizer_dir):
    over = tiny_run_overrides(
        tiny_tokenizer_dir,
        tmp_path / "r",
        **{
            "model.lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "objective.feat_layers": 2,
            "train.max_steps": 3,
            "train.lr": 1e-2,
            "train.eval_every": 0,
            "train.eval_at_start": False,
            "train.save_every": 0,
            "data.dev": None,
        },
    )
    trainer = run_training(load_config(TINY, over))
    student = trainer.acc.unwrap_model(trainer.module).student
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainer.module.projector is not None and all(p.requires_grad for p in trainer.module.projector.parameters())
    final = tmp_path / "r" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final).eval()  # plain transformers, no peft involved
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "feature_projector.safetensors").is_file()
    # The base is the untrained student again (built from its config with the run's seed; LoRA never changes it).
    m = trainer.cfg.model
    base = build_model(
        None, m.student_config, dtype=torch.float32, tokenizer=trainer.tokenizer, seed=trainer.cfg.train.seed
    )
    reloaded = peft.PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.tensor([[5, 9, 31, 7, 2, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reloaded(ids).logits, atol=1e-5, rtol=1e-5)
        untrained = build_model(None, m.student_config, dtype=torch.float32, tokenizer=trainer.tokenizer, seed=0)
        assert not torch.allclose(merged(ids).logits, untrained.eval()(ids).logits)  # the adapters moved the model


def test_bad_lora_specs_are_config_errors(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ConfigError, match="model.lora: unknown key"):
        load_config(TINY, tiny_run_overrides(tiny_tokenizer_dir, tmp_path, **{"model.lora": {"rank": 4}}))
    with pytest.raises(ConfigError, match="model.lora.r"):
        load_config(TINY, tiny_run_overrides(tiny_tokenizer_dir, tmp_path, **{"model.lora": {"r": 0}}))
