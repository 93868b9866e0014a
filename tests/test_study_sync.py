"""The pre-registered study's run files: what is saved to git and what a fresh machine gets back
(studies/prereg/sync_runs.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sync():
    spec = importlib.util.spec_from_file_location("sync_runs", REPO / "studies" / "prereg" / "sync_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(root: Path, rel: str, text: str = "x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _study(root: Path) -> None:
    _write(root, "choices.json", "{}")
    _write(root, "pilot/kd/lr0.001/seed100/final/config.json")  # a finished pilot
    _write(root, "pilot/kd/lr0.001/seed100/final/model.safetensors")
    _write(root, "pilot/kd/lr0.001/seed100/metrics.jsonl")
    _write(root, "pilot/kd/lr0.003/seed100/metrics.jsonl")  # a pilot cut off mid-run
    _write(root, "pilot/kd/lr0.003/seed100/checkpoint-30/optimizer.pt")
    _write(root, "kd/seed0/eval/summary.json")  # a finished, evaluated run
    _write(root, "kd/seed0/eval/dolly_test/summary.json")
    _write(root, "kd/seed2/eval/summary.json")  # evaluated but for Dolly test, which is scored last
    _write(root, "kd/seed2/eval/sinst/summary.json")
    _write(root, "kd/seed0/final/config.json")
    _write(root, "kd/seed0/final/tokenizer.json")
    _write(root, "kd/seed1/final/config.json")  # trained, its evaluation cut off
    _write(root, "teacher/eval/summary.json")
    _write(root, "teacher/eval/dolly_test/summary.json")
    _write(root, "cache/shard-000.npz")
    _write(root, "kd/seed0.log", "start\nstep:  5%|#  | 15/300\rstep: 10%|## | 30/300\ndone\n")


def test_save_keeps_the_small_files_and_strips_progress_bars(tmp_path: Path) -> None:
    sync = _sync()
    runs, dest = tmp_path / "runs", tmp_path / "dest"
    _study(runs)
    assert sync.save(runs, dest) > 0
    kept = _files(dest)
    assert "kd/seed0/eval/summary.json" in kept and "pilot/kd/lr0.003/seed100/metrics.jsonl" in kept
    assert not any(
        name.endswith((".safetensors", ".pt", "tokenizer.json")) or name.startswith("cache/") for name in kept
    )
    assert (dest / "kd/seed0.log.txt").read_text() == "start\ndone\n"
    assert sync.save(runs, dest) == 0, "a second save with nothing new changes nothing"


def test_restore_brings_back_the_finished_runs_only(tmp_path: Path) -> None:
    sync = _sync()
    runs, dest, fresh = tmp_path / "runs", tmp_path / "dest", tmp_path / "fresh"
    _study(runs)
    sync.save(runs, dest)
    restored = sync.restore(dest, fresh)
    assert sorted(restored) == ["kd/seed0", "pilot/kd/lr0.001/seed100", "teacher"]
    got = _files(fresh)
    assert "choices.json" in got and "kd/seed0/eval/summary.json" in got
    assert not any(name.startswith(("kd/seed1", "kd/seed2", "pilot/kd/lr0.003")) for name in got)
    assert not any(name.endswith(".log.txt") for name in got)
