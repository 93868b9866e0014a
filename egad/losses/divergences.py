"""Per-token divergences between a student and a teacher next-token distribution.

Every function has the signature ``fn(student_logits, teacher_logits, *, temperature=..., **hyper) -> (N,)``:
student first, teacher second, logits of shape (N, V) in any float dtype (cast to fp32 at once), result fp32 (N,).
Notation: p = softmax(z_T / tau) is the teacher, q = softmax(z_S / tau) the student. ``temperature`` is a float or an
(N,) tensor (per-token tau). No function multiplies by tau^2; the caller does, except for the names in ``NO_TAU2``.

Masked vocabulary: teacher logits may be -inf. A term a_v log(a_v / b_v) is 0 when a_v = 0 (0 log 0 = 0), and it is
*dropped* when b_v = 0 < a_v (the student-first "reverse" terms at masked entries, which are +inf in exact arithmetic).
Dropping follows the DistiLLM reference code (``masked_fill(..., isinf(teacher_logits) | isinf(logits), 0)``); it makes
the reverse directions a KL restricted to the teacher's support, finite but no longer guaranteed >= 0 on masked inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from egad.plan.entropy import row_sum

_NEG = torch.finfo(torch.float32).min

__all__ = [
    "DIVERGENCES",
    "NO_TAU2",
    "akl",
    "bild",
    "forward_kl",
    "hellinger_from_logprobs",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "todi",
    "tvd",
    "ttm",
    "wttm",
]


# ----------------------------------------------------------------------------------------------------------- helpers
def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both have shape (N, V); got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    return student_logits.float(), teacher_logits.float()


def _check_range(name: str, value: float, lo: float, hi: float, *, hi_inclusive: bool = True) -> None:
    ok = lo <= value <= hi if hi_inclusive else lo <= value < hi
    if not ok:
        raise ValueError(f"{name} must be in [{lo}, {hi}{']' if hi_inclusive else ')'}, got {value}")


def _checked_tau(tau: float | Tensor, rows: int, device: torch.device) -> float | Tensor:
    """A temperature validated once for every loss: a positive float, or an fp32 tensor of shape () or (rows,) on
    `device` (a tensor's values are not checked: that would synchronise with the device)."""
    if isinstance(tau, Tensor):
        if tau.dim() and tau.shape != (rows,):
            raise ValueError(f"temperature tensor must have shape ({rows},), got {tuple(tau.shape)}")
        return tau.to(device=device, dtype=torch.float32)
    if not float(tau) > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    return float(tau)


def _tau_column(temperature: float | Tensor, z: Tensor) -> Tensor:
    """The temperature as an (N, 1) fp32 column: one kernel signature for floats, 0-d and per-token tensors."""
    tau = _checked_tau(temperature, z.shape[0], z.device)
    if isinstance(tau, Tensor):
        return tau.detach().reshape(-1, 1).expand(z.shape[0], 1).contiguous()
    return z.new_full((z.shape[0], 1), tau)


def _temper(z: Tensor, tau: float | Tensor) -> Tensor:
    """z / tau, a new tensor, with tau a positive float, a 0-d tensor or an (N,) tensor of per-token temperatures."""
    tau = _checked_tau(tau, z.shape[0], z.device)
    return z / (tau[:, None] if isinstance(tau, Tensor) and tau.dim() else tau)


def _tempered(z: Tensor, tau: float | Tensor) -> Tensor:
    """`_temper`, except that at a float tau of 1 the logits are used as they are: no (N, V) copy."""
    return z if isinstance(tau, float) and tau == 1.0 else _temper(z, tau)


def _log_probs(z: Tensor, tau: float | Tensor) -> Tensor:
    return torch.log_softmax(_temper(z, tau), dim=-1)  # (N, V)


def _pair_log_probs(student_logits: Tensor, teacher_logits: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    zs, zt = _check_pair(student_logits, teacher_logits)
    return _log_probs(zs, tau), _log_probs(zt, tau)  # log q, log p: (N, V) each


def _kl_terms(loga: Tensor, logb: Tensor) -> Tensor:
    """Per-entry a_v log(a_v / b_v), 0 where a_v = 0 or b_v = 0 (see the module docstring). (N, V)"""
    keep = (loga > -math.inf) & (logb > -math.inf)
    # Sanitise before the arithmetic: where() alone would still backpropagate NaN from 0 * (-inf) branches.
    la = torch.where(keep, loga, 0.0)
    lb = torch.where(keep, logb, 0.0)
    return torch.where(keep, la.exp() * (la - lb), 0.0)


def _kl_from_logp(loga: Tensor, logb: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v log(a_v / b_v) from log-probabilities. (N, V) -> (N,)"""
    return _kl_terms(loga, logb).sum(dim=-1)


def _log_mix(loga: Tensor, logb: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) in log space, exact at w in {0, 1}. (N, V)"""
    x = loga + (math.log(w) if w > 0 else -math.inf)
    y = logb + (math.log1p(-w) if w < 1 else -math.inf)
    both_zero = (x == -math.inf) & (y == -math.inf)
    # Clamping to a finite floor keeps logaddexp's backward finite (it is NaN at (-inf, -inf)); logaddexp(floor, y)
    # returns y bit-exactly, so the w in {0, 1} endpoints reduce exactly to the plain KL.
    out = torch.logaddexp(x.clamp_min(_NEG), y.clamp_min(_NEG))
    # A zero mixture must stay -inf so that _kl_terms recognises it.
    return torch.where(both_zero, -math.inf, out)


# ------------------------------------------------------------------------------------------------------ divergences
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Forward KL = KL(teacher || student) = sum_v p_v log(p_v / q_v).

    Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).
    """
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_logp(logp, logq)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Reverse KL = KL(student || teacher) = sum_v q_v log(q_v / p_v).

    Token-level form of the MiniLLM objective: Gu, Dong, Wei & Huang, ICLR 2024, "MiniLLM: Knowledge Distillation of
    Large Language Models" (arXiv:2306.08543). Entries with teacher p_v = 0 (-inf logits) are dropped (see module doc).
    """
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_logp(logq, logp)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalised Jensen-Shannon divergence, ``beta`` weighting the TEACHER.

    JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q.

    CONVENTION: beta is the teacher's weight. TRL's GKD trainer historically used the swapped convention (beta on the
    student), so JSD_beta here equals their JSD_{1-beta}. JSD_0 = JSD_1 = 0 exactly; JSD_beta / beta -> KL(p || q)
    (forward) as beta -> 0 and JSD_beta / (1 - beta) -> KL(q || p) (reverse) as beta -> 1.
    Generalised JSD as used for LLM distillation by Agarwal et al., ICLR 2024, "On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes" (GKD, arXiv:2306.13649). Default beta = 0.5 (symmetric JSD).
    """
    _check_range("beta", beta, 0.0, 1.0)
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    logm = _log_mix(logp, logq, beta)
    return beta * _kl_from_logp(logp, logm) + (1.0 - beta) * _kl_from_logp(logq, logm)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, lam: float = 0.1
) -> Tensor:
    """Skew forward KL = KL(p || lam * p + (1 - lam) * q) (teacher first).

    Ko, Kim, Chen & Yun, ICML 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models"
    (arXiv:2402.03898). Default lam = 0.1; lam = 0 gives forward_kl exactly; 0 <= lam < 1.
    """
    _check_range("lam", lam, 0.0, 1.0, hi_inclusive=False)
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_logp(logp, _log_mix(logp, logq, lam))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, lam: float = 0.1
) -> Tensor:
    """Skew reverse KL = KL(q || (1 - lam) * p + lam * q) (student first).

    Ko et al., ICML 2024, DistiLLM (arXiv:2402.03898). Default lam = 0.1; lam = 0 gives reverse_kl exactly;
    0 <= lam < 1.
    """
    _check_range("lam", lam, 0.0, 1.0, hi_inclusive=False)
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    return _kl_from_logp(logq, _log_mix(logp, logq, 1.0 - lam))


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Total variation distance = 0.5 * sum_v |p_v - q_v| (symmetric; in [0, 1]).

    Used as a distillation baseline by Wen et al., ACL 2023, "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation" (arXiv:2307.15190).
    """
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(dim=-1)


def akl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, mu: float = 0.5
) -> Tensor:
    """Adaptive KL = w_head * KL(p || q) + w_tail * KL(q || p), the weights being stop-gradient.

    Sort p descending (stable); the head is the sorted prefix whose cumulative teacher mass is <= mu, and always the
    most likely token; the tail is the rest [SRC: AKL / ToDi / AdaKD code, `get_ratio`: `mask = cumsum > mu;
    mask[..., 0] = False`]. With gap_v = |p_v - q_v|: g_head = sum_head gap, g_tail = sum_tail gap,
    w_head = g_head / (g_head + g_tail),
    w_tail = 1 - w_head (0.5 / 0.5 when p == q, where both KLs are 0). Forward KL (teacher || student) is weighted by
    the head gap, reverse KL (student || teacher) by the tail gap.
    Wu, Tao, Wang, Yang, Zhao & Wong, COLING 2025, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
    Large Language Models" (arXiv:2404.02657). Default mu = 0.5.
    """
    _check_range("mu", mu, 0.0, 1.0)
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    with torch.no_grad():
        p, q = logp.exp(), logq.exp()
        p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)  # (N, V)
        gap = (p_sorted - q.gather(-1, order)).abs()
        tail = torch.cumsum(p_sorted, dim=-1) > mu
        tail[:, 0] = False
        g_tail = torch.where(tail, gap, 0.0).sum(dim=-1)  # (N,)
        g_head = torch.where(tail, 0.0, gap).sum(dim=-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(torch.float32).tiny), 0.5)
    return w_head * _kl_from_logp(logp, logq) + (1.0 - w_head) * _kl_from_logp(logq, logp)


def todi(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, beta: float = 1.0
) -> Tensor:
    """ToDi = sum_v [a_v p_v log(p_v / q_v) + (1 - a_v) q_v log(q_v / p_v)],  a_v = sg(sigmoid(beta log(p_v / q_v))).

    Per-token mix of the forward (teacher || student) and reverse (student || teacher) KL terms: where the teacher is
    more confident than the student the forward term dominates. Jung, Yoon, Kim & Lee, EMNLP 2025, "ToDi: Token-wise
    Distillation via Fine-Grained Divergence Control" (arXiv:2505.16297). Default beta = 1.0.
    """
    logq, logp = _pair_log_probs(student_logits, teacher_logits, temperature)
    with torch.no_grad():
        # nan_to_num: masked entries give -inf (or NaN where both are -inf); their terms are 0 anyway.
        a = torch.sigmoid(beta * torch.nan_to_num(logp - logq))  # (N, V)
    return (a * _kl_terms(logp, logq) + (1.0 - a) * _kl_terms(logq, logp)).sum(dim=-1)


def _ttm_parts(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    zs, zt = _check_pair(student_logits, teacher_logits)
    logp = _log_probs(zt, temperature)  # (N, V)
    # softmax(z/tau)^gamma renormalised == softmax(gamma * z / tau) == softmax(gamma * log p).
    log_target = torch.log_softmax(gamma * logp, dim=-1)
    logq1 = torch.log_softmax(zs, dim=-1)  # the student is never tempered in TTM
    return _kl_from_logp(log_target, logq1), logp


def ttm(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, gamma: float = 0.5
) -> Tensor:
    """Transformed Teacher Matching = KL(p~ || q_1) (transformed teacher first).

    p~ = p^gamma / sum_v p_v^gamma = softmax(gamma * z_T / tau) with p = softmax(z_T / tau); q_1 = softmax(z_S) at
    temperature 1 whatever ``temperature`` is. No tau^2 factor (listed in NO_TAU2).
    Zheng & Yang, ICLR 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (arXiv:2402.11148).
    Default gamma = 0.5; gamma > 0.
    """
    return _ttm_parts(student_logits, teacher_logits, temperature, gamma)[0]


def wttm(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 1.0, gamma: float = 0.5
) -> Tensor:
    """Weighted TTM = sg(sum_v p_v^gamma) * KL(p~ || q_1), p = softmax(z_T / tau), p~ and q_1 as in ``ttm``.

    The power sum U_gamma(p) is large for smooth teachers, so uncertain tokens weigh more. No tau^2 factor.
    Zheng & Yang, ICLR 2024 (arXiv:2402.11148). Default gamma = 0.5; gamma > 0.
    """
    kl, logp = _ttm_parts(student_logits, teacher_logits, temperature, gamma)
    with torch.no_grad():
        weight = (gamma * logp).exp().sum(dim=-1)  # (N,)
    return weight * kl


def _bild_side(zs: Tensor, zt: Tensor, lead: Tensor, top_k: int, tau: float | Tensor) -> Tensor:
    idx = lead.detach().topk(top_k, dim=-1).indices  # (N, k), descending by the leading model's logits
    i, j = torch.triu_indices(top_k, top_k, offset=1, device=zs.device)  # all k(k-1)/2 pairs i < j
    t, s = zt.gather(-1, idx), zs.gather(-1, idx)  # (N, k)
    log_t = _log_probs(t[:, i] - t[:, j], tau)  # (N, k(k-1)/2)
    log_s = _log_probs(s[:, i] - s[:, j], tau)
    return _kl_from_logp(log_t, log_s)


def bild(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float | Tensor = 3.0, top_k: int = 8
) -> Tensor:
    """Bi-directional Logits Difference loss = L_t + L_s, each a KL(teacher || student) over logit differences.

    Teacher-led L_t: I = topk(z_T, k) in descending order; for every pair i < j, d^T_ij = (z_T[I_i] - z_T[I_j]) / tau
    and d^S_ij = (z_S[I_i] - z_S[I_j]) / tau; L_t = KL(softmax(d^T) || softmax(d^S)) over the k(k-1)/2 pairs.
    Student-led L_s is the same with I = topk(z_S, k). No tau^2 factor (listed in NO_TAU2).
    Li, Zhou & Song, COLING 2025, "BiLD: Bi-directional Logits Difference Loss for Large Language Model
    Distillation" (arXiv:2406.13555). Defaults: top_k = 8, temperature = 3.0 (the only default that is not 1.0).
    Not defined when a selected teacher logit is -inf (inf - inf).
    """
    zs, zt = _check_pair(student_logits, teacher_logits)
    if not 2 <= top_k <= zs.shape[-1]:
        raise ValueError(f"top_k must be in [2, V={zs.shape[-1]}], got {top_k}")
    return _bild_side(zs, zt, zt, top_k, temperature) + _bild_side(zs, zt, zs, top_k, temperature)


def hellinger_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Hellinger distance sqrt(1/2 sum_v (sqrt p_v - sqrt q_v)^2) between rows of log-probabilities (N, V) -> (N,).

    A difficulty score, not a KD term (AdaKD selects and tempers tokens by it) [SRC: AdaKD code]."""
    p, q = teacher_logprobs.float().exp(), student_logprobs.float().exp()
    return (row_sum((p.sqrt() - q.sqrt()).pow(2)) * 0.5).clamp_min(0).sqrt()  # a plan signal: bits alike in any chunk


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "akl": akl,
    "todi": todi,
    "ttm": ttm,
    "wttm": wttm,
    "bild": bild,
}

# Divergences whose published definition applies no tau^2 factor; the caller reads this to decide its scaling.
NO_TAU2: frozenset[str] = frozenset({"ttm", "wttm", "bild"})
