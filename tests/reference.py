"""Naive float64 reference implementations used by the tests.

Written independently of ``egad.losses`` and as plainly as possible: explicit exp / sum softmax, explicit loops where
the definition is a loop. Every function takes (student_logits, teacher_logits) of shape (N, V), casts them to float64
and returns an (N,) float64 tensor, so autograd yields reference gradients.

Conventions shared with the library: a term a log(a / b) counts 0 when a = 0 or b = 0 (the latter is how MiniLLM /
DistiLLM treat teacher entries masked to -inf in the reverse directions).

This is a flat module of functions; references for other parts of the library may be appended below.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ref_tau(temperature: float | Tensor, n: int) -> Tensor:
    """Temperature as an (N, 1) float64 column."""
    if isinstance(temperature, Tensor):
        return temperature.detach().double().reshape(-1, 1).expand(n, 1)
    return torch.full((n, 1), float(temperature), dtype=torch.float64)


def ref_softmax(z: Tensor) -> Tensor:
    z = z.double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_kl_terms(a: Tensor, b: Tensor) -> Tensor:
    """Per-entry a_v log(a_v / b_v) of probability rows, 0 where a_v = 0 or b_v = 0."""
    use = (a > 0) & (b > 0)
    a_safe = torch.where(use, a, torch.ones_like(a))
    b_safe = torch.where(use, b, torch.ones_like(b))
    return torch.where(use, a_safe * torch.log(a_safe / b_safe), torch.zeros_like(a))


def ref_kl(a: Tensor, b: Tensor) -> Tensor:
    return ref_kl_terms(a, b).sum(dim=-1)


def ref_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    """(q, p) = (softmax(z_S / tau), softmax(z_T / tau)) in float64."""
    tau = ref_tau(temperature, student_logits.shape[0])
    return ref_softmax(student_logits.double() / tau), ref_softmax(teacher_logits.double() / tau)


def ref_forward_kl(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    return ref_kl(p, q)


def ref_reverse_kl(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    return ref_kl(q, p)


def ref_jsd(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, beta: float = 0.5) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_skew_forward_kl(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, lam: float = 0.1) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    return ref_kl(p, lam * p + (1 - lam) * q)


def ref_skew_reverse_kl(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, lam: float = 0.1) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    return ref_kl(q, (1 - lam) * p + lam * q)


def ref_tvd(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    return 0.5 * (p - q).abs().sum(dim=-1)


def ref_akl(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, mu: float = 0.5) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    w_head = []
    for p_row, q_row in zip(p.detach().tolist(), q.detach().tolist(), strict=True):
        order = sorted(range(len(p_row)), key=lambda v: -p_row[v])  # descending; Python's sort is stable
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for rank, v in enumerate(order):
            cum += p_row[v]
            if rank == 0 or cum <= mu:  # the most likely token always counts as head
                g_head += abs(p_row[v] - q_row[v])
            else:
                g_tail += abs(p_row[v] - q_row[v])
        w_head.append(0.5 if g_head + g_tail == 0 else g_head / (g_head + g_tail))
    w = torch.tensor(w_head, dtype=torch.float64)
    return w * ref_kl(p, q) + (1 - w) * ref_kl(q, p)


def ref_todi(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, beta: float = 1.0) -> Tensor:
    q, p = ref_probs(s, t, temperature)
    p_safe = torch.where(p > 0, p, torch.ones_like(p))
    a = torch.where(p > 0, torch.sigmoid(beta * torch.log(p_safe / q)), torch.zeros_like(p)).detach()
    return (a * ref_kl_terms(p, q) + (1 - a) * ref_kl_terms(q, p)).sum(dim=-1)


def ref_ttm(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, gamma: float = 0.5) -> Tensor:
    p = ref_softmax(t.double() / ref_tau(temperature, t.shape[0]))
    powered = p**gamma
    target = powered / powered.sum(dim=-1, keepdim=True)
    return ref_kl(target, ref_softmax(s.double()))


def ref_wttm(s: Tensor, t: Tensor, *, temperature: float | Tensor = 1.0, gamma: float = 0.5) -> Tensor:
    p = ref_softmax(t.double() / ref_tau(temperature, t.shape[0]))
    weight = (p**gamma).sum(dim=-1).detach()
    return weight * ref_ttm(s, t, temperature=temperature, gamma=gamma)


def ref_logit_difference_kl(s: Tensor, t: Tensor, idx: Tensor, tau: Tensor) -> Tensor:
    """KL(softmax(teacher pair differences / tau) || softmax(student pair differences / tau)) over idx (N, k)."""
    k = idx.shape[1]
    t_diffs, s_diffs = [], []
    for i in range(k):
        for j in range(i + 1, k):
            t_diffs.append(t.gather(1, idx[:, i : i + 1]) - t.gather(1, idx[:, j : j + 1]))
            s_diffs.append(s.gather(1, idx[:, i : i + 1]) - s.gather(1, idx[:, j : j + 1]))
    dt = torch.cat(t_diffs, dim=1) / tau
    ds = torch.cat(s_diffs, dim=1) / tau
    return ref_kl(ref_softmax(dt), ref_softmax(ds))


def ref_bild(s: Tensor, t: Tensor, *, temperature: float | Tensor = 3.0, top_k: int = 8) -> Tensor:
    s64, t64 = s.double(), t.double()
    tau = ref_tau(temperature, s.shape[0])
    teacher_idx = torch.argsort(t64.detach(), dim=-1, descending=True)[:, :top_k]
    student_idx = torch.argsort(s64.detach(), dim=-1, descending=True)[:, :top_k]
    return ref_logit_difference_kl(s64, t64, teacher_idx, tau) + ref_logit_difference_kl(s64, t64, student_idx, tau)


REF_DIVERGENCES = {
    "forward_kl": ref_forward_kl,
    "reverse_kl": ref_reverse_kl,
    "jsd": ref_jsd,
    "skew_forward_kl": ref_skew_forward_kl,
    "skew_reverse_kl": ref_skew_reverse_kl,
    "tvd": ref_tvd,
    "akl": ref_akl,
    "todi": ref_todi,
    "ttm": ref_ttm,
    "wttm": ref_wttm,
    "bild": ref_bild,
}
