"""The statistics of an A/B preference study: shares with Wilson intervals, the sign test, and
Fleiss' kappa for agreement between raters."""

from __future__ import annotations

import math
from collections import Counter
from statistics import NormalDist

from scipy.stats import binomtest


def wilson(k: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the share k / n, by its formula, so k may hold halves (a tie as half
    a win); (0, 1) when there is nothing to share."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test (binomial, p = 1/2) of wins against losses, ties left out; 1 with neither."""
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5).pvalue)


def fleiss_kappa(items: list[list[str]]) -> float | None:
    """Fleiss' kappa of items each rated by the same number (at least 2) of raters; a rating is a
    category name. None when it is undefined: no items, or every rating in one category."""
    if not items:
        return None
    raters = len(items[0])
    if raters < 2 or any(len(ratings) != raters for ratings in items):
        raise ValueError("Fleiss' kappa needs the same number of raters, at least two, for every item")
    totals: Counter = Counter()
    observed = 0.0
    for ratings in items:
        counts = Counter(ratings)
        totals.update(counts)
        observed += (sum(c * c for c in counts.values()) - raters) / (raters * (raters - 1))
    observed /= len(items)
    everyone = len(items) * raters
    expected = sum((c / everyone) ** 2 for c in totals.values())
    if math.isclose(expected, 1.0):
        return None
    return (observed - expected) / (1 - expected)
