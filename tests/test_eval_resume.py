"""egad.experiment.evaluate resumes per set, and its merged eval/summary.json holds every set even when that file was
removed, or rewritten by a resumed call that scored Dolly test alone: each set's own summary is the record."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from egad import experiment as X
from egad.eval.suite import merge_summary

SETS = ["dolly_dev", *X.OTHER_SETS, "dolly_test"]


def _fake_run_eval(calls: list[list[str]]):
    """Writes what run_eval writes (each set's summary with its settings, then the merged summary), no model."""

    def run_eval(model_dir, sets, settings, *, out_dir, data_dir, teacher_path=None):
        calls.append(list(sets))
        results = {}
        for i, name in enumerate(sets):
            rouge = {f"seed{s}": 5.0 + i + s / 100 for s in settings.seeds}
            results[name] = {"set": name, "nll": 3.0 + i, "settings": asdict(settings), "buckets": [1, 2]}
            if rouge:
                results[name]["rouge_l_per_seed"] = rouge
            (Path(out_dir) / name).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / name / "summary.json").write_text(json.dumps(results[name]))
        merge_summary(Path(out_dir), results, model_dir, teacher_path)
        return results

    return run_eval


def _evaluate(tmp_path: Path, out: Path):
    data = tmp_path / "data"
    for name in X.OTHER_SETS:
        (data / "eval").mkdir(parents=True, exist_ok=True)
        (data / "eval" / f"{name}.jsonl").write_text("")
    scale = replace(X.TOY, other_examples=4)
    return X.evaluate("model", out, scale=scale, data_dir=data, seeds=[10, 20], dev=True, skip_done=True,
                      teacher="teacher")  # fmt: skip


def test_merged_summary_is_rebuilt_from_the_sets_own_summaries(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(X, "run_eval", _fake_run_eval(calls))
    out = tmp_path / "eval"
    first = _evaluate(tmp_path, out)
    assert sorted(first) == sorted(SETS) and calls == [["dolly_dev"], X.OTHER_SETS, ["dolly_test"]]
    merged = json.loads((out / "summary.json").read_text())

    (out / "summary.json").unlink()
    again = _evaluate(tmp_path, out)
    assert len(calls) == 3, "every set was done: nothing may be scored again"
    assert again == first and json.loads((out / "summary.json").read_text()) == merged

    # A resumed call that re-scored Dolly test alone rewrote the merged summary with that set only.
    (out / "summary.json").write_text(json.dumps({"sets": {"dolly_test": merged["sets"]["dolly_test"]}}))
    assert _evaluate(tmp_path, out) == first and len(calls) == 3
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt == merged and all("buckets" not in v for v in rebuilt["sets"].values())
    assert rebuilt["teacher"] == "teacher" and rebuilt["model"] == "model"


def test_a_set_scored_with_other_settings_is_scored_again(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(X, "run_eval", _fake_run_eval(calls))
    out = tmp_path / "eval"
    _evaluate(tmp_path, out)
    stale = json.loads((out / "vicuna" / "summary.json").read_text())
    stale["settings"]["max_new_tokens"] += 1
    (out / "vicuna" / "summary.json").write_text(json.dumps(stale))
    (out / "summary.json").unlink()
    sets = _evaluate(tmp_path, out)
    assert calls[3:] == [["vicuna"]] and sorted(sets) == sorted(SETS)
