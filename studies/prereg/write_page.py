"""Write docs/results.md of the pre-registered study from its finished run folder, with main's page code
(egad.study.prereg_page) and nothing else: no cache job, no training, no evaluation. main's `egad study` would also
find every run and evaluation done, but it first re-opens the teacher cache through code refactored since the pinned
commit (f25dd9c); this reads only the files the page needs, so a mismatch there cannot start hours of recompute.

    .venv/bin/python studies/prereg/write_page.py studies/prereg/runs docs/results.md \
        --step-times studies/prereg/step_times.json

`studies/prereg/runs` is the committed copy of the run files (studies/prereg/sync_runs.py): it gives the same page as
the worktree's run folder, so any checkout can regenerate it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from egad import experiment as X
from egad.study import prereg_page as PP
from egad.study.driver import reference_row

REPO = Path(__file__).resolve().parents[2]
# The pre-registered command's cells and primary family (studies/prereg/run-study.sh); cells 6-8 were dropped.
CELLS = ["kd", "feat_kd_all", "egad", "kd_anchor", "feat_kd_last"]
PRIMARY = [("egad", "kd"), ("egad", "feat_kd_all")]


def reference(folder: Path, name: str) -> dict:
    """The teacher's or the cut's row, as `egad study` builds it from its evaluation summary."""
    path = folder / "eval" / "summary.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: the {name}'s evaluation has not finished (rerun run-study.sh)")
    sets = json.loads(path.read_text())["sets"]
    missing = [s for s in ("dolly_dev", "dolly_test") if s not in sets]
    if missing:
        sys.exit(f"{path} lacks {missing}: the {name}'s evaluation was cut off (rerun run-study.sh)")
    return reference_row(sets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="the study's run folder (runs/prereg of the pinned worktree)")
    ap.add_argument("page", type=Path, help="the page to write; its hand-written sections are kept")
    ap.add_argument("--step-times", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=7)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    unfinished = [
        f"{c}/seed{s}" for c in CELLS for s in seeds
        if not (args.runs / c / f"seed{s}" / "eval" / "dolly_test" / "summary.json").is_file()
    ]  # fmt: skip
    if unfinished:
        sys.exit(f"runs not yet evaluated: {', '.join(unfinished)} (let run-study.sh finish)")
    log = args.runs / "invocations.jsonl"
    invocations = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    text = PP.page(
        args.runs,
        CELLS,
        seeds,
        size=X.load_scale(str(REPO / "configs" / "study" / "prereg.yaml"), X.TOY),
        teacher=reference(args.runs / "teacher", "teacher"),
        cut=reference(args.runs / "cut", "untrained cut"),
        invocations=invocations,
        primary=PRIMARY,
        previous=args.page,
        repo=REPO,
        step_times=json.loads(args.step_times.read_text()) if args.step_times else None,
        generator="egad's page code (`studies/prereg/write_page.py`)",
    )
    args.page.write_text(text)
    print(f"wrote {args.page} and {args.page.parent / 'results-curves.png'}")


if __name__ == "__main__":
    main()
