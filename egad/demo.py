"""`egad demo`: the whole job on a fresh machine, with no model downloads.

1. train a byte-level BPE tokenizer on Dolly train;
2. train a small teacher from scratch (SFT, cached: a second demo reuses it);
3. distil a smaller student three ways: SFT, KD (forward KL) and EGAD;
4. evaluate the students and the teacher (Dolly test500 ROUGE-L over sampling seeds, teacher-forced NLL, KL);
5. print the table and write the report and plots into one folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from egad import experiment as X
from egad.eval.report import write_report

METHODS = ("sft", "kd", "egad")


def run_demo(out: str | Path = "runs/demo", *, data: str | None = None, quick: bool = False) -> str:
    scale = X.TOY_QUICK if quick else X.TOY
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dolly, data_dir = X.resolve_dolly(data, out)
    print(f"[demo] data {dolly}; output {out}; {'quick' if quick else 'full'} size")
    tok_dir = X.cached_tokenizer(scale, dolly)
    teacher_run = X.cached_teacher(scale, dolly, tok_dir)
    teacher = teacher_run / "final"
    shutil.copytree(teacher_run, out / "teacher", dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*"))
    runs = [out / "teacher"]
    for method in METHODS:
        raw = X.base_run(scale, dolly, out / method, tok_dir)
        raw["model"].update(X.model_fields("student", scale.student), teacher=str(teacher))
        raw["objective"] = {"preset": method, "feat_layers": scale.feat_layers}
        raw["train"]["max_steps"] = scale.student_steps
        print(f"[demo] distilling the student with {method}")
        runs.append(X.train_run(raw))
    for run in runs:
        print(f"[demo] evaluating {run.name}")
        X.evaluate(
            run / "final",
            run / "eval",
            scale=scale,
            data_dir=data_dir,
            seeds=scale.seeds,
            other_seeds=scale.seeds[:1],  # a fast fixed subset of the other sets: the first N records, one seed
            teacher=None if run.name == "teacher" else teacher,
        )
    table, plots = write_report(runs, out / "report")
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{table}\n\n[demo] report and {len(plots)} plots in {out / 'report'}; {minutes:.1f} min")
    return table
