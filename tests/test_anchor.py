"""train.anchor_l2: the L2 pull towards the student's initial weights (the study's anchor control)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_run_overrides
from safetensors.torch import load_file

from egad.config.run_config import load_config
from egad.config.schema import ConfigError
from egad.experiment import run_training
from egad.models.engines import check_support
from egad.train.optim import pull_to_anchor

TINY = REPO / "configs" / "tiny.yaml"


def test_pull_adds_gamma_times_the_drift_to_each_gradient():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    initial = [p.detach().clone() - torch.randn_like(p) for p in params]  # the weights have drifted from these
    params[0].grad = torch.randn(3, 5)
    grads_before = [params[0].grad.clone(), None]  # the second parameter got no gradient this window
    gamma = 0.37
    loss = pull_to_anchor(list(zip(params, initial, strict=True)), gamma)
    # Reference: autograd of gamma/2 ||theta - theta_0||^2, in float64, added to the loss gradient.
    theta = [p.detach().double().requires_grad_() for p in params]
    pull = sum(0.5 * gamma * (t - p0.double()).pow(2).sum() for t, p0 in zip(theta, initial, strict=True))
    pull.backward()
    assert loss == pytest.approx(float(pull.detach()), rel=1e-6)
    for p, t, g in zip(params, theta, grads_before, strict=True):
        expect = t.grad if g is None else t.grad + g.double()
        torch.testing.assert_close(p.grad.double(), expect, rtol=1e-6, atol=1e-7)


def _distance_to_init(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["anchor"] for r in rows if "anchor" in r]


def test_a_strong_anchor_keeps_the_student_near_its_initial_weights(tmp_path, tiny_tokenizer_dir):
    common = {"train.max_steps": 6, "train.eval_every": 0, "data.dev": None, "objective.preset": "kd",
              "train.log_every": 1, "train.lr": 3e-3, "train.save_every": 0}  # fmt: skip
    finals = {}
    for name, gamma in (("free", 0.0), ("anchored", 50.0)):
        out = tmp_path / name
        run_training(
            load_config(TINY, tiny_run_overrides(tiny_tokenizer_dir, out, **common, **{"train.anchor_l2": gamma}))
        )
        finals[name] = load_file(str(out / "final" / "model.safetensors"))
    assert _distance_to_init(tmp_path / "anchored"), "the anchored run logs its pull"
    assert not _distance_to_init(tmp_path / "free")
    # The same seed builds the same initial student: a one-step run at a vanishing learning rate writes it out.
    init = run_training(
        load_config(
            TINY,
            tiny_run_overrides(
                tiny_tokenizer_dir, tmp_path / "init", **{**common, "train.max_steps": 1, "train.lr": 1e-12}
            ),
        )
    )
    start = load_file(str(init.out / "final" / "model.safetensors"))

    def drift(state):
        return sum(float((state[k].float() - start[k].float()).pow(2).sum()) for k in start) ** 0.5

    assert drift(finals["anchored"]) < 0.5 * drift(finals["free"]), (drift(finals["anchored"]), drift(finals["free"]))


def test_anchor_is_refused_where_the_gradient_is_partitioned(tmp_path, tiny_tokenizer_dir):
    cfg = load_config(TINY, tiny_run_overrides(tiny_tokenizer_dir, tmp_path, **{"train.anchor_l2": 0.1}))
    for engine in ("fsdp2", "deepspeed-zero2"):
        with pytest.raises(ConfigError, match=f"anchor_l2=0.1.*{engine}.*DDP or on one process"):
            check_support(engine, cfg.train, cfg.model)
    check_support("ddp", cfg.train, cfg.model)
    with pytest.raises(ConfigError, match="anchor_l2"):
        load_config(TINY, {"train.anchor_l2": -1})
