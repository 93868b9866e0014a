"""The pre-registered protocol (docs/preregistration.md): each cell's learning rate, and the anchor control's
strength, chosen on one pilot seed's final dev NLL from the same grid, then the cell trained on every seed.

Cells run in priority order, so a study stopped early has whole cells (every seed) at the front of the list and
none at the end: the pre-registration drops cells from the end, never seeds or steps. Each round runs, in one pool,
the final seeds of every cell whose pilot is finished and the pilot of the next cell, so the workers stay busy.
The choices are written to OUT/choices.json as they are made; finished runs are skipped, so the protocol resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from egad.eval.runs import load_run
from egad.study import grid as G

# The anchor control trains with KD's chosen learning rate; its tuning budget is the strength gamma instead.
ANCHORED = {G.ANCHOR_CELL: "kd"}


def pilot_cells(cell: G.Cell, lr_grid: list[float], anchor_grid: list[float], chosen: dict[str, dict]) -> list[G.Cell]:
    """One cell's tuning runs: the learning-rate grid, or for the anchor control the strength grid at the learning
    rate its base cell chose. Dev NLL only (no test evaluation)."""
    if cell.name in ANCHORED:
        lr = chosen[ANCHORED[cell.name]]["train.lr"]
        return [
            replace(
                cell,
                name=f"pilot/{cell.name}/lr{lr:g}-anchor{g:g}",
                test_eval=False,
                run={**cell.run, "train.lr": lr, "train.anchor_l2": g},
            )
            for g in anchor_grid
        ]
    return [
        replace(cell, name=f"pilot/{cell.name}/lr{lr:g}", test_eval=False, run={**cell.run, "train.lr": lr})
        for lr in lr_grid
    ]


def final_dev_nll(setup: G.Setup, cell: G.Cell, seed: int) -> float:
    """The run's last dev NLL (the weights that are evaluated are the final ones); inf for a run that diverged."""
    rows = [r for r in load_run(G.run_dir(setup, cell, seed)).metrics if "dev_nll" in r]
    value = rows[-1]["dev_nll"] if rows else math.inf
    return value if math.isfinite(value) else math.inf


def choose(setup: G.Setup, pilots: list[G.Cell], seed: int) -> tuple[G.Cell, dict[str, float]]:
    """The pilot with the lowest final dev NLL (ties: the first in grid order) and every pilot's dev NLL."""
    scores = {p.name: final_dev_nll(setup, p, seed) for p in pilots}
    best = min(pilots, key=lambda p: scores[p.name])
    return best, scores


def run_protocol(
    setup: G.Setup,
    cells: list[str],
    seeds: list[int],
    *,
    lr_grid: list[float],
    anchor_grid: list[float],
    pilot_seed: int,
    workers: int = 1,
) -> dict[str, dict]:
    """Tune and train every cell in order; returns {cell: its chosen run overrides}, also in OUT/choices.json."""
    if pilot_seed in seeds:
        raise ValueError(f"the pilot seed {pilot_seed} is one of the final seeds {seeds}: pick another")
    for name, base in ANCHORED.items():
        if name in cells and (base not in cells or cells.index(base) > cells.index(name)):
            raise ValueError(f"cell {name} takes the learning rate of {base}: list {base} before it")
    path = setup.out / "choices.json"
    choices: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
    chosen: dict[str, dict] = {}
    piloted: list[str] = []
    todo = list(cells)
    while todo or piloted:
        jobs = [(replace(G.cell(c), run={**G.cell(c).run, **chosen[c]}), s) for c in piloted for s in seeds]
        nxt = todo.pop(0) if todo else None
        pilots = pilot_cells(G.cell(nxt), lr_grid, anchor_grid, chosen) if nxt else []
        jobs += [(p, pilot_seed) for p in pilots]
        G.run_cells(setup, jobs, workers)
        piloted = []
        if nxt:
            best, scores = choose(setup, pilots, pilot_seed)
            chosen[nxt] = {k: v for k, v in best.run.items() if k in ("train.lr", "train.anchor_l2")}
            choices[nxt] = {"run": chosen[nxt], "pilot_seed": pilot_seed, "dev_nll": scores}
            path.write_text(json.dumps(choices, indent=1))
            piloted = [nxt]
    return chosen
