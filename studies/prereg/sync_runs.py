"""Copies the study's run files between its run folder and this committed folder (no rsync needed).

    python sync_runs.py save RUNS DEST      # the small files of every run; logs without progress-bar redraws
    python sync_runs.py restore DEST RUNS   # back: the finished runs only, and the learning-rate choices
    python sync_runs.py finished RUNS       # the finished runs, a line each (persist.sh commits when it changes)

`save` skips weights, checkpoints, the teacher cache and anything over 8 MB: only what the results page reads, and
the logs. `restore` copies a run only when it is finished: a pilot with final/config.json, a final run or the teacher
with its Dolly test scored (eval/dolly_test/summary.json: Dolly test is scored last); an unfinished run's checkpoints
are gone with its machine, so it starts again from step 0.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

SKIP_DIRS = {"cache", "cache-run", "teacher-hidden", "data", "best"}
SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".png"}
MAX_BYTES = 8 << 20
BAR = re.compile(r"\d+%\|")  # a tqdm progress line


def _kept(rel: Path) -> bool:
    parts = rel.parts
    if any(p in SKIP_DIRS or p.startswith("checkpoint-") for p in parts[:-1]):
        return False
    name = parts[-1]
    return not (name.startswith("tokenizer") or Path(name).suffix in SKIP_SUFFIXES)


def _copy_if_changed(src: Path, dst: Path) -> bool:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return True


def save(runs: Path, dest: Path) -> int:
    changed = 0
    for src in sorted(p for p in runs.rglob("*") if p.is_file()):
        rel = src.relative_to(runs)
        if not _kept(rel) or src.stat().st_size > MAX_BYTES:
            continue
        if src.suffix == ".log":
            text = src.read_text(errors="replace").replace("\r", "\n")
            lines = [ln for ln in text.split("\n") if ln.strip() and not BAR.search(ln)]
            out = dest / rel.with_name(rel.name + ".txt")
            new = "\n".join(lines) + "\n"
            if not (out.is_file() and out.read_text() == new):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(new)
                changed += 1
            continue
        changed += _copy_if_changed(src, dest / rel)
    return changed


def finished(root: Path) -> list[Path]:
    """The finished runs: a pilot with final/config.json, a final run or the teacher with its Dolly test scored."""
    # Dolly test is scored last: eval/summary.json is written before it, after the other sets (run-study.sh).
    done = [p.parent.parent.parent for p in root.rglob("eval/dolly_test/summary.json")]
    done += [p.parent.parent for p in root.rglob("final/config.json") if "pilot" in p.relative_to(root).parts]
    return sorted(set(done))


def restore(dest: Path, runs: Path) -> list[str]:
    runs.mkdir(parents=True, exist_ok=True)
    if (dest / "choices.json").is_file():
        shutil.copy2(dest / "choices.json", runs / "choices.json")
    restored = []
    for run in finished(dest):
        rel = run.relative_to(dest)
        for src in run.rglob("*"):
            if src.is_file() and not src.name.endswith(".log.txt"):
                _copy_if_changed(src, runs / rel / src.relative_to(run))
        restored.append(str(rel))
    return restored


if __name__ == "__main__":
    mode, a, b = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[-1])
    if mode == "save":
        print(f"{save(a, b)} file(s) changed")
    elif mode == "finished":
        for run in finished(a):  # with the markers' sizes and times, so a summary written again shows too
            marks = [m for m in (run / "eval" / "dolly_test" / "summary.json", run / "final" / "config.json")]
            marks = [m for m in marks if m.is_file()]
            print(run.relative_to(a), *(f"{m.stat().st_size}:{m.stat().st_mtime_ns}" for m in marks))
    elif mode == "restore":
        for rel in restore(a, b):
            print(f"restored {rel}")
    else:
        raise SystemExit(f"mode {mode!r}: save or restore")
