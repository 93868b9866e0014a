"""Tests for egad.losses.cross_vocab: exact matching, ULD and the hybrid against float64 references written here,
the same-tokenizer oracle, and the chunked path from hidden states and heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from egad.config.presets import preset
from egad.losses import cross_vocab as cv
from egad.losses import cross_vocab_chunked as cvc
from egad.losses.cross_vocab import EXACT_DIVERGENCES, VocabMap
from egad.losses.cross_vocab_chunked import chunked_cross_vocab_loss
from egad.losses.divergences import DIVERGENCES
from egad.models.heads import OutputHead
from egad.objective.compose import StudentOutputs, distillation_loss
from egad.teacher.signal import FusedSignal

N, V_T, V_S, G = 7, 61, 37, 20  # odd shapes; G matched pairs
TEMPERATURES = ["1.0", "2.5", "per-token"]
HYPER = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"lam": 0.2}, "skew_reverse_kl": {"lam": 0.2}, "akl": {"mu": 0.3},
         "todi": {"beta": 2.0}}  # fmt: skip
# fp32 implementation against float64 references (values O(1)); the oracle compares two fp32 paths.
ATOL, RTOL = 2e-5, 1e-4


# ------------------------------------------------------------------------------------------ float64 references
def _probs(z: Tensor, tau: Tensor) -> Tensor:
    z = z.double() / tau
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)  # exp(-inf) = 0 at masked entries
    return e / e.sum(dim=-1, keepdim=True)


def _tau(temperature, n: int) -> Tensor:
    if isinstance(temperature, Tensor):
        return temperature.double().reshape(n, 1)
    return torch.full((n, 1), float(temperature), dtype=torch.float64)


def _kl(a: Tensor, b: Tensor) -> Tensor:
    """sum a log(a / b), a term counting 0 where a = 0 or b = 0."""
    use = (a > 0) & (b > 0)
    a1, b1 = torch.where(use, a, 1.0), torch.where(use, b, 1.0)
    return torch.where(use, a1 * torch.log(a1 / b1), 0.0).sum(-1)


def ref_buckets(zs, zt, t_ids, s_ids, temperature):
    """(q, p) over the matched pairs and one tail bucket, by explicit masks and sums."""
    tau = _tau(temperature, zs.shape[0])
    q, p = _probs(zs, tau), _probs(zt, tau)
    s_rest = torch.ones(zs.shape[1], dtype=torch.bool)
    s_rest[s_ids] = False
    t_rest = torch.ones(zt.shape[1], dtype=torch.bool)
    t_rest[t_ids] = False
    qb = torch.cat([q[:, s_ids], (q * s_rest).sum(-1, keepdim=True)], dim=-1)
    pb = torch.cat([p[:, t_ids], (p * t_rest).sum(-1, keepdim=True)], dim=-1)
    return qb, pb, q[:, s_rest], p[:, t_rest]


def ref_divergence(name: str, q: Tensor, p: Tensor, **hyper) -> Tensor:
    """The dense divergences on probability rows, written out plainly."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        b = hyper.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skew_forward_kl":
        lam = hyper.get("lam", 0.1)
        return _kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        lam = hyper.get("lam", 0.1)
        return _kl(q, (1 - lam) * p + lam * q)
    if name == "akl":
        mu = hyper.get("mu", 0.5)
        with torch.no_grad():
            order = torch.argsort(p, dim=-1, descending=True, stable=True)
            ps, qs = p.gather(-1, order), q.gather(-1, order)
            tail = torch.cumsum(ps, -1) > mu
            tail[:, 0] = False
            gap = (ps - qs).abs()
            gt, gh = (gap * tail).sum(-1), (gap * ~tail).sum(-1)
            wh = torch.where(gh + gt > 0, gh / (gh + gt), 0.5)
        return wh * _kl(p, q) + (1 - wh) * _kl(q, p)
    if name == "todi":
        beta = hyper.get("beta", 1.0)
        use = (p > 0) & (q > 0)
        p1, q1 = torch.where(use, p, 1.0), torch.where(use, q, 1.0)
        with torch.no_grad():
            a = torch.sigmoid(beta * torch.log(p1 / q1))
        terms = a * p1 * torch.log(p1 / q1) + (1 - a) * q1 * torch.log(q1 / p1)
        return torch.where(use, terms, 0.0).sum(-1)
    raise KeyError(name)


def ref_sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Sort both rows descending, zero-pad the shorter one, sum |difference|."""
    size = max(p.shape[-1], q.shape[-1])
    ps = F.pad(torch.sort(p, dim=-1, descending=True).values, (0, size - p.shape[-1]))
    qs = F.pad(torch.sort(q, dim=-1, descending=True).values, (0, size - q.shape[-1]))
    return (ps - qs).abs().sum(-1)


def ref_loss(loss, zs, zt, t_ids, s_ids, temperature, divergence="forward_kl", matched_weight=0.5, **hyper):
    qb, pb, q_rest, p_rest = ref_buckets(zs, zt, t_ids, s_ids, temperature)
    if loss == "exact":
        return ref_divergence(divergence, qb, pb, **hyper)
    if loss == "uld":
        tau = _tau(temperature, zs.shape[0])
        return ref_sorted_l1(_probs(zt, tau), _probs(zs, tau))
    w = matched_weight
    return w * ref_divergence(divergence, qb, pb, **hyper) + (1 - w) * ref_sorted_l1(p_rest, q_rest)


# ----------------------------------------------------------------------------------------------------- helpers
def _map(seed: int = 0, g: int = G, v_t: int = V_T, v_s: int = V_S) -> VocabMap:
    gen = torch.Generator().manual_seed(seed)
    return VocabMap(torch.randperm(v_t, generator=gen)[:g], torch.randperm(v_s, generator=gen)[:g], v_t, v_s)


def _logits(seed: int, n: int = N, v_t: int = V_T, v_s: int = V_S, masked: bool = False):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v_s, generator=gen) * 2
    zt = torch.randn(n, v_t, generator=gen) * 2
    if masked:  # masked vocabulary entries on the teacher side, one row with almost everything masked
        zt[:, ::5] = -math.inf
        zt[2, 2:] = -math.inf  # (column 0 is masked too: one teacher entry left)
        zs[:, 3] = -math.inf
    return zs, zt


def _temperature(kind: str, n: int = N):
    if kind == "per-token":
        return 1.0 + 2.0 * torch.rand(n, generator=torch.Generator().manual_seed(5))
    return float(kind)


def _close(a: Tensor, b: Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def _value_and_grad(fn, zs: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    z = zs.detach().clone().requires_grad_()
    out = fn(z)
    (g,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), [z])
    return out.detach(), g


# --------------------------------------------------------------------------------------------- per-token losses
@pytest.mark.parametrize("temp", TEMPERATURES)
@pytest.mark.parametrize("divergence", EXACT_DIVERGENCES)
@pytest.mark.parametrize("masked", [False, True])
def test_exact_matches_reference(divergence, temp, masked):
    zs, zt = _logits(1, masked=masked)
    vm, tau, hyper = _map(), _temperature(temp), HYPER.get(divergence, {})
    w = torch.rand(N, generator=torch.Generator().manual_seed(2))
    got, g = _value_and_grad(lambda z: cv.exact(z, zt, vm, temperature=tau, divergence=divergence, **hyper), zs, w)
    ref, g_ref = _value_and_grad(
        lambda z: ref_loss("exact", z.double(), zt, vm.teacher_ids, vm.student_ids, tau, divergence, **hyper), zs, w
    )
    _close(got, ref)
    _close(g, g_ref)


@pytest.mark.parametrize("temp", TEMPERATURES)
@pytest.mark.parametrize("loss", ["uld", "hybrid"])
@pytest.mark.parametrize("masked", [False, True])
def test_uld_and_hybrid_match_reference(loss, temp, masked):
    zs, zt = _logits(3, masked=masked)
    vm, tau = _map(1), _temperature(temp)
    kw = {"matched_weight": 0.3, "divergence": "jsd", "beta": 0.4} if loss == "hybrid" else {}
    w = torch.rand(N, generator=torch.Generator().manual_seed(4))
    got, g = _value_and_grad(lambda z: cv.CROSS_VOCAB_LOSSES[loss](z, zt, vm, temperature=tau, **kw), zs, w)
    ref, g_ref = _value_and_grad(
        lambda z: ref_loss(loss, z.double(), zt, vm.teacher_ids, vm.student_ids, tau, **kw), zs, w
    )
    _close(got, ref)
    _close(g, g_ref)


def test_tail_buckets_edge_cases():
    zs, zt = _logits(6)
    # every student id matched: the student's tail is empty (-inf, no gradient), the teacher's is not
    full_student = VocabMap(torch.arange(V_S) + 5, torch.randperm(V_S, generator=torch.Generator().manual_seed(0)),
                            V_T, V_S)  # fmt: skip
    logq, logp = cv.matched_logprobs(zs, zt, full_student)
    assert logq.shape == logp.shape == (N, V_S + 1)
    assert torch.isneginf(logq[:, -1]).all() and torch.isfinite(logp[:, -1]).all()
    _close(logq.exp().sum(-1), torch.ones(N), atol=1e-6)
    z = zs.clone().requires_grad_()
    cv.exact(z, zt, full_student).sum().backward()
    assert torch.isfinite(z.grad).all()
    ref = ref_loss("exact", zs, zt, full_student.teacher_ids, full_student.student_ids, 1.0)
    _close(cv.exact(zs, zt, full_student), ref)
    # no pair at all: one bucket each holding all the mass, divergence 0; ULD on the rest is the whole ULD
    empty = VocabMap(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), V_T, V_S)
    _close(cv.exact(zs, zt, empty), torch.zeros(N), atol=1e-6)
    _close(cv.hybrid(zs, zt, empty, matched_weight=0.0), cv.uld(zs, zt), atol=1e-6)


def test_uld_properties():
    zs, zt = _logits(7)
    # permuting a vocabulary does not change ULD: only the shape of the distribution counts
    perm = torch.randperm(V_T, generator=torch.Generator().manual_seed(0))
    _close(cv.uld(zs, zt), cv.uld(zs, zt[:, perm]), atol=1e-6)
    same = torch.randn(N, 41)
    _close(cv.uld(same, same[:, torch.randperm(41)]), torch.zeros(N), atol=1e-6)
    assert bool((cv.uld(zs, zt) <= 2.0 + 1e-6).all())  # an L1 distance between two distributions


def test_input_checks():
    zs, zt = _logits(8)
    vm = _map()
    with pytest.raises(ValueError, match="slice padded rows"):
        cv.exact(zs[:, :-1], zt, vm)
    with pytest.raises(ValueError, match="not offered"):
        cv.exact(zs, zt, vm, divergence="ttm")
    with pytest.raises(ValueError, match="matched_weight"):
        cv.hybrid(zs, zt, vm, matched_weight=1.5)
    with pytest.raises(ValueError, match="distinct"):
        VocabMap(torch.tensor([1, 1]), torch.tensor([0, 2]), V_T, V_S)
    with pytest.raises(ValueError, match="lie in"):
        VocabMap(torch.tensor([V_T]), torch.tensor([0]), V_T, V_S)


# ------------------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("temp", TEMPERATURES)
@pytest.mark.parametrize("divergence", EXACT_DIVERGENCES)
def test_oracle_identity_map_equals_same_tokenizer_divergence(divergence, temp):
    n, v = 3 * 47, 123
    zs, zt = _logits(9, n=n, v_t=v, v_s=v)
    zt[:, ::7] = -math.inf  # masked vocabulary entries too
    tau, hyper = _temperature(temp, n), HYPER.get(divergence, {})
    w = torch.rand(n, generator=torch.Generator().manual_seed(3))
    vm = VocabMap.identity(v)
    got, g = _value_and_grad(lambda z: cv.exact(z, zt, vm, temperature=tau, divergence=divergence, **hyper), zs, w)
    ref, g_ref = _value_and_grad(lambda z: DIVERGENCES[divergence](z, zt, temperature=tau, **hyper), zs, w)
    _close(got, ref, atol=1e-5)
    _close(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("tau0", [1.0, 2.0])
def test_oracle_chunked_equals_egad_fused_kd(tau0):
    """Same tokenizer, identity map: the chunked cross-vocabulary forward KL, reduced as the objective reduces it,
    is egad's fused KD loss (student hidden + head, teacher hidden + head), values and gradients."""
    b, length, d_s, d_t, v = 3, 47, 24, 40, 123
    gen = torch.Generator().manual_seed(11)
    hs = torch.randn(b, length, d_s, generator=gen)
    ws = torch.randn(v, d_s, generator=gen) * 0.3
    ht = torch.randn(b, length, d_t, generator=gen)
    wt = torch.randn(v, d_t, generator=gen) * 0.3
    targets = torch.randint(0, v, (b, length), generator=gen)
    targets[0, :5] = -100  # positions outside the response: neither path distils them
    keep = targets.reshape(-1) != -100
    n = int(keep.sum())

    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = distillation_loss(StudentOutputs(hidden=h1, lm_head_weight=w1), FusedSignal(ht, OutputHead(wt)), targets,
                            preset("kd", alpha=1.0, tau0=tau0, chunk_size=16))  # fmt: skip
    out.loss.backward()

    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    coef = torch.full((n,), tau0**2 / n)
    rows = h2.reshape(-1, d_s)[keep]
    per_token = chunked_cross_vocab_loss(rows, w2, ht.reshape(-1, d_t)[keep], wt, VocabMap.identity(v),
                                         temperature=tau0, chunk_size=13, token_weights=coef)  # fmt: skip
    loss = (per_token * coef).sum()
    loss.backward()
    _close(loss, out.loss, atol=1e-6)
    _close(h2.grad, h1.grad, atol=1e-6)
    _close(w2.grad, w1.grad, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- chunked
def _head_case(seed: int, padded: int = 3, fancy: bool = False):
    gen = torch.Generator().manual_seed(seed)
    d_s, d_t = 19, 29
    hs = torch.randn(N, d_s, generator=gen)
    ws = torch.randn(V_S + padded, d_s, generator=gen) * 0.4
    bs = torch.randn(V_S + padded, generator=gen) if fancy else None
    ht = torch.randn(N, d_t, generator=gen)
    wt = torch.randn(V_T + padded, d_t, generator=gen) * 0.4
    return hs, ws, bs, ht, wt


def _student_logits(h, w, b, fancy: bool) -> Tensor:
    z = h @ w[:V_S].t() + (b[:V_S] if b is not None else 0)
    if fancy:  # logit scale 0.7, soft-cap 5
        z = 5.0 * torch.tanh(z * 0.7 / 5.0)
    return z


@pytest.mark.parametrize("loss", ["exact", "uld", "hybrid"])
@pytest.mark.parametrize("chunk", [1, 3, 50])
@pytest.mark.parametrize("weighted", [True, False])
def test_chunked_matches_reference(loss, chunk, weighted):
    fancy = chunk == 3  # a head with bias, logit scale and soft-cap on one chunk size
    hs, ws, bs, ht, wt = _head_case(12, fancy=fancy)
    vm, tau = _map(2), _temperature("per-token")
    weights = torch.rand(N, generator=torch.Generator().manual_seed(6))
    weights[[1, 4]] = 0.0  # masked positions: unaligned student targets get no distillation
    head = OutputHead(ws, bs, logit_scale=0.7 if fancy else 1.0, softcap=5.0 if fancy else None)
    leaves = [t.clone().requires_grad_() for t in (hs, ws) + ((bs,) if fancy else ())]
    head = OutputHead(leaves[1], leaves[2] if fancy else None, head.hidden_scale, head.logit_scale, head.softcap)
    out = chunked_cross_vocab_loss(leaves[0], head, ht, wt, vm, loss=loss, temperature=tau, chunk_size=chunk,
                                   token_weights=weights if weighted else None)  # fmt: skip
    (out * weights).sum().mul(0.5).backward()  # a constant factor on top of the weights still takes the fast path

    ref_leaves = [t.detach().double().requires_grad_() for t in (hs, ws) + ((bs,) if fancy else ())]
    zs = _student_logits(ref_leaves[0], ref_leaves[1], ref_leaves[2] if fancy else None, fancy)
    zt = ht.double() @ wt[:V_T].double().t()
    ref = ref_loss(loss, zs, zt, vm.teacher_ids, vm.student_ids, tau)
    (ref * weights.double()).sum().mul(0.5).backward()
    _close(out, ref.detach())
    for got, want in zip(leaves, ref_leaves, strict=True):
        _close(got.grad, want.grad)
    assert not leaves[1].grad[V_S:].any()  # padded head rows take no gradient
    assert not leaves[0].grad[[1, 4]].any()


def test_chunked_upstream_not_proportional_to_weights_recomputes():
    hs, ws, _, ht, wt = _head_case(13)
    vm = _map(3)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(7))
    other = torch.rand(N, generator=torch.Generator().manual_seed(8))
    grads = []
    for tw in (weights, None):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        out = chunked_cross_vocab_loss(h, w, ht, wt, vm, chunk_size=2, token_weights=tw)
        (out * other).sum().backward()
        grads.append((h.grad, w.grad))
    _close(grads[0][0], grads[1][0], atol=1e-6)
    _close(grads[0][1], grads[1][1], atol=1e-6)


def test_chunked_without_grad_and_empty():
    hs, ws, _, ht, wt = _head_case(14)
    vm = _map(4)
    with torch.no_grad():
        out = chunked_cross_vocab_loss(hs, ws, ht, wt, vm, loss="hybrid", chunk_size=4)
    _close(out, cv.hybrid(hs @ ws[:V_S].t(), ht @ wt[:V_T].t(), vm), atol=1e-5)
    h = hs[:0].clone().requires_grad_()
    w = ws.clone().requires_grad_()
    empty = chunked_cross_vocab_loss(h, w, ht[:0], wt, vm)
    assert empty.shape == (0,)
    empty.sum().backward()
    assert w.grad is not None and not w.grad.any()
    with pytest.raises(ValueError, match="needs the vocabulary map"):
        chunked_cross_vocab_loss(hs, ws, ht, wt, None, loss="exact")
    with pytest.raises(ValueError, match="token_weights"):
        chunked_cross_vocab_loss(hs, ws, ht, wt, vm, token_weights=torch.ones(N + 1))


def test_chunked_projects_each_chunk_once_with_token_weights(monkeypatch):
    hs, ws, _, ht, wt = _head_case(15)
    vm, calls = _map(5), []
    original = cvc._Run.chunk
    monkeypatch.setattr(cvc._Run, "chunk", lambda self, *a: calls.append(1) or original(self, *a))
    weights = torch.rand(N, generator=torch.Generator().manual_seed(9))
    for tw, expected in ((weights, 3), (None, 6)):  # 3 chunks of 3 rows; without weights backward re-projects
        calls.clear()
        h = hs.clone().requires_grad_()
        (chunked_cross_vocab_loss(h, ws, ht, wt, vm, chunk_size=3, token_weights=tw) * weights).sum().backward()
        assert len(calls) == expected
