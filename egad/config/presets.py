"""Every method is data: a preset is a dict of ObjectiveConfig overrides (spec sections 7 and 9).

The defaults of ObjectiveConfig are full EGAD. `VANILLA_KD` switches the three components off; baselines and
ablations start from it or from EGAD and change only what defines them. `docs/method.md` cites each paper.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from egad.config.schema import ConfigError, ObjectiveConfig

# The three EGAD components, as overrides that switch each one off.
C1_OFF = {"weighting": "none"}
C2_OFF = {"temp_mode": "const", "tau0": 1.0}
C3_OFF = {"beta_f": 0.0, "route_mode": "none"}
VANILLA_KD = {**C1_OFF, **C2_OFF, **C3_OFF}  # (1 - alpha) CE + alpha FKL at tau=1

PRESETS: dict[str, dict[str, Any]] = {
    # --- EGAD and its 2^3 component grid (spec section 9) ---
    "egad": {},
    "egad_c1": {**C2_OFF, **C3_OFF},  # curriculum only
    "egad_c2": {**C1_OFF, **C3_OFF},  # adaptive temperature only
    "egad_c3": {**C1_OFF, **C2_OFF},  # dual branch only
    "egad_no_c1": {**C1_OFF},  # C2 + C3
    "egad_no_c2": {**C2_OFF},  # C1 + C3
    "egad_no_c3": {**C3_OFF},  # C1 + C2
    # --- component controls ---
    "egad_reverse_curriculum": {"pacing": "reverse"},
    "egad_static_easy": {"curriculum_mode": "static_easy"},
    "egad_static_hard": {"curriculum_mode": "static_hard"},
    "egad_competence": {"curriculum_mode": "competence", "pacing_c0": 0.3},
    "egad_tilt": {"curriculum_mode": "tilt"},
    "egad_direct_temp": {"temp_mode": "direct"},
    "egad_no_tau2": {"tau2": "none"},
    "egad_random_route": {"route_mode": "random"},
    "egad_feat_only": {"hard_branch": "feat_only"},
    "egad_last_layer": {"layer_map": "last"},
    "egad_mse_ln": {"feat_loss": "mse_ln"},
    "egad_rkl": {"divergence": "reverse_kl"},
    "egad_srkl": {"divergence": "skew_reverse_kl"},
    "egad_todi": {"divergence": "todi"},
    # --- baselines (spec section 7) ---
    "sft": {**VANILLA_KD, "alpha": 0.0},
    "kd": {**VANILLA_KD},
    "kd_tau1.5": {**VANILLA_KD, "tau0": 1.5},
    "kd_tau2": {**VANILLA_KD, "tau0": 2.0},
    "rkl": {**VANILLA_KD, "divergence": "reverse_kl"},
    "jsd": {**VANILLA_KD, "divergence": "jsd"},
    "skl": {**VANILLA_KD, "divergence": "skew_forward_kl"},
    "srkl": {**VANILLA_KD, "divergence": "skew_reverse_kl"},
    "tvd": {**VANILLA_KD, "divergence": "tvd"},
    "akl": {**VANILLA_KD, "divergence": "akl"},
    "ttm": {**VANILLA_KD, "divergence": "ttm"},
    "wttm": {**VANILLA_KD, "divergence": "wttm"},
    "todi": {**VANILLA_KD, "divergence": "todi"},
    "bild": {**VANILLA_KD, "divergence": "bild", "tau0": 3.0},
    "ea_kd": {**VANILLA_KD, "weighting": "ea_kd"},
    "adakd_idts": {
        **VANILLA_KD,
        "weighting": "select_hellinger",
        "select_ratio": 0.5,
        "temp_mode": "idts",
        "temp_signal": "hellinger",
    },
    "se_kd_teacher": {**VANILLA_KD, "weighting": "select_teacher_entropy", "select_ratio": 0.2},
    "se_kd_student": {**VANILLA_KD, "weighting": "select_student_entropy", "select_ratio": 0.2},
    # AT-KD: entropy-aware teacher weighting in the AKD style (Kwon et al. 2020), single-teacher form of the spec:
    # w = exp(-2 d) / mean(exp(-2 d)), i.e. the tilt curriculum frozen at lambda = 0.
    "at_kd": {**VANILLA_KD, "weighting": "curriculum", "curriculum_mode": "tilt", "fixed_lambda": 0.0},
    "feat_kd_all": {**VANILLA_KD, "route_mode": "all", "beta_f": 1.0},
}


def preset(name: str, **overrides: Any) -> ObjectiveConfig:
    """The ObjectiveConfig of a named preset, with optional field overrides on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown objective preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    known = set(asdict(ObjectiveConfig()))
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown objective field(s) {bad}; see `egad train --help` for the list")
    return ObjectiveConfig(**{**PRESETS[name], **overrides})
