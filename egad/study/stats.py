"""Paired comparisons between cells with the training seed as the unit, and the 2^3 component main effects.

The primary tests take one number per training seed: the difference between two cells trained with that seed (each
the mean over the same test examples). With n seeds they are a sample of n: `seed_test` gives their mean, a 95%
t-interval, the two-sided paired t-test p and the exact sign-flip p over all 2^n sign patterns (which cannot go below
2 / 2^n: 0.25 with 3 seeds), and `holm` corrects a family of p-values. The two-level bootstrap over seeds and then
test examples (`hierarchical_bootstrap`) is kept as a secondary reading of the example-level noise: with 3 seeds it
returns p = 1/n whenever the three seed differences share a sign, so no p-value is drawn from it on the results page.

The t distribution is scipy's; the tests check its p-values and quantiles against a numerical integration of the t
density and against published tables.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import scipy.stats

# The 2^3 factorial of spec section 9: (C1 curriculum, C2 adaptive tau, C3 dual branch) -> preset.
FACTORIAL = {
    (0, 0, 0): "kd",
    (1, 0, 0): "egad_c1",
    (0, 1, 0): "egad_c2",
    (0, 0, 1): "egad_c3",
    (1, 1, 0): "egad_no_c3",
    (1, 0, 1): "egad_no_c2",
    (0, 1, 1): "egad_no_c1",
    (1, 1, 1): "egad",
}


def _seed_dirs(cell_dir: Path, seeds: list[int]) -> list[Path]:
    return [cell_dir / f"seed{s}" / "eval" / "dolly_test" for s in seeds]


def seed_example_rouge(cell_dir: Path, seeds: list[int]) -> list[list[float]]:
    """ROUGE-L per training seed (rows) and test example (columns)."""
    runs = []
    for d in _seed_dirs(cell_dir, seeds):
        gen = next(d.glob("generations-*.jsonl"))
        runs.append([json.loads(x)["rouge_l"] for x in gen.read_text().splitlines()])
    return runs


def seed_example_nll(cell_dir: Path, seeds: list[int]) -> tuple[list[list[float]], list[int]]:
    """Response-NLL sums per training seed and test example, and the token counts per example (the same for every
    cell: same tokenizer and references)."""
    sums, tokens = [], None
    for d in _seed_dirs(cell_dir, seeds):
        per = json.loads((d / "nll-per-example.json").read_text())
        sums.append(per["nll_sum"])
        if tokens is not None and per["tokens"] != tokens:
            raise ValueError(f"{d}: token counts differ between seeds; the cells were not scored on the same tokens")
        tokens = per["tokens"]
    return sums, tokens or []


def main_effects(values: dict[str, float]) -> dict[str, float] | None:
    """Mean metric with a component minus mean without it, over the 8 factorial cells (None if any is missing)."""
    if not all(p in values for p in FACTORIAL.values()):
        return None
    effects = {}
    for i, name in enumerate(["C1 curriculum", "C2 adaptive tau", "C3 dual branch"]):
        on = [values[p] for k, p in FACTORIAL.items() if k[i]]
        off = [values[p] for k, p in FACTORIAL.items() if not k[i]]
        effects[name] = statistics.fmean(on) - statistics.fmean(off)
    return effects


def main_effects_per_seed(values: dict[str, list[float]]) -> dict[str, list[float]] | None:
    """`main_effects` within each training seed (cells paired by seed index): component -> one effect per seed, the
    sample that `seed_test` takes. None if a factorial cell is missing."""
    if not all(p in values for p in FACTORIAL.values()):
        return None
    n = {len(values[p]) for p in FACTORIAL.values()}
    if len(n) != 1:
        raise ValueError(f"the factorial cells have different numbers of seeds: {sorted(n)}")
    per_seed = [main_effects({p: values[p][s] for p in FACTORIAL.values()}) for s in range(n.pop())]
    return {comp: [e[comp] for e in per_seed] for comp in per_seed[0]} if per_seed else None


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with `df` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    return float(2.0 * scipy.stats.t.sf(abs(t), df))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (0.5 < q < 1)."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must be in (0.5, 1), got {q}")
    return float(scipy.stats.t.ppf(q, df))


MAX_SIGN_FLIP_SEEDS = 20  # 2^20 patterns, enumerated in blocks


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of mean zero: the share of all 2^n sign patterns whose
    |sum of signed differences| is at least the observed one. Under no difference each seed's difference is as likely
    to have either sign; with n seeds the smallest possible p is 2 / 2^n. A nan or infinite difference (a seed that
    diverged or was not evaluated) gives nan, as the t-test does: no comparison counts as at least as extreme."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or d.size > MAX_SIGN_FLIP_SEEDS:
        raise ValueError(f"need 1 to {MAX_SIGN_FLIP_SEEDS} per-seed differences, got shape {d.shape}")
    if not np.isfinite(d).all():
        return math.nan
    observed = abs(d.sum()) - 1e-12 * np.abs(d).sum()  # ties in exact arithmetic count as at least as extreme
    bits = np.arange(d.size)
    hits = 0
    for start in range(0, 2**d.size, 2**16):
        patterns = np.arange(start, min(start + 2**16, 2**d.size))[:, None]
        signs = 1.0 - 2.0 * ((patterns >> bits) & 1)  # (block, n): every pattern once over the blocks
        hits += int((np.abs(signs @ d) >= observed).sum())
    return hits / 2**d.size


def seed_test(diffs: list[float], level: float = 0.95) -> dict:
    """The training seed as the unit: `diffs` holds one a - b difference per seed (each a mean over test examples).
    Returns n, the differences, their mean and sd, the `level` t-interval (lo, hi: nan with one seed), the paired
    t statistic, its two-sided p (`p_t`, nan with one seed; 0 when every difference is the same non-zero number) and
    the exact sign-flip p (`p_sign`; nan past MAX_SIGN_FLIP_SEEDS seeds). A nan or infinite difference makes every
    statistic but the mean nan: a seed that diverged is not evidence either way."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        raise ValueError("no per-seed differences")
    mean = statistics.fmean(d)
    out = {"n": n, "diffs": d, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan, "t": math.nan}
    out.update(p_t=math.nan, p_sign=sign_flip_p(d) if n <= MAX_SIGN_FLIP_SEEDS else math.nan)
    if n > 1 and all(math.isfinite(x) for x in d):
        sd = statistics.stdev(d)
        se = sd / math.sqrt(n)
        half = t_quantile(0.5 + level / 2.0, n - 1) * se
        t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
        out.update(sd=sd, lo=mean - half, hi=mean + half, t=t, p_t=t_sf2(t, n - 1))
    return out


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in the input order: the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). A nan p (a test that could not be run) stays nan and does not count
    in m."""
    idx = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out


def hierarchical_bootstrap(
    a: list[list[float]],
    b: list[list[float]],
    *,
    weights: list[float] | None = None,
    n: int = 10000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired difference a - b whose unit of replication includes the training seed.

    a[s][e], b[s][e]: the value of training seed s (paired: same seed for both cells) on test example e (paired: same
    examples). Each of the `n` resamples draws training seeds with replacement, then, within each drawn seed, test
    examples with replacement (a two-level bootstrap, as for nested designs), and takes the mean difference, weighted
    by `weights` per example when given (token counts: sums of NLL become a token-mean difference). So the interval
    widens with the seed-to-seed spread, which a bootstrap over examples of seed means would hide.

    Returns mean (the point estimate over all seeds and examples), lo / hi (the 95% percentile interval) and p (the
    two-sided bootstrap p-value of no difference, at least 1/n)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (S, E)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"need per-seed, per-example values of equal shape, got {np.shape(a)} and {np.shape(b)}")
    s_count, e_count = d.shape
    w = np.ones(e_count) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (e_count,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {e_count} non-negative numbers with a positive sum")
    mean = float((d * w).sum() / (w.sum() * s_count))
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    for start in range(0, n, 500):  # blocks bound the (block, S, E) index array
        m = min(500, n - start)
        seeds = rng.integers(0, s_count, size=(m, s_count))
        examples = rng.integers(0, e_count, size=(m, s_count, e_count))
        vals = d[seeds[:, :, None], examples] * w[examples]
        stats[start : start + m] = vals.sum(axis=(1, 2)) / w[examples].sum(axis=(1, 2))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    p = 2 * min((stats <= 0).mean(), (stats >= 0).mean())
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "p": float(max(min(p, 1.0), 1.0 / n))}


def compare_seeds(out: Path, a: str, b: str, seeds: list[int], n: int = 10000) -> dict[str, dict[str, float]]:
    """The secondary, example-level reading of a - b on Dolly test (`hierarchical_bootstrap`, seeds paired by index):
    ROUGE-L (higher is better) and token-mean response NLL (lower is better), each with its 95% interval. The primary
    test is `seed_test` on the per-seed differences."""
    sa, tokens = seed_example_nll(out / a, seeds)
    sb, tokens_b = seed_example_nll(out / b, seeds)
    if tokens != tokens_b:
        raise ValueError(f"{a} and {b} were scored on different test tokens; compare cells of one study only")
    per_token = [[x / max(t, 1) for x, t in zip(row, tokens, strict=True)] for row in sa]
    per_token_b = [[x / max(t, 1) for x, t in zip(row, tokens, strict=True)] for row in sb]
    rouge = hierarchical_bootstrap(seed_example_rouge(out / a, seeds), seed_example_rouge(out / b, seeds), n=n)
    nll = hierarchical_bootstrap(per_token, per_token_b, weights=tokens, n=n)
    return {"rouge_l": rouge, "test_nll": nll}
