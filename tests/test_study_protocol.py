"""The pre-registered protocol's bookkeeping: each cell's learning rate (the anchor control's strength) chosen on the
pilot seed's final dev NLL, cells in priority order, finals pipelined with the next cell's pilot, choices resumable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from egad.config.methods import METHODS
from egad.study import grid as G
from egad.study import protocol as P

# Fake final dev NLL of a pilot run: a valley in log(lr) whose bottom each cell puts elsewhere; the anchor's best
# strength is its middle one; one learning rate diverges.
BEST_LR = {"kd": 1e-3, "egad": 3e-4, "sft": 3e-3}


def fake_dev_nll(cell: G.Cell) -> float:
    lr, gamma = cell.run["train.lr"], cell.run.get("train.anchor_l2")
    if lr == 3e-3 and cell.preset == "egad":
        return math.nan
    base = cell.name.split("/")[1]
    value = 3.0 + abs(math.log10(lr) - math.log10(BEST_LR.get(base, BEST_LR.get(cell.preset, 1e-3))))
    return value + (0.0 if gamma in (None, 0.01) else 0.5)


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    rounds: list[list[tuple[str, int, dict]]] = []

    def run_cells(setup, jobs, workers=1):
        rounds.append([(c.name, s, dict(c.run)) for c, s in jobs])
        for cell, seed in jobs:
            out = G.run_dir(setup, cell, seed)
            out.mkdir(parents=True, exist_ok=True)
            rows = [
                {"step": 0, "dev_nll": 9.0},
                {"step": 10, "dev_nll": fake_dev_nll(cell) if cell.name.startswith("pilot/") else 3.0},
            ]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(G, "run_cells", run_cells)
    setup = G.Setup(None, Path("d"), Path("d"), "t", Path("c"), Path("t"), tmp_path)
    return setup, rounds


def test_each_cell_gets_the_learning_rate_of_its_best_pilot(fake_runs):
    setup, rounds = fake_runs
    grid = [3e-4, 1e-3, 3e-3]
    cells = ["kd", "egad", G.ANCHOR_CELL, "sft"]
    chosen = P.run_protocol(setup, cells, [0, 1], lr_grid=grid, anchor_grid=[0.001, 0.01, 0.1], pilot_seed=100)
    assert chosen == {
        "kd": {"train.lr": 1e-3},
        "egad": {"train.lr": 3e-4},  # 3e-3 diverged (nan): never chosen
        G.ANCHOR_CELL: {"train.lr": 1e-3, "train.anchor_l2": 0.01},  # KD's rate, its own strength
        "sft": {"train.lr": 3e-3},
    }
    # Round i: the finals of cell i-1 (every seed, first) and the pilots of cell i.
    names = [[(n, s) for n, s, _ in r] for r in rounds]
    assert names[0] == [(f"pilot/kd/lr{lr:g}", 100) for lr in grid]
    assert names[1] == [("kd", 0), ("kd", 1)] + [(f"pilot/egad/lr{lr:g}", 100) for lr in grid]
    assert names[2][:2] == [("egad", 0), ("egad", 1)]
    assert [n for n, _ in names[2][2:]] == [f"pilot/{G.ANCHOR_CELL}/lr0.001-anchor{g:g}" for g in (0.001, 0.01, 0.1)]
    assert names[-1] == [("sft", 0), ("sft", 1)]
    finals = {n: run for r in rounds for n, s, run in r if not n.startswith("pilot/")}
    assert finals[G.ANCHOR_CELL] == {"train.anchor_l2": 0.01, "train.lr": 1e-3}
    assert finals["egad"] == {"train.lr": 3e-4}
    saved = json.loads((setup.out / "choices.json").read_text())
    assert saved["egad"]["dev_nll"]["pilot/egad/lr0.003"] == math.inf
    assert saved["sft"]["run"] == {"train.lr": 3e-3} and saved["sft"]["pilot_seed"] == 100


def test_protocol_refuses_a_pilot_seed_among_the_finals_and_an_anchor_before_its_base(fake_runs):
    setup, _ = fake_runs
    kw = {"lr_grid": [1e-3], "anchor_grid": [0.01]}
    with pytest.raises(ValueError, match="pilot seed 3 is one of the final seeds"):
        P.run_protocol(setup, ["kd"], [0, 3], pilot_seed=3, **kw)
    with pytest.raises(ValueError, match=f"cell {G.ANCHOR_CELL} takes the learning rate of kd"):
        P.run_protocol(setup, [G.ANCHOR_CELL, "kd"], [0], pilot_seed=100, **kw)


def test_prereg_controls_are_cells_of_their_base_presets():
    anchor, last = G.cell(G.ANCHOR_CELL), G.cell("feat_kd_last")
    assert anchor.preset == "kd" and anchor.run["train.anchor_l2"] > 0
    assert last.preset == "feat_kd_all" and last.overrides == {"layer_map": "last"}
    assert G.expand_cells("prereg") == G.PREREG_CELLS and set(G.PREREG_CELLS) <= set(METHODS)
