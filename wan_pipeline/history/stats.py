"""The rank statistics `compare` judges on: one-sided Mann-Whitney U tests and confidence bounds on a ratio."""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Iterable

import numpy as np


_EXACT_MAX_N = 60  # C(60, 30) < 2**63: exact integer counts up to here


@functools.lru_cache(maxsize=256)
def u_null_counts(m: int, n: int) -> np.ndarray:
    """Counts of U = 0..m*n over all C(m+n, m) equally likely orderings (no ties): the coefficients of the
    Gaussian binomial [m+n choose m]_q, built as prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i)."""
    if m > n:
        m, n = n, m
    size = m * n + 1
    c = np.zeros(size, dtype=np.int64)
    c[0] = 1
    for i in range(1, m + 1):
        shift = n + i
        if shift < size:
            c[shift:] -= c[: size - shift].copy()
        for r in range(i):  # divide by (1 - q^i): running sums with stride i
            c[r::i] = np.cumsum(c[r::i])
    c.setflags(write=False)  # cached: shared by every caller
    return c


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass
class RankTest:
    p_slower: float  # P(U >= u) under no change: small when y (current) is slower
    p_faster: float
    method: str
    min_p: float  # the smallest p-value these sample sizes can give
    u: float
    counts: np.ndarray | None  # exact null distribution, when used
    sigma: float | None  # normal approximation's standard deviation, when used


def mann_whitney(x: Iterable[float], y: Iterable[float]) -> RankTest:
    """One-sided Mann-Whitney U tests of y vs x (scipy.stats.mannwhitneyu): exact without ties up to 60 values in
    all, else normal with tie and continuity correction. Also the smallest p these sizes can give, and the null
    distribution (exact) or its standard deviation (normal) that the ratio bounds are inverted from."""
    from scipy.stats import mannwhitneyu

    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    m, n = len(x), len(y)
    _, tie_counts = np.unique(np.concatenate([x, y]), return_counts=True)
    if not np.any(tie_counts > 1) and m + n <= _EXACT_MAX_N:
        slower = mannwhitneyu(y, x, alternative="greater", method="exact")
        faster = mannwhitneyu(y, x, alternative="less", method="exact")
        return RankTest(float(slower.pvalue), float(faster.pvalue), "exact", 1.0 / math.comb(m + n, m),
                        float(slower.statistic), u_null_counts(m, n), None)
    big_n = m + n
    tie_term = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts)) / (big_n * (big_n - 1))
    sigma = math.sqrt(m * n / 12.0 * ((big_n + 1) - tie_term))
    mu = m * n / 2.0
    if sigma == 0:  # every value equal: nothing to rank (scipy would answer nan)
        return RankTest(1.0, 1.0, "normal", 1.0, mu, None, 0.0)
    slower = mannwhitneyu(y, x, alternative="greater", method="asymptotic", use_continuity=True)
    faster = mannwhitneyu(y, x, alternative="less", method="asymptotic", use_continuity=True)
    return RankTest(min(1.0, float(slower.pvalue)), min(1.0, float(faster.pvalue)), "normal",
                    _normal_sf((m * n - mu - 0.5) / sigma), float(slower.statistic), None, sigma)


def _critical_u(test: RankTest, m: int, n: int, alpha: float) -> int | None:
    """Largest c with P(U <= c) <= alpha under no change, or None when even U = 0 is more likely than alpha."""
    if test.counts is not None:
        cdf = np.cumsum(test.counts) / float(test.counts.sum())
        ok = np.nonzero(cdf <= alpha)[0]
        return int(ok[-1]) if len(ok) else None
    sigma = test.sigma or math.sqrt(m * n * (m + n + 1) / 12.0)
    c = math.floor(m * n / 2.0 - statistics.NormalDist().inv_cdf(1 - alpha) * sigma - 0.5)
    return c if c >= 0 else None


def _thin(values: np.ndarray, limit: int = 1000) -> np.ndarray:
    if len(values) <= limit:
        return values
    return np.quantile(values, (np.arange(limit) + 0.5) / limit)


def ratio_bounds(x: Iterable[float], y: Iterable[float], alpha: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) of the ratio y/x as a shift of log timings: the Hodges-Lehmann estimate and the
    one-sided (1 - alpha) bounds inverted from the U distribution (0 / inf when the sizes cannot bound it).
    More than 1000 values a side are thinned to 1000 quantiles."""
    lx, ly = np.log(_thin(np.asarray(list(x), float))), np.log(_thin(np.asarray(list(y), float)))
    diffs = np.sort((ly[None, :] - lx[:, None]).ravel())
    estimate = float(math.exp(np.median(diffs)))
    m, n = len(lx), len(ly)
    c = _critical_u(mann_whitney(lx, ly), m, n, alpha)
    if c is None:
        return 0.0, estimate, math.inf
    return float(math.exp(diffs[c])), estimate, float(math.exp(diffs[m * n - c - 1]))
