"""Per-token divergences against a cached top-k teacher (the offline teacher cache, `egad.teacher.signal.TopKSignal`).

The cache stores, per response token, the teacher's top-k ids and log-probs at tau = 1 and the tail log-mass
log m = log(1 - sum_topk p) (-inf when k = V). Each loss here maps BOTH models to a distribution over k + 1 outcomes,
the k cached ids plus one "tail" bucket for every other token, and runs the dense formula of
`egad.losses.divergences` on those bucket log-probs (log-probs are valid logits; they are passed already tempered,
with temperature=1 to the dense function). So every loss is a true divergence between two (k+1)-outcome
distributions, and equals its dense counterpart exactly when k = V. Signatures mirror the dense ones:
``fn(student_logits (N, V), ids (N, k), teacher_logprobs (N, k), tail (N,), *, temperature, **hyper) -> (N,)`` fp32,
``temperature`` a float or an (N,) tensor, no tau^2 factor (the caller applies it, except for ``divergences.NO_TAU2``).

Student buckets (exact): q = softmax(z_S / tau) at the cached ids, and the student's own tail mass as a logsumexp over
the non-cached entries. Computing it as log(1 - sum q(ids)) would cancel to log 0 = -inf when the student puts almost
all its mass on the ids; the logsumexp is exact there. With nothing left (k = V, or every other entry -inf) the tail
is -inf, as the teacher's.

APPROXIMATIONS, each exact when k = V:

1. Teacher temperature. The cache holds p at tau = 1 only. We use p^(tau) over the buckets = softmax((log p_ids, t) /
   tau): the tail is ONE pseudo-token. With t = log m this underestimates the tempered tail for tau > 1 (x^a is
   subadditive for a < 1: m^(1/tau) <= sum_tail p_v^(1/tau)); `tempered_tail` gives the t whose power is the tail's
   power sum instead, from the cached entropy (`entropy_matched_tail`) or from a tail sample (below).
2. Coarsening. Even at tau = 1 the loss compares the bucket distributions, not the full ones. For the f-divergences
   (forward/reverse/skew KL, JSD, TVD) that is a lower bound of the full value (data processing), with equality when
   the student is proportional to the teacher inside the tail. AKL ranks the tail as a single entry when it splits
   head and tail; ToDi gives the tail one mixing weight from the aggregated ratio log(m_p / m_q).
3. TTM / WTTM. The teacher is tempered by tau, then powered by gamma, the tail again as one pseudo-token (the target's
   tail is matched at the total exponent gamma/tau); the student is not tempered. WTTM's weight sum_v p_v^gamma sees
   the pseudo-token's power, not sum_tail p_v^gamma.
4. BiLD uses only the cached ids; the tail is unused. Teacher logits there are replaced by the cached log-probs:
   log-prob differences equal logit differences, so the teacher-led half is exact for top_k <= k. The student-led half
   needs the teacher's value at the student's top_k over the full vocabulary, unknown outside the cache; we take the
   student's top_k AMONG THE CACHED IDS instead. Exact when the student's top_k all lie in the cached ids (always when
   k = V), an approximation otherwise. Requires 2 <= top_k <= k.

SAMPLED TAIL (`SAMPLED_DIVERGENCES`: forward_kl, ttm, wttm, given ``sample=``, a `sparse_tail.TailSample`). A cache
that also stores S tokens drawn from the tail (`egad.losses.sparse_tail`) lets the losses whose tail term is an
expectation under the teacher, KL(target || student), drop the bucket: the target P_a = p^a / Z_all(a) is exact at the
top-k ids, the tail is the S sampled ids with importance weights w_s summing to the tempered tail mass, and the student
log-probs are exact over the full vocabulary. The value sum_topk P (log P - log q) + sum_s w_s (log P_s - log q_s)
is a consistent estimate of the full KL (not a lower bound; it may fall below 0 on a token where the student is
close), and its gradient in the student logits, (q - P^) / tau with P^ = (P at the top-k, w at the sample), equals
the exact (q - p) / tau in expectation over the sample (exactly at tau = 1/b, where the weights are uniform; up to the
O(1/S) self-normalisation bias elsewhere). WTTM's weight comes from the sample's power sums. The other losses keep the
buckets, with the tail tempered from the sample's power sums (`tempered_tail`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from egad.losses import divergences as dense
from egad.losses.sparse_buckets import student_bucket_logprobs, teacher_bucket_logprobs
from egad.losses.sparse_tail import (  # noqa: F401 (entropy_matched_tail, tempered_tail: re-exported)
    TailSample,
    entropy_matched_tail,
    tail_log_power_sum,
    teacher_atoms,
    tempered_tail,
)
from egad.losses.student_atoms import student_atom_logprobs, student_atom_logprobs_and_ce

__all__ = [
    "SAMPLED_DIVERGENCES",
    "SPARSE_DIVERGENCES",
    "TailSample",
    "akl",
    "bild",
    "forward_kl",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "student_atom_logprobs",
    "tempered_tail",
    "todi",
    "tvd",
    "ttm",
    "wttm",
]


# ----------------------------------------------------------------------------------------------------------- buckets
def _check(student_logits: Tensor, ids: Tensor, teacher_logprobs: Tensor, tail: Tensor) -> None:
    n = student_logits.shape[0] if student_logits.dim() == 2 else -1
    if n < 0 or ids.dim() != 2 or ids.shape[0] != n or teacher_logprobs.shape != ids.shape or tail.shape != (n,):
        raise ValueError(
            "expected student_logits (N, V), ids (N, k), teacher_logprobs (N, k) and tail (N,); got "
            f"{tuple(student_logits.shape)}, {tuple(ids.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(tail.shape)}"
        )
    if not 1 <= ids.shape[1] <= student_logits.shape[1]:
        raise ValueError(f"k must be in [1, V={student_logits.shape[1]}], got {ids.shape[1]}")


def _buckets(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    temperature: float | Tensor,
    *,
    temper_student: bool = True,
) -> tuple[Tensor, Tensor]:
    """(log q, log p) over the k+1 buckets, both (N, k+1), ready for a dense divergence at temperature 1."""
    _check(student_logits, ids, teacher_logprobs, tail)
    logq = student_bucket_logprobs(student_logits, ids, temperature=temperature if temper_student else 1.0)
    return logq, teacher_bucket_logprobs(teacher_logprobs, tail, temperature=temperature)


# ------------------------------------------------------------------------------------------------------ divergences
def _on_buckets(dense_fn: Callable[..., Tensor], doc: str, *, temper_student: bool = True) -> Callable[..., Tensor]:
    """The sparse twin of a dense divergence: both sides mapped to the k+1 buckets, then the dense formula at tau=1.
    Hyper-parameters (beta, lam, mu, gamma) and their defaults and checks are the dense function's."""

    def fn(
        student_logits: Tensor,
        ids: Tensor,
        teacher_logprobs: Tensor,
        tail: Tensor,
        *,
        temperature: float | Tensor = 1.0,
        **hyper: float,
    ) -> Tensor:
        logq, logp = _buckets(student_logits, ids, teacher_logprobs, tail, temperature, temper_student=temper_student)
        return dense_fn(logq, logp, temperature=1.0, **hyper)

    fn.__name__ = fn.__qualname__ = dense_fn.__name__
    fn.__doc__ = f"{doc} See `divergences.{dense_fn.__name__}` for the formula, direction and defaults."
    return fn


_bucket_forward_kl = _on_buckets(dense.forward_kl, "KL(p || q) over the k+1 buckets.")
reverse_kl = _on_buckets(dense.reverse_kl, "KL(q || p) over the k+1 buckets.")
jsd = _on_buckets(dense.jsd, "Generalised JSD, beta weighting the teacher, over the k+1 buckets.")
skew_forward_kl = _on_buckets(dense.skew_forward_kl, "KL(p || lam p + (1 - lam) q) over the k+1 buckets.")
skew_reverse_kl = _on_buckets(dense.skew_reverse_kl, "KL(q || (1 - lam) p + lam q) over the k+1 buckets.")
tvd = _on_buckets(dense.tvd, "0.5 sum |p - q| over the k+1 buckets.")
akl = _on_buckets(dense.akl, "Adaptive KL over the k+1 buckets, the tail ranked as one entry.")
todi = _on_buckets(dense.todi, "ToDi over the k+1 buckets, the tail with one mixing weight.")
_bucket_ttm = _on_buckets(
    dense.ttm, "KL(p~ || q_1) over the k+1 buckets, p~ from the tempered teacher, q_1 untempered.", temper_student=False
)
_bucket_wttm = _on_buckets(
    dense.wttm, "sg(sum p^gamma) * TTM over the k+1 buckets (weight underestimated for k < V).", temper_student=False
)


# ----------------------------------------------------------------------------------------------- the sampled tail
def _atom_kl(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    sample: TailSample,
    exponent: float | Tensor,
    student_temperature: float | Tensor,
    targets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """KL(P_a || q) with the teacher's tail from `sample` (module docstring, "sampled tail"), log Z_all(a), and with
    `targets` (N,) the student's cross-entropy -log q_1(targets) at tau = 1, from the same call as its atoms
    (`student_atom_logprobs_and_ce`: at tau = 1 the same normaliser, no second (N, V) pass).

    P_a = p^a / Z_all(a) is exact at the top-k ids; the tail contributes sum_s w_s (log P_a(v_s) - log q(v_s)),
    q = softmax(z_S / student_temperature) exact over the full vocabulary. -> (N,) fp32, (N,) float64, (N,) fp32"""
    _check(student_logits, ids, teacher_logprobs, tail)
    if sample.ids.shape[0] != ids.shape[0]:
        raise ValueError(f"tail sample has {sample.ids.shape[0]} rows, the top-k {ids.shape[0]}")
    k = ids.shape[1]
    logp_top, logp_s, log_w, log_norm = teacher_atoms(teacher_logprobs, tail, sample, exponent)
    atoms = torch.cat([ids, sample.ids], dim=-1)
    ce = None
    if targets is None:
        logq = student_atom_logprobs(student_logits, atoms, temperature=student_temperature)
    else:
        logq, ce = student_atom_logprobs_and_ce(student_logits, atoms, targets, temperature=student_temperature)
    head = dense._kl_terms(logp_top.float(), logq[:, :k]).sum(-1)
    w = log_w.exp().float()  # (N, S); 0 on an empty tail
    logp_s = logp_s.float()
    keep = (w > 0) & torch.isfinite(logp_s)
    # Sanitised as in _kl_terms, so that a masked entry's -inf sends no NaN back through where().
    diff = torch.where(keep, logp_s, 0.0) - torch.where(keep, logq[:, k:], 0.0)
    return head + torch.where(keep, w * diff, 0.0).sum(-1), log_norm, ce


def forward_kl(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    sample: TailSample | None = None,
) -> Tensor:
    """KL(p || q) over the k+1 buckets; with a tail `sample`, over the top-k and the sampled tail instead.

    See `divergences.forward_kl`. Bucketed, it misses the KL inside the tail (a lower bound at tau = 1). Sampled, the
    tail term is estimated from the sample and the student's gradient at every entry is (q - P^)/tau, P^ the teacher
    at the top-k plus the sample weights: the exact gradient (q - p)/tau in expectation over the sample."""
    if sample is None:
        return _bucket_forward_kl(student_logits, ids, teacher_logprobs, tail, temperature=temperature)
    tau = _check_temperature(temperature)
    return _atom_kl(student_logits, ids, teacher_logprobs, tail, sample, 1.0 / tau, tau)[0]


def forward_kl_and_ce(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    sample: TailSample,
    targets: Tensor,
    *,
    temperature: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """The sampled `forward_kl` at `temperature` and the cross-entropy -log q(targets) at tau = 1, both (N,), from one
    student call (`student_atom_logprobs_and_ce`): at a float temperature of 1 the CE shares the KL's normaliser (no
    (N, V) pass of its own); at any other it takes one more in-place normaliser in the same call."""
    tau = _check_temperature(temperature)
    a = 1.0 / tau
    kl, _, ce = _atom_kl(student_logits, ids, teacher_logprobs, tail, sample, a, tau, targets)
    return kl, ce  # type: ignore[return-value]


def _ttm_with_sample(student_logits, ids, teacher_logprobs, tail, temperature, gamma, sample):
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    tau = _check_temperature(temperature)
    kl, log_norm, _ = _atom_kl(student_logits, ids, teacher_logprobs, tail, sample, gamma / tau, 1.0)
    return kl, log_norm, tau


def ttm(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    gamma: float = 0.5,
    sample: TailSample | None = None,
) -> Tensor:
    """KL(p~ || q_1), p~ = p^(gamma / tau) renormalised, q_1 untempered: over the k+1 buckets, or over the top-k and
    the sampled tail when a `sample` is given. See `divergences.ttm`."""
    if sample is None:
        return _bucket_ttm(student_logits, ids, teacher_logprobs, tail, temperature=temperature, gamma=gamma)
    return _ttm_with_sample(student_logits, ids, teacher_logprobs, tail, temperature, gamma, sample)[0]


def wttm(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    gamma: float = 0.5,
    sample: TailSample | None = None,
) -> Tensor:
    """sg(sum_v p_v^gamma) * TTM, p = the teacher at tau. With a `sample`, the TTM term as in `ttm` and the weight
    Z_all(gamma / tau) / Z_all(1 / tau)^gamma from the sampled tail's power sums (bucketed, the weight is
    underestimated for k < V). See `divergences.wttm`."""
    if sample is None:
        return _bucket_wttm(student_logits, ids, teacher_logprobs, tail, temperature=temperature, gamma=gamma)
    kl, log_norm, tau = _ttm_with_sample(student_logits, ids, teacher_logprobs, tail, temperature, gamma, sample)
    with torch.no_grad():
        a1 = 1.0 / torch.as_tensor(tau, dtype=torch.float64, device=tail.device).detach()
        log_tail = tail_log_power_sum(tail, sample, a1)
        a1_col = a1[:, None] if a1.dim() == 1 else a1
        log_z1 = torch.logaddexp(torch.logsumexp(a1_col * teacher_logprobs.double(), dim=-1), log_tail)
        weight = (log_norm.detach() - gamma * log_z1).exp().float()
    return weight * kl


def _check_temperature(temperature: float | Tensor) -> float | Tensor:
    if isinstance(temperature, Tensor):
        return temperature.float()
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def bild(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor,
    *,
    temperature: float | Tensor = 3.0,
    top_k: int = 8,
) -> Tensor:
    """BiLD restricted to the cached ids (``tail`` unused); see `divergences.bild` and the module docstring, 4.

    The dense BiLD on the (N, k) sub-vocabulary of cached ids is exactly that restriction: its teacher-led top_k are
    the first top_k cached ids, its student-led top_k the student's best among the cached ids.
    """
    _check(student_logits, ids, teacher_logprobs, tail)
    if not 2 <= top_k <= ids.shape[1]:
        raise ValueError(f"top_k must be in [2, k={ids.shape[1]}] (BiLD only sees the cached ids), got {top_k}")
    zs = student_logits.float().gather(-1, ids)  # (N, k)
    return dense.bild(zs, teacher_logprobs.float(), temperature=temperature, top_k=top_k)


# The losses that take a tail `sample=` keyword: KL(target || student) with the teacher first, so the tail term is an
# expectation under the teacher, which the sample estimates. The others read the sample only through `tempered_tail`.
SAMPLED_DIVERGENCES = frozenset({"forward_kl", "ttm", "wttm"})

SPARSE_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
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
