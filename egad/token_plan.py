"""Per-token decisions of the objective, all under no_grad: difficulty d_t, curriculum weight w_t, temperature
tau_t, the tau^2 factor and the route r_t (spec sections 2-5; baseline weight rules of section 7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from egad.config import ObjectiveConfig
from egad.curriculum import curriculum_weights, pacing
from egad.entropy import batch_mid_rank, normalized_entropy, quantile_cdf
from egad.losses.divergences import NO_TAU2
from egad.routing import route_tokens, topk_mask
from egad.temperature import tau_squared_factor, token_temperature


@torch.no_grad()
def token_plan(
    sig: dict[str, Tensor],
    cfg: ObjectiveConfig,
    *,
    progress: float,
    vocab: int,
    knots: Tensor | None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor | float]:
    """Difficulty, curriculum weight, temperature, tau^2 factor and route per token, all under no_grad."""
    h = sig["entropy"]
    if not cfg.needs_difficulty:
        d = torch.zeros_like(h)  # no component reads it (e.g. plain KD): no calibration needed
    elif cfg.difficulty == "normalized":
        d = (normalized_entropy(h, vocab) / cfg.h_ref).clamp(0, 1)
    elif cfg.cdf_mode == "batch":
        d = batch_mid_rank(h)
    else:
        if knots is None:
            raise ValueError(
                f"cdf_mode={cfg.cdf_mode!r} needs entropy quantile knots: calibrate them on the teacher "
                "(egad.entropy.EntropyQuantileCalibrator) and pass knots=, or set cdf_mode='batch'"
            )
        d = quantile_cdf(h, knots.to(h.device))
    lam = _lambda(cfg, progress)
    w = _weights(sig, d, lam, cfg, vocab)
    tau = _temperature(sig, d, w, cfg)
    t2 = torch.ones_like(tau) if cfg.divergence in NO_TAU2 else tau_squared_factor(tau, cfg.tau2)
    if cfg.uses_features:
        route = route_tokens(d, mode=cfg.route_mode, rho=cfg.rho, entropy=h, h_abs=cfg.h_abs, generator=generator)
    else:
        route = torch.zeros_like(d, dtype=torch.bool)
    return {"entropy": h, "difficulty": d, "weight": w, "tau": tau, "tau2": t2, "route": route, "lambda": lam}


def _lambda(cfg: ObjectiveConfig, progress: float) -> float:
    if cfg.fixed_lambda is not None:
        return cfg.fixed_lambda
    if cfg.curriculum_mode == "competence":
        # Competence gating uses the sqrt competence c(s); presets set pacing_c0=0.3 (0.01 starves early training).
        return pacing(progress, "sqrt", s0=cfg.pacing_s0, s1=cfg.pacing_s1, c0=cfg.pacing_c0)
    return pacing(progress, cfg.pacing, s0=cfg.pacing_s0, s1=cfg.pacing_s1, c0=cfg.pacing_c0)


def _weights(sig: dict[str, Tensor], d: Tensor, lam: float, cfg: ObjectiveConfig, vocab: int) -> Tensor:
    if cfg.weighting == "none":
        return torch.ones_like(d)
    if cfg.weighting == "curriculum":
        return curriculum_weights(d, lam, mode=cfg.curriculum_mode, w_min=cfg.w_min, beta_max=cfg.tilt_beta_max)
    if cfg.weighting == "ea_kd":
        # EA-KD (Su et al.): w = (H_T + H_T H_S / H_ub) / 2 with H_ub = log V, entropies at t_ea.
        ht = sig.get("entropy_ea", sig["entropy"])
        return (ht + ht * sig["student_entropy"] / math.log(vocab)) / 2
    score = {
        "select_teacher_entropy": sig["entropy"],
        "select_student_entropy": sig.get("student_entropy"),
        "select_hellinger": sig.get("hellinger"),
    }[cfg.weighting]
    return topk_mask(score, cfg.select_ratio).float() / cfg.select_ratio


def _temperature(sig: dict[str, Tensor], d: Tensor, w: Tensor, cfg: ObjectiveConfig) -> Tensor:
    score = sig["hellinger"] if cfg.temp_signal == "hellinger" else sig["entropy"]
    kw = dict(
        mode=cfg.temp_mode,
        tau_min=cfg.tau_min,
        tau_max=cfg.tau_max,
        tau0=cfg.tau0,
        kappa=cfg.kappa,
        edt_t0=cfg.edt_t0,
        edt_theta=cfg.edt_theta,
    )
    if cfg.weighting.startswith("select_") and cfg.temp_mode == "idts":
        # AdaKD computes IDTS (and its median) over the selected tokens only.
        tau = torch.full_like(d, cfg.tau0)
        sel = w > 0
        if sel.any():
            tau[sel] = token_temperature(d[sel], score=score[sel], **kw)
        return tau
    return token_temperature(d, score=score, **kw)
