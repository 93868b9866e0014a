"""The fused teacher: its last hidden state and head, projected chunk by chunk, give the objective exactly what its
full logits give, for every rule that reads the teacher (entropy, Hellinger, EA-KD, divergences, features)."""

from __future__ import annotations

import pytest
import torch
from conftest import plan_state

from egad.config.presets import preset
from egad.losses.features import FeatureProjector
from egad.models.heads import OutputHead
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.teacher.signal import DenseSignal, FusedSignal

B, L, V, DT, DS = 2, 29, 83, 24, 16


def _teacher(softcap=None, bias=True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, L, DT, generator=g)
    head = OutputHead(
        torch.randn(V + 3, DT, generator=g),  # 3 padded rows
        torch.randn(V + 3, generator=g) if bias else None,
        hidden_scale=0.5,
        logit_scale=1.3,
        softcap=softcap,
    )
    return hidden, head


@pytest.mark.parametrize("name", ["kd", "egad", "ea_kd", "adakd_idts", "akl", "se_kd_student", "bild"])
@pytest.mark.parametrize("softcap", [None, 7.0])
def test_fused_teacher_equals_its_logits(name, softcap):
    hidden, head = _teacher(softcap)
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(B, L, V + 3, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[:, :4] = -100
    fs = [torch.randn(B, L, DS, generator=g, requires_grad=True)]
    ft = [torch.randn(B, L, DT, generator=g)]
    logits = head.logits(hidden)  # what the model itself would return, (B, L, V + 3)
    state = plan_state(logits[..., :V], zs[..., :V])
    cfg = preset(name, chunk_size=11, feat_layers=1)
    proj = FeatureProjector(DS, DT, 1)
    kw = dict(progress=0.4, state=state, projector=proj, vocab_size=V)
    dense = distillation_loss(StudentOutputs(logits=zs, features=fs), DenseSignal(logits, ft), targets, cfg, **kw)
    fused = distillation_loss(StudentOutputs(logits=zs, features=fs), FusedSignal(hidden, head, ft), targets, cfg, **kw)
    torch.testing.assert_close(fused.loss, dense.loss, atol=1e-5, rtol=1e-5)
    assert fused.tokens.keys() == dense.tokens.keys()
    for k in ("entropy", "hellinger", "student_entropy", "weight", "tau"):
        if k in dense.tokens:
            torch.testing.assert_close(fused.tokens[k], dense.tokens[k], atol=1e-5, rtol=1e-5)
    # One teacher projection per chunk: the plan and the divergence share it.
    n_chunks = -(-int((targets != -100).sum()) // 11)
    assert fused.metrics["teacher_chunks"].item() == n_chunks
    params = [zs, *fs, *proj.parameters()]
    got = torch.autograd.grad(fused.loss, params, allow_unused=True)
    want = torch.autograd.grad(dense.loss, params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_teacher_never_builds_full_logits(monkeypatch):
    """Every projection it makes is one chunk's: at most chunk_size rows of the head's output at a time."""
    hidden, head = _teacher()
    rows_seen = []
    real = OutputHead.linear

    def spy(self, h, vocab):
        rows_seen.append(h.shape[0])
        return real(self, h, vocab)

    monkeypatch.setattr(OutputHead, "linear", spy)
    targets = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2))
    zs = torch.randn(B, L, V + 3, requires_grad=True)
    distillation_loss(
        StudentOutputs(logits=zs), FusedSignal(hidden, head), targets, preset("kd", chunk_size=8), vocab_size=V
    )
    assert rows_seen and max(rows_seen) <= 8


def test_online_teacher_fused_signal_equals_the_models_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from egad.teacher.online import OnlineTeacher

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 61, (2, 9))
    mask = torch.ones_like(ids)
    fused = OnlineTeacher(model, [1], fused=True).signal({"input_ids": ids, "attention_mask": mask})
    dense = OnlineTeacher(model, [1]).signal({"input_ids": ids, "attention_mask": mask})
    assert isinstance(fused, FusedSignal) and fused.vocab_rows == 61
    rows = torch.arange(18)
    torch.testing.assert_close(fused.chunk(rows, 61).logits, dense.rows(rows, 61), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.features_at(rows)[0], dense.features_at(rows)[0])
