"""Uncertainty of benchmark metrics: bootstrap resamples of the test set with one fold, the spread over folds with several.

With one fold, the test set is resampled ``n`` times (100 by default) and each metric is computed on
every resample, without refitting the probe or changing the retrieval database. Without groups the
test samples are drawn with replacement. With groups (the case of each sample) it is a cluster
bootstrap: the groups are drawn with replacement and every sample of a drawn group enters the
resample. Tiles or slides of one case are alike, so resampling them one by one treats correlated
samples as independent and gives intervals that are too narrow. The summary is the metric on the
full test set, the standard deviation of the resampled values as its standard error, and their 2.5
and 97.5 percentiles. With several folds, the summary is the mean over folds and its standard error,
std(ddof=1) / sqrt(folds).
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
    groups: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """Return, per metric name, its ``n`` values on resamples of ``count`` test rows.

    ``compute`` takes an array of row indices and returns the metrics of those rows. The draws come
    from ``numpy.random.default_rng(seed)``, as in :func:`shared.agreement.bootstrap_interval`. Without
    ``groups``, each resample is ``count`` rows drawn with replacement. With ``groups`` (one value per
    row), each resample draws as many groups as there are, with replacement, numbered in the order of
    their first row, and contains every row of each drawn group, in row order. When every group has
    one row, the resamples equal those without groups.
    """
    members = None if groups is None else group_rows(count, groups)
    units = count if members is None else len(members)
    if units < 2:
        described = "test samples" if members is None else "groups (cases) among the test samples"
        raise ConfigError(
            f"bootstrap: {units} {described}, expected at least 2 to resample. Put more samples or cases in the test set.",
            value=units,
            limit=2,
        )
    if n < 2:
        raise ConfigError(f"bootstrap: n is {n}, expected at least 2 resamples for a standard error.", value=n, limit=2)

    generator = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n):
        drawn = generator.integers(0, units, size=units)
        rows = drawn if members is None else np.concatenate([members[group] for group in drawn])
        for name, value in compute(rows).items():
            values.setdefault(name, []).append(float(value))
    return {name: np.asarray(resampled) for name, resampled in values.items()}


def group_rows(count: int, groups: Sequence) -> list[np.ndarray]:
    """Return the row indices of each group, in row order, with the groups in the order of their first row.

    Raises :class:`ConfigError` when ``groups`` does not have one value per row.
    """
    groups = np.asarray(groups, dtype=object)
    if groups.shape != (count,):
        raise ConfigError(
            f"bootstrap: groups have shape {groups.shape}, expected one group (case id) per test sample, ({count},).",
            value=list(groups.shape),
            limit=count,
        )
    number_of: dict = {}
    codes = np.array([number_of.setdefault(group, len(number_of)) for group in groups.tolist()], dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes, minlength=len(number_of)))[:-1])


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
