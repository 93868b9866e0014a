"""The method registry: every method trains by name, the README's paper index is the registry's, the study's cells
are methods."""

from __future__ import annotations

import pytest
from conftest import REPO

from egad.config.methods import DERIVED, METHODS, PAPER_INDEX, method, paper_index
from egad.config.presets import PRESETS, preset
from egad.config.schema import ConfigError
from egad.study import grid as G


def test_readme_paper_index_is_the_registry():
    text = (REPO / "README.md").read_text().split("## Paper index", 1)[1]
    table = [ln for ln in text.strip().splitlines() if ln.startswith("|")]
    assert table == paper_index(), "regenerate the README's paper index from egad.config.methods.paper_index()"


def test_every_method_is_in_one_index_row_and_every_row_names_methods():
    listed = [m for f in PAPER_INDEX for m in f.methods]
    assert sorted(listed) == sorted(METHODS), set(listed) ^ set(METHODS)
    assert len(listed) == len(set(listed))


def test_derived_methods_resolve_to_their_objective_and_run_fields():
    gkd = method("gkd")
    assert gkd.objective_config() == preset("jsd", jsd_beta=0.5) and gkd.run == {"train.on_policy": 0.5}
    assert method("feat_kd_last").objective_config().layer_map == "last"
    assert method("kd_anchor").run["train.anchor_l2"] > 0 and method("seqkd").teacher_answers
    for name in PRESETS:
        assert method(name).objective_config() == preset(name) and not method(name).run
    assert {m.name for m in DERIVED}.isdisjoint(PRESETS)
    with pytest.raises(ConfigError, match="unknown objective preset 'nope'"):
        method("nope")


def test_study_cells_are_methods():
    for name in G.GRID + G.REAL_CELLS + G.PREREG_CELLS + G.STUDENT_DATA:
        c, m = G.cell(name), method(name)
        assert (c.preset, c.overrides) == (m.base, m.objective)
        assert {k: v for k, v in c.run.items() if k != "data.train"} == m.run
    assert G.cell("seqkd").needs_answers and G.cell("gkd").on_policy


def test_egad_train_takes_every_method_by_name_with_its_run_fields():
    from egad.config.run_config import build_config

    raw = {"model": {"student": "s", "teacher": "t"}}
    for name in METHODS:
        cfg = build_config(raw, {"objective.preset": name})
        assert cfg.method == name and cfg.objective == method(name).objective_config()
        assert cfg.to_dict()["objective"] == {"preset": name}
    cfg = build_config(raw, {"objective.preset": "gkd"})
    assert cfg.train.on_policy == 0.5 and cfg.objective.divergence == "jsd"
    assert build_config(raw, {"objective.preset": "gkd", "train.on_policy": "0.25"}).train.on_policy == 0.25
    assert build_config(raw, {"objective.preset": "kd_anchor"}).train.anchor_l2 == 0.01
    with pytest.raises(ConfigError, match="objective.preset='gkdd' is unknown"):
        build_config(raw, {"objective.preset": "gkdd"})
