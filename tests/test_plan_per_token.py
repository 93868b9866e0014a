"""The per-token plan depends on the token and run-level state only: a vector's plan equals the plans of its parts
for every preset; the running CDFs absorb a window the same way however it was split; the batch rules are refused
where a window is split; the curriculum reaches its end at the last step; a cache's missing hidden state is an error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import plan_state

from egad.config.presets import PRESETS, preset
from egad.config.schema import ConfigError
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.objective.token_plan import batch_rules, check_window_exact, expected_route_share, token_plan
from egad.plan.curriculum import training_progress
from egad.plan.entropy_stream import EmaEntropyHistogram
from egad.plan.routing import content_keys
from egad.teacher.signal import TopKSignal

N, V = 90, 37


def _signals(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(N, V, generator=g) * torch.exp(torch.randn(N, 1, generator=g) * 1.5)
    zs = torch.randn(N, V, generator=g)
    lt, ls = zt.log_softmax(-1), zs.log_softmax(-1)
    pt, ps = lt.exp(), ls.exp()
    sig = {
        "entropy": -(pt * lt).sum(-1),
        "student_entropy": -(ps * ls).sum(-1),
        "hellinger": (0.5 * (pt.sqrt() - ps.sqrt()).pow(2).sum(-1)).sqrt(),
    }
    sig["entropy_ea"], sig["student_ea"] = sig["entropy"] * 0.9, sig["student_entropy"] * 0.8
    return sig, zt, zs


PER_TOKEN = [name for name in PRESETS if not batch_rules(preset(name))]


@pytest.mark.parametrize("name", PER_TOKEN)
@pytest.mark.parametrize("tilt_like", [False, True])
def test_plan_of_a_vector_is_the_plans_of_its_parts(name, tilt_like):
    """Split 90 tokens 17 / 73 (any two micro-batches of one window): each token keeps its weight, temperature,
    tau^2 factor and route, whatever its batch-mates; tau2='normalized' and the tilt normaliser included."""
    sig, zt, zs = _signals()
    extra = {}
    if tilt_like:  # the run-level normalisers: of tau^2, and of the tilt weights
        extra["tau2"] = "normalized"
        if preset(name).weighting == "curriculum":
            extra["curriculum_mode"] = "tilt"
    cfg = preset(name, **extra)
    state = plan_state(zt, zs, seed=12345)
    keys = torch.arange(N) * 2**24 + 3
    whole = token_plan(sig, cfg, progress=0.37, vocab=V, state=state, keys=keys)
    parts = [
        token_plan({k: v[sl] for k, v in sig.items()}, cfg, progress=0.37, vocab=V, state=state, keys=keys[sl])
        for sl in (slice(0, 17), slice(17, N))
    ]
    assert torch.equal(torch.cat([p["route"] for p in parts]), whole["route"]), (
        f"{name}: the route depends on the batch"
    )
    for key in ("weight", "tau", "tau2", "difficulty"):
        # Float rounding may differ by an ulp between vector lengths (vectorised loops); a batch rule moves values
        # by far more.
        joined = torch.cat([p[key] for p in parts])
        torch.testing.assert_close(joined, whole[key], rtol=1e-6, atol=0, msg=f"{name}: {key} depends on the batch")


def test_the_batch_rules_are_named_and_refused_under_a_split():
    for cfg in (preset("egad", route_mode="batch_topk"), preset("egad", cdf_mode="batch")):
        assert batch_rules(cfg)
        check_window_exact(cfg, grad_accum=1, processes=1)  # one micro-batch is the window: exact
        for accum, procs in ((2, 1), (1, 2)):
            with pytest.raises(ConfigError, match="global_quantile|'global'"):
                check_window_exact(cfg, grad_accum=accum, processes=procs)
    for name in PRESETS:  # every preset is per-token by default
        assert not batch_rules(preset(name)), name
        check_window_exact(preset(name), grad_accum=4, processes=8)


def test_the_curriculum_reaches_its_end_at_the_last_step():
    assert training_progress(0, 30) == 0.0 and training_progress(29, 30) == 1.0
    assert training_progress(10, 21) == pytest.approx(0.5)
    assert training_progress(0, 1) == 1.0


def test_a_window_absorbed_from_summed_counts_is_independent_of_the_split():
    g = torch.Generator().manual_seed(5)
    start, window = torch.rand(500, generator=g) * 4, torch.rand(300, generator=g) * 6
    one, two = EmaEntropyHistogram(decay=0.9), EmaEntropyHistogram(decay=0.9)
    for h in (one, two):
        h.update(start)
    one.absorb(one.bin_counts(window))
    two.absorb(two.bin_counts(window[:77]) + two.bin_counts(window[77:]))  # two micro-batches, or two processes
    torch.testing.assert_close(one.counts, two.counts, atol=0, rtol=0)
    per_micro = EmaEntropyHistogram(decay=0.9)
    per_micro.update(start)
    per_micro.update(window[:77])
    per_micro.update(window[77:])
    assert not torch.allclose(per_micro.counts, one.counts)  # what an update per micro-batch would have done
    one.absorb(torch.zeros(one.num_bins, dtype=torch.float64))  # an empty window changes nothing
    torch.testing.assert_close(one.counts, two.counts, atol=0, rtol=0)


def test_expected_route_share():
    state = plan_state(*_signals()[1:])
    assert expected_route_share(preset("egad"), state) == 0.2
    assert expected_route_share(preset("feat_kd_all"), state) == 1.0
    h = _signals()[0]["entropy"]
    share = expected_route_share(preset("egad", route_mode="abs", h_abs=float(h.median())), state)
    assert share == pytest.approx(0.5, abs=0.02)


def test_content_keys_follow_a_sequence_into_any_batch():
    a = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 9, 2, 0, 0, 0]])
    mask_a = (torch.arange(6)[None] < torch.tensor([[4], [3]])).long()
    b = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 0, 0, 0]])
    mask_b = (torch.arange(7)[None] < torch.tensor([[7], [4]])).long()
    ka, kb = content_keys(a, mask_a), content_keys(b, mask_b)
    assert torch.equal(ka[0, :4], kb[1, :4])
    assert ka[0, 0] != ka[1, 0] and len(set(kb[0].tolist())) == 7


def test_a_routed_token_without_a_stored_hidden_state_is_an_error():
    g = torch.Generator().manual_seed(3)
    b, length, k = 1, 12, 4
    zs = torch.randn(b, length, V, generator=g, requires_grad=True)
    logits = torch.randn(b, length, V, generator=g) * 3
    logp = logits.log_softmax(-1)
    top = logp.topk(k, -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    stored = torch.zeros(b, length, dtype=torch.bool)  # the cache kept no hidden state at all
    feats = [torch.zeros(b, length, 8)]
    teacher = TopKSignal(top.indices, top.values, tail, entropy, feats, V, stored)
    cfg = preset("egad", feat_layers=1)
    from egad.losses.features import FeatureProjector

    with pytest.raises(ValueError, match=r"no stored hidden state.*rho=0.2"):
        distillation_loss(
            StudentOutputs(logits=zs, features=[torch.randn(b, length, 8)]),
            teacher,
            torch.randint(0, V, (b, length), generator=g),
            cfg,
            state=plan_state(logits, zs),
            projector=FeatureProjector(8, 8, 1),
        )


def test_the_router_reads_a_cache_threshold_or_refuses_one_that_stores_too_little():
    from egad.train.run_parts import cache_route_threshold

    def route_threshold(rho: float, hidden_quantile: float, route_mode: str = "global_quantile"):
        cache = SimpleNamespace(manifest={"hidden_quantile": hidden_quantile, "hidden_threshold": 3.5}, path="cache")
        return cache_route_threshold(preset("egad", rho=rho, route_mode=route_mode), cache)

    assert route_threshold(0.2, 0.8) == 3.5  # the same share: the router reads the cache's own threshold
    assert route_threshold(0.1, 0.8) is None  # fewer routed than stored: the run-level quantile
    with pytest.raises(ConfigError, match=r"rho=0.3.*--hidden-quantile 0.7"):
        route_threshold(0.3, 0.8)
    with pytest.raises(ConfigError, match="route_mode"):
        route_threshold(0.2, 0.8, route_mode="random")
    assert math.isfinite(route_threshold(0.2, 0.8))
