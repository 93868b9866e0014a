"""Component C3, routing only: which response tokens take the feature-distillation branch (spec section 5).

[EGAD-abs: "logits-only distillation on easy tokens and deeper feature-based distillation on difficult tokens".]
``r_t = True`` sends token ``t`` to the hard branch (KD plus feature loss); ``False`` keeps it logits-only. The caller
computes routes under ``torch.no_grad()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ROUTE_MODES", "route_count", "route_tokens", "topk_mask"]

ROUTE_MODES = ("none", "all", "batch_topk", "global_quantile", "abs", "random")


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
    mode: str = "batch_topk",
    rho: float = 0.2,
    entropy: Tensor | None = None,
    h_abs: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hard-branch routing ``r_t`` (``(N,)`` bool) over the batch's masked response tokens.

    * ``batch_topk`` (default) [idea: top-20% "minority" high-entropy tokens, SRC: Wang et al. 2025, "Beyond the
      80/20 rule", batch-level percentile, page; use as a KD router OURS]: the top ``ceil(rho * N)`` tokens by ``d``
      (:func:`topk_mask`; ``generator``, if given, breaks ties at random). A fixed feature-branch budget per step.
    * ``global_quantile``: ``r = d >= 1 - rho`` (``d`` is the global entropy quantile ``u``).
    * ``abs``: ``r = entropy >= h_abs`` (nats); ``entropy`` is required.
    * ``random`` (control for ``batch_topk``, spec section 9) [OURS]: exactly ``ceil(rho * N)`` tokens drawn
      uniformly without replacement using ``generator`` (the default CPU RNG if None).
    * ``none`` / ``all``: no token / every token (the "feature everywhere" control).

    ``rho`` is validated in every mode, including those that ignore it.

    Raises:
        ValueError: on an unknown ``mode``, ``rho`` outside (0, 1], a non-finite ``h_abs``, or a missing or
            mis-shaped ``entropy`` for ``abs``.
    """
    if mode not in ROUTE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(ROUTE_MODES)}")
    _check_vector(d, "d")
    rho = _check_frac(rho, "rho", allow_zero=False)
    if isinstance(h_abs, bool) or not isinstance(h_abs, (int, float)) or not math.isfinite(h_abs):
        raise ValueError(f"h_abs={h_abs!r} must be a finite float")
    if mode == "abs":
        if entropy is None:
            raise ValueError("entropy is required for mode='abs'")
        _check_vector(entropy, "entropy")
        if entropy.shape != d.shape:
            raise ValueError(f"entropy shape {tuple(entropy.shape)} must match d shape {tuple(d.shape)}")

    n = d.numel()
    if mode == "none":
        return torch.zeros(n, dtype=torch.bool, device=d.device)
    if mode == "all":
        return torch.ones(n, dtype=torch.bool, device=d.device)
    if mode == "batch_topk":
        return topk_mask(d, rho, generator=generator)
    if mode == "global_quantile":
        return d.detach() >= 1.0 - rho
    if mode == "abs":
        return entropy.detach().to(d.device) >= h_abs  # type: ignore[union-attr]
    # random
    mask = torch.zeros(n, dtype=torch.bool, device=d.device)
    k = route_count(rho, n)
    if k > 0:
        perm = torch.randperm(n, generator=generator, device=_generator_device(generator))
        mask[perm[:k].to(d.device)] = True
    return mask
