"""The study machinery: paired tests, factorial effects, the results page, and --quick end to end (in 2 processes)."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction

import pytest
from conftest import REPO

from egad import experiment as X
from egad.config.methods import METHODS, paper_index
from egad.config.schema import ConfigError
from egad.study import comparisons as C
from egad.study import driver
from egad.study import grid as G
from egad.study import results as R
from egad.study.stats import (
    FACTORIAL,
    compare_seeds,
    hierarchical_bootstrap,
    holm,
    main_effects,
    main_effects_per_seed,
    seed_test,
    sign_flip_p,
    t_quantile,
)


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
    index = paper_index(["kd", "egad"])
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
    from egad.config.run_config import build_config

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
    from egad.config.run_config import build_config

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
    assert set(G.expand_cells("student_data")) <= set(METHODS)


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


# Synthetic per-seed differences: decimal strings, so the brute-force sign-flip count below is exact.
SYNTHETIC = [
    ["0.048", "0.162", "0.196"],  # all one sign, 3 seeds: the sign-flip test cannot go below 0.25
    ["-0.31", "0.05", "-0.12", "-0.40"],
    ["1.5", "-0.25", "0.75", "0.5", "1.0", "0.25"],  # 6 seeds, two differences tie in size
    ["0.01", "0.02", "0.03", "0.04", "0.05", "0.06", "0.07", "-0.01"],
    ["2.0", "-2.0", "1.0", "-1.0", "0.5"],
]


def _t_two_sided_by_quadrature(t: float, df: int) -> float:
    """P(|T| >= |t|) by numerical integration of the t density (mpmath), not through the incomplete beta."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    c = mp.gamma(mp.mpf(df + 1) / 2) / (mp.sqrt(df * mp.pi) * mp.gamma(mp.mpf(df) / 2))
    return float(2 * mp.quad(lambda x: c * (1 + x * x / df) ** (-mp.mpf(df + 1) / 2), [abs(t), mp.inf]))


def _sign_flip_by_enumeration(diffs: list[Fraction]) -> float:
    """Every one of the 2^n sign patterns, in exact rational arithmetic."""
    observed = abs(sum(diffs))
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    return hits / 2 ** len(diffs)


@pytest.mark.parametrize("diffs", SYNTHETIC)
def test_seed_test_p_values_match_independent_computations(diffs):
    mp = pytest.importorskip("mpmath")
    x = [float(d) for d in diffs]
    n = len(x)
    res = seed_test(x)
    mean = sum(x) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    assert res["mean"] == pytest.approx(mean, abs=1e-15) and res["t"] == pytest.approx(t, rel=1e-12)
    assert res["p_t"] == pytest.approx(_t_two_sided_by_quadrature(t, n - 1), rel=1e-8, abs=1e-14)
    assert res["p_sign"] == _sign_flip_by_enumeration([Fraction(d) for d in diffs])
    # The interval's half-width is the 0.975 quantile (found by root-finding on the integrated density) times se.
    q = float(mp.findroot(lambda u: _t_two_sided_by_quadrature(float(u), n - 1) - 0.05, 2.0))
    assert res["hi"] - mean == pytest.approx(q * sd / math.sqrt(n), rel=1e-8)
    assert res["lo"] == pytest.approx(2 * mean - res["hi"], rel=1e-12)


def test_seed_test_reference_values_and_edges():
    # Student's t 0.975 quantiles, from published tables: the 95% half-width over se.
    for df, q in [(1, 12.706204736), (2, 4.302652730), (5, 2.570581836), (19, 2.093024054)]:
        res = seed_test([1.0, 3.0] if df == 1 else [float(i) for i in range(df + 1)])
        assert (res["hi"] - res["mean"]) / (res["sd"] / math.sqrt(df + 1)) == pytest.approx(q, rel=1e-9)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272456, rel=1e-9)
    assert math.isnan(seed_test([float(i) for i in range(25)])["p_sign"])  # too many seeds to enumerate
    assert sign_flip_p([0.1, 0.2, 0.3]) == 0.25 and sign_flip_p([0.1] * 6) == 2 / 64  # the floors: 2 / 2^n
    one = seed_test([0.4])
    assert one["p_sign"] == 1.0 and math.isnan(one["p_t"]) and math.isnan(one["lo"])
    same = seed_test([0.2, 0.2, 0.2])
    assert same["p_t"] == 0.0 and same["p_sign"] == 0.25
    assert seed_test([0.0, 0.0])["p_t"] == 1.0
    for bad in (math.nan, math.inf, -math.inf):  # a diverged seed must not read as a significant difference
        res = seed_test([0.3, bad, 0.2, 0.4])
        assert math.isnan(res["p_sign"]) and math.isnan(res["p_t"]) and math.isnan(res["lo"])


def test_seed_level_tests_against_the_two_level_bootstrap():
    """The issue's case: three seeds whose differences share a sign. The two-level bootstrap calls it certain; the
    seed-level tests say what three seeds can show."""
    rng = random.Random(1)
    base = [[rng.gauss(0, 1) for _ in range(300)] for _ in range(3)]
    shifted = [[x + d for x in row] for row, d in zip(base, [0.05, 0.5, 0.9], strict=True)]
    assert hierarchical_bootstrap(shifted, base, n=2000)["p"] < 0.01
    per_seed = [sum(a) / 300 - sum(b) / 300 for a, b in zip(shifted, base, strict=True)]
    res = seed_test(per_seed)
    assert res["p_sign"] == 0.25 and 0.05 < res["p_t"] < 0.5 and res["lo"] < 0 < res["hi"]


def _holm_by_step_down(ps: list[float]) -> list[float]:
    """The adjusted p of H_i is the smallest alpha at which Holm's step-down procedure rejects it: try every alpha
    at which a decision can change."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [1.0] * m
    for alpha in sorted({min(1.0, (m - k) * ps[order[k]]) for k in range(m)}, reverse=True):
        rejected = set()
        for k, i in enumerate(order):
            if ps[i] * (m - k) > alpha:
                break
            rejected.add(i)
        for i in rejected:
            out[i] = alpha
    return out


def test_holm_matches_the_step_down_definition():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = random.Random(3)
    for m in (1, 2, 3, 5, 8):
        ps = [rng.choice([rng.random(), rng.random() / 50, 0.25]) for _ in range(m)]
        assert holm(ps) == pytest.approx(_holm_by_step_down(ps), abs=1e-15), ps
    got = holm([0.02, math.nan, 0.04])  # a test that could not run is left out of the family
    assert got[0] == pytest.approx(0.04) and math.isnan(got[1]) and got[2] == pytest.approx(0.04)


def test_main_effects_per_seed_recover_each_seeds_effects():
    effects = [{0: -0.3, 1: 0.05, 2: 0.0}, {0: -0.1, 1: 0.15, 2: -0.2}, {0: -0.2, 1: 0.1, 2: 0.1}]
    values = {
        p: [5.0 + s + sum(e[i] for i in range(3) if k[i]) for s, e in enumerate(effects)] for k, p in FACTORIAL.items()
    }
    got = main_effects_per_seed(values)
    for j, comp in enumerate(got):
        assert got[comp] == pytest.approx([e[j] for e in effects], abs=1e-12)
    assert main_effects_per_seed({k: v for k, v in values.items() if k != "kd"}) is None


def _rows(n_seeds: int = 3) -> list:
    rng = random.Random(5)
    rows = []
    for cell, group, shift in [
        ("kd", "baseline", 0.0),
        ("feat_kd_all", "baseline", -0.1),
        ("sft", "baseline", 0.3),
        ("egad_dev_tuned", "dev-tuned", -0.2),
    ] + [(p, "component", -0.05 * sum(k)) for k, p in FACTORIAL.items() if p != "kd"]:
        dev = [6.0 + shift + rng.gauss(0, 0.05) for _ in range(n_seeds)]
        rows.append(
            R.Row(cell, group, dev, [d + 0.02 for d in dev], {"dolly_test": [10 - d for d in dev]}, [1.0] * n_seeds)
        )
    return rows


def test_results_page_tests_with_the_seed_as_the_unit():
    rows = _rows()
    by = {r.cell: r for r in rows}
    boot = {"test_nll": {"lo": -0.5, "hi": -0.1}, "rouge_l": {"lo": 0.1, "hi": 0.9}}
    lines = C.comparisons(rows, lambda a, b: boot)
    text = "\n".join(lines)
    assert "`feat_kd_all`" in text.split("Best baseline")[1].split(".")[0]  # best by dev NLL
    exploratory = lines.index("**Exploratory comparisons** (uncorrected)")
    primary = [ln for ln in lines[:exploratory] if ln.startswith("| `")]
    assert len(primary) == 3 * 2  # egad - kd and egad - feat_kd_all: test NLL, Dolly ROUGE-L (Holm) and dev NLL
    family = []
    for b in ("kd", "feat_kd_all"):
        for metric in ("test_nll", "rouge:dolly_test"):
            va, vb = C.seed_values(by["egad"], metric), C.seed_values(by[b], metric)
            family.append(seed_test([x - y for x, y in zip(va, vb, strict=True)]))
    adjusted = holm([r["p_t"] for r in family])
    test_nll_kd = next(ln for ln in primary if "`kd`" in ln and "| test NLL |" in ln).split(" | ")
    assert test_nll_kd[4] == C.fmt_p(family[0]["p_t"]) and test_nll_kd[5] == C.fmt_p(adjusted[0])
    assert test_nll_kd[6] == C.fmt_p(family[0]["p_sign"]) and test_nll_kd[6] in ("0.250", "0.500", "0.750", "1.000")
    assert test_nll_kd[7] == C.fmt_p(holm([r["p_sign"] for r in family])[0])
    assert test_nll_kd[8] == "[-0.500, -0.100] |"  # the secondary column, from compare_fn
    assert all(len(ln.split(" | ")) == 7 for ln in lines[exploratory:] if ln.startswith("| `"))  # no Holm columns
    assert "no p-value is drawn from it" in text and "2^3 = 8 sign patterns" in text
    # A pre-registered family replaces the default one.
    lines = C.comparisons(rows, None, primary=[("egad", "sft")])
    exploratory = lines.index("**Exploratory comparisons** (uncorrected)")
    assert all("`egad` - `sft`" in ln for ln in lines[:exploratory] if ln.startswith("| `"))
    assert any(ln.startswith("| `egad` - `kd` |") for ln in lines[exploratory:])
    eff = C.effects(rows)
    assert sum(ln.startswith("| C3 dual branch |") for ln in eff) == 3 and "sign-flip p" in eff[2]


def test_primary_comparisons_parse_and_name_bad_cells():
    cells = ["kd", "egad", "feat_kd_all"]
    assert driver.parse_primary("egad-kd, egad-feat_kd_all", cells) == [("egad", "kd"), ("egad", "feat_kd_all")]
    assert driver.parse_primary(None, cells) is None
    with pytest.raises(ConfigError, match="rkl"):
        driver.parse_primary("egad-rkl", cells)
    with pytest.raises(ConfigError, match="a-b"):
        driver.parse_primary("egad", cells)


def test_builtin_scales_are_package_yaml(tmp_path):
    names = sorted(p.stem for p in X.SCALE_DIR.glob("*.yaml"))
    assert names == sorted(X.SCALES) and {"toy", "toy_quick", "smollm2"} <= set(names)
    assert X.SMOLLM2.teacher == "smollm2-135m-instruct" and X.SMOLLM2.run["train.mixed_precision"] == "bf16"
    assert X.TOY.seeds == (10, 20, 30, 40, 50) and X.TOY.student["num_hidden_layers"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text((X.SCALE_DIR / "toy.yaml").read_text() + "stduent_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stduent_steps'\]"):
        X.read_scale(bad)


def test_a_run_is_done_when_its_dolly_test_is_scored(tmp_path):
    """The evaluation's summary.json is written after the other sets, before Dolly test, which is scored last: a run
    cut off while scoring Dolly test must not be skipped on resume."""
    from types import SimpleNamespace

    setup, cell = SimpleNamespace(out=tmp_path), G.cell("kd")
    run = G.run_dir(setup, cell, 0)
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "eval" / "sinst").mkdir(parents=True)
    (run / "eval" / "summary.json").write_text("{}")
    assert cell.test_eval and not G.is_done(setup, cell, 0)
    (run / "eval" / "dolly_test").mkdir()
    (run / "eval" / "dolly_test" / "summary.json").write_text("{}")
    assert G.is_done(setup, cell, 0)
