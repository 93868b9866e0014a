"""Every preset runs one forward/backward through tiny HF models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from conftest import plan_state
from transformers import AutoModelForCausalLM, Qwen2Config

from egad.config.presets import PRESETS, preset
from egad.config.schema import ConfigError, ObjectiveConfig
from egad.data.batches import shift_labels
from egad.losses.features import FeatureProjector, layer_map
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.plan.entropy import fit_quantile_knots, token_entropy
from egad.teacher.signal import DenseSignal

VOCAB = 101  # the real vocabulary; the teacher's embedding has padded rows beyond it


def tiny(hidden: int, vocab_rows: int, seed: int):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def models():
    teacher = tiny(48, VOCAB + 7, seed=0).eval()
    student = tiny(32, VOCAB, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 19), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    targets = shift_labels(labels)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True)
    mask = targets.reshape(-1) != -100
    knots = fit_quantile_knots(token_entropy(t_out.logits.reshape(-1, VOCAB + 7)[mask][:, :VOCAB]), 51)
    return teacher, student, ids, targets, t_out, knots


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_one_step_on_tiny_hf_models(name, models):
    teacher, student, ids, targets, t_out, knots = models
    cfg = preset(name, feat_layers=2)
    pairs = layer_map(cfg.layer_map, 2, 2, cfg.feat_layers)
    student.zero_grad()
    s_out = student(input_ids=ids, output_hidden_states=True)
    proj = FeatureProjector(32, 48, len(pairs)) if cfg.uses_features else None
    out = distillation_loss(
        StudentOutputs(logits=s_out.logits, features=[s_out.hidden_states[m] for m, _ in pairs]),
        DenseSignal(t_out.logits, [t_out.hidden_states[t] for _, t in pairs]),
        targets,
        cfg,
        progress=0.5,
        vocab_size=VOCAB,
        state=plan_state(t_out.logits, s_out.logits),
        projector=proj,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    g = student.model.embed_tokens.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    if proj is not None:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
        assert out.metrics["feat"].item() > 0
    if cfg.alpha > 0:
        assert out.metrics["kd"].item() > 0


def test_fused_path_on_hf_model_matches_logits(models):
    teacher, student, ids, targets, t_out, knots = models
    cfg = preset("egad_no_c3", chunk_size=7)
    student.zero_grad()
    out_logits = student(input_ids=ids)
    a = distillation_loss(
        StudentOutputs(logits=out_logits.logits),
        DenseSignal(t_out.logits),
        targets,
        cfg,
        progress=0.3,
        vocab_size=VOCAB,
        knots=knots,
    )
    a.loss.backward()
    g_ref = student.lm_head.weight.grad.clone()
    student.zero_grad()
    hidden = student.model(input_ids=ids).last_hidden_state
    b = distillation_loss(
        StudentOutputs(hidden=hidden, lm_head_weight=student.lm_head.weight),
        DenseSignal(t_out.logits),
        targets,
        cfg,
        progress=0.3,
        vocab_size=VOCAB,
        knots=knots,
    )
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.lm_head.weight.grad, g_ref, atol=1e-5, rtol=1e-4)


def test_presets_differ_where_they_should():
    assert preset("kd") != preset("egad")
    assert preset("egad_c1").weighting == "curriculum" and preset("egad_c1").beta_f == 0
    assert preset("egad_c2").temp_mode == "inverse" and preset("egad_c2").weighting == "none"
    assert preset("egad_c3").uses_features and preset("egad_c3").temp_mode == "const"
    assert not preset("sft").uses_teacher
    assert preset("egad") == ObjectiveConfig()


def test_unknown_preset_and_field_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown objective preset 'egda'"):
        preset("egda")
    with pytest.raises(ConfigError, match="alpah"):
        preset("kd", alpah=0.3)
    with pytest.raises(ConfigError, match="objective.rho"):
        preset("egad", rho=0.0)
    with pytest.raises(ConfigError, match="objective.temp_mode='hot'"):
        ObjectiveConfig(temp_mode="hot")
