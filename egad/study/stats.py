"""Paired comparisons between cells, on the same test examples, and the 2^3 component main effects."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

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
    """a - b on Dolly test with the training seed in the unit of replication (`hierarchical_bootstrap`, seeds paired
    by index): ROUGE-L (higher is better) and token-mean response NLL (lower is better), each with its 95% interval
    and p-value."""
    sa, tokens = seed_example_nll(out / a, seeds)
    sb, tokens_b = seed_example_nll(out / b, seeds)
    if tokens != tokens_b:
        raise ValueError(f"{a} and {b} were scored on different test tokens; compare cells of one study only")
    per_token = [[x / max(t, 1) for x, t in zip(row, tokens, strict=True)] for row in sa]
    per_token_b = [[x / max(t, 1) for x, t in zip(row, tokens, strict=True)] for row in sb]
    rouge = hierarchical_bootstrap(seed_example_rouge(out / a, seeds), seed_example_rouge(out / b, seeds), n=n)
    nll = hierarchical_bootstrap(per_token, per_token_b, weights=tokens, n=n)
    return {"rouge_l": rouge, "test_nll": nll}
