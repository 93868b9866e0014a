"""Component C2: entropy-adaptive per-token distillation temperature (spec section 4).

[EGAD-abs: "adjust the distillation temperature based on token entropy to better capture teacher confidence
patterns".] The abstract gives no direction; the default is inverse (AdaKD-like). ``d_t`` and the entropy are always
computed at tau = 1, before any temperature is applied. The caller computes everything here under
``torch.no_grad()``; ``tau_t`` then divides both teacher and student logits, and each token's divergence is multiplied
by :func:`tau_squared_factor`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TAU2_MODES", "TEMP_MODES", "tau_squared_factor", "token_temperature"]

TEMP_MODES = ("inverse", "direct", "idts", "edt", "const")
TAU2_MODES = ("per_token", "none", "normalized")

# Floor on the score before log / division: entropies of near-deterministic tokens underflow to 0.
_SCORE_FLOOR = 1e-8
# EDT's base N in T = T0 * N^(theta / H) [SRC: EDT, Zhang et al. 2024, page].
_EDT_BASE = 0.8


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite float")
    return float(value)


def _check_vector(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 1 or x.dtype == torch.bool or x.is_complex():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D real tensor (N,), got {got}")
    return x


def token_temperature(
    d: Tensor,
    *,
    mode: str = "inverse",
    tau_min: float = 1.0,
    tau_max: float = 2.0,
    tau0: float = 1.0,
    kappa: float = 0.3,
    score: Tensor | None = None,
    edt_t0: float = 2.0,
    edt_theta: float = 1.0,
    median: float | None = None,
) -> Tensor:
    """Per-token temperature ``tau_t`` (fp32, ``(N,)``).

    * ``inverse`` (default) [OURS; direction from AdaKD's IDTS, "low temperature for difficult tokens, high
      temperature for easy tokens", SRC: AdaKD code and abstract]: ``tau = tau_max - (tau_max - tau_min) * d``.
    * ``direct`` [OURS; same direction as EDT decoding]: ``tau = tau_min + (tau_max - tau_min) * d``.
    * ``idts`` [SRC: AdaKD code, ``loss/losses.py::calculate_distillation_weight``]:
      ``tau = tau0 * exp(-kappa * tanh(log(score / median(score))))``, bounded in ``[tau0 e^-|kappa|,
      tau0 e^|kappa|]``. ``score`` is required (the teacher entropy or another difficulty score); it is floored at
      1e-8 before the log. ``median`` is the run-level median of the score (from its calibrated or streamed
      CDF); without it the lower median of the given vector is used, a batch rule that depends on the token's
      batch-mates. A negative ``kappa`` flips the direction ("direct" IDTS).
    * ``edt`` [SRC: EDT, Zhang et al. 2024, page; clipping OURS]:
      ``tau = clip(edt_t0 * 0.8 ** (edt_theta / score), tau_min, tau_max)`` with ``score`` (the entropy, required)
      floored at 1e-8.
    * ``const`` (component off): ``tau = tau0`` everywhere; ``tau0 = 1`` is the LLM-KD default [SRC: ToDi code,
      ``arguments.py``].

    ``d`` (the difficulty in [0, 1]) fixes ``N`` in every mode and is what ``inverse``/``direct`` use; it is not
    range-checked (that would force a device sync).

    Raises:
        ValueError: on an unknown ``mode``, ``not 0 < tau_min <= tau_max``, ``tau0 <= 0``, ``edt_t0 <= 0``, a
            missing or mis-shaped ``score`` for ``idts``/``edt``, or non-finite numbers.
    """
    if mode not in TEMP_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(TEMP_MODES)}")
    _check_vector(d, "d")
    tau_min = _check_real(tau_min, "tau_min")
    tau_max = _check_real(tau_max, "tau_max")
    tau0 = _check_real(tau0, "tau0")
    kappa = _check_real(kappa, "kappa")
    edt_t0 = _check_real(edt_t0, "edt_t0")
    edt_theta = _check_real(edt_theta, "edt_theta")
    if not 0.0 < tau_min <= tau_max:
        raise ValueError(f"tau_min={tau_min!r}, tau_max={tau_max!r}: need 0 < tau_min <= tau_max")
    if tau0 <= 0.0:
        raise ValueError(f"tau0={tau0!r} must be > 0")
    if edt_t0 <= 0.0:
        raise ValueError(f"edt_t0={edt_t0!r} must be > 0")
    if mode in ("idts", "edt"):
        if score is None:
            raise ValueError(f"score is required for mode={mode!r} (pass the teacher entropy)")
        _check_vector(score, "score")
        if score.shape != d.shape:
            raise ValueError(f"score shape {tuple(score.shape)} must match d shape {tuple(d.shape)}")

    x = d.detach().float()
    if x.numel() == 0:
        return x.new_zeros((0,))
    if mode == "inverse":
        return tau_max - (tau_max - tau_min) * x
    if mode == "direct":
        return tau_min + (tau_max - tau_min) * x
    if mode == "const":
        return torch.full_like(x, tau0)

    sc = score.detach().to(device=x.device, dtype=torch.float32).clamp_min(_SCORE_FLOOR)  # type: ignore[union-attr]
    if mode == "idts":
        med = sc.median() if median is None else max(float(median), _SCORE_FLOOR)
        return tau0 * torch.exp(-kappa * torch.tanh(torch.log(sc / med)))
    # edt: 0.8 ** (theta / H) underflows to 0 for H -> 0, which the clip turns into tau_min.
    return (edt_t0 * torch.pow(_EDT_BASE, edt_theta / sc)).clamp(tau_min, tau_max)


def tau_squared_factor(tau: Tensor, mode: str = "per_token", *, norm: float | None = None) -> Tensor:
    """Per-token multiplier of the divergence that compensates the ``1/tau^2`` gradient scale of KD.

    [SRC: Hinton et al. 2015, recalled; the per-token form matches AdaKD's code, which multiplies each token's loss
    by ``tau_t**2``.] Knob ``tau2`` (spec section 4, rule 3):

    * ``per_token`` (default): ``tau**2``;
    * ``none``: ones;
    * ``normalized`` [OURS]: ``tau**2 / E[tau**2]``; ``norm`` is the run-level ``E[tau**2]`` (from the run's
      calibrated distribution); without it the mean over the given vector is used, a batch rule.

    Returns:
        ``(N,)`` fp32.
    """
    if mode not in TAU2_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(TAU2_MODES)}")
    _check_vector(tau, "tau")
    t = tau.detach().float()
    if t.numel() == 0:
        return t.new_zeros((0,))
    if mode == "none":
        return torch.ones_like(t)
    t2 = t * t
    if mode == "per_token":
        return t2
    return t2 / (t2.mean() if norm is None else float(norm))
