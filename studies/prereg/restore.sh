#!/bin/bash
# On a fresh machine: the pinned worktree, its environment, and the finished runs copied back from the committed
# run files, so `run-study.sh` skips them. An unfinished run is not copied: its checkpoints died with the machine,
# so it starts again from step 0 (the pre-registration's stopping rule: not a re-run, its results were never seen).
set -eu
REPO=/work/main
WT=/work/study-prereg
COMMIT=f25dd9c
[ -d "$WT" ] || git -C "$REPO" worktree add --detach "$WT" "$COMMIT"
[ "$(git -C "$WT" rev-parse --short=7 HEAD)" = "$COMMIT" ] || { echo "worktree not at $COMMIT" >&2; exit 1; }
(cd "$WT" && make install >/dev/null)
SRC=$REPO/studies/prereg/runs
DST=$WT/runs/prereg
mkdir -p "$DST"
[ -f "$SRC/choices.json" ] && cp "$SRC/choices.json" "$DST/"
# A pilot is done when its final/config.json exists, a final run when its eval/summary.json does (egad/study/grid.py).
find "$SRC" \( -path '*/final/config.json' -o -path '*/eval/summary.json' \) | while read -r mark; do
  run=$(dirname "$(dirname "$mark")")
  case $mark in */final/config.json) [[ $run == */pilot/* ]] || continue ;; esac
  rel=${run#"$SRC"/}
  mkdir -p "$DST/$rel" && rsync -a "$run"/ "$DST/$rel"/
  echo "restored $rel"
done
cp "$REPO/studies/prereg/run-study.sh" "$WT/runs/run-study.sh"
