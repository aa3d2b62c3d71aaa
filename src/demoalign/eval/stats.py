"""Statistics of reports: mean ± std and the paired t-test over seeds, and the percentile
bootstrap interval of a mean over items."""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy.stats import t as student_t


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_t_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sided paired t-test of mean(a − b) = 0: (t, p). Pairs are matched by position (seed).

    Identical pairs give (0, 1); differences with zero spread but non-zero mean give (±inf, 0).
    A spread at the level of float rounding (identical differences computed from different sums)
    counts as zero spread, rather than yielding a p-value like 1e-29 from rounding noise.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired t-test needs two equal-length samples of at least 2")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_std(diffs)
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(len(diffs)))
    return t, float(2 * student_t.sf(abs(t), df=len(diffs) - 1))


def verdict(a: list[float], b: list[float], alpha: float = 0.05) -> tuple[str, float]:
    """'yes' (a > b, p < alpha), 'no' (a ≤ b on average), or 'not significant'; with the p-value."""
    _, p = paired_t_test(a, b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if diff > 0 and p < alpha:
        return "yes", p
    if diff <= 0:
        return "no", p
    return "not significant", p


def bootstrap_interval(
    values: list[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (resampling items with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        means.append(x[rng.integers(0, x.size, size=(rows, x.size))].mean(axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1 - tail])
    return float(low), float(high)


def summarize(
    values: list[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """{value: mean, low, high: bootstrap interval, n}."""
    low, high = bootstrap_interval(values, n_resamples, seed, confidence)
    return {"value": sum(values) / len(values), "low": low, "high": high, "n": len(values)}


def paired_deltas(values: list[float], baseline: list[float]) -> list[float]:
    """Per-item differences of two models scored on the SAME items, in the same order: their
    bootstrap is the paired bootstrap (an item's two values are resampled together)."""
    if len(values) != len(baseline):
        raise ValueError(
            f"paired comparison needs the same items: {len(values)} values against "
            f"{len(baseline)} of the baseline"
        )
    return [a - b for a, b in zip(values, baseline)]


def paired_t_interval(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """Mean of (a − b) over matched pairs (seeds) with its Student-t interval: what the paired
    t-test tests, as a size. With zero spread the interval is the point itself."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired interval needs two equal-length samples of at least 2")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_std(diffs)
    half = student_t.ppf((1 + confidence) / 2, df=len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"difference": mean, "low": mean - half, "high": mean + half, "n": len(diffs)}
