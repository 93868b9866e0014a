"""The fused kernels (egad.losses.kernels), of the student atoms and of the online forward KL: values against a
float64 reference written apart, the modes and their fallback, and cached and online losses that are the same under
the compiled kernels and eager."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from egad.config.presets import preset
from egad.config.schema import ConfigError, ObjectiveConfig
from egad.data import batches as D
from egad.losses import kernels
from egad.losses.features import FeatureProjector
from egad.objective.student import DistillationModule
from egad.objective.token_plan import PlanState
from egad.teacher.cache import TeacherCache, write_cache


def _logits(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 4
    z[1, v // 3 :] = -math.inf  # a masked tail
    z[2] = -math.inf  # a row with nothing left
    return z


@pytest.mark.parametrize("with_ce", [False, True])
@pytest.mark.parametrize(("n", "v"), [(5, 7), (33, 1001), (4, 49152)])
def test_compiled_kernels_match_float64(n: int, v: int, with_ce: bool) -> None:
    z = _logits(n, v, n + v)
    tau = 0.5 + torch.rand(n, 1, generator=torch.Generator().manual_seed(1)) * 2
    a, b = torch.randn(n, 1), torch.randn(n, 1)
    with kernels.using("compiled"):
        m, total, total1 = kernels.normalisers(z, tau, with_ce=with_ce)
        grad = kernels.dense_grad(z, m, tau, a, b if with_ce else None)
    z64, tau64 = z.double(), tau.double()
    m64 = z64.max(-1, keepdim=True).values.nan_to_num(neginf=0.0)
    assert torch.equal(m, m64.float())
    want = torch.exp((z64 - m64) / tau64).sum(-1, keepdim=True)
    want1 = torch.exp(z64 - m64).sum(-1, keepdim=True) if with_ce else want
    torch.testing.assert_close(total, want.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(total1, want1.float(), rtol=1e-5, atol=0)
    want_grad = a.double() * torch.exp((z64 - m64) / tau64)
    if with_ce:
        want_grad = want_grad + b.double() * torch.exp(z64 - m64)
    torch.testing.assert_close(grad, want_grad.float(), rtol=1e-5, atol=1e-6)
    assert (grad[2] == 0).all() and (grad[1, v // 3 :] == 0).all()


@pytest.mark.parametrize(("n", "v"), [(5, 7), (33, 1001), (4, 49152)])
def test_compiled_forward_kl_kernels_match_float64(n: int, v: int) -> None:
    """Masked tails and all -inf rows on both sides, in different rows and in the same row (row 2)."""
    zs, zt = _logits(n, v, n + v), _logits(n, v, n + v + 1).roll(1, 0)  # the teacher's masked rows are 2 and 3
    zs[-1, 0] = -math.inf  # a student zero where the teacher has mass: the term and p's entry are dropped
    tau = 0.5 + torch.rand(n, 1, generator=torch.Generator().manual_seed(2)) * 2
    cq, cp = torch.randn(n, 1), torch.randn(n, 1)
    with kernels.using("compiled"):
        ms, total_s, mt, total_t, kl, kept = kernels.kl_forward(zs, zt, tau)
        grad = kernels.kl_grad(zs, zt, tau, ms, total_s, mt, total_t, cq, cp)
    logq = torch.log_softmax(zs.double() / tau.double(), -1)
    logp = torch.log_softmax(zt.double() / tau.double(), -1)
    keep = (logq > -math.inf) & (logp > -math.inf)  # NaN rows (nothing left) are not kept either
    terms = torch.where(keep, logp.exp() * (logp - logq), 0.0)
    torch.testing.assert_close(kl.squeeze(-1), terms.sum(-1).float(), rtol=1e-5, atol=1e-6)
    p_kept = torch.where(keep, logp.exp(), 0.0)
    torch.testing.assert_close(kept.squeeze(-1), p_kept.sum(-1).float(), rtol=1e-5, atol=1e-7)
    q = torch.nan_to_num(logq.exp(), nan=0.0)
    want = cq.double() * q - cp.double() * p_kept
    torch.testing.assert_close(grad, want.float(), rtol=1e-5, atol=1e-7)
    assert kl[2] == 0 and kept[2] == 0 and (grad[2] == 0).all()


def test_a_mode_outside_the_list_is_refused() -> None:
    with pytest.raises(ValueError, match="'fast' is not one of"), kernels.using("fast"):
        pass
    with pytest.raises(ConfigError, match="objective.kernels='fast'"):
        ObjectiveConfig(kernels="fast")


def test_eager_is_the_default_of_a_bare_call_and_the_mode_is_scoped() -> None:
    z = torch.zeros(2, 3)
    assert not kernels.active(z)
    with kernels.using("compiled"):
        assert kernels.active(z)
        with kernels.using("eager"):
            assert not kernels.active(z)
        assert kernels.active(z)
    assert not kernels.active(z)


def _broken_compiler(*args, **kwargs):
    raise RuntimeError("no C++ compiler found")


def test_auto_falls_back_to_eager_once_with_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_broken", {})
    monkeypatch.setattr(kernels, "_compiled", {"normalisers": _broken_compiler, "dense_grad": _broken_compiler})
    z = _logits(4, 9, 3)
    tau = torch.full((4, 1), 1.5)
    with kernels.using("auto"):
        with pytest.warns(RuntimeWarning, match="no C.. compiler found.*using eager PyTorch"):
            got = kernels.normalisers(z, tau, with_ce=True)
        assert not kernels.active(z)  # remembered: the next call does not try again
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = kernels.normalisers(z, tau, with_ce=True)
    want = kernels._normalisers(z, tau, True)
    for x, y, w in zip(got, again, want, strict=True):
        assert torch.equal(x, w) and torch.equal(y, w)


def test_compiled_mode_names_the_failure_and_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_broken", {})
    monkeypatch.setattr(kernels, "_compiled", {"normalisers": _broken_compiler})
    with kernels.using("compiled"), pytest.raises(RuntimeError, match="objective.kernels='compiled'.*'eager'"):
        kernels.normalisers(torch.zeros(2, 3), torch.ones(2, 1), with_ce=False)


# ------------------------------------------------------------------------------------------- a whole cached step
@pytest.fixture(scope="module")
def cached(tmp_path_factory, dolly_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records, _ = D.load_records(dolly_path, "train", max_examples=6)
    items, _ = D.tokenize_dataset(records, tok, template="alpaca", max_prompt_len=48, max_len=96)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      initializer_range=0.5, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("kernels-cache")
    write_cache(teacher, tok, items, out, k=16, vocab_size=len(tok), layers=[2], hidden_quantile=0.5,
                batch_size=6, hash_weights=False, progress=False, max_len=96)  # fmt: skip
    return cfg, items, TeacherCache(out)


@pytest.mark.parametrize("fused", [False, True])
def test_a_cached_egad_step_is_the_same_compiled_and_eager(cached, fused: bool) -> None:
    """Per-token temperatures (the CE takes its own normaliser) and the feature branch, both heads."""
    cfg, items, cache = cached
    batch = D.collate(items, cfg.pad_token_id)
    batch["train_index"] = torch.tensor([it["index"] for it in items])
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(1)
        student = LlamaForCausalLM(cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": 1}))
        projector = FeatureProjector(32, 32, 1)
        module = DistillationModule(student.train(), projector, [1], fused, vocab=cfg.vocab_size)
        objective = preset("egad", feat_layers=1, kernels=mode)
        state = PlanState(knots=cache.knots, route_threshold=cache.manifest.get("hidden_threshold"))
        labels = D.shift_labels(batch["labels"])
        signal = cache.signal(batch)
        loss, _, _ = module(batch["input_ids"], batch["attention_mask"], labels, signal, objective, progress=0.5,
                            vocab_size=cfg.vocab_size, state=state)  # fmt: skip
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        results[mode] = (loss.detach(), grads)
    (l0, g0), (l1, g1) = results["eager"], results["compiled"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_past_the_recompile_limit_a_new_variant_runs_eager_with_one_warning(monkeypatch) -> None:
    """torch compiles a function for a bounded number of input variants: past it, egad's kernels must not read as
    uncompilable (no error in `compiled` mode, the device not marked broken), and the values stay right."""
    import torch._dynamo

    def scaled(z, double: bool):  # a new function: no variant of it is compiled yet in this process
        return z * 2 if double else z * 3

    monkeypatch.setattr(kernels, "_EAGER", {**kernels._EAGER, "scaled": scaled})
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_over_limit", set())
    monkeypatch.setattr(kernels, "_broken", {})
    z = torch.arange(6.0).reshape(2, 3)
    with torch._dynamo.config.patch(recompile_limit=1):  # not monkeypatch: its undo deletes a config entry
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert torch.equal(kernels._call("scaled", "compiled", z, True), z * 2)  # the one variant allowed
        with pytest.warns(RuntimeWarning, match="'scaled' reached torch's recompile limit"):
            assert torch.equal(kernels._call("scaled", "compiled", z, False), z * 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # warned once
            assert torch.equal(kernels._call("scaled", "auto", z[:1], False), z[:1] * 3)
    assert kernels._broken == {} and kernels.active(z, "auto")


def test_the_backward_keeps_the_forwards_mode(monkeypatch) -> None:
    """On a GPU the backward runs in the autograd engine's thread, where the forward's scope does not reach: the
    forward's mode travels with the graph. Here the backward runs after the scope has closed."""
    from egad.losses.student_atoms import student_atom_logprobs_and_ce

    calls = []

    def spy(*args):
        calls.append(len(args))
        return kernels._dense_grad(*args)

    monkeypatch.setattr(kernels, "_compiled", {"normalisers": kernels._normalisers, "dense_grad": spy})
    z = _logits(6, 11, 4)[3:].clone().requires_grad_()  # finite rows
    with kernels.using("compiled"):
        logq, ce = student_atom_logprobs_and_ce(z, torch.tensor([[0, 5]] * 3), torch.tensor([1, 2, 3]),
                                                temperature=torch.tensor([1.0, 1.5, 2.0]))  # fmt: skip
    (logq.sum() + ce.sum()).backward()
    assert calls == [5] and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ["kd", "egad"])
def test_an_online_teacher_loss_is_the_same_compiled_and_eager(monkeypatch, name: str) -> None:
    """The fused online teacher's forward KL (with the shared CE at tau 1 for `kd`, per-token tau for `egad`) under
    `objective.kernels`: the same loss and gradients, and the compiled run does go through the KL kernels."""
    from conftest import plan_state

    from egad.models.heads import OutputHead
    from egad.objective.compose import StudentOutputs, distillation_loss
    from egad.teacher.signal import FusedSignal

    b, length, v, dt, ds = 2, 23, 97, 24, 16
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, length, dt, generator=g)
    head = OutputHead(torch.randn(v + 3, dt, generator=g), None, hidden_scale=0.5, logit_scale=1.3, softcap=None)
    zs = torch.randn(b, length, v + 3, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (b, length), generator=g)
    targets[:, :3] = -100
    fs, ft = [torch.randn(b, length, ds, generator=g, requires_grad=True)], [torch.randn(b, length, dt, generator=g)]
    state = plan_state(head.logits(hidden)[..., :v], zs[..., :v])
    calls = []
    real = kernels.kl_forward
    monkeypatch.setattr(kernels, "kl_forward", lambda *a, **k: calls.append(kernels.current()) or real(*a, **k))
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        proj = FeatureProjector(ds, dt, 1)
        cfg = preset(name, chunk_size=13, feat_layers=1, kernels=mode)
        out = distillation_loss(StudentOutputs(logits=zs, features=fs), FusedSignal(hidden, head, ft), targets, cfg,
                                progress=0.4, state=state, projector=proj, vocab_size=v)  # fmt: skip
        params = [zs, *fs, *proj.parameters()]
        results[mode] = (out.loss.detach(), torch.autograd.grad(out.loss, params, allow_unused=True))
    assert calls and set(calls) == {"compiled"}
    (l0, g0), (l1, g1) = results["eager"], results["compiled"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, c in zip(g0, g1, strict=True):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)
