"""egad.integrations.trl: TRL's DistillationTrainer with egad's objective as its loss.

(1) On one fixed batch of TRL-style inputs the adapter's loss and gradients equal egad's objective computed directly
from the models' full logits; (2) a short on-policy run trains and logs egad's metrics; (3) the TRL version pin."""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs the trl extra: pip install -e '.[trl]'")

from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DistillationConfig  # noqa: E402

from egad.config.presets import preset  # noqa: E402
from egad.config.schema import ConfigError  # noqa: E402
from egad.integrations.common import PROJECTOR_ATTR  # noqa: E402
from egad.integrations.trl import (  # noqa: E402
    TRL_VERSIONS,
    EgadDistillationTrainer,
    TRLVersionError,
    check_trl_version,
)
from egad.models.load import capture_hidden  # noqa: E402
from egad.objective.compose import StudentOutputs, distillation_loss  # noqa: E402
from egad.plan.entropy import fit_quantile_knots  # noqa: E402
from egad.teacher.signal import DenseSignal  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer_dir))
    tok.padding_side = "left"
    return tok


def _model(tok, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(cfg)


def _args(tmp_path, **kw) -> DistillationConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_completion_length=8,
        use_vllm=False,
        report_to="none",
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        max_steps=3,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return DistillationConfig(**base)


def _prompts(n: int = 8) -> Dataset:
    topics = ["rivers", "bread", "the moon", "bicycles", "music", "rain", "chess", "tea"]
    return Dataset.from_list([{"prompt": f"Write one sentence about {topics[i % len(topics)]}."} for i in range(n)])


def _knots() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return fit_quantile_knots(torch.rand(4000, generator=g) * math.log(512))


def _trl_inputs(vocab: int, pad: int) -> dict[str, torch.Tensor]:
    """A generation batch as TRL's _generate_and_score_completions returns it: prompts left-padded, completions
    right-padded, num_items_in_batch the (here single-process) completion-token count."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, vocab, (3, 6), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    prompt_mask[2, :1] = 0
    prompt_ids[prompt_mask == 0] = pad
    completion_ids = torch.randint(3, vocab, (3, 7), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    completion_mask[2, 6:] = 0
    completion_ids[completion_mask == 0] = pad
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum().float(),
    }


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("name", ["kd", "egad"])
def test_adapter_loss_equals_the_objective_on_full_logits(name, tokenizer, tmp_path):
    student, teacher = _model(tokenizer, 32, 2, 0), _model(tokenizer, 64, 2, 1)
    knots = _knots()
    trainer = EgadDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path),
        train_dataset=_prompts(),
        processing_class=tokenizer,
        objective=name,
        entropy_knots=knots,
    )
    model = trainer.model
    assert (getattr(model, PROJECTOR_ATTR, None) is not None) == preset(name).uses_features
    trainer.state.global_step, trainer.state.max_steps = 1, 4  # progress 1/3: the curriculum is not at its start
    inputs = _trl_inputs(len(tokenizer), tokenizer.pad_token_id)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    got = _grads(model)

    # Reference: egad's objective on the models' own full logits at the completion positions.
    cfg, pairs = trainer.egad.cfg, trainer.egad.pairs
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    p, k = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    at = slice(p - 1, p + k - 1)  # the positions that predict the completion tokens
    with capture_hidden(model, [m for m, _ in pairs]) as s_feats:
        s_logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), capture_hidden(trainer.teacher_model, [t for _, t in pairs]) as t_feats:
        t_logits = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits
    targets = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    ref = distillation_loss(
        StudentOutputs(logits=s_logits[:, at], features=[f[:, at] for f in s_feats] or None),
        DenseSignal(t_logits[:, at], [f[:, at] for f in t_feats] or None),
        targets,
        cfg,
        progress=1 / 3,  # step 1 of steps 0..3
        num_tokens=float(inputs["num_items_in_batch"]),
        vocab_size=len(tokenizer),
        knots=knots,
        projector=getattr(model, PROJECTOR_ATTR, None),
    )
    ref.loss.backward()
    want = _grads(model)

    torch.testing.assert_close(loss.detach(), ref.loss.detach(), atol=1e-5, rtol=1e-4)
    assert set(got) == set(want) == {n for n, q in model.named_parameters() if q.requires_grad}
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    if cfg.uses_features:
        assert float(ref.metrics["feat"]) > 0 and any(n.startswith(PROJECTOR_ATTR) for n in want)
    assert trainer._metrics["train"]["egad/kd"] and math.isfinite(trainer._metrics["train"]["egad/kd"][0])


def test_egad_preset_trains_on_policy(tokenizer, tmp_path):
    student, teacher = _model(tokenizer, 32, 2, 0), _model(tokenizer, 64, 2, 1)
    before = {n: q.detach().clone() for n, q in student.named_parameters()}
    trainer = EgadDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path),
        train_dataset=_prompts(),
        processing_class=tokenizer,
        objective=preset("egad", cdf_mode="ema_hist"),  # the running entropy CDF, kept by the adapter
        entropy_knots=_knots(),  # where the running CDF starts
    )
    projector_before = [q.detach().clone() for q in trainer.egad.projector.parameters()]
    trainer.train()

    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3 and all(math.isfinite(row["loss"]) for row in logs)
    for key in ("egad/kd", "egad/ce", "egad/feat", "egad/weight_mean", "egad/tau_mean", "egad/routed_frac"):
        assert all(math.isfinite(row[key]) for row in logs), key
    assert all(row["egad/teacher_entropy"] > 0 for row in logs)
    assert trainer.egad.streams["entropy"].num_updates >= 3  # the start, then once per finished window
    changed = [n for n, q in student.named_parameters() if n in before and not torch.equal(q.detach(), before[n])]
    assert len(changed) == len(before)  # every student weight (embeddings, blocks, norms; the head is tied)
    assert all(
        not torch.equal(a, b.detach())
        for a, b in zip(projector_before, trainer.egad.projector.parameters(), strict=True)
    )

    # The saved model carries the projector's weights; from_pretrained loads the student and ignores them.
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert any(key.startswith(PROJECTOR_ATTR) for key in load_file(str(out / "model.safetensors")))
    loaded = LlamaForCausalLM.from_pretrained(str(out))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)


def test_missing_knots_is_a_clear_config_error(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="cdf_mode='global'.*entropy_knots=.*calibrate_entropy"):
        EgadDistillationTrainer(
            model=_model(tokenizer, 32, 2, 0),
            teacher_model=_model(tokenizer, 64, 2, 1),
            args=_args(tmp_path),
            train_dataset=_prompts(),
            processing_class=tokenizer,
            objective="egad",
        )


def test_version_pin(monkeypatch, tokenizer, tmp_path):
    assert TRL_VERSIONS == ">=1.10,<1.17"
    check_trl_version(trl.__version__)  # the installed one is in range
    for ok in ("1.10.0", "1.16.3"):
        check_trl_version(ok)
    for bad in ("1.9.2", "1.17.0", "1.17.0.dev0", "2.0.0"):
        with pytest.raises(TRLVersionError, match=rf"trl {bad} is installed"):
            check_trl_version(bad)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(TRLVersionError, match=r"trl>=1\.10,<1\.17.*trl 1\.17\.0 is installed"):
        EgadDistillationTrainer(
            model=_model(tokenizer, 32, 2, 0),
            teacher_model=_model(tokenizer, 64, 2, 1),
            args=_args(tmp_path),
            train_dataset=_prompts(),
            processing_class=tokenizer,
            objective="kd",
        )
