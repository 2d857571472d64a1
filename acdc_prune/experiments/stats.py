"""Paired bootstrap confidence intervals for differences between two models scored on the same patients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedDifference:
    """The mean paired difference ``a - b`` over ``n`` units and its bootstrap confidence interval.

    Attributes:
        mean: mean over the units of ``a - b``.
        low: lower bound of the interval (NaN with fewer than two units).
        high: upper bound of the interval (NaN with fewer than two units).
        n: units with a defined score in both ``a`` and ``b``.
        confidence: coverage of the interval, e.g. 0.95.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (never with fewer than two units)."""
        return bool(self.low > 0.0 or self.high < 0.0)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> PairedDifference:
    """Percentile bootstrap interval of the mean of the paired differences ``a[i] - b[i]``.

    The differences are resampled with replacement ``resamples`` times (indices drawn by
    ``numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``); the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the resampled means (numpy's
    linear interpolation). Pairs where either score is NaN are left out.

    Args:
        a: scores of the first model, one per unit (e.g. per patient), shape ``(n,)``.
        b: scores of the second model on the same units in the same order, shape ``(n,)``.
        resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling (the same inputs always give the same interval).

    Raises:
        ValueError: ``a`` and ``b`` differ in shape, or ``confidence`` is outside (0, 1).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    diff = (a - b)[~(np.isnan(a) | np.isnan(b))]
    n = int(diff.size)
    if n < 2:
        mean = float(diff.mean()) if n else float("nan")
        return PairedDifference(mean, float("nan"), float("nan"), n, confidence)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = diff[indices].mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), n, confidence)
