"""The study's comparisons with the training seed as the unit: one cell's per-seed numbers (`Row`), the paired tests
between cells with Holm over the primary family, the factorial main effects, and how their numbers are printed."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from egad.experiment import OTHER_SETS
from egad.study.stats import holm, main_effects_per_seed, seed_test


@dataclass
class Row:
    cell: str
    group: str
    dev_nll: list[float]
    test_nll: list[float]
    rouge: dict[str, list[float]]  # eval set -> per training seed
    train_min: list[float]  # training wall minutes per seed (nan: not recorded)

    def mean(self, metric: str) -> float:
        vals = self.rouge["dolly_test"] if metric == "rouge" else getattr(self, metric)
        return statistics.fmean(vals)


METRICS = {"test_nll": ("test NLL", 3), "rouge:dolly_test": ("Dolly ROUGE-L", 2), "dev_nll": ("dev NLL", 3)}
PRIMARY_METRICS = ("test_nll", "rouge:dolly_test")


def seed_values(row: Row, metric: str) -> list[float] | None:
    """One value per training seed (seed order), or None when the row lacks the metric."""
    if metric.startswith("rouge:"):
        return row.rouge.get(metric.split(":", 1)[1])
    return getattr(row, metric)


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "—"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def signed(x: float, digits: int) -> str:
    return "—" if math.isnan(x) else f"{x:+.{digits}f}"


def interval(res: dict, digits: int) -> str:
    ci = "" if math.isnan(res["lo"]) else f" [{res['lo']:+.{digits}f}, {res['hi']:+.{digits}f}]"
    return f"{res['mean']:+.{digits}f}{ci}"


def comparison_pairs(
    rows: list[Row], primary: list[tuple[str, str]] | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str | None]:
    """(primary pairs, other pairs, the best baseline by mean dev NLL). Without `primary` the primary comparisons
    are EGAD against KD and against the best baseline (chosen on dev, never on test); the others are the dev-tuned
    EGAD against the same two and the student-data pairs."""
    by = {r.cell: r for r in rows}
    baselines = [r for r in rows if r.group == "baseline"]
    best = min(baselines, key=lambda r: r.mean("dev_nll")).cell if baselines else None
    default = [("egad", b) for b in dict.fromkeys(("kd", best))]
    others = [(a, b) for a in ("egad", "egad_dev_tuned") for b in dict.fromkeys(("kd", best))]
    others += [("egad_on_policy", "gkd"), ("egad_on_policy", "egad")]
    first = [tuple(p) for p in (default if primary is None else primary)]
    first = [p for p in dict.fromkeys(first) if p[0] in by and p[1] in by]
    rest = [p for p in dict.fromkeys(others) if p not in first and p[0] in by and p[1] in by]
    return first, rest, best


def comparisons(rows: list[Row], compare_fn=None, primary: list[tuple[str, str]] | None = None) -> list[str]:
    """The paired tests with the training seed as the unit (`seed_test`), Holm over the primary family, and the
    two-level bootstrap interval from `compare_fn(a, b)` (`compare_seeds`) as a secondary column."""
    by = {r.cell: r for r in rows}
    first, rest, best = comparison_pairs(rows, primary)
    if not first and not rest:
        return []
    sets = [s for s in ["dolly_test"] + OTHER_SETS if all(s in r.rouge for r in rows)]
    metrics = dict(METRICS) | {f"rouge:{s}": (f"{s} ROUGE-L", 2) for s in sets[1:]}
    tests: dict[tuple[tuple[str, str], str], dict] = {}
    for pair in first + rest:
        for m in metrics:
            va, vb = seed_values(by[pair[0]], m), seed_values(by[pair[1]], m)
            if va is not None and vb is not None:
                tests[pair, m] = seed_test([x - y for x, y in zip(va, vb, strict=True)])
    family = [k for k in tests if k[0] in first and k[1] in PRIMARY_METRICS]
    for key, h_t, h_s in zip(
        family, holm([tests[k]["p_t"] for k in family]), holm([tests[k]["p_sign"] for k in family]), strict=True
    ):
        tests[key].update(holm_t=h_t, holm_sign=h_s)
    n = len(rows[0].dev_nll)
    names = ", ".join(f"`{a}` - `{b}`" for a, b in first) or "none"
    lines = [
        f"Best baseline by mean dev NLL (chosen on dev, not test): `{best}`. Differences are a - b; for NLL negative "
        "favours a, for ROUGE-L positive does. **The unit is the training seed:** each of the "
        f"{n} training seeds gives one difference, a's mean over the test examples minus b's (test NLL: the token "
        "mean), the two cells paired by seed. Over these per-seed differences: their mean with a 95% t-interval, the "
        "two-sided paired t-test p, and the exact sign-flip p over all "
        f"2^{n} = {2**n} sign patterns (its smallest possible value is {2 / 2**n:.4g}).",
        "",
        f"**Primary comparisons:** {names}, each on test NLL and Dolly ROUGE-L; Holm's correction runs over these "
        f"{len(family)} tests, for the t-test and the sign-flip p separately (dev NLL is shown, not in the family). "
        "The exploratory comparisons are uncorrected.",
        "",
        "**Secondary, example-level:** the 95% interval of a two-level bootstrap (training seeds, then test examples "
        "within each; 10,000 resamples). It shows the example-to-example noise; with few seeds it understates the "
        "seed-to-seed uncertainty, so no p-value is drawn from it.",
    ]
    head = "| a - b | metric | per-seed differences | mean [95% t-interval] | t-test p | "
    tables = [
        ("**Primary comparisons**", first, head + "Holm | sign-flip p | Holm | bootstrap 95% (secondary) |", 9),
        ("**Exploratory comparisons** (uncorrected)", rest, head + "sign-flip p | bootstrap 95% (secondary) |", 7),
    ]
    for title, pairs, header, width in tables:
        if not pairs:
            continue
        lines += ["", title, "", header, "|" + "---|" * width]
        for pair in pairs:
            boot = compare_fn(*pair) if compare_fn is not None else {}
            for m, (label, digits) in metrics.items():
                if (pair, m) not in tests:
                    continue
                res = tests[pair, m]
                b = boot.get({"test_nll": "test_nll", "rouge:dolly_test": "rouge_l"}.get(m, ""), None)
                ci = f"[{b['lo']:+.{digits}f}, {b['hi']:+.{digits}f}]" if b else "—"
                per = ", ".join(signed(x, digits) for x in res["diffs"])
                cells = [f"`{pair[0]}` - `{pair[1]}`", label, per, interval(res, digits), fmt_p(res["p_t"])]
                if pair in first:
                    cells.append(fmt_p(res.get("holm_t", math.nan)))
                cells.append(fmt_p(res["p_sign"]))
                if pair in first:
                    cells.append(fmt_p(res.get("holm_sign", math.nan)))
                lines.append("| " + " | ".join([*cells, ci]) + " |")
    return lines


def effects(rows: list[Row]) -> list[str]:
    """The 2^3 main effects, each within every training seed and then tested over the seeds (`seed_test`)."""
    metrics = ("dev_nll", "test_nll", "rouge:dolly_test")
    per_metric = {}
    for m in metrics:
        values = {r.cell: seed_values(r, m) for r in rows if seed_values(r, m) is not None}
        per_metric[m] = main_effects_per_seed(values)
    if any(v is None for v in per_metric.values()):
        return []
    lines = [
        "Mean over the four factorial cells with the component minus the four without it (KD is the all-off cell), "
        "computed within each training seed; the interval and p-values treat the per-seed effects as the sample, as "
        "in the paired tests (uncorrected: the factorial is not in the primary family).",
        "",
        "| component | metric | per-seed effects | mean [95% t-interval] | t-test p | sign-flip p |",
        "|---|---|---|---|---|---|",
    ]
    for comp in per_metric["dev_nll"]:
        for m in metrics:
            label, digits = METRICS[m]
            res = seed_test(per_metric[m][comp])
            per = ", ".join(signed(x, digits) for x in res["diffs"])
            lines.append(
                f"| {comp} | {label} | {per} | {interval(res, digits)} | {fmt_p(res['p_t'])} | {fmt_p(res['p_sign'])} |"
            )
    return lines
