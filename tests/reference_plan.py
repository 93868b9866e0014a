"""Float64 reference of the whole per-token plan and of the EGAD objective, written from the spec (sections 2-7).

Written independently of egad's plan and maths code (token_plan, curriculum, temperature, routing, entropy, objective,
losses): only `cfg` fields and the projector's weight matrices are read from the library, so that a wrong weight,
temperature, route or dropped hyperparameter in the library cannot be mirrored here. The divergences come from
`reference.py`, which is itself independent of the library.

Every per-token decision reads the token and run-level state only (spec section 5, "Rule for every per-token
quantity"): CDFs given as quantile knots of each signal (teacher entropy, student entropy, Hellinger), and constants
taken from them as expectations over the run's distribution, integrated here by the trapezoid rule on a fine grid of
probabilities (the library uses midpoints of another grid). Conventions the spec leaves open are taken from the
library's docstrings (not its code) and written out again here: ties in the batch top-k go to the earlier position;
`ceil(frac * N)` is computed after rounding `frac * N` to 9 decimals; IDTS and EDT floor their score at 1e-8; EDT's
base is 0.8; the IDTS median is the run-level median of its score, over the selected tokens (quantile 1 - ratio/2)
when a selection ranks by the same score; the random route draws U = hash(key, seed) / 2^32 with the 32-bit
xor-shift-multiply hash (multiplier 0x45D9F3B, two rounds, key's low word xor seed's low word, then its high word
xor seed's high word) and routes U < rho; the feature term is divided by the expected routed count (rho N, or
P(H >= h_abs) N, or N for 'all'); the cosine schedule is clipped at `s = s1`; the parameter-free layer norm of
`mse_ln` uses torch's default eps 1e-5.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from reference import REF_DIVERGENCES, ref_softmax
from torch import Tensor

SCORE_FLOOR = 1e-8
EDT_BASE = 0.8
LN_EPS = 1e-5
SELECT_RULES = ("select_teacher_entropy", "select_student_entropy", "select_hellinger")
SELECT_SCORE = {"select_teacher_entropy": "entropy", "select_student_entropy": "student_entropy",
                "select_hellinger": "hellinger"}  # fmt: skip
GRID = 20001  # trapezoid points for run-level expectations


# ------------------------------------------------------------------------------------------------ per-token signals
def ref_entropy(z: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy (nats) of softmax(z / T) per row, float64, with 0 log 0 = 0 (masked -inf logits)."""
    p = ref_softmax(z.detach().double() / temperature)
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return -(p * torch.log(safe)).sum(-1)


def ref_hellinger(zs: Tensor, zt: Tensor) -> Tensor:
    """Hellinger distance sqrt(0.5 * sum (sqrt p - sqrt q)^2) between teacher and student at tau = 1."""
    p, q = ref_softmax(zt.detach().double()), ref_softmax(zs.detach().double())
    return (0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)).sqrt()


# ------------------------------------------------------------------------------------------------------- difficulty
def ref_knot_cdf(h: Tensor, knots: Tensor) -> Tensor:
    """u = F(h) from knots at probabilities j/(K-1): linear between knots, mid-rank on equal knots, 0 / 1 outside."""
    q = knots.detach().double().tolist()
    k = len(q)
    out = []
    for x in h.tolist():
        n_lt = sum(1 for v in q if v < x)
        n_le = sum(1 for v in q if v <= x)
        if n_le > n_lt:  # x sits on knots n_lt .. n_le - 1: their mid-rank
            out.append((n_lt + n_le - 1) / 2 / (k - 1))
        elif n_lt == 0:
            out.append(0.0)
        elif n_lt == k:
            out.append(1.0)
        else:
            j = n_lt - 1  # q_j < x < q_{j+1}
            out.append((j + (x - q[j]) / (q[j + 1] - q[j])) / (k - 1))
    return torch.tensor(out, dtype=torch.float64)


def ref_quantile(knots: Tensor, p: float) -> float:
    """Q(p) of the knots (knot j at j/(K-1)), linear in between."""
    q = knots.detach().double().tolist()
    pos = min(max(p, 0.0), 1.0) * (len(q) - 1)
    j = min(int(math.floor(pos)), len(q) - 2)
    return q[j] + (pos - j) * (q[j + 1] - q[j])


def ref_expect(f, knots: Tensor | None, lo: float = 0.0, *, identity: bool = False) -> float:
    """E[f(X)] for X with quantile function Q on probabilities [lo, 1] (identity: X = p itself), trapezoid rule."""
    p = torch.linspace(lo, 1.0, GRID, dtype=torch.float64)
    if identity:
        x = p
    else:
        q = knots.detach().double()  # type: ignore[union-attr]
        pos = p * (q.numel() - 1)
        j = pos.floor().long().clamp(0, q.numel() - 2)
        x = q[j] + (pos - j.double()) * (q[j + 1] - q[j])
    y = f(x)
    return float(((y[1:] + y[:-1]) / 2).mean())


def ref_batch_mid_rank(h: Tensor) -> Tensor:
    """(rank - 0.5) / N with 1-based ranks, ties at their average rank: (#below + #at-or-below) / (2N)."""
    n = h.numel()
    below = (h[None, :] < h[:, None]).sum(1).double()
    at_or_below = (h[None, :] <= h[:, None]).sum(1).double()
    return (below + at_or_below) / (2 * n)


def ref_mix32(x: int) -> int:
    for _ in range(2):
        x ^= x >> 16
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def ref_hash_uniform(key: int, seed: int) -> float:
    m = 0xFFFFFFFF
    h = ref_mix32((key & m) ^ (seed & m))
    h = ref_mix32(h ^ ((key >> 32) & m) ^ ((seed >> 32) & m))
    return h / 2.0**32


def needs_difficulty(cfg: Any) -> bool:
    """Whether any component reads d_t: the curriculum, the linear temperatures, or a d-based route."""
    d_route = uses_features(cfg) and cfg.route_mode in ("batch_topk", "global_quantile")
    return cfg.weighting == "curriculum" or cfg.temp_mode in ("inverse", "direct") or d_route


def uses_features(cfg: Any) -> bool:
    return cfg.beta_f > 0 and cfg.route_mode != "none"


def ref_difficulty(h: Tensor, cfg: Any, knots: Tensor | None, vocab: int) -> Tensor:
    if cfg.difficulty == "normalized":
        return (h / math.log(vocab) / cfg.h_ref).clamp(0.0, 1.0)
    if cfg.cdf_mode == "batch":
        return ref_batch_mid_rank(h)
    assert knots is not None, "cdf_mode global / ema_hist read the given knots"
    return ref_knot_cdf(h, knots)


# ------------------------------------------------------------------------------------------------------------ lambda
def ref_lambda(cfg: Any, s: float) -> float:
    """lambda(s): fixed_lambda if set; the sqrt competence for curriculum_mode='competence'; else cfg.pacing."""
    if cfg.fixed_lambda is not None:
        return float(cfg.fixed_lambda)
    kind = "sqrt" if cfg.curriculum_mode == "competence" else cfg.pacing
    s0, s1, c0 = cfg.pacing_s0, cfg.pacing_s1, cfg.pacing_c0
    if kind in ("linear", "reverse"):
        lin = min(1.0, max(0.0, (s - s0) / (s1 - s0)))
        return lin if kind == "linear" else 1.0 - lin
    if kind == "sqrt":
        return min(1.0, math.sqrt(s * (1.0 - c0**2) / s1 + c0**2))
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * min(s / s1, 1.0))) / 2.0
    if kind == "step":
        return 0.0 if s < 0.5 else 1.0
    raise AssertionError(f"unknown pacing {kind}")


# ----------------------------------------------------------------------------------------------------------- weights
def ref_count(frac: float, n: int) -> int:
    """ceil(frac * n), after rounding frac * n to 9 decimals (0.7 * 10 is 7, not 8)."""
    return min(n, math.ceil(round(frac * n, 9)))


def ref_top_positions(score: Tensor, k: int) -> list[int]:
    """Positions of the k largest scores; equal scores go to the earlier position."""
    vals = score.tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return order[:k]


def ref_weights(
    cfg: Any, d: Tensor | None, lam: float, sig: dict[str, Tensor], vocab: int, cdfs: dict[str, Tensor]
) -> Tensor:
    h = sig["entropy"]
    n = h.numel()
    if cfg.weighting == "none":
        return torch.ones(n, dtype=torch.float64)
    if cfg.weighting == "curriculum":
        assert d is not None
        mode = cfg.curriculum_mode
        if mode in ("linear_interp", "static_easy", "static_hard"):
            la = {"static_easy": 0.0, "static_hard": 1.0}.get(mode, lam)
            return cfg.w_min + (1.0 - cfg.w_min) * 2.0 * ((1.0 - la) * (1.0 - d) + la * d)
        if mode == "tilt":
            beta = cfg.tilt_beta_max * (2.0 * lam - 1.0)
            if cfg.difficulty == "quantile":
                norm = ref_expect(lambda u: torch.exp(beta * u), None, identity=True)
            else:
                norm = ref_expect(
                    lambda h: torch.exp(beta * (h / math.log(vocab) / cfg.h_ref).clamp(0, 1)), cdfs["entropy"]
                )
            return torch.exp(beta * d) / norm
        if mode == "competence":
            return (d <= lam).double()
        raise AssertionError(f"unknown curriculum_mode {mode}")
    if cfg.weighting == "ea_kd":
        ht, hs = sig["entropy_ea"], sig["student_entropy_ea"]
        return (ht + ht * hs / math.log(vocab)) / 2.0
    name = SELECT_SCORE[cfg.weighting]
    u = ref_knot_cdf(sig[name], cdfs[name])
    return (u >= 1.0 - cfg.select_ratio).double() / cfg.select_ratio


# ------------------------------------------------------------------------------------------------------- temperature
def ref_temp_signal(cfg: Any) -> str:
    return "hellinger" if cfg.temp_signal == "hellinger" else "entropy"


def ref_temp_lo(cfg: Any) -> float:
    """AdaKD's IDTS acts on the selected tokens; when they are selected by the temperature's own score, those are its
    quantiles above 1 - ratio."""
    if cfg.temp_mode == "idts" and SELECT_SCORE.get(cfg.weighting) == ref_temp_signal(cfg):
        return 1.0 - cfg.select_ratio
    return 0.0


def ref_idts_median(cfg: Any, cdfs: dict[str, Tensor]) -> float:
    lo = ref_temp_lo(cfg)
    return ref_quantile(cdfs[ref_temp_signal(cfg)], lo + (1.0 - lo) / 2.0)


def ref_idts(score: Tensor, cfg: Any, median: float) -> Tensor:
    sc = score.clamp_min(SCORE_FLOOR)
    return cfg.tau0 * torch.exp(-cfg.kappa * torch.tanh(torch.log(sc / max(median, SCORE_FLOOR))))


def ref_tau_of_d(cfg: Any, d: Tensor) -> Tensor:
    span = cfg.tau_max - cfg.tau_min
    return cfg.tau_max - span * d if cfg.temp_mode == "inverse" else cfg.tau_min + span * d


def ref_edt(cfg: Any, score: Tensor) -> Tensor:
    sc = score.clamp_min(SCORE_FLOOR)
    return (cfg.edt_t0 * EDT_BASE ** (cfg.edt_theta / sc)).clamp(cfg.tau_min, cfg.tau_max)


def ref_temperature(cfg: Any, d: Tensor | None, w: Tensor, sig: dict[str, Tensor], cdfs: dict[str, Tensor]) -> Tensor:
    n = w.numel()
    mode = cfg.temp_mode
    if mode == "const":
        return torch.full((n,), float(cfg.tau0), dtype=torch.float64)
    if mode in ("inverse", "direct"):
        assert d is not None
        return ref_tau_of_d(cfg, d)
    score = sig[ref_temp_signal(cfg)]
    if mode == "idts":
        median = ref_idts_median(cfg, cdfs)
        if cfg.weighting in SELECT_RULES:
            # AdaKD: IDTS on the selected tokens only; the others keep tau0.
            tau = torch.full((n,), float(cfg.tau0), dtype=torch.float64)
            sel = w > 0
            tau[sel] = ref_idts(score[sel], cfg, median)
            return tau
        return ref_idts(score, cfg, median)
    if mode == "edt":
        return ref_edt(cfg, score)
    raise AssertionError(f"unknown temp_mode {mode}")


def ref_tau2(cfg: Any, tau: Tensor, cdfs: dict[str, Tensor], vocab: int) -> Tensor:
    if cfg.divergence in ("ttm", "wttm", "bild") or cfg.tau2 == "none":  # published forms carry no tau^2
        return torch.ones_like(tau)
    t2 = tau**2
    if cfg.tau2 == "per_token":
        return t2
    # tau^2 over its run-level mean, over the tokens the temperature rule applies to.
    mode = cfg.temp_mode
    if mode == "const":
        norm = cfg.tau0**2
    elif mode in ("inverse", "direct") and cfg.difficulty == "quantile":
        norm = ref_expect(lambda u: ref_tau_of_d(cfg, u) ** 2, None, identity=True)
    elif mode in ("inverse", "direct"):
        norm = ref_expect(
            lambda h: ref_tau_of_d(cfg, (h / math.log(vocab) / cfg.h_ref).clamp(0, 1)) ** 2, cdfs["entropy"]
        )
    elif mode == "idts":
        med = ref_idts_median(cfg, cdfs)
        norm = ref_expect(lambda x: ref_idts(x, cfg, med) ** 2, cdfs[ref_temp_signal(cfg)], ref_temp_lo(cfg))
    else:
        norm = ref_expect(lambda x: ref_edt(cfg, x) ** 2, cdfs[ref_temp_signal(cfg)])
    return t2 / norm


# ------------------------------------------------------------------------------------------------------------ routes
def ref_route(cfg: Any, d: Tensor | None, h: Tensor, cdfs: dict[str, Tensor], keys: list[int], seed: int) -> Tensor:
    n = h.numel()
    r = torch.zeros(n, dtype=torch.bool)
    if not uses_features(cfg):
        return r
    mode = cfg.route_mode
    if mode == "all":
        return torch.ones(n, dtype=torch.bool)
    if mode == "batch_topk":
        assert d is not None
        r[ref_top_positions(d, ref_count(cfg.rho, n))] = True
    elif mode == "global_quantile":
        r = ref_knot_cdf(h, cdfs["entropy"]) >= 1.0 - cfg.rho
    elif mode == "abs":
        r = h >= cfg.h_abs
    elif mode == "random":
        r = torch.tensor([ref_hash_uniform(k, seed) < cfg.rho for k in keys], dtype=torch.bool)
    else:
        raise AssertionError(f"unknown route_mode {mode}")
    return r


# ------------------------------------------------------------------------------------------------------ the objective
def ref_div_kwargs(cfg: Any) -> dict[str, Any]:
    return {
        "jsd": {"beta": cfg.jsd_beta},
        "skew_forward_kl": {"lam": cfg.skew_lambda},
        "skew_reverse_kl": {"lam": cfg.skew_lambda},
        "akl": {"mu": cfg.akl_mu},
        "todi": {"beta": cfg.todi_beta},
        "ttm": {"gamma": cfg.ttm_gamma},
        "wttm": {"gamma": cfg.ttm_gamma},
        "bild": {"top_k": cfg.bild_top_k},
    }.get(cfg.divergence, {})


def ref_layer_norm(x: Tensor) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS)


def ref_feature_loss(kind: str, hs: Tensor, ht: Tensor) -> Tensor:
    if kind == "cosine":
        return 1.0 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))
    if kind == "mse_ln":
        return ((ref_layer_norm(hs) - ref_layer_norm(ht)) ** 2).sum(-1) / hs.shape[-1]
    raise AssertionError(f"unknown feat_loss {kind}")


def ref_plan(
    s: Tensor,
    t: Tensor,
    cfg: Any,
    cdfs: dict[str, Tensor],
    progress: float,
    vocab: int,
    keys: list[int],
    seed: int,
) -> dict[str, Any]:
    """The per-token decisions from (N, V) student / teacher logits, float64, all detached. cdfs: knots by signal
    (entropy, student_entropy, hellinger); keys: the tokens' keys for the hashed draws."""
    knots = cdfs.get("entropy")
    s, t = s.detach().double(), t.detach().double()
    h = ref_entropy(t)
    sig = {"entropy": h}
    if cfg.weighting == "ea_kd":
        sig["entropy_ea"] = ref_entropy(t, cfg.ea_temperature)
        sig["student_entropy_ea"] = ref_entropy(s, cfg.ea_temperature)
    sig["student_entropy"] = ref_entropy(s)
    sig["hellinger"] = ref_hellinger(s, t)
    d = ref_difficulty(h, cfg, knots, vocab) if needs_difficulty(cfg) else None
    lam = ref_lambda(cfg, progress)
    w = ref_weights(cfg, d, lam, sig, vocab, cdfs)
    tau = ref_temperature(cfg, d, w, sig, cdfs)
    return {
        "entropy": h,
        "difficulty": d,
        "weight": w,
        "tau": tau,
        "tau2": ref_tau2(cfg, tau, cdfs, vocab),
        "route": ref_route(cfg, d, h, cdfs, keys, seed),
        "lambda": lam,
    }


def ref_objective(
    zs: Tensor,
    zt: Tensor,
    targets: Tensor,
    cfg: Any,
    fs: list[Tensor] | None,
    ft: list[Tensor] | None,
    proj: Any,
    cdfs: dict[str, Tensor],
    progress: float,
    vocab: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, dict[str, Any]]:
    """L = (1 - alpha) CE + alpha KD + beta_f feat on (B, L, .) inputs; float64 loss with autograd to zs, fs, proj.

    `plan["difficulty"]` is None when no component reads d_t.
    """
    v = vocab if vocab is not None else min(zs.shape[-1], zt.shape[-1])
    mask = targets.reshape(-1) != -100
    s = zs.reshape(-1, zs.shape[-1])[mask][:, :v].double()
    t = zt.reshape(-1, zt.shape[-1])[mask][:, :v].detach().double()
    y = targets.reshape(-1)[mask]
    n = s.shape[0]
    keys = mask.nonzero().flatten().tolist()  # default keys: the flat positions
    plan = ref_plan(s, t, cfg, cdfs, progress, v, keys, seed)

    logq1 = torch.log(ref_softmax(s))
    ce = -logq1[torch.arange(n), y].sum() / n
    loss = (1.0 - cfg.alpha) * ce
    if cfg.alpha > 0:
        div = REF_DIVERGENCES[cfg.divergence](s, t, temperature=plan["tau"], **ref_div_kwargs(cfg))
        coef = plan["weight"] * plan["tau2"]
        if cfg.hard_branch == "feat_only":
            coef = coef * (~plan["route"]).double()
        loss = loss + cfg.alpha * (coef * div).sum() / n
    if uses_features(cfg):
        r = plan["route"]
        per_tok = torch.zeros(int(r.sum()), dtype=torch.float64)
        for k, (f_s, f_t) in enumerate(zip(fs, ft, strict=True)):  # type: ignore[arg-type]
            hs = f_s.reshape(-1, f_s.shape[-1])[mask][r].double() @ proj.proj[k].weight.double().t()
            ht = f_t.reshape(-1, f_t.shape[-1])[mask][r].detach().double()
            per_tok = per_tok + ref_feature_loss(cfg.feat_loss, hs, ht)
        per_tok = per_tok / len(fs)  # type: ignore[arg-type]
        beta = cfg.beta_f * (plan["lambda"] if cfg.feat_weight_schedule == "follow_lambda" else 1.0)
        if cfg.route_mode == "all":
            share = 1.0
        elif cfg.route_mode == "abs":
            share = 1.0 - float(ref_knot_cdf(torch.tensor([cfg.h_abs]), cdfs["entropy"])[0])
        else:
            share = cfg.rho
        budget = max(1.0, share * n)
        loss = loss + beta * per_tok.sum() / budget
    return loss, plan
