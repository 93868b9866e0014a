#!/bin/bash
# The pre-registered study (docs/preregistration.md), cells 1-5 (the stopping rule dropped 6-8). Resumes.
cd /work/study-prereg
export EGAD_TEACHER_HIDDEN_CACHE=/work/study-prereg/runs/prereg/teacher-hidden
export TOKENIZERS_PARALLELISM=false
echo 1000 > /proc/self/oom_score_adj 2>/dev/null
# The pinned study takes a run's eval/summary.json as its end, but it is written after the other sets and before
# Dolly test, which is scored last: a run cut off while scoring Dolly test would be skipped without it. Removing that
# summary lets the evaluation resume (the finished sets are kept).
find runs/prereg -path '*/eval/summary.json' -not -path 'runs/prereg/teacher/*' | while read -r s; do
  [ -f "$(dirname "$s")/dolly_test/summary.json" ] || { echo "evaluation cut off: $s removed"; rm -f "$s"; }
done >> runs/prereg-study.log
exec .venv/bin/egad study --size configs/study/prereg.yaml --cells kd,feat_kd_all,egad,kd_anchor,feat_kd_last \
  --seeds 7 --lr-grid 3e-4,1e-3,3e-3 --anchor-grid 0.001,0.01,0.1 --pilot-seed 100 \
  --primary egad-kd,egad-feat_kd_all --jobs 2 --out runs/prereg --results docs/results.md \
  >> runs/prereg-study.log 2>&1
