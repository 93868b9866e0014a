"""`egad train` across tokenizers (issue 22): tiny from-config Llama models, the student over the session's 512-entry
BPE and the teacher over a 400-entry BPE trained on other records; KD and EGAD end to end, the checkpoint loads, the
same-tokenizer oracle through the cross path, and the refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import DOLLY, REPO, tiny_run_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from egad.config.run_config import load_config
from egad.config.schema import ConfigError
from egad.errors import EgadError
from egad.experiment import run_training
from egad.models.load import ModelError
from egad.train.trainer import Trainer
from egad.xtok import AlignmentError

TINY = REPO / "configs" / "tiny.yaml"


def _over(tok, teacher_tok, out, **extra):
    o = {
        "train.max_steps": 10,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.lr": 3e-3,
        "train.log_every": 1,
        "data.max_train_examples": 160,
        "data.max_dev_examples": 16,
        "objective.feat_layers": 1,
    }
    if teacher_tok is not None:
        o.update({"model.teacher_tokenizer": str(teacher_tok), "objective.cross_vocab": "exact"})
    o.update(extra)
    return tiny_run_overrides(tok, out, **o)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "preset,loss", [("kd", "exact"), ("egad", "exact"), ("egad", "hybrid"), ("kd", "uld")], ids=str
)
def test_cross_tokenizer_run_trains_and_loads(tmp_path, tiny_tokenizer_dir, teacher_tok_dir, preset, loss):
    out = tmp_path / "run"
    extra = {"objective.preset": preset, "objective.cross_vocab": loss}
    over = _over(tiny_tokenizer_dir, teacher_tok_dir, out, **extra)
    trainer = run_training(load_config(TINY, over))
    assert trainer.teacher_tokenizer is not None and len(trainer.teacher_tokenizer) != len(trainer.tokenizer)
    train = [r for r in _rows(out) if "kd" in r and "step" in r]
    assert train[-1]["loss"] < train[0]["loss"], [r["loss"] for r in train]
    assert all(0.5 < r["aligned_frac"] < 1.0 for r in train), [r["aligned_frac"] for r in train]
    assert train[-1]["kd"] > 0
    if preset == "egad":
        assert train[-1]["feat"] > 0 and 0 < train[-1]["routed_frac"] < 0.5
        assert train[-1]["weight_min"] < train[-1]["weight_max"] and train[-1]["tau_mean"] > 1.0
        assert (out / "entropy_knots.safetensors").is_file()
    evals = [r for r in _rows(out) if "dev_nll" in r]
    assert evals and "dev_kl" not in evals[-1]  # no teacher KL across vocabularies
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert len(tok) == len(trainer.tokenizer) and model.config.vocab_size == len(tok)
    ids = tok("### Instruction:\nSay hi\n\n### Response:\n", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tok)


@pytest.mark.parametrize("preset", ["kd", "egad"])
def test_same_tokenizer_through_the_cross_path_matches_the_ordinary_path(tmp_path, tiny_tokenizer_dir, preset):
    """The oracle: one tokenizer on both sides, forced through the cross path with exact matching (identity map, every
    target aligned one to one): the same losses, step by step, as the ordinary path."""
    common = {"objective.preset": preset, "train.max_steps": 4, "data.dev": None, "train.eval_at_start": False}
    losses = {}
    for name, extra in (("plain", {}), ("cross", {"objective.cross_vocab": "exact"})):
        out = tmp_path / name
        run_training(load_config(TINY, _over(tiny_tokenizer_dir, None, out, **common, **extra)))
        losses[name] = [r for r in _rows(out) if "kd" in r and "step" in r]
    for a, b in zip(losses["plain"], losses["cross"], strict=True):
        for key in ("loss", "ce", "kd", "feat"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert all(r["aligned_frac"] == 1.0 for r in losses["cross"])


def test_refusals(tmp_path, tiny_tokenizer_dir, teacher_tok_dir):
    base = _over(tiny_tokenizer_dir, teacher_tok_dir, tmp_path / "r")
    # Tokenizers differ and the switch is off: refused, both named.
    with pytest.raises(ModelError, match=r"(?s)teacher's tokenizer is .*teacher-tok.*objective.cross_vocab"):
        Trainer(load_config(TINY, {**base, "objective.cross_vocab": "none"})).setup()
    # A teacher cache across tokenizers is served (tests/test_xtok_cache.py): no refusal here any more.
    with pytest.raises(ConfigError, match="not offered across tokenizers"):
        load_config(TINY, {**base, "objective.divergence": "ttm"})
    with pytest.raises(ConfigError, match="teacher's entropy only"):
        load_config(TINY, {**base, "objective.preset": "ea_kd"})
    with pytest.raises(EgadError, match="nothing: no such model folder"):
        Trainer(load_config(TINY, {**base, "model.teacher_tokenizer": str(tmp_path / "nothing")})).setup()


def test_offsets_that_do_not_tile_the_response_are_refused(tmp_path, tiny_tokenizer_dir, teacher_tok_dir, monkeypatch):
    """A teacher tokenizer whose offsets do not map to the text (here: every offset shifted by one character) is
    refused by `egad train` before training, naming the data line and why."""
    from egad.xtok import align

    real = align.OffsetEncoder.__call__

    def shifted(self, texts):
        got = real(self, texts)
        if self.role != "teacher":
            return got
        return [(ids, [(min(s + 1, len(t)), min(e + 1, len(t))) for s, e in offs]) for t, (ids, offs) in
                zip(texts, got, strict=True)]  # fmt: skip

    monkeypatch.setattr(align.OffsetEncoder, "__call__", shifted)
    with pytest.raises(AlignmentError, match=rf"{DOLLY.name}:\d+: the response, teacher: character 0 .* no token"):
        Trainer(load_config(TINY, _over(tiny_tokenizer_dir, teacher_tok_dir, tmp_path / "r"))).setup()


def _yaml_config(tmp_path, over: dict):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    for key, value in over.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("case", ["switch_off", "unalignable"])
def test_cli_gives_one_line_errors(tmp_path, tiny_tokenizer_dir, teacher_tok_dir, monkeypatch, case):
    """Through `egad train`, the refusals are one line, status 2 (they are EgadErrors)."""
    from typer.testing import CliRunner

    from egad.cli import app

    over = _over(tiny_tokenizer_dir, teacher_tok_dir, tmp_path / "r")
    if case == "switch_off":
        over["objective.cross_vocab"] = "none"
        named = ["cross_vocab", "teacher-tok"]
    else:
        from egad.xtok import align

        monkeypatch.setattr(align, "token_cuts", lambda offsets, n: [0] + [-1] * (len(offsets) - 1) + [n])
        named = ["share no boundary", DOLLY.name]
    result = CliRunner().invoke(app, ["train", "--config", str(_yaml_config(tmp_path, over))])
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in named:
        assert text in lines[0], lines[0]


# ------------------------------------------------------------------------------------ the objective's own oracle
@pytest.mark.parametrize("name", ["kd", "egad", "egad_hybrid_w1", "egad_batch_cdf", "egad_features_only"])
def test_cross_objective_equals_the_same_tokenizer_objective_at_odd_shapes(name):
    """One vocabulary on both sides, every target aligned to itself, the identity map: the cross-tokenizer objective
    gives the same loss, metrics and gradients (student hidden states, head, projector) as `distillation_loss` on
    the fused teacher. hybrid with cross_vocab_weight 1 is exact."""
    import torch

    from egad.config.presets import preset
    from egad.losses.cross_vocab import VocabMap
    from egad.losses.features import FeatureProjector
    from egad.models.heads import OutputHead
    from egad.objective.compose import StudentOutputs, distillation_loss
    from egad.objective.token_plan import PlanState
    from egad.plan.entropy import fit_quantile_knots, token_entropy
    from egad.teacher.signal import FusedSignal
    from egad.xtok.objective import cross_distillation_loss
    from egad.xtok.source import CrossSignal

    torch.manual_seed(0)
    b, length, d_s, d_t, v = 3, 13, 7, 5, 47
    extra = {
        "egad_hybrid_w1": {"cross_vocab": "hybrid", "cross_vocab_weight": 1.0},
        "egad_batch_cdf": {"cdf_mode": "batch"},  # a batch rule: the plan in a pass of its own
        "egad_features_only": {"alpha": 0.0},
    }.get(name, {})
    cfg = preset(name.split("_")[0], feat_layers=2, chunk_size=10, **extra)
    targets = torch.randint(0, v, (b, length))
    targets[:, :4] = -100
    targets[1, 10:] = -100
    t_hidden = torch.randn(b, length, d_t)
    t_head = OutputHead(torch.randn(v, d_t))
    t_feats = [torch.randn(b, length, d_t) for _ in range(2)]
    rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
    with torch.no_grad():
        ent = token_entropy(t_head.logits(t_hidden.reshape(-1, d_t)[rows]))
    state = PlanState(knots=fit_quantile_knots(ent, 11))
    keys = torch.arange(b * length).reshape(b, length) * 7

    def run(cross: bool):
        torch.manual_seed(1)
        hidden = torch.randn(b, length, d_s, requires_grad=True)
        w = torch.randn(v, d_s, requires_grad=True)
        feats = [hidden * 0.5 + 1.0, hidden.tanh()]
        proj = FeatureProjector(d_s, d_t, 2)
        student = StudentOutputs(hidden=hidden, head=OutputHead(w), features=feats)
        kw = dict(progress=0.3, num_tokens=40.0, vocab_size=v, state=state, projector=proj, token_keys=keys)
        if cross:
            c = dataclasses.replace(cfg, cross_vocab="hybrid" if "hybrid" in name else "exact")
            sig = CrossSignal(t_hidden, t_head, t_feats, rows, rows, v, c.cross_vocab, VocabMap.identity(v))
            out = cross_distillation_loss(student, sig, targets, c, **kw)
        else:
            out = distillation_loss(student, FusedSignal(t_hidden, t_head, t_feats), targets, cfg, **kw)
        out.loss.backward()
        return out, [hidden.grad, w.grad, *(p.grad for p in proj.parameters())]

    (a, ga), (c, gc) = run(False), run(True)
    torch.testing.assert_close(c.loss, a.loss, rtol=1e-5, atol=1e-6)
    for key in ("ce", "kd", "feat", "weight_mean", "tau_mean", "routed_frac"):
        if key in a.metrics:
            torch.testing.assert_close(c.metrics[key], a.metrics[key], rtol=1e-5, atol=1e-6, msg=key)
    for x, y in zip(ga, gc, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
