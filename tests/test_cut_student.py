"""Students cut from the teacher ("prune, then distil"): the kept layers are the teacher's, byte for byte, the model
saves and reloads as a plain HF model, and the feature map pairs each student layer with its source layer."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, tiny_run_overrides
from transformers import AutoConfig, AutoModelForCausalLM

from egad.losses.features import feature_pairs, layer_map
from egad.models.load import ModelError, copied_layers, cut_layers, cut_student, decoder_layers, even_layers

TINY = REPO / "configs" / "tiny.yaml"


def _teacher(model_type: str = "llama", layers: int = 7, **extra) -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_even_layers_keep_the_first_and_the_last():
    assert even_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert even_layers(7, 7) == list(range(7)) and even_layers(7, 2) == [0, 6] and even_layers(5, 1) == [0]
    for n in range(1, 12):
        for k in range(1, n + 1):
            got = even_layers(n, k)
            assert len(set(got)) == k and got == sorted(got) and got[0] == 0 and (k == 1 or got[-1] == n - 1)
    with pytest.raises(ModelError, match="cannot keep 8"):
        even_layers(7, 8)
    with pytest.raises(ModelError, match="increasing"):
        cut_layers([3, 1], 7)
    with pytest.raises(ModelError, match="below 7"):
        cut_layers([0, 7], 7)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_kept_layers_are_byte_equal_to_their_source(model_type, tmp_path):
    teacher = _teacher(model_type)
    student = cut_student(teacher, [0, 3, 6], dtype=torch.float32)
    t_blocks, s_blocks = decoder_layers(teacher), decoder_layers(student)
    assert len(s_blocks) == 3 and student.config.num_hidden_layers == 3
    for s_i, t_i in enumerate([0, 3, 6]):
        t_state, s_state = t_blocks[t_i].state_dict(), s_blocks[s_i].state_dict()
        assert t_state.keys() == s_state.keys()
        for name in t_state:
            assert torch.equal(t_state[name], s_state[name]), (s_i, name)
    outside = {k: v for k, v in teacher.state_dict().items() if ".layers." not in k}
    for name, value in outside.items():  # embeddings, final norm, (tied) head
        assert torch.equal(student.state_dict()[name], value), name
    if model_type == "qwen2":  # per-layer config lists follow the kept layers
        assert len(student.config.layer_types) == 3
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert copied_layers(again, 7) == [0, 3, 6] and copied_layers(again, 8) is None
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)


def test_a_full_cut_is_the_teacher():
    teacher = _teacher(layers=4)
    student = cut_student(teacher, 4, dtype=torch.float32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_feature_pairs_follow_the_copied_layers():
    # Student blocks 1..3 copied from teacher blocks 0, 3, 6 -> hidden states 1, 4, 7 of the teacher.
    assert feature_pairs("uniform", 3, 7, 3, copied_from=[0, 3, 6]) == [(1, 1), (2, 4), (3, 7)]
    assert feature_pairs("last", 3, 7, copied_from=[0, 2, 5]) == [(3, 6)]
    assert feature_pairs("uniform", 3, 7, 3) == layer_map("uniform", 3, 7, 3)
    with pytest.raises(ValueError, match="entries"):
        feature_pairs("uniform", 3, 7, 3, copied_from=[0, 1])


def test_training_a_cut_student_records_its_layers(tmp_path, tiny_tokenizer_dir):
    from egad.config.run_config import load_config
    from egad.experiment import run_training

    over = tiny_run_overrides(
        tiny_tokenizer_dir,
        tmp_path / "run",
        **{
            "model.student_config": None,
            "model.student_cut": 2,
            "objective.feat_layers": 2,
            "train.max_steps": 2,
            "train.eval_every": 0,
            "train.eval_at_start": False,
            "data.dev": None,
        },
    )
    trainer = run_training(load_config(TINY, over))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["student_cut"] == [0, 1]
    assert trainer.pairs == [(1, 1), (2, 2)]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.egad_cut == {"teacher_layers": 2, "layers": [0, 1]}
