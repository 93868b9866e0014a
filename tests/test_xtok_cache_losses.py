"""The cross-vocabulary losses against a cached (top-k) teacher, `egad.losses.cross_vocab_topk`: values and gradients
against float64 references written here row by row from the definitions, equality with the dense losses when the
cache holds the whole vocabulary (k = V_T), the lower-bound property below it, and the chunked engine against the
unchunked functions, at odd shapes."""

from __future__ import annotations

import math

import pytest
import torch

from egad.losses.cross_vocab import CROSS_VOCAB_LOSSES, VocabMap
from egad.losses.cross_vocab_chunked import chunked_cross_vocab_topk_loss
from egad.losses.cross_vocab_topk import CROSS_VOCAB_TOPK_LOSSES, TopKRows
from egad.models.heads import OutputHead

N, V_T, V_S, G = 7, 53, 41, 29


def _vmap(seed: int = 0) -> VocabMap:
    g = torch.Generator().manual_seed(seed)
    t = torch.randperm(V_T, generator=g)[:G]
    s = torch.randperm(V_S, generator=g)[:G]
    return VocabMap(t, s, V_T, V_S)


def _teacher(zt: torch.Tensor, k: int) -> TopKRows:
    """What the cache stores of dense teacher logits: top-k at tau = 1, the tail log-mass, the exact entropy."""
    logp = zt.double().log_softmax(-1)
    top = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, top.indices, -math.inf)
    tail = torch.logsumexp(rest, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return TopKRows(top.indices, top.values.float(), tail.float(), ent.float(), zt.shape[1])


# ----------------------------------------------------------------------------------- float64 references, row by row
def _ref_partition(zs_row, zt_row, ids_row, vmap, tau):
    """(q, p) over [matched top-k ids..., one bucket], float64, from the full tempered distributions."""
    q = torch.softmax(zs_row / tau, -1)
    p = torch.softmax(zt_row / tau, -1)
    t2s = {int(a): int(b) for a, b in zip(vmap.teacher_ids, vmap.student_ids, strict=True)}
    qs, ps = [], []
    for t in ids_row.tolist():
        if t in t2s:
            qs.append(q[t2s[t]])
            ps.append(p[t])
    q_m, p_m = torch.stack(qs) if qs else q[:0], torch.stack(ps) if ps else p[:0]
    return torch.cat([q_m, (1 - q_m.sum())[None]]), torch.cat([p_m, (1 - p_m.sum())[None]])


def _ref_exact(zs, zt, ids, vmap, tau, divergence):
    out = []
    for i in range(zs.shape[0]):
        q, p = _ref_partition(zs[i], zt[i], ids[i], vmap, tau)
        if divergence == "forward_kl":
            keep = p > 0
            out.append((p[keep] * (p[keep].log() - q[keep].log())).sum())
        elif divergence == "reverse_kl":
            keep = q > 0
            out.append((q[keep] * (q[keep].log() - p[keep].log())).sum())
        else:  # tvd
            out.append(0.5 * (p - q).abs().sum())
    return torch.stack(out)


def _l1_sorted(a, b):
    a, b = a.sort(descending=True).values, b.sort(descending=True).values
    n = max(a.numel(), b.numel())
    a = torch.cat([a, a.new_zeros(n - a.numel())])
    b = torch.cat([b, b.new_zeros(n - b.numel())])
    return (a - b).abs().sum()


def _ref_uld(zs, zt, k, tau):
    out = []
    for i in range(zs.shape[0]):
        q = torch.softmax(zs[i] / tau, -1).sort(descending=True).values
        p = torch.softmax(zt[i] / tau, -1).sort(descending=True).values
        out.append(_l1_sorted(p[:k], q[:k]) + (p[k:].sum() - q[k:].sum()).abs())
    return torch.stack(out)


def _ref_hybrid(zs, zt, ids, vmap, tau, w):
    exact = _ref_exact(zs, zt, ids, vmap, tau, "forward_kl")
    t2s = {int(a): int(b) for a, b in zip(vmap.teacher_ids, vmap.student_ids, strict=True)}
    k, out = ids.shape[1], []
    for i in range(zs.shape[0]):
        q = torch.softmax(zs[i] / tau, -1)
        p = torch.softmax(zt[i] / tau, -1)
        top = ids[i].tolist()
        matched_s = [t2s[t] for t in top if t in t2s]
        p_known = torch.stack([p[t] for t in top if t not in t2s] or [p.new_zeros(())])
        in_top = torch.zeros(V_T, dtype=torch.bool)
        in_top[ids[i]] = True
        p_tail = p[~in_top].sum()
        keep = torch.ones(V_S, dtype=torch.bool)
        keep[matched_s] = False
        q_rest = q[keep].sort(descending=True).values
        out.append(_l1_sorted(p_known, q_rest[:k]) + (p_tail - q_rest[k:].sum()).abs())
    return w * exact + (1 - w) * torch.stack(out)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(N, V_S, generator=g, dtype=torch.float64) * 2.0
    zt = torch.randn(N, V_T, generator=g, dtype=torch.float64) * 2.5
    return zs, zt


@pytest.mark.parametrize("k", [5, 17, V_T])
@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "tvd", "uld", "hybrid"])
def test_values_and_gradients_match_the_float64_reference(case, k):
    zs, zt = _inputs(1)
    vmap, teacher = _vmap(), _teacher(zt, k)
    tau = 1.0
    leaf = zs.float().clone().requires_grad_(True)
    ref_leaf = zs.clone().requires_grad_(True)
    if case == "uld":
        got = CROSS_VOCAB_TOPK_LOSSES["uld"](leaf, teacher, vmap, temperature=tau)
        ref = _ref_uld(ref_leaf, zt, k, tau)
    elif case == "hybrid":
        got = CROSS_VOCAB_TOPK_LOSSES["hybrid"](leaf, teacher, vmap, temperature=tau, matched_weight=0.3)
        ref = _ref_hybrid(ref_leaf, zt, teacher.ids, vmap, tau, 0.3)
    else:
        got = CROSS_VOCAB_TOPK_LOSSES["exact"](leaf, teacher, vmap, temperature=tau, divergence=case)
        ref = _ref_exact(ref_leaf, zt, teacher.ids, vmap, tau, case)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-6)
    w = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    (got * w.float()).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("loss", ["exact", "uld", "hybrid"])
def test_the_whole_vocabulary_cached_equals_the_dense_loss_at_any_temperature(loss):
    """k = V_T: nothing is left in the tail, so the cached loss is the dense one, per-token temperatures included."""
    zs, zt = _inputs(2)
    vmap, teacher = _vmap(3), _teacher(zt, V_T)
    tau = torch.linspace(0.7, 2.5, N)
    a = zs.float().clone().requires_grad_(True)
    b = zs.float().clone().requires_grad_(True)
    kw = {"matched_weight": 0.4} if loss == "hybrid" else {}
    got = CROSS_VOCAB_TOPK_LOSSES[loss](a, teacher, vmap, temperature=tau, **kw)
    want = CROSS_VOCAB_LOSSES[loss](b, zt.float(), vmap, temperature=tau, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["exact", "uld"])
def test_a_top_k_cache_never_exceeds_the_dense_loss(loss):
    """Below k = V_T the partition is coarser (exact: data processing) or the tail is compared in bulk (ULD: the
    triangle inequality): the cached value is a lower bound of the dense one at tau = 1."""
    zs, zt = _inputs(4)
    vmap = _vmap(5)
    dense = CROSS_VOCAB_LOSSES[loss](zs.float(), zt.float(), vmap)
    for k in (1, 4, 16, V_T - 1):
        cached = CROSS_VOCAB_TOPK_LOSSES[loss](zs.float(), _teacher(zt, k), vmap)
        assert bool((cached <= dense + 1e-5).all()), (k, cached, dense)


@pytest.mark.parametrize("loss", ["exact", "uld", "hybrid"])
def test_chunked_equals_unchunked_with_gradients(loss):
    torch.manual_seed(6)
    d = 11
    zt = torch.randn(N, V_T, dtype=torch.float64) * 2
    vmap, teacher = _vmap(7), _teacher(zt, 9)
    tau = torch.linspace(0.8, 2.0, N)
    weights = torch.linspace(0.1, 1.0, N)

    def run(chunked: bool):
        torch.manual_seed(8)
        hs = torch.randn(N, d, requires_grad=True)
        w = torch.randn(V_S + 3, d, requires_grad=True)  # 3 padded rows
        if chunked:
            vals = chunked_cross_vocab_topk_loss(hs, OutputHead(w), teacher, vmap, loss=loss, temperature=tau,
                                                 chunk_size=3, token_weights=weights)  # fmt: skip
        else:
            vals = CROSS_VOCAB_TOPK_LOSSES[loss](hs @ w[:V_S].t(), teacher, vmap, temperature=tau)
        (vals * weights).sum().backward()
        return vals.detach(), hs.grad, w.grad

    for x, y in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_teacher_rows_are_checked():
    zs, zt = _inputs(9)
    teacher = _teacher(zt, 5)
    with pytest.raises(ValueError, match="expected student logits"):
        CROSS_VOCAB_TOPK_LOSSES["exact"](zs[:3].float(), teacher, _vmap())
    with pytest.raises(ValueError, match="slice padded rows away"):
        CROSS_VOCAB_TOPK_LOSSES["exact"](torch.randn(N, V_S + 1), teacher, _vmap())
    with pytest.raises(ValueError, match="TopKRows expects"):
        TopKRows(teacher.ids, teacher.logprobs[:, :2], teacher.tail, teacher.entropy, V_T)
