#!/bin/bash
# When every run is done (the worktree's `egad study` has exited and written its own page): the quiet step times,
# then the results page, written by main's page code (studies/prereg/write_page.py) from the same run folder. The
# discussion and the deviations (studies/prereg/deviations.md) are written by hand into the page after it; a page
# regenerated later keeps them.
set -eu
cd /work/main
RUNS=/work/study-prereg/runs/prereg
pgrep -f "egad study" >/dev/null && { echo "the study is still running: wait for it" >&2; exit 1; }
[ -f "$RUNS/teacher/eval/summary.json" ] || { echo "the teacher's evaluation is missing: rerun run-study.sh" >&2; exit 1; }
# The earlier exploratory study's page moves aside (its link in the README and in the new page points there).
if [ -f docs/results.md ] && ! grep -q "Pre-registered" docs/results.md; then
  git mv docs/results.md docs/results-30step.md
  [ -f docs/results.png ] && git mv docs/results.png docs/results-30step.png
  sed -i 's/(results\.png)/(results-30step.png)/' docs/results-30step.md
fi
# eager: the study's pinned code (f25dd9c) predates egad/losses/kernels.py, so its runs took eager steps.
[ -f studies/prereg/step_times.json ] ||
  .venv/bin/python bench/study_step_time.py --steps 30 --kernels eager --out studies/prereg/step_times.json
# main's page code on the finished run folder, nothing else (write_page.py says why not main's `egad study`).
.venv/bin/python studies/prereg/write_page.py "$RUNS" docs/results.md --step-times studies/prereg/step_times.json
echo "now: the discussion and deviations in docs/results.md, the README's summary and its links to results-30step.md"
