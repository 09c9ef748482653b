"""E-divisive change points (energy statistic, permutation test) over a series of run medians."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def _energy_q(x: np.ndarray, min_size: int) -> tuple[int, float]:
    """E-divisive (Matteson & James 2014, alpha = 1): the split tau maximising
    Q(tau) = m n / (m + n) * (2 mean|X - Y| - mean_{i<j}|X_i - X_j| - mean_{i<j}|Y_i - Y_j|), X = x[:tau], Y = x[tau:]."""
    n = len(x)
    d = np.abs(x[:, None] - x[None, :])
    c = d.cumsum(0).cumsum(1)  # c[i, j] = sum d[:i+1, :j+1]
    tau = np.arange(min_size, n - min_size + 1)
    if len(tau) == 0:
        return -1, -math.inf
    m, k = tau.astype(float), (n - tau).astype(float)
    t1 = tau - 1
    total = c[n - 1, n - 1]
    left = c[t1, t1]  # sum over X x X (each pair twice)
    cross = c[t1, n - 1] - left  # sum over X x Y
    right = total - 2 * cross - left  # sum over Y x Y
    with np.errstate(divide="ignore", invalid="ignore"):
        within_x = np.where(m > 1, left / (m * (m - 1)), 0.0)
        within_y = np.where(k > 1, right / (k * (k - 1)), 0.0)
    q = m * k / n * (2 * cross / (m * k) - within_x - within_y)
    best = int(np.argmax(q))
    return int(tau[best]), float(q[best])


def change_points(values: Iterable[float], min_size: int = 2, permutations: int = 999, p_threshold: float = 0.05,
                  min_shift: float = 0.0, seed: int = 0) -> list[dict]:
    """Hierarchical e-divisive change points of a series (one value per run, oldest first), each kept when a
    permutation test gives p <= p_threshold and the segment medians differ by at least `min_shift` (in the
    series' units: pass log timings for relative steps). Small series have little power: with 8 values split 5/3 the
    smallest possible p is about 2/56.
    Returns [{'index': first index of the new level, 'p': ..., 'before': median, 'after': median}] sorted by index."""
    series = np.asarray(list(values), dtype=float)
    rng = np.random.default_rng(seed)
    found: list[int] = []
    pvalues: dict[int, float] = {}
    segments = [(0, len(series))]
    while segments:
        lo, hi = segments.pop()
        seg = series[lo:hi]
        if len(seg) < 2 * min_size or np.all(seg == seg[0]):
            continue
        tau, q = _energy_q(seg, min_size)
        if tau < 0:
            continue
        exceed = 0
        for _ in range(permutations):
            _, q_perm = _energy_q(rng.permutation(seg), min_size)
            exceed += q_perm >= q * (1 - 1e-12)
        p = (exceed + 1) / (permutations + 1)
        if p > p_threshold:
            continue
        found.append(lo + tau)
        pvalues[lo + tau] = p
        segments += [(lo, lo + tau), (lo + tau, hi)]
    found.sort()
    # Segment levels between neighbouring change points (all of them, kept or not); report the steps of min_shift+.
    result = []
    bounds = [0] + found + [len(series)]
    for i, cp in enumerate(found):
        before = float(np.median(series[bounds[i]:cp]))
        after = float(np.median(series[cp:bounds[i + 2]]))
        if abs(after - before) < min_shift:
            continue
        result.append({"index": cp, "p": pvalues[cp], "before": before, "after": after})
    return result
