"""The chunked objective against a dense autograd twin and a hand-written float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import plan_state

from egad.config.presets import PRESETS, preset
from egad.config.schema import ObjectiveConfig
from egad.data.batches import shift_labels
from egad.losses.divergences import DIVERGENCES
from egad.losses.features import FEATURE_LOSSES, FeatureProjector
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.objective.token_plan import token_plan
from egad.plan.entropy import token_entropy
from egad.teacher.signal import DenseSignal

B, L, V, DS, DT, K = 3, 47, 123, 24, 40, 2
ATOL, RTOL = 1e-5, 1e-4  # fp32 chunked vs fp32 dense: only summation order differs


def make_batch(seed=0, b=B, length=L, v=V, dtype=torch.float32, masked_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(b, length, v, generator=g) * 2).to(dtype).requires_grad_()
    zt = (torch.randn(b, length, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (b, length), generator=g)
    targets[torch.rand(b, length, generator=g) < masked_frac] = -100
    fs = [torch.randn(b, length, DS, generator=g).requires_grad_() for _ in range(K)]
    ft = [torch.randn(b, length, DT, generator=g) for _ in range(K)]
    return zs, zt, targets, fs, ft


def knots_for(zt, targets, v=V, zs=None):
    """The run-level state: CDFs of the teacher entropy and, for the rules on the student, of the student entropy and
    the Hellinger distance, fitted on this batch's response tokens (a student of unit-normal logits by default)."""
    mask = targets.reshape(-1) != -100
    t = zt.reshape(-1, zt.shape[-1])[mask][:, :v].float()
    s = torch.randn_like(t, generator=torch.Generator().manual_seed(99)) if zs is None else zs
    s = s.reshape(-1, s.shape[-1])[: t.shape[0], :v] if zs is None else s.reshape(-1, s.shape[-1])[mask][:, :v]
    return plan_state(t, s)


def dense_twin(zs, zt, targets, cfg, fs, ft, proj, knots, progress):
    """Same maths, no chunks, no custom autograd: plain autograd on the full (N, V) tensors."""
    mask = targets.reshape(-1) != -100
    s = zs.reshape(-1, zs.shape[-1])[mask].float()
    t = zt.reshape(-1, zt.shape[-1])[mask].float()
    y = targets.reshape(-1)[mask]
    n = s.shape[0]
    with torch.no_grad():
        sig = {"entropy": token_entropy(t)}
        if cfg.weighting in ("ea_kd", "select_student_entropy"):
            sig["student_entropy"] = token_entropy(s, temperature=cfg.ea_temperature if cfg.weighting == "ea_kd" else 1)
            if cfg.ea_temperature != 1:
                sig["entropy_ea"] = token_entropy(t, temperature=cfg.ea_temperature)
        if cfg.weighting == "select_hellinger" or cfg.temp_signal == "hellinger":
            sig["hellinger"] = (0.5 * (t.softmax(-1).sqrt() - s.softmax(-1).sqrt()).pow(2).sum(-1)).sqrt()
        plan = token_plan(sig, cfg, progress=progress, vocab=t.shape[-1], state=knots)
    kw = {"gamma": cfg.ttm_gamma} if cfg.divergence in ("ttm", "wttm") else {}
    div = DIVERGENCES[cfg.divergence](s, t, temperature=plan["tau"], **kw)
    coef = plan["weight"] * plan["tau2"]
    if cfg.hard_branch == "feat_only":
        coef = coef * (~plan["route"]).float()
    loss = (1 - cfg.alpha) * F.cross_entropy(s, y, reduction="sum") / n + cfg.alpha * (coef * div).sum() / n
    if cfg.uses_features:
        r = plan["route"]
        per = 0
        for k in range(len(fs)):
            hs = fs[k].reshape(-1, DS)[mask][r]
            ht = ft[k].reshape(-1, DT)[mask][r]
            per = per + FEATURE_LOSSES[cfg.feat_loss](proj.proj[k](hs), ht)
        budget = (1.0 if cfg.route_mode == "all" else cfg.rho) * n
        loss = loss + cfg.beta_f * (per / len(fs)).sum() / budget
    return loss


def run_objective(zs, zt, targets, cfg, fs, ft, proj, knots, progress, **kw):
    return distillation_loss(
        StudentOutputs(logits=zs, features=fs),
        DenseSignal(zt, ft),
        targets,
        cfg,
        progress=progress,
        state=knots,
        projector=proj,
        **kw,
    )


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


DETERMINISTIC = [p for p in PRESETS if p not in ("egad_random_route",)]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_chunked_equals_dense_twin(name):
    zs, zt, targets, fs, ft = make_batch(seed=1)
    cfg = preset(name, chunk_size=13, feat_layers=K)
    proj = FeatureProjector(DS, DT, K)
    knots = knots_for(zt, targets)
    out = run_objective(zs, zt, targets, cfg, fs, ft, proj, knots, 0.37)
    ref = dense_twin(zs, zt, targets, cfg, fs, ft, proj, knots, 0.37)
    torch.testing.assert_close(out.loss, ref, atol=ATOL, rtol=RTOL)
    params = [zs, *fs, *proj.parameters()]
    for got, want in zip(grads(out.loss, params), grads(ref, params), strict=True):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_hand_written_float64_reference_for_default_egad():
    """Full EGAD written out from the spec formulas in float64, sharing no code with the package."""
    zs, zt, targets, fs, ft = make_batch(seed=2)
    cfg = ObjectiveConfig(feat_layers=K, chunk_size=16)
    proj = FeatureProjector(DS, DT, K)
    knots = knots_for(zt, targets)
    s_prog = 0.25
    out = run_objective(zs, zt, targets, cfg, fs, ft, proj, knots, s_prog)

    mask = targets.reshape(-1) != -100
    s = zs.reshape(-1, V)[mask].double()
    t = zt.reshape(-1, V)[mask].double()
    y = targets.reshape(-1)[mask]
    n = s.shape[0]
    p1 = torch.exp(t - torch.logsumexp(t, -1, keepdim=True))
    h = -(p1 * torch.log(p1)).sum(-1)
    kn = knots.knots.double()
    u = torch.empty(n, dtype=torch.float64)
    for i in range(n):  # linear interpolation of the knot CDF, knot j at j/(K-1)
        j = int(torch.searchsorted(kn, h[i]))
        if j == 0:
            u[i] = 0.0
        elif j >= len(kn):
            u[i] = 1.0
        else:
            u[i] = (j - 1 + (h[i] - kn[j - 1]) / (kn[j] - kn[j - 1])) / (len(kn) - 1)
    lam = s_prog
    w = 0.2 + 0.8 * 2 * ((1 - lam) * (1 - u) + lam * u)
    tau = 2.0 - 1.0 * u
    logp = torch.log_softmax(t / tau[:, None], -1)
    logq = torch.log_softmax(s / tau[:, None], -1)
    fkl = (logp.exp() * (logp - logq)).sum(-1)
    ce = -torch.log_softmax(s, -1)[torch.arange(n), y]
    loss = 0.5 * ce.sum() / n + 0.5 * (w * tau**2 * fkl).sum() / n
    routed = (u >= 0.8).nonzero().flatten()  # the run-level quantile route, u >= 1 - rho
    feat = 0
    for k in range(K):
        hs = fs[k].reshape(-1, DS)[mask][routed].double() @ proj.proj[k].weight.double().t()
        ht = ft[k].reshape(-1, DT)[mask][routed].double()
        feat = feat + (1 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1)))
    loss = loss + (feat / K).sum() / (0.2 * n)
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-5, rtol=1e-5)
    g_got, g_want = grads(out.loss, [zs])[0], grads(loss, [zs])[0]
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["egad", "kd", "akl", "bild", "adakd_idts", "feat_kd_all"])
def test_fused_lm_head_equals_logits(name):
    g = torch.Generator().manual_seed(3)
    d = 16
    hidden = torch.randn(B, L, d, generator=g, requires_grad=True)
    w = (torch.randn(V + 5, d, generator=g) * 0.3).requires_grad_()  # 5 padded rows, like Qwen's embeddings
    _, zt, targets, fs, ft = make_batch(seed=3)
    cfg = preset(name, chunk_size=11, feat_layers=K)
    proj = FeatureProjector(DS, DT, K)
    knots = knots_for(zt, targets)
    fused = distillation_loss(
        StudentOutputs(hidden=hidden, lm_head_weight=w, features=fs),
        DenseSignal(zt, ft),
        targets,
        cfg,
        progress=0.6,
        state=knots,
        projector=proj,
        vocab_size=V,
    )
    logits = hidden @ w.t()
    plain = distillation_loss(
        StudentOutputs(logits=logits, features=fs),
        DenseSignal(zt, ft),
        targets,
        cfg,
        progress=0.6,
        state=knots,
        projector=proj,
        vocab_size=V,
    )
    torch.testing.assert_close(fused.loss, plain.loss, atol=ATOL, rtol=RTOL)
    for a, b in zip(grads(fused.loss, [hidden, w]), grads(plain.loss, [hidden, w]), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["egad", "kd", "egad_no_c3", "sft", "feat_kd_all"])
def test_four_micro_batches_equal_one_batch(name):
    zs, zt, targets, fs, ft = make_batch(seed=4, b=8)
    # Per-token routing and a global CDF make every token's treatment independent of the batch split.
    cfg = preset(name, chunk_size=64, feat_layers=K, route_mode="global_quantile" if "feat" not in name else "all")
    proj = FeatureProjector(DS, DT, K)
    knots = knots_for(zt, targets)
    n_total = int((targets != -100).sum())
    whole = run_objective(zs, zt, targets, cfg, fs, ft, proj, knots, 0.5)
    parts = sum(
        run_objective(
            zs[i : i + 2],
            zt[i : i + 2],
            targets[i : i + 2],
            cfg,
            [f[i : i + 2] for f in fs],
            [f[i : i + 2] for f in ft],
            proj,
            knots,
            0.5,
            num_tokens=n_total,
        ).loss
        for i in range(0, 8, 2)
    )
    torch.testing.assert_close(parts, whole.loss, atol=ATOL, rtol=RTOL)
    params = [zs, *proj.parameters()]
    for a, b in zip(grads(parts, params), grads(whole.loss, params), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["egad", "kd", "sft", "bild", "feat_kd_all"])
@pytest.mark.parametrize("fused", [False, True])
def test_fully_masked_batch_gives_zero_and_finite_grads(name, fused):
    zs, zt, targets, fs, ft = make_batch(seed=5)
    targets[:] = -100
    proj = FeatureProjector(DS, DT, K)
    cfg = preset(name, feat_layers=K)
    if fused:
        hidden = torch.randn(B, L, 8, requires_grad=True)
        w = torch.randn(V, 8, requires_grad=True)
        student, params = StudentOutputs(hidden=hidden, lm_head_weight=w, features=fs), [hidden, w]
    else:
        student, params = StudentOutputs(logits=zs, features=fs), [zs]
    out = distillation_loss(
        student, DenseSignal(zt, ft), targets, cfg, state=knots_for(zt, targets + 200), projector=proj
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    for p in params + list(proj.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and torch.count_nonzero(p.grad) == 0


def test_bf16_inputs_give_fp32_result_close_to_fp32():
    zs, zt, targets, fs, ft = make_batch(seed=6)
    zs16, zt16 = zs.detach().bfloat16().requires_grad_(), zt.bfloat16()
    cfg = preset("egad", feat_layers=K, chunk_size=32)
    proj = FeatureProjector(DS, DT, K)
    knots = knots_for(zt16.float(), targets)
    out16 = run_objective(zs16, zt16, targets, cfg, fs, ft, proj, knots, 0.5)
    out32 = run_objective(zs16.detach().float().requires_grad_(), zt16.float(), targets, cfg, fs, ft, proj, knots, 0.5)
    assert out16.loss.dtype == torch.float32
    # Same bf16-rounded values upcast inside: only the grad buffer is bf16, so values agree to fp32 precision.
    torch.testing.assert_close(out16.loss, out32.loss, atol=1e-5, rtol=1e-5)
    out16.loss.backward()
    assert zs16.grad.dtype == torch.bfloat16 and torch.isfinite(zs16.grad.float()).all()


def test_padded_vocab_rows_are_sliced_and_mismatch_is_an_error():
    zs, zt, targets, fs, ft = make_batch(seed=7)
    junk = torch.full((B, L, 9), 50.0)  # padded rows with large logits would dominate any softmax
    cfg = preset("kd")
    base = distillation_loss(StudentOutputs(logits=zs), DenseSignal(zt), targets, cfg)
    padded = distillation_loss(
        StudentOutputs(logits=torch.cat([zs, junk[..., :4]], -1)),
        DenseSignal(torch.cat([zt, junk], -1)),
        targets,
        cfg,
        vocab_size=V,
    )
    torch.testing.assert_close(padded.loss, base.loss)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(StudentOutputs(logits=zs), DenseSignal(torch.cat([zt, junk], -1)), targets, cfg)
    with pytest.raises(ValueError, match="tokenizer"):
        distillation_loss(StudentOutputs(logits=zs), DenseSignal(zt), targets, cfg, vocab_size=V + 1)


def test_errors_name_the_fix():
    zs, zt, targets, fs, ft = make_batch(seed=8)
    with pytest.raises(ValueError, match="knots"):
        distillation_loss(StudentOutputs(logits=zs), DenseSignal(zt), targets, preset("egad_no_c3"))
    with pytest.raises(ValueError, match="FeatureProjector"):
        distillation_loss(
            StudentOutputs(logits=zs),
            DenseSignal(zt),
            targets,
            preset("egad", cdf_mode="batch", route_mode="batch_topk"),
        )
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(StudentOutputs(logits=zs), None, targets, preset("kd"))
    with pytest.raises(ValueError, match="progress"):
        distillation_loss(StudentOutputs(logits=zs), DenseSignal(zt), targets, preset("kd"), progress=1.5)


def test_sft_needs_no_teacher_and_equals_cross_entropy():
    zs, _, targets, _, _ = make_batch(seed=9)
    out = distillation_loss(StudentOutputs(logits=zs), None, targets, preset("sft"))
    ref = F.cross_entropy(zs.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_metrics_and_token_signals_are_reported():
    zs, zt, targets, fs, ft = make_batch(seed=10)
    cfg = preset("egad", feat_layers=K)
    out = run_objective(zs, zt, targets, cfg, fs, ft, FeatureProjector(DS, DT, K), knots_for(zt, targets), 0.9)
    n = int((targets != -100).sum())
    for key in (
        "loss",
        "ce",
        "kd",
        "feat",
        "entropy_mean",
        "entropy_p90",
        "lambda",
        "weight_mean",
        "tau_mean",
        "routed_frac",
    ):
        assert key in out.metrics and torch.isfinite(out.metrics[key])
    assert out.tokens["entropy"].shape == (n,)
    # Routed by the run-level quantile (u >= 0.8); the knots come from this batch, so about a fifth of it.
    assert out.metrics["routed_frac"].item() == pytest.approx(0.2, abs=0.05)
    assert 1.0 <= out.metrics["tau_mean"].item() <= 2.0
    mix = 0.5 * out.metrics["ce"] + 0.5 * out.metrics["kd"] + out.metrics["feat"]
    torch.testing.assert_close(out.metrics["loss"], mix, atol=1e-5, rtol=1e-5)


def test_shift_labels():
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[-100, 5, 6, 7, -100]]


@pytest.mark.parametrize("fused", [False, True])
def test_upstream_gradient_scales_and_second_backward_is_refused(fused):
    zs, zt, targets, _, _ = make_batch(seed=11)
    hidden = torch.randn(B, L, 8, requires_grad=True)
    w = torch.randn(V, 8, requires_grad=True)
    student = StudentOutputs(hidden=hidden, lm_head_weight=w) if fused else StudentOutputs(logits=zs)
    leaf = hidden if fused else zs
    cfg = preset("kd", chunk_size=17)
    (g1,) = torch.autograd.grad(distillation_loss(student, DenseSignal(zt), targets, cfg).loss, leaf)
    (g3,) = torch.autograd.grad(3.0 * distillation_loss(student, DenseSignal(zt), targets, cfg).loss, leaf)
    torch.testing.assert_close(g3, 3.0 * g1)
    loss = distillation_loss(student, DenseSignal(zt), targets, cfg).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def _exact_topk_signal(zt: torch.Tensor, features=None):
    """A cache-style signal holding the whole distribution (k = V, empty tail)."""
    from egad.teacher.signal import TopKSignal

    logp = zt.float().log_softmax(-1)
    lp, ids = logp.sort(-1, descending=True)
    tail = torch.full(zt.shape[:-1], float("-inf"))
    return TopKSignal(
        ids=ids,
        logprobs=lp,
        tail_logmass=tail,
        entropy=token_entropy(zt.reshape(-1, V)).reshape(zt.shape[:-1]),
        features=features,
    )


@pytest.mark.parametrize("name", ["egad", "kd", "egad_no_c3", "akl", "adakd_idts", "se_kd_student", "srkl"])
def test_cached_signal_with_k_equal_v_matches_dense(name):
    zs, zt, targets, fs, ft = make_batch(seed=12)
    cfg = preset(name, chunk_size=19, feat_layers=K)
    proj = FeatureProjector(DS, DT, K)
    knots = knots_for(zt, targets)
    dense = distillation_loss(
        StudentOutputs(logits=zs, features=fs),
        DenseSignal(zt, ft),
        targets,
        cfg,
        progress=0.4,
        state=knots,
        projector=proj,
    )
    cached = distillation_loss(
        StudentOutputs(logits=zs, features=fs),
        _exact_topk_signal(zt, ft),
        targets,
        cfg,
        progress=0.4,
        state=knots,
        projector=proj,
    )
    torch.testing.assert_close(cached.loss, dense.loss, atol=ATOL, rtol=RTOL)
    for a, b in zip(grads(cached.loss, [zs]), grads(dense.loss, [zs]), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
