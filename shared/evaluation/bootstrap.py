"""Uncertainty of benchmark metrics: bootstrap resamples of the test set with one fold, the spread over folds with several.

With one fold, the test samples are drawn with replacement ``n`` times (100 by default) and each
metric is computed on every resample, without refitting the probe or changing the retrieval
database. The summary is the metric on the full test set, the standard deviation of the resampled
values as its standard error, and their 2.5 and 97.5 percentiles. With several folds, the summary is
the mean over folds and its standard error, std(ddof=1) / sqrt(folds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

BOOTSTRAP_RESAMPLES = 100


@dataclass(frozen=True)
class MetricSummary:
    """A metric's estimate and standard error, with how they were obtained.

    ``method`` is "bootstrap" or "folds", and ``count`` the resamples or folds with a finite value.
    ``low`` and ``high`` bound the 95% percentile interval of a bootstrap, and are None for folds.
    """

    mean: float
    standard_error: float
    method: str
    count: int
    low: float | None = None
    high: float | None = None


def bootstrap_resample_metrics(
    compute: Callable[[np.ndarray], Mapping[str, float]],
    count: int,
    *,
    n: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Return, per metric name, its ``n`` values on resamples of ``count`` test rows.

    ``compute`` takes an array of row indices (drawn with replacement from
    ``numpy.random.default_rng(seed)``, as in :func:`shared.agreement.bootstrap_interval`) and returns
    the metrics of those rows.
    """
    if count < 2:
        raise ConfigError(f"bootstrap: {count} test samples, expected at least 2 to resample.", value=count, limit=2)
    if n < 2:
        raise ConfigError(f"bootstrap: n is {n}, expected at least 2 resamples for a standard error.", value=n, limit=2)

    generator = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n):
        rows = generator.integers(0, count, size=count)
        for name, value in compute(rows).items():
            values.setdefault(name, []).append(float(value))
    return {name: np.asarray(resampled) for name, resampled in values.items()}


def summarize_bootstrap(estimates: Mapping[str, float], resampled: Mapping[str, np.ndarray]) -> dict[str, MetricSummary]:
    """Summarise each metric by its full-test-set estimate and the spread of its resampled values.

    Resamples with a NaN value (a macro AUC on a resample that misses a class) are left out, and
    ``count`` is the number that remained.
    """
    summaries = {}
    for name, estimate in estimates.items():
        values = np.asarray(resampled[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) < 2:
            summaries[name] = MetricSummary(mean=float(estimate), standard_error=float("nan"), method="bootstrap", count=len(values))
            continue
        low, high = np.percentile(values, [2.5, 97.5])
        summaries[name] = MetricSummary(
            mean=float(estimate),
            standard_error=float(values.std(ddof=1)),
            method="bootstrap",
            count=len(values),
            low=float(low),
            high=float(high),
        )
    return summaries


def summarize_folds(fold_metrics: Sequence[Mapping[str, float]]) -> dict[str, MetricSummary]:
    """Summarise each metric by its mean over folds and the standard error of that mean, std(ddof=1) / sqrt(folds).

    Folds with a NaN value are left out. Raises :class:`ConfigError` for fewer than 2 folds, which
    need :func:`bootstrap_resample_metrics` instead.
    """
    if len(fold_metrics) < 2:
        raise ConfigError(
            f"summarize_folds: {len(fold_metrics)} fold, expected at least 2. Bootstrap the test set of a single fold instead.",
            value=len(fold_metrics),
            limit=2,
        )
    summaries = {}
    for name in fold_metrics[0]:
        values = np.array([metrics[name] for metrics in fold_metrics], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if len(values) else float("nan")
        error = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) >= 2 else float("nan")
        summaries[name] = MetricSummary(mean=mean, standard_error=error, method="folds", count=len(values))
    return summaries
