"""A run folder as `egad report` and the study read it: its config, its metric log and its evaluation summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from egad.errors import EgadError
from egad.train.run_log import read_metrics


class ReportError(EgadError):
    """A folder that `egad report` cannot read as a run; the message names it and what a run folder holds."""


RUN_FILES = ("config.yaml", "metrics.jsonl", "eval/summary.json")  # a run folder holds at least one of them


@dataclass
class Run:
    label: str
    path: Path
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evals: dict = field(default_factory=dict)
    evaluated: str | None = None  # the model folder or id that eval/summary.json scored

    @property
    def method(self) -> str:
        """The objective preset, or — for a model that egad did not train (a real teacher, a cut student)."""
        return self.config.get("objective", {}).get("preset", "—")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.metrics if key in r and "step" in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def train_series(self, key: str) -> tuple[list[float], list[float]]:
        """A training-log value against the mean step of the window it averages. A row at step s averages the steps
        since the previous training row: log_every of them, fewer in a partial last window. Drawn at s, each full
        window lagged (log_every - 1) / 2 steps behind a one-step last one: a jump at the end that training did not
        make. Drawn at its mean step, the partial window is kept (the only reading of the last steps) where it is."""
        xs, ys, prev = [], [], 0
        for r in self.metrics:
            if "lr" not in r or "step" not in r:  # evaluations and events are not window means
                continue
            if key in r:
                xs.append((prev + 1 + r["step"]) / 2)
                ys.append(r[key])
            prev = r["step"]
        return xs, ys

    @property
    def best_dev_nll(self) -> float | None:
        vals = [r["dev_nll"] for r in self.metrics if "dev_nll" in r]
        return min(vals) if vals else None

    @property
    def dev_nll(self) -> float | None:
        """Dev NLL of the evaluated model (the `dolly_dev` eval set), else the best one of the training log."""
        if "dolly_dev" in self.evals:
            return float(self.evals["dolly_dev"]["nll"])
        return self.best_dev_nll


def rouge_sets(runs: list[Run]) -> list[str]:
    """The eval sets that some run has ROUGE-L for (dolly_dev holds teacher-forced NLL only)."""
    return list(dict.fromkeys(s for r in runs for s, e in r.evals.items() if "rouge_l_mean" in e))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run folder {path} does not exist: pass folders written by `egad train` (train.output_dir)")
    run = Run(label=path.name, path=path)
    if (path / "config.yaml").is_file():
        run.config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if (path / "metrics.jsonl").is_file():
        run.metrics = read_metrics(path)
    if (path / "eval" / "summary.json").is_file():
        summary = json.loads((path / "eval" / "summary.json").read_text())
        run.evals, run.evaluated = summary["sets"], summary.get("model")
    return run
