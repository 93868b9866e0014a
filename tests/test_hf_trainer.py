"""egad.integrations.hf.EgadTrainer: egad's objective in a plain transformers.Trainer.

Gradient accumulation normalises by the window's token count: 2 micro-batches of b give the same loss and update as
one batch of 2b; and a short run trains, evaluates and saves a model that from_pretrained loads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from egad.config.presets import preset
from egad.data import batches as D
from egad.integrations.common import PROJECTOR_ATTR
from egad.integrations.hf import EgadTrainer
from egad.plan.entropy import fit_quantile_knots

torch.set_num_threads(1)

VOCAB = 64


def _model(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _examples(n: int = 8) -> list[dict]:
    """Prompt + response items of different lengths, labels -100 on the prompt (as egad.data.batches tokenises them)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        p, r = 3 + i % 4, 4 + (i * 3) % 5
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return D.collate(items, pad_id=0)


def _args(tmp_path, name: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / name),
        learning_rate=0.1,
        optim="sgd",  # plain SGD: the update is proportional to the gradient, so a mis-scaled loss shows
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping, which would hide a scale
        weight_decay=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",  # same data in the same order for both runs
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize(("name", "fused"), [("egad_no_c3", True), ("feat_kd_all", True), ("kd", False)])
def test_accumulation_equals_one_big_batch(name, fused, tmp_path):
    """egad_no_c3 (curriculum + per-token temperature, global knots), feature KD on all tokens (projector) and KD on
    the models' full logits (fused=False) are per-token objectives, so micro-batching must not change them."""
    student, teacher = _model(32, 0), _model(48, 1)
    cfg = preset(name)
    knots = fit_quantile_knots(torch.rand(2000, generator=torch.Generator().manual_seed(0)) * math.log(VOCAB))

    def run(batch: int, accumulation: int):
        torch.manual_seed(7)  # the projector's initialisation
        trainer = EgadTrainer(
            copy.deepcopy(student),
            copy.deepcopy(teacher),
            _args(
                tmp_path,
                f"b{batch}",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
            ),
            objective=cfg,
            entropy_knots=knots if cfg.needs_knots else None,
            fused=fused,
            train_dataset=_examples(),
            data_collator=_collate,
        )
        trainer.train()
        loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
        return loss, dict(trainer.model.named_parameters()), trainer

    loss_acc, params_acc, t_acc = run(2, 2)
    loss_big, params_big, _ = run(4, 1)
    assert math.isfinite(loss_acc)
    assert abs(loss_acc - loss_big) <= 1e-5
    assert set(params_acc) == set(params_big)
    assert any(n.startswith(PROJECTOR_ATTR) for n in params_acc) == cfg.uses_features
    moved = 0
    for n, p in params_acc.items():
        torch.testing.assert_close(
            p.detach(), params_big[n].detach(), atol=1e-5, rtol=0, msg=lambda m, n=n: f"{n}: {m}"
        )
        moved += not torch.equal(p.detach(), dict(student.named_parameters()).get(n, p).detach())
    assert moved > 0
    logged = next(row for row in t_acc.state.log_history if "loss" in row)
    assert logged["egad/kd"] > 0 and logged["egad/ce"] > 0


def test_short_run_evaluates_and_saves_a_loadable_model(tmp_path):
    student, teacher = _model(32, 0), _model(48, 1)
    trainer = EgadTrainer(
        student,
        teacher,
        _args(tmp_path, "run", per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, optim="adamw_torch"),
        objective=preset("egad", cdf_mode="batch", route_mode="batch_topk"),  # batch rules: one window, one batch
        train_dataset=_examples(),
        eval_dataset=_examples(4),
        data_collator=_collate,
    )
    before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 2 and all(math.isfinite(row["loss"]) and row["egad/feat"] > 0 for row in logs)
    assert not torch.equal(before, student.model.layers[0].self_attn.q_proj.weight)

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_egad/kd"])

    out = tmp_path / "final"
    trainer.save_model(str(out))
    saved = load_file(str(out / "model.safetensors"))
    assert any(key.startswith(PROJECTOR_ATTR) for key in saved)  # the projector travels with the checkpoint
    loaded = LlamaForCausalLM.from_pretrained(str(out))
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, dict(student.named_parameters())[n].detach(), atol=0, rtol=0)
