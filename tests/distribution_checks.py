"""Exact-distribution checks for the sampling tests: a sample of a sampler against the
distribution it must follow.

Two bounds that a correct sampler breaks with probability below ``ALPHA`` for any seed:

* total variation: by the Bretagnolle-Huber-Carol inequality,
  ``P(||p_hat - p||_1 >= eps) <= 2**k * exp(-N * eps**2 / 2)`` for ``k`` cells and ``N``
  trials, so ``TV = ||p_hat - p||_1 / 2`` stays below
  ``sqrt(2 * (k * ln 2 + ln(1 / ALPHA)) / N) / 2``;
* Pearson's chi-square, with cells of expected count below 5 pooled, and its p-value from
  the closed-form chi-square survival function (scipy is not a dependency); the function
  is pinned to textbook critical values in ``test_acceptance.py``.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 1e-6


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with integer ``df`` (closed forms by parity)."""
    if x <= 0:
        return 1.0
    half = x / 2
    if df % 2 == 0:
        terms = [j * math.log(half) - math.lgamma(j + 1) for j in range(df // 2)]
        head = 0.0
    else:
        terms = [(j - 0.5) * math.log(half) - math.lgamma(j + 0.5) for j in range(1, (df - 1) // 2 + 1)]
        head = math.erfc(math.sqrt(half))
    return min(1.0, head + sum(math.exp(t - half) for t in terms))


def chi2_critical(df: int, alpha: float) -> float:
    """The value the statistic exceeds with probability ``alpha`` (bisection on the sf)."""
    low, high = 0.0, 10.0 * df + 200.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if chi2_sf(mid, df) > alpha else (low, mid)
    return high


def compare(counts: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """TV distance, its bound, Pearson chi-square (pooled), df, critical value and p-value."""
    n = counts.sum()
    cells = len(probs)
    tv = 0.5 * float(np.abs(counts / n - probs).sum())
    tv_bound = 0.5 * math.sqrt(2 * (cells * math.log(2) + math.log(1 / ALPHA)) / n)
    expected = n * probs
    impossible = int(counts[probs == 0].sum())  # a token the target never emits
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & (probs > 0)].sum()] if np.any(~big & (probs > 0)) else [])
    exp = list(expected[big]) + ([expected[~big & (probs > 0)].sum()] if np.any(~big & (probs > 0)) else [])
    chi2 = float(sum((o - e) ** 2 / e for o, e in zip(obs, exp)))
    df = len(obs) - 1
    return dict(tv=tv, tv_bound=tv_bound, chi2=chi2, df=df, critical=chi2_critical(df, ALPHA),
                p_value=chi2_sf(chi2, df), impossible=impossible)


def report(name: str, stats: dict[str, float]) -> str:
    line = (f"{name}: TV={stats['tv']:.4f} (bound {stats['tv_bound']:.4f}), chi2={stats['chi2']:.1f} "
            f"df={stats['df']} (critical {stats['critical']:.1f}, p={stats['p_value']:.3g}), "
            f"impossible={stats['impossible']}")
    print(line)
    return line


def assert_matches(name: str, counts: np.ndarray, probs: np.ndarray) -> None:
    stats = compare(counts, probs)
    line = report(name, stats)
    assert stats["impossible"] == 0, line
    assert stats["tv"] < stats["tv_bound"], line
    assert stats["p_value"] > ALPHA, line


def assert_rejected(name: str, counts: np.ndarray, probs: np.ndarray) -> None:
    stats = compare(counts, probs)
    line = report(name, stats)
    assert stats["tv"] > stats["tv_bound"], line
    assert stats["p_value"] < ALPHA, line


