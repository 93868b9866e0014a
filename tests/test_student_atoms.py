"""The student atoms' in-place forward and hand-written backward against float64 autograd, on odd shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from egad.losses import sparse
from egad.losses.divergences import _temper
from egad.losses.sparse_tail import TailSample
from egad.losses.student_atoms import _shifted, student_atom_logprobs, student_atom_logprobs_and_ce

N, V, J = 37, 123, 19


def _inputs(seed: int, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 3
    ids = torch.randint(0, V, (N, J), generator=g)
    ids[:, 5] = ids[:, 2]  # repeats in every row
    ids[:4, 7:10] = ids[:4, 6:7]
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = ids[::3, 4]  # targets among the atoms, and not
    if masked:
        z[:, 100:] = -math.inf  # a masked vocabulary tail, never an atom or a target
        ids, targets = ids % 100, targets % 100
    return z, ids, targets


TEMPERATURES = {
    "one": lambda: 1.0,
    "float": lambda: 1.7,
    "scalar": lambda: torch.tensor(0.6),
    "per_token": lambda: 1.0 + torch.rand(N, generator=torch.Generator().manual_seed(5)),
}


def _reference(z, ids, targets, tau):
    """float64 autograd: log softmax(z / tau) at ids, and -log softmax(z) at targets."""
    z64 = z.double()
    tau64 = tau.double() if isinstance(tau, torch.Tensor) else tau
    logq = torch.log_softmax(_temper(z64, tau64), dim=-1).gather(-1, ids)
    ce = -torch.log_softmax(z64, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return logq, ce


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", list(TEMPERATURES))
def test_atoms_match_float64_autograd(temperature: str, masked: bool, kernel_mode: str) -> None:
    z, ids, targets = _inputs(1, masked)
    tau = TEMPERATURES[temperature]()
    w = torch.randn(N, J, generator=torch.Generator().manual_seed(2))
    fast = z.clone().requires_grad_()
    got = student_atom_logprobs(fast, ids, temperature=tau)
    (got * w).sum().backward()
    ref = z.double().requires_grad_()
    want, _ = _reference(ref, ids, targets, tau)
    (want * w.double()).sum().backward()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.grad, ref.grad.float(), rtol=1e-5, atol=1e-6)
    if masked:
        assert (fast.grad[:, 100:] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", list(TEMPERATURES))
def test_atoms_and_cross_entropy_match_float64_autograd(temperature: str, masked: bool, kernel_mode: str) -> None:
    z, ids, targets = _inputs(3, masked)
    tau = TEMPERATURES[temperature]()
    w = torch.randn(N, J, generator=torch.Generator().manual_seed(4))
    w_ce = torch.rand(N, generator=torch.Generator().manual_seed(6))
    fast = z.clone().requires_grad_()
    logq, ce = student_atom_logprobs_and_ce(fast, ids, targets, temperature=tau)
    ((logq * w).sum() + (ce * w_ce).sum()).backward()
    ref = z.double().requires_grad_()
    want_logq, want_ce = _reference(ref, ids, targets, tau)
    ((want_logq * w.double()).sum() + (want_ce * w_ce.double()).sum()).backward()
    assert logq.shape == (N, J) and ce.shape == (N,)
    torch.testing.assert_close(logq, want_logq.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, want_ce.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.grad, ref.grad.float(), rtol=1e-5, atol=1e-6)


def test_a_temperature_with_a_gradient_takes_plain_autograd(kernel_mode: str) -> None:
    z, ids, targets = _inputs(7)
    tau = (1.0 + torch.rand(N, generator=torch.Generator().manual_seed(8))).requires_grad_()
    logq, ce = student_atom_logprobs_and_ce(z, ids, targets, temperature=tau)
    logq.sum().backward()
    ref = tau.detach().double().requires_grad_()
    want, want_ce = _reference(z, ids, targets, ref)
    want.sum().backward()
    torch.testing.assert_close(tau.grad, ref.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, want_ce.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", list(TEMPERATURES))
def test_one_pass_shift_rounds_as_temper_then_subtract(temperature: str) -> None:
    """The shift is bit for bit (z / tau) - m, and m / tau the maximum of z / tau."""
    z, _, _ = _inputs(9)
    tau = TEMPERATURES[temperature]()
    m = z.amax(-1, keepdim=True)
    mt = _temper(m, tau)
    assert torch.equal(mt, _temper(z, tau).amax(-1, keepdim=True))
    assert torch.equal(_shifted(z, tau, mt), _temper(z, tau) - mt)


def _sample(seed: int, k: int = 6, s: int = 11) -> tuple[torch.Tensor, ...]:
    """A teacher row set: top-k ids and log-probs, tail log-mass and a tail sample (ids may repeat)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    top = logp.topk(k, -1)
    rest = logp.scatter(1, top.indices, -math.inf)
    tail = rest.logsumexp(-1)
    sid = torch.multinomial((0.5 * rest).softmax(-1), s, replacement=True, generator=g)
    sample = TailSample(sid, logp.gather(1, sid), (0.5 * rest).logsumexp(-1), 0.5)
    return top.indices, top.values, tail, sample


@pytest.mark.parametrize("temperature", ["one", "per_token", "float"])
def test_sampled_forward_kl_and_ce_equal_the_separate_losses(temperature: str, kernel_mode: str) -> None:
    """The fused KL + CE of the sampled path against the sampled KL alone and F.cross_entropy: values and gradients."""
    ids, lp, tail, sample = _sample(11)
    z, _, targets = _inputs(12)
    tau = TEMPERATURES[temperature]()
    fast = z.clone().requires_grad_()
    kl, ce = sparse.forward_kl_and_ce(fast, ids, lp, tail, sample, targets, temperature=tau)
    (kl.sum() + 0.3 * ce.sum()).backward()
    ref = z.clone().requires_grad_()
    want_kl = sparse.forward_kl(ref, ids, lp, tail, temperature=tau, sample=sample)
    want_ce = F.cross_entropy(ref, targets, reduction="none")
    (want_kl.sum() + 0.3 * want_ce.sum()).backward()
    torch.testing.assert_close(kl, want_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_backward_in_row_blocks_is_bit_identical(monkeypatch) -> None:
    """The CE's softmax is recomputed in the backward a block of rows at a time; any block size gives the same bits."""
    from egad.losses import student_atoms

    z, ids, targets = _inputs(13)
    tau = TEMPERATURES["per_token"]()
    grads = []
    for rows in (N, 5, 1):  # one block; several with a short last one; one row each
        monkeypatch.setattr(student_atoms, "_block_rows", lambda vocab, rows=rows: rows)
        x = z.clone().requires_grad_()
        logq, ce = student_atom_logprobs_and_ce(x, ids, targets, temperature=tau)
        (logq.sum() + 2.0 * ce.sum()).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
