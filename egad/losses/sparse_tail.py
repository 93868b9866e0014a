"""The teacher's tail beyond the cached top-k, known through a sample of it: the teacher side of the sampled losses.

A cache may store, besides the top-k, S token ids drawn from the tail (the tokens outside the top-k) with
probability pi_v = p_v^b / Z_b, where b = `TailSample.exponent` (1/2 by default: the tail of the teacher at tau = 2),
their log-probs log p_v at tau = 1, and the exact log Z_b = log sum_tail p^b. With the exact tail mass m this gives,
at any exponent a (a = 1/tau for a tempered teacher, gamma/tau for TTM):

* the tail's power sum log Z(a) = log sum_tail p^a (`tail_log_power_sum`): the importance estimate
  log Z_b + log mean_s p_s^(a - b), plus c (a - b) / (1 - b) with c set so that it equals log m at a = 1. Exact at
  a = b and at a = 1 whatever the sample, an estimate in between and beyond;
* the tempered teacher P_a = p^a / Z_all(a) at the top-k ids and at the sampled ids, and weights
  w_s = M_a softmax_s((a - b) log p_s) that sum to the tempered tail mass M_a (`teacher_atoms`). sum_s w_s f(v_s)
  is then the self-normalised importance estimate of sum_tail P_a(v) f(v): consistent (bias O(1/S)), and unbiased at
  a = b, where the weights are uniform. A proposal flatter than the target (b < a) keeps the weights p^(a - b)
  bounded; for tau > 1/b (a < b) they grow as p falls and the estimate gets noisier.

All of it is a function of the teacher alone (no student), in float64: the weights and normaliser are constants of
the loss. Shapes: top-k log-probs (N, k), tail log-mass (N,), sample (N, S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TailSample", "entropy_matched_tail", "tail_log_power_sum", "teacher_atoms", "tempered_tail"]


@dataclass(frozen=True)
class TailSample:
    """S teacher tokens drawn from the tail in proportion to p^exponent, by systematic sampling (so an id may repeat).

    ids: (..., S) token ids, never among the top-k. logprobs: (..., S) their log p at tau = 1. log_z: (...,) the
    exact log sum_tail p^exponent (-inf where the tail is empty). Leading shapes are (B, L) in a signal, (N,) in a
    chunk. exponent: b in (0, 1).
    """

    ids: Tensor
    logprobs: Tensor
    log_z: Tensor
    exponent: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.exponent < 1.0:
            raise ValueError(f"TailSample.exponent must be in (0, 1), got {self.exponent}")
        if self.ids.dim() < 1 or self.ids.shape[-1] < 1:
            raise ValueError("TailSample needs at least one sampled id per row; pass no sample instead")
        if self.ids.shape != self.logprobs.shape or self.ids.shape[:-1] != self.log_z.shape:
            raise ValueError(
                "TailSample expects ids (..., S), logprobs (..., S) and log_z (...); got "
                f"{tuple(self.ids.shape)}, {tuple(self.logprobs.shape)}, {tuple(self.log_z.shape)}"
            )

    @property
    def size(self) -> int:
        return self.ids.shape[-1]

    def rows(self, flat_index: Tensor) -> TailSample:
        """The sample at flattened leading positions: ids long, log-probs and log_z fp32. -> (C, S), (C, S), (C,)"""
        s = self.size
        ids = self.ids.reshape(-1, s)[flat_index].long()
        logprobs = self.logprobs.reshape(-1, s)[flat_index].float()
        log_z = self.log_z.reshape(-1)[flat_index].float()
        return TailSample(ids, logprobs, log_z, self.exponent)


def _exponent(a: float | Tensor, like: Tensor) -> Tensor:
    """a as float64 (N,) or (), on `like`'s device."""
    a = torch.as_tensor(a, dtype=torch.float64, device=like.device)
    if a.dim() > 1 or (a.dim() == 1 and a.shape != like.shape[:1]):
        raise ValueError(f"exponent must be a float or an (N,) tensor, got shape {tuple(a.shape)}")
    if not bool((a > 0).all()):
        raise ValueError("exponent must be > 0")
    return a


def tail_log_power_sum(tail: Tensor, sample: TailSample, exponent: float | Tensor) -> Tensor:
    """log sum_tail p^a (float64), from the exact tail log-mass (N,) and the sample; -inf for an empty tail. -> (N,)

    The importance estimate from the sample, corrected in log space by a term linear in a that makes it exact at
    a = 1 (log m) and leaves it exact at a = b (log Z_b). Rows whose tail mass is 0 give -inf."""
    a = _exponent(exponent, tail)
    return _power_sum(tail, sample, a, _is_one(exponent))[0]


def _is_one(exponent: float | Tensor) -> bool:
    """A Python number equal to 1 (then the estimate at a and at 1 are one computation)."""
    return not isinstance(exponent, Tensor) and float(exponent) == 1.0


def _power_sum(tail: Tensor, sample: TailSample, a: Tensor, at_one: bool) -> tuple[Tensor, Tensor]:
    """`tail_log_power_sum` at a checked float64 exponent a, () or (N,), and (a - b) log p_s (N, S), which
    `teacher_atoms` reuses; at_one: a is 1, so the estimate at 1 is the one at a."""
    b = sample.exponent
    lp = sample.logprobs.double()  # (N, S)
    log_z = sample.log_z.double()
    log_s = math.log(sample.size)

    def estimate(e: Tensor) -> tuple[Tensor, Tensor]:
        x = ((e[:, None] if e.dim() == 1 else e) - b) * lp
        return log_z + torch.logsumexp(x, dim=-1) - log_s, x

    m_log = tail.double()
    live = torch.isfinite(m_log) & torch.isfinite(log_z)
    at_a, x = estimate(a)
    at_1 = at_a if at_one else estimate(torch.ones((), dtype=torch.float64, device=tail.device))[0]
    c = torch.where(live, m_log - at_1, 0.0)
    out = at_a + c * (a - b) / (1.0 - b)
    return torch.where(live, out, -math.inf), x


def teacher_atoms(
    logprobs: Tensor, tail: Tensor, sample: TailSample, exponent: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The teacher at exponent a over the top-k ids and the sampled ids, all float64:

    (log P_a at the top-k ids (N, k), log P_a at the sampled ids (N, S), log w (N, S), log Z_all(a) (N,)), where
    P_a = p^a / Z_all(a), Z_all(a) = sum_topk p^a + sum_tail p^a and the weights w sum to the tempered tail mass. The
    top-k part renormalises the rounding of a quantised cache. An empty tail gives weights 0 (log w = -inf)."""
    a = _exponent(exponent, tail)
    a_col = a[:, None] if a.dim() == 1 else a
    lp, slp = logprobs.double(), sample.logprobs.double()
    top = a_col * lp  # (N, k)
    log_tail, x = _power_sum(tail, sample, a, _is_one(exponent))  # (N,), (N, S) = (a - b) log p_s
    log_norm = torch.logaddexp(torch.logsumexp(top, dim=-1), log_tail)
    log_w = (log_tail - log_norm)[:, None] + torch.log_softmax(x, dim=-1)
    log_w = torch.where(torch.isfinite(log_tail)[:, None], log_w, -math.inf)
    return top - log_norm[:, None], a_col * slp - log_norm[:, None], log_w, log_norm


def entropy_matched_tail(
    logprobs: Tensor, tail: Tensor, entropy: Tensor, exponent: float | Tensor, *, vocab_size: int
) -> Tensor:
    """A tail value for `teacher_bucket_logprobs` that tempers the tail as n_eff equal tokens instead of one.

    Tempering raises each probability to a = 1/tau (TTM: gamma/tau), so the tail's tempered weight is
    sum_tail p^a, which a single pseudo-token (m^a) underestimates badly for a flat tail. The cache's exact entropy
    H fixes the tail's own entropy T = H - (-sum_topk p log p); a tail uniform over n_eff tokens with mass m has
    T = m log(n_eff / m), so n_eff = m exp(T / m), clamped to [1, V - k]. Then sum_tail p^a ~= m^a n_eff^(1-a),
    which `teacher_bucket_logprobs` reproduces from the returned value log m + (1/a - 1) log n_eff.
    Exact for a uniform tail, for a = 1 (unchanged) and for k = V. (N, k), (N,), (N,) -> (N,).
    """
    # float64: T / m amplifies the cancellation in H - H_top when the tail mass is small. The stored fp32 entropy
    # still bounds the precision: the error of log n_eff is about 1e-7 H / m.
    lp = logprobs.double()
    m_log = tail.double()
    h_top = -(lp.exp() * lp).sum(-1)
    t = (entropy.double() - h_top).clamp_min(0)
    m = m_log.exp()
    log_n = torch.where(m > 1e-6, m_log + t / m.clamp_min(1e-6), torch.zeros_like(m))
    log_n = log_n.clamp(0.0, math.log(max(vocab_size - lp.shape[-1], 1)))
    a = torch.as_tensor(exponent, dtype=torch.float64, device=lp.device)
    out = m_log + (1.0 / a - 1.0) * log_n
    return torch.where(torch.isfinite(m_log), out, m_log).float()


def tempered_tail(
    logprobs: Tensor,
    tail: Tensor,
    entropy: Tensor,
    exponent: float | Tensor,
    *,
    vocab_size: int,
    sample: TailSample | None = None,
) -> Tensor:
    """The tail value to give the bucketed losses at tempering exponent a (1/tau; gamma/tau for TTM): a pseudo-token
    whose p^a is sum_tail p^a. From the sample's power sums when there is one (exact at a = 1 and a = its exponent),
    else `entropy_matched_tail`. (N, k), (N,), (N,) -> (N,) fp32"""
    if sample is None:
        return entropy_matched_tail(logprobs, tail, entropy, exponent, vocab_size=vocab_size)
    a = torch.as_tensor(exponent, dtype=torch.float64, device=tail.device)
    out = tail_log_power_sum(tail, sample, a) / a
    return torch.where(torch.isfinite(tail), out, tail.double()).float()
