#!/bin/bash
# When every run is done (the worktree's `egad study` has exited and written its own page): the quiet step times,
# then the results page written by main's `egad study` from the same run folder (finished runs and evaluations are
# skipped: same layout, same evaluation settings). The discussion and the deviations (studies/prereg/deviations.md)
# are written by hand into the page after it; a page regenerated later keeps them.
set -eu
cd /work/main
RUNS=/work/study-prereg/runs/prereg
pgrep -f "egad study" >/dev/null && { echo "the study is still running: wait for it" >&2; exit 1; }
[ -f "$RUNS/teacher/eval/summary.json" ] || { echo "the teacher's evaluation is missing: rerun run-study.sh" >&2; exit 1; }
# The earlier exploratory study's page moves aside (its link in the README and in the new page points there).
if ! grep -q "Pre-registered" docs/results.md; then
  git mv docs/results.md docs/results-30step.md
  [ -f docs/results.png ] && git mv docs/results.png docs/results-30step.png
  sed -i 's/(results\.png)/(results-30step.png)/' docs/results-30step.md
fi
# eager: the study's pinned code (f25dd9c) predates egad/losses/kernels.py, so its runs took eager steps.
[ -f studies/prereg/step_times.json ] ||
  .venv/bin/python bench/study_step_time.py --steps 30 --kernels eager --out studies/prereg/step_times.json
.venv/bin/egad study --size configs/study/prereg.yaml --cells kd,feat_kd_all,egad,kd_anchor,feat_kd_last --seeds 7 \
  --lr-grid 3e-4,1e-3,3e-3 --anchor-grid 0.001,0.01,0.1 --pilot-seed 100 --primary egad-kd,egad-feat_kd_all \
  --jobs 2 --out "$RUNS" --results docs/results.md --step-times studies/prereg/step_times.json \
  --beside docs/results-30step.md
echo "now: the discussion and deviations in docs/results.md, the README's summary and its links to results-30step.md"
