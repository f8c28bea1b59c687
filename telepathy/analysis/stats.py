"""The statistics used on runs: seed-level CIs, Holm, McNemar, paired bootstrap and permutation tests."""

import math

import numpy as np
from scipy import stats


def mean_ci(values, confidence=0.95):
    """Mean and t-based CI across independent observations (seeds).

    With fewer than 2 values the CI and std are NaN: one seed says nothing
    about seed variance.
    """
    x = np.asarray(values, dtype=float)
    if np.isnan(x).any():
        raise ValueError("mean_ci got NaN values; missing metrics must be handled before")
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan,
           "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "ci_half": math.nan}
    if n >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * stats.sem(x))
        out.update(std=float(x.std(ddof=1)), ci_half=half,
                   ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def holm(pvalues):
    """Holm step-down adjusted p-values, in the input order; NaN stays NaN and is not counted."""
    p = np.asarray(pvalues, dtype=float)
    adj = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def mcnemar(b, c):
    """Exact McNemar p-value from the discordant counts.

    b: pairs where the method is right and the baseline wrong; c: the reverse.
    """
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5).pvalue)


def paired_bootstrap(diffs_by_stratum, n_boot=10_000, confidence=0.95, seed=0):
    """Percentile CI of the mean paired difference, resampling items within each stratum.

    diffs_by_stratum: list of 1-d arrays, one per seed, of per-item
    differences (method minus baseline). Each resample keeps each stratum's
    size, so seeds are weighted as in the point estimate.
    """
    rng = np.random.default_rng(seed)
    diffs = [np.asarray(d, dtype=float) for d in diffs_by_stratum if len(d)]
    total = sum(len(d) for d in diffs)
    if total == 0:
        return math.nan, math.nan, math.nan
    estimate = float(sum(d.sum() for d in diffs) / total)
    sums = np.zeros(n_boot)
    for d in diffs:
        for start in range(0, n_boot, 1000):  # bounded memory for large test sets
            stop = min(n_boot, start + 1000)
            idx = rng.integers(0, len(d), size=(stop - start, len(d)))
            sums[start:stop] += d[idx].sum(axis=1)
    boot = sums / total
    alpha = 1 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return estimate, float(lo), float(hi)


def paired_permutation_p(x, y, n_resamples=9_999, seed=0):
    """Two-sided paired permutation test (sign flips) of mean(x - y), via scipy."""
    res = stats.permutation_test(
        (np.asarray(x, float), np.asarray(y, float)),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples", n_resamples=n_resamples, vectorized=True,
        alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.pvalue)
