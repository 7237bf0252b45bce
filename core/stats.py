"""Exact binomial intervals used by the trainer, the evaluation and the portal (torch-free).

The flag threshold is certified with a one-sided Clopper–Pearson bound on the error among
unflagged validation images (selective classification with guaranteed risk, Geifman & El-Yaniv
2017); the portal reports audit estimates with the two-sided interval.
The population stability index compares a day's production distribution with validation (drift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import beta


def clopper_pearson_upper(errors: int, n: int, delta: float = 0.05) -> float:
    """One-sided upper confidence bound (level ``1 - delta``) on a binomial rate.

    ``errors`` wrong out of ``n``: the true rate is below the returned value with probability at
    least ``1 - delta``. With ``n == 0`` nothing is known: 1.0.
    """
    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, errors + 1, n - errors))


def clopper_pearson_interval(errors: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact interval ``(low, high)`` on a binomial rate at the given confidence."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    low = 0.0 if errors <= 0 else float(beta.ppf(alpha / 2, errors, n - errors + 1))
    high = 1.0 if errors >= n else float(beta.ppf(1 - alpha / 2, errors + 1, n - errors))
    return low, high


def population_stability_index(
    expected_counts: Sequence[float], actual_counts: Sequence[float], epsilon: float = 1e-4
) -> float:
    """Population stability index of ``actual`` against ``expected``, binned the same way.

    ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`` over the bins' shares ``e_i`` (expected, e.g. the
    validation set) and ``a_i`` (actual, e.g. one day in production). It is 0 for identical
    distributions and grows with the shift; the usual reading is below 0.1 stable, 0.1 to 0.2 a
    moderate shift, above 0.2 a significant one. A share of 0 would make the logarithm infinite,
    so every share is raised to at least ``epsilon`` and the shares renormalised before the sum.

    Args:
        expected_counts: Counts (or shares) per bin of the reference distribution.
        actual_counts: Counts (or shares) per bin of the observed distribution, same bins.
        epsilon: Floor of a bin's share, > 0.

    Returns:
        The index, >= 0.

    Raises:
        ValueError: If the bin counts differ, a count is negative, a side has no counts, or
            ``epsilon`` is not positive.
    """
    if len(expected_counts) != len(actual_counts) or not expected_counts:
        raise ValueError(f"need the same non-zero number of bins, got {len(expected_counts)} and {len(actual_counts)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    expected = _floored_shares(expected_counts, epsilon)
    actual = _floored_shares(actual_counts, epsilon)
    return float(sum((a - e) * math.log(a / e) for e, a in zip(expected, actual)))


def _floored_shares(counts: Sequence[float], epsilon: float) -> list[float]:
    """Counts as shares that sum to 1, each at least about ``epsilon``."""
    if any(count < 0 for count in counts):
        raise ValueError("counts must not be negative")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("a distribution with no counts has no shares")
    floored = [max(count / total, epsilon) for count in counts]
    norm = sum(floored)
    return [share / norm for share in floored]
