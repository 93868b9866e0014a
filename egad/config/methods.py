"""The method registry: every method egad trains, by name, in one place. A method is an objective preset
(egad.config.presets: ObjectiveConfig overrides) plus, for a few, the run fields that define it (the on-policy fraction,
the anchor's pull) or the data it trains on (the teacher's answers, for sequence-level KD); and a row of the paper
index with its citation. `egad train --objective.preset NAME`, the CLI's list, the study's grid and the README's
paper index all read this registry; tests/test_methods.py checks the README against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from egad.config.presets import PRESETS, preset
from egad.config.schema import ConfigError, ObjectiveConfig


@dataclass(frozen=True)
class Method:
    name: str
    base: str  # the objective preset it starts from
    objective: dict[str, Any] = field(default_factory=dict)  # ObjectiveConfig overrides on the base
    run: dict[str, Any] = field(default_factory=dict)  # dotted run fields it sets unless the run sets them
    teacher_answers: bool = False  # trains on the teacher's sampled answers (data.train from `egad generate`)

    def objective_config(self, **overrides: Any) -> ObjectiveConfig:
        return preset(self.base, **{**self.objective, **overrides})


# Methods that are a preset plus something: the study's on-policy, sequence-level and control cells.
DERIVED = [
    # GKD (Agarwal et al. 2024): half the batches on-policy, JSD with beta = 0.5, KD's alpha.
    Method("gkd", "jsd", {"jsd_beta": 0.5}, {"train.on_policy": 0.5}),
    Method("egad_on_policy", "egad", {}, {"train.on_policy": 0.5}),
    # Sequence-level KD (Kim & Rush 2016): SFT on the teacher's sampled answers to the training prompts.
    Method("seqkd", "sft", teacher_answers=True),
    # KD at the KD:CE ratio that EA-KD's unnormalised weights (mean about 4 on Dolly) give it.
    Method("kd_alpha0.8", "kd", {"alpha": 0.8}),
    # The pre-registered study's controls of the feature branch (docs/preregistration.md): KD with an L2 pull to the
    # initial weights (strength tuned on dev; this default is its grid's middle), and feature KD on the last layer
    # only, whose student side is not a copy of the teacher's at the start.
    Method("kd_anchor", "kd", {}, {"train.anchor_l2": 0.01}),
    Method("feat_kd_last", "feat_kd_all", {"layer_map": "last"}),
]
METHODS: dict[str, Method] = {name: Method(name, name) for name in PRESETS} | {m.name: m for m in DERIVED}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown objective preset {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclass(frozen=True)
class Family:
    """One row of the paper index: a method family, its members and its citation."""

    label: str
    methods: tuple[str, ...]
    citation: str


PAPER_INDEX = [
    Family("EGAD (full)", ("egad",), "Zhang et al. 2026, arXiv 2605.01732 (spec: docs/method.md)"),
    Family(
        "EGAD components / leave-one-out",
        ("egad_c1", "egad_c2", "egad_c3", "egad_no_c1", "egad_no_c2", "egad_no_c3"),
        "ablation grid, spec section 9",
    ),
    Family(
        "EGAD component controls",
        (
            "egad_reverse_curriculum",
            "egad_static_easy",
            "egad_static_hard",
            "egad_competence",
            "egad_tilt",
            "egad_direct_temp",
            "egad_no_tau2",
            "egad_random_route",
            "egad_feat_only",
            "egad_last_layer",
            "egad_mse_ln",
            "egad_rkl",
            "egad_srkl",
            "egad_todi",
        ),  # fmt: skip
        "spec section 9; ours",
    ),
    Family("SFT", ("sft",), "—"),
    Family("KD (forward KL)", ("kd", "kd_tau1.5", "kd_tau2", "kd_alpha0.8"), "Hinton et al. 2015"),
    Family("Reverse KL", ("rkl",), "token-level form of MiniLLM, Gu et al. ICLR 2024"),
    Family("JSD(beta)", ("jsd",), "GKD, Agarwal et al. ICLR 2024"),
    Family("GKD (on-policy JSD)", ("gkd",), "Agarwal et al. ICLR 2024, arXiv 2306.13649"),
    Family("EGAD on-policy", ("egad_on_policy",), "EGAD with GKD's on-policy batches; ours"),
    Family("Sequence-level KD", ("seqkd",), "Kim & Rush, EMNLP 2016, arXiv 1606.07947"),
    Family("Skew KL / skew reverse KL", ("skl", "srkl"), "DistiLLM, Ko et al. ICML 2024"),
    Family("TVD", ("tvd",), "Wen et al. ACL 2023 (f-divergence KD)"),
    Family("AKL", ("akl",), "Wu et al. COLING 2025"),
    Family("ToDi", ("todi",), "Jung et al. EMNLP 2025"),
    Family("TTM / WTTM", ("ttm", "wttm"), "Zheng & Yang, ICLR 2024"),
    Family("BiLD", ("bild",), "Li et al. COLING 2025"),
    Family("EA-KD", ("ea_kd",), "Su et al. (entropy-aware KD)"),
    Family("AdaKD (IDTS)", ("adakd_idts",), "Xie et al. AAAI 2026"),
    Family(
        "SE-KD-style top-20% selection", ("se_kd_teacher", "se_kd_student"), "selective KD by teacher / student entropy"
    ),
    Family("AKD-style entropy weighting (AT-KD)", ("at_kd",), "Kwon et al. ICASSP 2020, single-teacher form"),
    Family("Feature KD on all tokens", ("feat_kd_all",), "TinyBERT / DistilBERT-style control"),
    Family(
        "Feature-branch controls",
        ("kd_anchor", "feat_kd_last"),
        "anchor to the initial weights; last-layer features only (docs/preregistration.md)",
    ),
]


def paper_index(names: list[str] | None = None) -> list[str]:
    """The paper index as Markdown table lines: every family, or those with a member in `names`."""
    rows = [f for f in PAPER_INDEX if names is None or set(f.methods) & set(names)]
    lines = ["| method | preset | citation |", "|---|---|---|"]
    lines += [f"| {f.label} | {', '.join(f'`{m}`' for m in f.methods)} | {f.citation} |" for f in rows]
    return lines if rows else []
