"""The statistics used on runs: seed-level CIs, Holm, McNemar, sign test, cluster bootstrap and permutation tests."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> dict[str, float]:
    """Mean and t-based CI across independent observations (seeds).

    With fewer than 2 values the CI and std are NaN: one seed says nothing
    about seed variance.
    """
    x = np.asarray(values, dtype=float)
    if np.isnan(x).any():
        raise ValueError("mean_ci got NaN values; missing metrics must be handled before")
    n = len(x)
    out = {
        "n": n,
        "mean": float(x.mean()) if n else math.nan,
        "std": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "ci_half": math.nan,
    }
    if n >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * stats.sem(x))
        out.update(std=float(x.std(ddof=1)), ci_half=half, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values (statsmodels), in the input order; NaN stays NaN and is not counted.

    statsmodels counts a NaN in the family size m, so only the finite p-values are passed to it.
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    adj = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        adj[ok] = multipletests(p[ok], method="holm")[1]
    return adj


def mcnemar(b: int, c: int) -> float:
    """Exact McNemar p-value from the discordant counts (statsmodels).

    b: pairs where the method is right and the baseline wrong; c: the reverse.
    """
    from statsmodels.stats.contingency_tables import mcnemar as _mcnemar

    if b + c == 0:
        return 1.0
    return float(_mcnemar([[0, int(b)], [int(c), 0]], exact=True).pvalue)


def sign_test_p(diffs: ArrayLike) -> float:
    """Two-sided exact sign test of per-item differences (statsmodels); ties are dropped.

    On seed-averaged per-item correctness this is the test of the paired comparison: with
    one seed a side it is exactly McNemar's test (the signs are the discordant pairs).
    """
    from statsmodels.stats.descriptivestats import sign_test

    d = np.asarray(diffs, dtype=float)
    if not (d != 0).any():
        return 1.0
    return float(sign_test(d)[1])


def item_means(by_seed: ArrayLike) -> np.ndarray:
    """Per-item mean over seeds of a [seeds, items] array (a 1-d array is one seed)."""
    d = np.asarray(by_seed, dtype=float)
    return d if d.ndim == 1 else d.mean(axis=0)


def paired_bootstrap(
    diffs_by_seed: ArrayLike, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile CI of the mean paired difference by a cluster bootstrap over items.

    diffs_by_seed: one 1-d array per seed of per-item differences (method minus
    baseline), all aligned on the same test items ([seeds, items]; a 1-d array is
    one seed). Items are the
    unit of resampling: one resample of item indices is applied to every seed, because
    the same item is hard or easy in every seed; resampling within each seed
    independently treats seeds x items as independent and gives a too narrow CI.
    Resampling the per-item seed means is the same thing, and uses less memory.
    """
    rng = np.random.default_rng(seed)
    d = item_means(diffs_by_seed)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan
    boot = np.empty(n_boot)
    step = max(1, 4_000_000 // n)  # bounded memory for large test sets
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        boot[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(lo), float(hi)


def paired_permutation_p(x: ArrayLike, y: ArrayLike, n_resamples: int = 9_999, seed: int = 0) -> float:
    """Two-sided paired permutation test (sign flips) of mean(x - y), via scipy."""
    res = stats.permutation_test(
        (np.asarray(x, float), np.asarray(y, float)),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples",
        n_resamples=n_resamples,
        vectorized=True,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(res.pvalue)
