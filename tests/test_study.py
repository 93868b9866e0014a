"""The study machinery: paired tests, factorial effects, the results page, and --quick end to end (in 2 processes)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import REPO

from egad import experiment as X
from egad.config import ConfigError
from egad.study import driver
from egad.study import grid as G
from egad.study import results as R
from egad.study.stats import FACTORIAL, compare_seeds, hierarchical_bootstrap, main_effects


def test_hierarchical_bootstrap_detects_a_shift_and_not_noise():
    a = [[float(i % 7) for i in range(200)]]
    res = hierarchical_bootstrap([[x + 1.0 for x in a[0]]], a, n=2000)
    assert res["mean"] == 1.0 and res["p"] < 0.01
    assert hierarchical_bootstrap(a, [list(reversed(a[0]))], n=2000)["p"] > 0.05


def test_main_effects_recover_an_additive_model():
    effect = {0: -0.3, 1: 0.05, 2: 0.0}
    values = {p: 5.0 + sum(effect[i] for i in range(3) if k[i]) for k, p in FACTORIAL.items()}
    got = main_effects(values)
    assert list(got.values()) == pytest.approx(list(effect.values()), abs=1e-12)
    assert main_effects({k: v for k, v in values.items() if k != "egad"}) is None


def _fake_cell(root, cell, seed, rouge, sums, tokens):
    d = root / cell / f"seed{seed}" / "eval" / "dolly_test"
    d.mkdir(parents=True)
    (d / "generations-seed10.jsonl").write_text("".join(json.dumps({"rouge_l": x}) + "\n" for x in rouge))
    (d / "nll-per-example.json").write_text(json.dumps({"nll_sum": sums, "tokens": tokens}))


def test_compare_gives_token_mean_nll_difference(tmp_path):
    tokens = [3, 5, 2, 10]
    _fake_cell(tmp_path, "a", 0, [10, 20, 30, 40], [3.0, 5.0, 2.0, 10.0], tokens)
    _fake_cell(tmp_path, "b", 0, [9, 18, 27, 36], [6.0, 10.0, 4.0, 20.0], tokens)
    res = compare_seeds(tmp_path, "a", "b", [0], n=500)
    assert res["test_nll"]["mean"] == pytest.approx(1.0 - 2.0)  # token means 1.0 and 2.0
    assert res["rouge_l"]["mean"] == pytest.approx(2.5)
    _fake_cell(tmp_path, "c", 0, [1, 1, 1, 1], [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="different test tokens"):
        compare_seeds(tmp_path, "a", "c", [0], n=10)


def test_paper_index_and_discussion_survive_regeneration(tmp_path):
    index = R.paper_index(REPO / "README.md", ["kd", "egad"])
    assert index[0] == "| method | preset | citation |" and any("`egad`" in ln for ln in index)
    assert not any("`todi`" in ln for ln in index)
    page = tmp_path / "results.md"
    page.write_text(f"# x\n\n{R.DISCUSSION}\n\nEGAD loses on NLL.\n\n## Paired tests\n\nold\n")
    assert R.kept_discussion(page) == [f"{R.DISCUSSION}\n\nEGAD loses on NLL."]
    assert "Not written yet" in R.kept_discussion(tmp_path / "missing.md")[-1]


@pytest.mark.slow
def test_quick_study_runs_in_two_processes_and_resumes(tmp_path, monkeypatch, dolly_path, egad_cache_dir):
    monkeypatch.setenv("EGAD_CACHE_DIR", str(egad_cache_dir))
    out = tmp_path / "study"
    argv = ["--quick", "--jobs", "2", "--out", str(out), "--data", str(dolly_path.parent.parent)]
    driver.main(argv)
    text = (out / "results.md").read_text()
    for cell in G.QUICK_CELLS:
        assert f"| `{cell}` |" in text
        assert (out / cell / "seed0" / "eval" / "summary.json").is_file()
        assert (out / cell / "seed0.log").stat().st_size > 0  # the worker's output went to the cell's log
    assert "| `egad` - `kd` |" in text and "**teacher**" in text
    assert "Dev sweep of EGAD's knobs" in text and "(chosen)" in text
    for knob in list(G.TUNE)[:2]:
        assert (out / "tune" / knob / "seed0" / "final" / "config.json").is_file()
    assert (out / "results.png").stat().st_size > 5000
    # Resumable: a second run skips finished cells (no new training, same table) and logs both invocations.
    mtime = (out / "egad" / "seed0" / "eval" / "summary.json").stat().st_mtime
    driver.main(argv)
    assert (out / "egad" / "seed0" / "eval" / "summary.json").stat().st_mtime == mtime
    assert len((out / "invocations.jsonl").read_text().splitlines()) == 2


def test_size_file_replaces_fields_and_names_bad_keys(tmp_path):
    from egad.run_config import build_config

    size = X.load_scale(REPO / "configs" / "study" / "gpu.yaml", X.TOY)
    assert size.student == "Qwen/Qwen2.5-0.5B" and size.max_len == 512 and size.vocab == X.TOY.vocab
    assert X.model_fields("student", size.student) == {"student": "Qwen/Qwen2.5-0.5B"} and size.run["train.lr"] == 2e-5
    assert X.model_fields("student", X.TOY.student) == {"student_config": X.TOY.student}
    raw = X.base_run(size, tmp_path / "dolly.jsonl", tmp_path / "run", tmp_path)
    raw["model"].update(X.model_fields("student", size.student), teacher="Qwen/Qwen2.5-1.5B-Instruct")
    cfg = build_config(raw)  # every `run:` key is a real run-config field
    assert cfg.train.mixed_precision == "bf16" and cfg.data.max_len == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("size: {student_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"size\.student_stepz"):
        X.load_scale(bad, X.TOY)


def test_dev_tuned_cell_is_retrained_when_the_choice_changes(tmp_path):
    cell = tmp_path / G.TUNED
    (cell / "seed0").mkdir(parents=True)
    (cell / "seed0" / "config.yaml").write_text("objective: {preset: egad, beta_f: 2.0}\n")
    driver.retire_stale_choice(cell, {"beta_f": 2.0})
    assert cell.is_dir()  # same choice: the finished runs stand
    driver.retire_stale_choice(cell, {"curriculum_mode": "static_hard"})
    assert not cell.exists() and len(list(tmp_path.glob(f"{G.TUNED}.stale-*/seed0/config.yaml"))) == 1


def test_hierarchical_bootstrap_counts_the_training_seed():
    rng = random.Random(0)
    base = [[rng.gauss(0, 1) for _ in range(300)] for _ in range(3)]
    # A shift that every seed shows: detected, and the interval covers it.
    shifted = [[x + 0.5 + rng.gauss(0, 0.1) for x in row] for row in base]
    res = hierarchical_bootstrap(shifted, base, n=2000)
    assert res["p"] < 0.01 and res["lo"] < 0.5 < res["hi"] and res["mean"] == pytest.approx(0.5, abs=0.05)
    # Seeds that disagree (+1, -1, +0.2): each seed's difference is unmistakable over its 300 examples, but the
    # training seed is the unit of replication, so the pooled difference is not significant.
    flips = [[x + delta for x in row] for row, delta in zip(base, [1.0, -1.0, 0.2], strict=True)]
    res = hierarchical_bootstrap(flips, base, n=2000)
    assert res["p"] > 0.05 and res["lo"] < 0 < res["hi"]
    # What a bootstrap over test examples of the seed means would have claimed: one "seed" of averaged values.
    seed_means = [[[sum(col) / 3 for col in zip(*rows, strict=True)]] for rows in (flips, base)]
    assert hierarchical_bootstrap(*seed_means, n=2000)["p"] < 0.05


def test_hierarchical_bootstrap_weights_give_the_token_mean():
    sums_a, sums_b, tokens = [[3.0, 5.0, 2.0, 10.0]], [[6.0, 10.0, 4.0, 20.0]], [3, 5, 2, 10]
    per_token_a = [[s / t for s, t in zip(sums_a[0], tokens, strict=True)]]  # 1.0 everywhere
    per_token_b = [[s / t for s, t in zip(sums_b[0], tokens, strict=True)]]  # 2.0 everywhere
    res = hierarchical_bootstrap(per_token_a, per_token_b, weights=tokens, n=200)
    assert (
        res["mean"] == pytest.approx(-1.0) and res["lo"] == pytest.approx(-1.0) and res["p"] == pytest.approx(1 / 200)
    )
    with pytest.raises(ValueError, match="weights"):
        hierarchical_bootstrap(per_token_a, per_token_b, weights=[1, 2], n=10)


def _setup(tmp_path, answers=None) -> G.Setup:
    return G.Setup(X.TOY_QUICK, tmp_path / "dolly.jsonl", tmp_path, "teacher-dir", tmp_path / "cache",
                   tmp_path / "teacher", tmp_path / "out", answers=answers)  # fmt: skip


def test_student_data_cells_change_what_the_student_trains_on(tmp_path):
    from egad.run_config import build_config

    size = X.TOY_QUICK
    answers = tmp_path / "answers.jsonl"
    setup = _setup(tmp_path, answers)
    gkd = build_config(G.cell_config(setup, G.cell("gkd"), 1))
    assert gkd.train.on_policy == 0.5 and gkd.model.teacher_cache is None  # the teacher scores the samples online
    assert gkd.objective.divergence == "jsd" and gkd.objective.jsd_beta == 0.5 and gkd.train.seed == 1
    assert gkd.train.on_policy_max_new_tokens == size.max_len - size.max_prompt_len
    on_policy = build_config(G.cell_config(setup, G.cell("egad_on_policy"), 0))
    assert (
        on_policy.objective.curriculum_mode
        == build_config(G.cell_config(setup, G.cell("egad"), 0)).objective.curriculum_mode
    )
    assert on_policy.train.on_policy == 0.5 and on_policy.model.teacher_cache is None
    seqkd = build_config(G.cell_config(setup, G.cell("seqkd"), 0))
    assert seqkd.data.train == str(answers) and seqkd.train.on_policy == 0 and not seqkd.objective.uses_teacher
    kd = build_config(G.cell_config(setup, G.cell("kd"), 0))
    assert kd.model.teacher_cache == str(setup.cache) and kd.data.train == str(setup.dolly) and kd.train.on_policy == 0
    with pytest.raises(ValueError, match="teacher's answers"):
        G.cell_config(_setup(tmp_path), G.cell("seqkd"), 0)


def test_cells_expand_grids_and_names_once():
    assert G.expand_cells("real,student_data,kd") == G.REAL_CELLS + list(G.STUDENT_DATA)
    assert G.expand_cells("sft, seqkd") == ["sft", "seqkd"]
    assert set(G.expand_cells("student_data")) <= G.PRESETS_AND_DERIVED


def test_train_minutes_read_timing_or_the_run_files(tmp_path):
    import math
    import os

    run = tmp_path / "a" / "seed0"
    (run / "final").mkdir(parents=True)
    assert math.isnan(R.train_minutes(run))
    (run / "config.yaml").write_text("x")
    (run / "final" / "config.json").write_text("{}")
    os.utime(run / "config.yaml", (1000.0, 1000.0))
    os.utime(run / "final" / "config.json", (1000.0 + 90, 1000.0 + 90))
    assert R.train_minutes(run) == pytest.approx(1.5)
    (run / "timing.json").write_text(json.dumps({"train_min": 2.25, "eval_min": 7.0}))
    assert R.train_minutes(run) == 2.25
    row = R.Row("seqkd", "student data", [4.0, 4.2], [4.1, 4.3], {"dolly_test": [10.0, 12.0]}, [2.0, 3.0])
    lines = R.table([row])
    assert lines[0].endswith("| train min |") and lines[-1].endswith("| 2.5 ± 0.7 |")
    missing = R.Row("kd", "baseline", [4.0], [4.1], {"dolly_test": [10.0]}, [math.nan])
    assert R.table([missing])[-1].endswith("| — |")


@pytest.mark.slow
def test_student_data_cells_run_end_to_end(tmp_path, monkeypatch, dolly_path, egad_cache_dir):
    monkeypatch.setenv("EGAD_CACHE_DIR", str(egad_cache_dir))
    out = tmp_path / "study"
    argv = ["--quick", "--no-tune", "--cells", "kd,student_data", "--out", str(out),
            "--data", str(dolly_path.parent.parent)]  # fmt: skip
    driver.main(argv)
    answers = [json.loads(x) for x in (out / "teacher-answers.jsonl").read_text().splitlines()]
    asked = X.TOY_QUICK.student_steps * X.TOY_QUICK.batch  # the prompts the cells train on; empty answers left out
    assert asked / 2 < len(answers) <= asked and all(a["split"] == "train" and a["response"].strip() for a in answers)
    text = (out / "results.md").read_text()
    kd = out / "kd" / "seed0"
    assert (kd / "final" / "config.json").is_file() and not list(kd.glob("checkpoint-*"))  # resume state dropped
    for cell in G.STUDENT_DATA:
        assert f"| student data | `{cell}` |" in text
        assert json.loads((out / cell / "seed0" / "timing.json").read_text())["train_min"] > 0
    setup_events = [json.loads(x) for x in (out / "gkd" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert setup_events[0]["teacher_source"] == "OnlineTeacher"
    assert "| `egad_on_policy` - `gkd` |" in text and "generated once in" in text
