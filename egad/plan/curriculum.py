"""Component C1: token-level curriculum from low- to high-entropy tokens (spec section 3).

[EGAD-abs: "dynamically shifting focus from low- to high-entropy tokens during training".] ``pacing`` maps training
progress ``s`` to ``lambda(s)``; ``curriculum_weights`` maps the per-token difficulty ``d_t`` (the entropy quantile
by default) and ``lambda`` to per-token loss weights ``w_t``. The caller computes both under ``torch.no_grad()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CURRICULUM_MODES", "PACING_KINDS", "curriculum_weights", "pacing", "tilt_normaliser", "training_progress"]

PACING_KINDS = ("linear", "sqrt", "cosine", "step", "reverse")
CURRICULUM_MODES = ("linear_interp", "tilt", "competence", "static_easy", "static_hard")


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite float")
    return float(value)


def pacing(s: float, kind: str = "linear", *, s0: float = 0.0, s1: float = 1.0, c0: float = 0.01) -> float:
    """Curriculum position ``lambda(s)`` in [0, 1] at training progress ``s = step / total_steps`` in [0, 1].

    * ``linear`` (default) [OURS]: ``clip((s - s0) / (s1 - s0), 0, 1)``.
    * ``sqrt`` (competence) [SRC: Platanios et al. 2019, "Competence-based curriculum learning"]:
      ``min(1, sqrt(s * (1 - c0**2) / s1 + c0**2))``; starts at ``c0``, reaches 1 at ``s = s1``. Use ``c0 = 0.3``
      for the token-level ``competence`` gating of :func:`curriculum_weights` (spec section 3).
    * ``cosine`` [OURS]: ``(1 - cos(pi * min(s / s1, 1))) / 2``.
    * ``step`` [OURS]: 0 for ``s < 0.5``, 1 from ``s = 0.5`` on.
    * ``reverse`` (hard-to-easy control, spec section 9) [OURS]: ``1 - linear``.

    ``s0`` only shifts ``linear`` and ``reverse``; ``sqrt`` and ``cosine`` use ``s1`` as written in the spec; ``c0``
    only enters ``sqrt``. All arguments are validated whatever the kind.

    Raises:
        ValueError: on an unknown ``kind``, ``s`` outside [0, 1], ``not 0 <= s0 < s1`` or ``not 0 <= c0 < 1``.
    """
    if kind not in PACING_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(PACING_KINDS)}")
    s = _check_real(s, "s")
    s0 = _check_real(s0, "s0")
    s1 = _check_real(s1, "s1")
    c0 = _check_real(c0, "c0")
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"s={s!r} must be in [0, 1] (training progress step / total_steps)")
    if not 0.0 <= s0 < s1:
        raise ValueError(f"s0={s0!r}, s1={s1!r}: need 0 <= s0 < s1")
    if not 0.0 <= c0 < 1.0:
        raise ValueError(f"c0={c0!r} must be in [0, 1)")

    if kind in ("linear", "reverse"):
        lam = min(1.0, max(0.0, (s - s0) / (s1 - s0)))
        return lam if kind == "linear" else 1.0 - lam
    if kind == "sqrt":
        return min(1.0, math.sqrt(s * (1.0 - c0 * c0) / s1 + c0 * c0))
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * min(s / s1, 1.0))) / 2.0
    return 0.0 if s < 0.5 else 1.0  # step


def tilt_normaliser(beta: float) -> float:
    """``E[exp(beta d)]`` for ``d`` uniform on [0, 1] (the entropy quantile): ``(e^beta - 1) / beta``, 1 at 0."""
    return math.exp(_log_tilt_normaliser(beta))


def _log_tilt_normaliser(beta: float) -> float:
    # log((e^b - 1) / b), written so that neither a large |b| overflows nor a small one loses digits.
    if beta == 0.0:
        return 0.0
    if beta > 0.0:
        return beta + math.log(-math.expm1(-beta)) - math.log(beta)
    return math.log(-math.expm1(beta)) - math.log(-beta)


def curriculum_weights(
    d: Tensor,
    lam: float,
    *,
    mode: str = "linear_interp",
    w_min: float = 0.2,
    beta_max: float = 2.0,
    tilt_norm: float | None = None,
) -> Tensor:
    """Per-token curriculum weights ``w_t`` (fp32) from difficulty ``d_t`` in [0, 1] and position ``lam``.

    * ``linear_interp`` (default) [OURS, spec section 3]:
      ``w = w_min + (1 - w_min) * 2 * [(1 - lam) * (1 - d) + lam * d]``. With ``d`` uniform on [0, 1] (the entropy
      quantile), ``E[w] = 1`` for every ``lam``; ``lam = 0`` favours confident tokens, ``lam = 0.5`` is flat and
      ``lam = 1`` favours uncertain ones; the range is ``[w_min, 2 - w_min]``.
    * ``tilt`` [OURS]: ``beta = beta_max * (2 * lam - 1)``, ``w = exp(beta * d) / E[exp(beta * d)]`` with the
      expectation a run-level constant, never the batch's mean: ``tilt_norm`` when given (the caller's estimate over
      the run's distribution of ``d``), else :func:`tilt_normaliser`, exact for ``d`` uniform on [0, 1] (the entropy
      quantile). The mean weight is then 1 over the run's tokens; the extreme weight ratio is ``e^{|beta|}``.
    * ``competence`` [SRC: Platanios et al. 2019 competence; per-token gating OURS]: ``w = 1[d <= lam]``; pass the
      competence ``c(s) = pacing(s, 'sqrt', c0=0.3)`` as ``lam``.
    * ``static_easy`` / ``static_hard`` (spec section 9 controls; AKD-like / EA-KD-like): ``linear_interp`` frozen at
      ``lam = 0`` / ``lam = 1``; the ``lam`` argument is ignored (but still validated).

    ``d`` is not range-checked (that would force a device sync); values outside [0, 1] extrapolate the formulas.

    Raises:
        ValueError: on an unknown ``mode``, ``lam`` outside [0, 1], ``w_min`` outside [0, 1], a negative
            ``beta_max`` or a ``d`` that is not a 1-D real tensor.
    """
    if mode not in CURRICULUM_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(CURRICULUM_MODES)}")
    if not isinstance(d, Tensor) or d.ndim != 1 or d.dtype == torch.bool or d.is_complex():
        got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
        raise ValueError(f"d must be a 1-D real tensor (N,), got {got}")
    lam = _check_real(lam, "lam")
    w_min = _check_real(w_min, "w_min")
    beta_max = _check_real(beta_max, "beta_max")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam!r} must be in [0, 1]")
    if not 0.0 <= w_min <= 1.0:
        raise ValueError(f"w_min={w_min!r} must be in [0, 1]")
    if beta_max < 0.0:
        raise ValueError(f"beta_max={beta_max!r} must be >= 0")

    x = d.detach().float()
    if x.numel() == 0:
        return x.new_zeros((0,))
    if mode == "static_easy":
        mode, lam = "linear_interp", 0.0
    elif mode == "static_hard":
        mode, lam = "linear_interp", 1.0

    if mode == "linear_interp":
        return w_min + (1.0 - w_min) * 2.0 * ((1.0 - lam) * (1.0 - x) + lam * x)
    if mode == "tilt":
        beta = beta_max * (2.0 * lam - 1.0)
        if tilt_norm is not None and not tilt_norm > 0.0:
            raise ValueError(f"tilt_norm={tilt_norm!r} must be > 0")
        log_norm = _log_tilt_normaliser(beta) if tilt_norm is None else math.log(tilt_norm)
        return torch.exp((beta * x.double()) - log_norm).float()
    return (x <= lam).float()  # competence


def training_progress(step: int, total_steps: int) -> float:
    """``s`` of optimizer step ``step`` (0-based) in a run of ``total_steps``: ``step / (total_steps - 1)``, so the
    first step sees ``s = 0`` and the last ``s = 1`` (a one-step run: 1)."""
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)
