#!/bin/bash
# On a fresh machine: the pinned worktree, its environment, and the finished runs copied back from the committed
# run files, so `run-study.sh` skips them. An unfinished run is not copied: its checkpoints died with the machine,
# so it starts again from step 0 (the pre-registration's stopping rule: not a re-run, its results were never seen).
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WT=${WT:-/work/study-prereg}
COMMIT=f25dd9c
if [ -z "${NO_WORKTREE:-}" ]; then  # NO_WORKTREE=1: only the run files (a dry run into another WT)
  [ -d "$WT" ] || git -C "$REPO" worktree add --detach "$WT" "$COMMIT"
  [ "$(git -C "$WT" rev-parse --short=7 HEAD)" = "$COMMIT" ] || { echo "worktree not at $COMMIT" >&2; exit 1; }
  (cd "$WT" && make install >/dev/null)
fi
SRC=${SRC:-$REPO/studies/prereg/runs}
DST=$WT/runs/prereg
python3 "$REPO/studies/prereg/sync_runs.py" restore "$SRC" "$DST"
mkdir -p "$WT/runs"
cp "$REPO/studies/prereg/run-study.sh" "$WT/runs/run-study.sh" && chmod +x "$WT/runs/run-study.sh"
