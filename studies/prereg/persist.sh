#!/bin/bash
# Copies the study's small run files (metrics, configs, evaluations, timings, choices; no weights, checkpoints or
# cache) from the pinned worktree into this folder and commits them whenever a run finishes (checked every 5 minutes):
# a machine that is shut down loses its untracked run folder, and only what is committed survives. Run beside run-study.sh:
#   setsid nohup studies/prereg/persist.sh >/dev/null 2>&1 &
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SRC=/work/study-prereg/runs/prereg
DST=$REPO/studies/prereg/runs
mkdir -p "$DST"
# The CPU each session's runs train on (deviations.md, 4: CPUs round differently), one line per session.
echo "$(date -u +%Y-%m-%dT%H:%MZ) $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores" >> "$DST/machines.txt"
last=""
while true; do
  # A commit when a run finishes (or the choices change), not every few minutes: an unfinished run restarts from
  # step 0 on a fresh machine, so its partial files are worth nothing there.
  now=$( [ -d "$SRC" ] && { python3 "$REPO/studies/prereg/sync_runs.py" finished "$SRC"; cat "$SRC/choices.json" 2>/dev/null; } )
  if [ -d "$SRC" ] && [ "$now" != "$last" ]; then
    last=$now
    python3 "$REPO/studies/prereg/sync_runs.py" save "$SRC" "$DST" >/dev/null
    cd "$REPO" || exit 1
    for try in 1 2 3 4 5; do
      git add -f studies/prereg/runs >/dev/null 2>&1 &&
        { git diff --cached --quiet -- studies/prereg/runs ||
          git commit -q --only -m "Study run files (pre-registered study, auto-saved): $(date -u +%H:%MZ)" -- studies/prereg/runs; } &&
        break
      sleep 7
    done
  fi
  sleep "${PERSIST_EVERY:-300}"
done
