"""Component C3, routing only: which response tokens take the feature-distillation branch (spec section 5).

[EGAD-abs: "logits-only distillation on easy tokens and deeper feature-based distillation on difficult tokens".]
``r_t = True`` sends token ``t`` to the hard branch (KD plus feature loss); ``False`` keeps it logits-only. The caller
computes routes under ``torch.no_grad()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BATCH_ROUTES",
    "ROUTE_MODES",
    "content_keys",
    "hashed_uniform",
    "route_count",
    "route_tokens",
    "step_seed",
    "topk_mask",
]

ROUTE_MODES = ("none", "all", "global_quantile", "batch_topk", "abs", "random")
# Routes that depend on the token's batch-mates: exact only when one micro-batch on one process is the whole window.
BATCH_ROUTES = ("batch_topk",)
_M32 = 0xFFFFFFFF


def _check_vector(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 1 or x.dtype == torch.bool or x.is_complex():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D real tensor (N,), got {got}")
    return x


def _check_frac(frac: object, name: str, *, allow_zero: bool) -> float:
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac):
        raise ValueError(f"{name}={frac!r} must be a float in {interval}")
    low_ok = frac >= 0.0 if allow_zero else frac > 0.0
    if not (low_ok and frac <= 1.0):
        raise ValueError(f"{name}={frac!r} must be a float in {interval}")
    return float(frac)


def route_count(frac: float, n: int) -> int:
    """``ceil(frac * n)``, robust to binary rounding (``0.7 * 10`` is ``7.000000000000001`` in floats, not 7)."""
    # Rounding to 9 decimals removes representation noise while keeping any real fractional part of frac * n.
    return min(n, math.ceil(round(frac * n, 9)))


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 lanes holding values below 2**32; the multiplier is below
    2**31, so no product leaves int64."""
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def hashed_uniform(keys: Tensor, seed: int) -> Tensor:
    """A uniform number in [0, 1) per key, a pure function of (key, seed): the same token gets the same draw whatever
    batch, process or device it lands in. keys: int64 (any shape, values >= 0). Returns fp64 of the same shape."""
    k = keys.long()
    s = int(seed) & ((1 << 62) - 1)
    h = _mix32((k & _M32) ^ (s & _M32))
    h = _mix32(h ^ ((k >> 32) & _M32) ^ ((s >> 32) & _M32))
    return h.double() / 2.0**32


def step_seed(seed: int, step: int) -> int:
    """The seed of the hashed draws at optimizer step `step` of a run seeded `seed`: a 32-bit hash of both."""
    return int(hashed_uniform(torch.tensor([step]), seed).item() * 2**32)


def content_keys(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(B, L) int64 token keys from the sequences themselves, for trainers that do not know their examples' indices:
    a hash of each row's tokens (where attended) and the position. The same sequence gets the same keys in any
    batch; identical sequences share their draws."""
    ids = input_ids.long()
    pos = torch.arange(ids.shape[1], device=ids.device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    per_token = _mix32(((ids & _M32) ^ _mix32(pos)[None, :]) & _M32) * mask
    row = _mix32(per_token.sum(1) & _M32)
    return row[:, None] * 2**24 + pos[None, :]


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def topk_mask(score: Tensor, frac: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask with exactly ``ceil(frac * N)`` True entries at the largest scores.

    Ties at the cut-off are broken by position (earlier index first) when ``generator`` is None, and uniformly at
    random (reproducibly, from ``generator``) otherwise; both are deterministic given their inputs. With the entropy
    quantile as ``score`` ties are common (many near-zero entropies share one mid-rank). NaN scores are not supported.

    Args:
        score: ``(N,)`` real scores.
        frac: fraction in [0, 1].
        generator: optional ``torch.Generator`` for random tie-breaking.

    Returns:
        ``(N,)`` bool on ``score``'s device.
    """
    _check_vector(score, "score")
    frac = _check_frac(frac, "frac", allow_zero=True)
    n = score.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    k = route_count(frac, n)
    if k == 0:
        return mask
    s = score.detach()
    if generator is None:
        order = torch.sort(s, descending=True, stable=True).indices
    else:
        # A random pre-permutation makes the stable sort break ties uniformly at random.
        perm = torch.randperm(n, generator=generator, device=_generator_device(generator)).to(score.device)
        order = perm[torch.sort(s[perm], descending=True, stable=True).indices]
    mask[order[:k]] = True
    return mask


def route_tokens(
    d: Tensor,
    *,
    mode: str = "global_quantile",
    rho: float = 0.2,
    entropy: Tensor | None = None,
    h_abs: float = 1.0,
    keys: Tensor | None = None,
    seed: int = 0,
    entropy_threshold: float | None = None,
) -> Tensor:
    """Hard-branch routing ``r_t`` (``(N,)`` bool) of response tokens.

    Every mode but ``batch_topk`` decides each token from its own values and run-level constants, so any split of an
    optimizer window into micro-batches and processes routes the same tokens.

    * ``global_quantile`` (default) [idea: the top-20% "minority" high-entropy tokens, SRC: Wang et al. 2025, "Beyond
      the 80/20 rule", page; use as a KD router OURS]: ``r = d >= 1 - rho`` with ``d`` the run-level entropy quantile
      ``u``; or ``entropy >= entropy_threshold`` when a threshold in nats is given (an offline cache's hidden-state
      threshold, so that the router and the cache agree token for token).
    * ``batch_topk``: the top ``ceil(rho * N)`` tokens of the given vector by ``d`` (:func:`topk_mask`, ties to the
      earlier position). A batch rule: exact only when the vector is the whole optimizer window.
    * ``abs``: ``r = entropy >= h_abs`` (nats); ``entropy`` is required.
    * ``random`` (control, spec section 9) [OURS]: ``r = U(key, seed) < rho`` with :func:`hashed_uniform`, a draw per
      token from its key (``keys``; default the position in the vector) and the step's ``seed``.
    * ``none`` / ``all``: no token / every token (the "feature everywhere" control).

    ``rho`` is validated in every mode, including those that ignore it.

    Raises:
        ValueError: on an unknown ``mode``, ``rho`` outside (0, 1], a non-finite ``h_abs``, or a missing or
            mis-shaped ``entropy`` for ``abs`` or a threshold.
    """
    if mode not in ROUTE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(ROUTE_MODES)}")
    _check_vector(d, "d")
    rho = _check_frac(rho, "rho", allow_zero=False)
    if isinstance(h_abs, bool) or not isinstance(h_abs, (int, float)) or not math.isfinite(h_abs):
        raise ValueError(f"h_abs={h_abs!r} must be a finite float")
    if mode == "abs" or (mode == "global_quantile" and entropy_threshold is not None):
        if entropy is None:
            raise ValueError(f"entropy is required for mode={mode!r} with an entropy threshold")
        _check_vector(entropy, "entropy")
        if entropy.shape != d.shape:
            raise ValueError(f"entropy shape {tuple(entropy.shape)} must match d shape {tuple(d.shape)}")

    n = d.numel()
    if mode == "none":
        return torch.zeros(n, dtype=torch.bool, device=d.device)
    if mode == "all":
        return torch.ones(n, dtype=torch.bool, device=d.device)
    if mode == "batch_topk":
        return topk_mask(d, rho)
    if mode == "global_quantile":
        if entropy_threshold is not None:
            return entropy.detach().to(d.device) >= entropy_threshold  # type: ignore[union-attr]
        return d.detach() >= 1.0 - rho
    if mode == "abs":
        return entropy.detach().to(d.device) >= h_abs  # type: ignore[union-attr]
    # random
    if keys is None:
        keys = torch.arange(n, device=d.device)
    if keys.shape != d.shape:
        raise ValueError(f"keys shape {tuple(keys.shape)} must match d shape {tuple(d.shape)}")
    return (hashed_uniform(keys, seed) < rho).to(d.device)
