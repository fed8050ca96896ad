"""Run the linear-probe and retrieval protocols over every fold of a task and summarise them.

A task is a feature matrix with one row per sample, a label per row, and folds of row indices. For a
slide-level or case-level task a row is a pooled feature (see :func:`load_pooled_features`). For a
tile-level task a row is a tile, and the folds must group the tiles of a case. With one fold the test
set is bootstrapped, by case when ``groups`` gives each row's case (see
:mod:`shared.evaluation.bootstrap`); with several, the metrics are averaged over folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import ConfigError
from shared.evaluation.bootstrap import (
    BOOTSTRAP_RESAMPLES,
    MetricSummary,
    bootstrap_resample_metrics,
    summarize_bootstrap,
    summarize_folds,
)
from shared.evaluation.folds import Fold
from shared.evaluation.linear_probe import classification_metrics, evaluate_linear_probe
from shared.evaluation.retrieval import DEFAULT_KS, evaluate_retrieval
from shared.features import read_features


@dataclass(frozen=True)
class ProtocolResult:
    """The metrics of each fold, and their summary over folds or bootstrap resamples."""

    protocol: str
    fold_metrics: list[dict[str, float]]
    summary: dict[str, MetricSummary]


def run_linear_probe(
    features: np.ndarray,
    labels: Sequence,
    folds: Sequence[Fold],
    *,
    cost: float = 1.0,
    balanced: bool = True,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    groups: Sequence | None = None,
) -> ProtocolResult:
    """Fit a linear probe on each fold's train rows, score it on the test rows, and summarise the metrics.

    Validation rows are not used, because the cost is fixed rather than tuned. ``groups`` (the case of
    each row) makes the one-fold bootstrap draw cases instead of rows.
    """
    features, labels, groups = _check_task(features, labels, folds, groups)
    fold_metrics = []
    last = None
    for fold in folds:
        last = evaluate_linear_probe(features[fold.train], labels[fold.train], features[fold.test], labels[fold.test], cost=cost, balanced=balanced)
        fold_metrics.append(last.metrics)

    if len(folds) > 1:
        return ProtocolResult("linear_probe", fold_metrics, summarize_folds(fold_metrics))
    test_labels = labels[folds[0].test]
    resampled = bootstrap_resample_metrics(
        lambda rows: classification_metrics(test_labels[rows], last.probabilities[rows], last.classes),
        len(test_labels),
        n=bootstrap_resamples,
        seed=seed,
        groups=None if groups is None else groups[folds[0].test],
    )
    return ProtocolResult("linear_probe", fold_metrics, summarize_bootstrap(fold_metrics[0], resampled))


def run_retrieval(
    features: np.ndarray,
    labels: Sequence,
    folds: Sequence[Fold],
    *,
    metric: str = "l2",
    ks: Sequence[int] = DEFAULT_KS,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    groups: Sequence | None = None,
) -> ProtocolResult:
    """Query each fold's train rows with its test rows and summarise the retrieval metrics.

    A bootstrap resamples the queries and keeps the database, so it measures how the metrics vary with
    the test set. ``groups`` (the case of each row) makes it draw the queries of whole cases.
    """
    features, labels, groups = _check_task(features, labels, folds, groups)
    fold_metrics = []
    last = None
    for fold in folds:
        last = evaluate_retrieval(features[fold.train], labels[fold.train], features[fold.test], labels[fold.test], metric=metric, ks=ks)
        fold_metrics.append(last.metrics)

    if len(folds) > 1:
        return ProtocolResult(f"retrieval_{metric}", fold_metrics, summarize_folds(fold_metrics))
    per_query = last.per_query
    resampled = bootstrap_resample_metrics(
        lambda rows: {name: values[rows].mean() for name, values in per_query.items()},
        len(folds[0].test),
        n=bootstrap_resamples,
        seed=seed,
        groups=None if groups is None else groups[folds[0].test],
    )
    return ProtocolResult(f"retrieval_{metric}", fold_metrics, summarize_bootstrap(fold_metrics[0], resampled))


def load_pooled_features(folder: Path, sample_ids: Sequence[str]) -> np.ndarray:
    """Read ``folder/ID.h5`` for each id, as ``unite pool`` writes them, and return the (N, D) matrix in ``sample_ids`` order.

    Raises :class:`ConfigError` naming the id when a file is missing, contains per-patch features, or
    differs from the others in dimension or encoder.
    """
    folder = Path(folder)
    rows = []
    encoders = set()
    for sample_id in sample_ids:
        path = folder / f"{sample_id}.h5"
        if not path.is_file():
            raise ConfigError(f"no feature file for sample {sample_id!r}: {path} not found. Pool its features with unite pool first.", value=str(sample_id))
        feature_file = read_features(path)
        if feature_file.features.shape[0] != 1:
            raise ConfigError(
                f"feature file {path} has {feature_file.features.shape[0]} rows, expected one pooled row. Pool it with unite pool first.",
                value=feature_file.features.shape[0],
            )
        if rows and feature_file.features.shape[1] != rows[0].shape[0]:
            raise ConfigError(
                f"feature file {path} has {feature_file.features.shape[1]} dimensions, but the first sample has {rows[0].shape[0]}. "
                "Use features of one encoder and one pooling.",
                value=feature_file.features.shape[1],
            )
        encoders.add(feature_file.attrs.get("encoder"))
        rows.append(feature_file.features[0])
    if len(encoders) > 1:
        raise ConfigError(
            f"feature files in {folder} come from several encoders ({sorted(map(str, encoders))}). Keep one encoder per folder.",
            value=sorted(map(str, encoders)),
        )
    if not rows:
        raise ConfigError("load_pooled_features: no sample ids. Pass the ids of the split file.", value=0)
    return np.stack(rows)


def _check_task(
    features: np.ndarray, labels: Sequence, folds: Sequence[Fold], groups: Sequence | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ConfigError(
            f"features have shape {features.shape} and labels {labels.shape}, expected (N, D) features with one label per row.",
            value=[list(features.shape), list(labels.shape)],
        )
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        if groups.shape != (len(features),):
            raise ConfigError(
                f"groups have shape {groups.shape}, expected one case id per feature row, ({len(features)},).",
                value=list(groups.shape),
                limit=len(features),
            )
    if not folds:
        raise ConfigError("no folds. Read them from a split file or make them with make_folds.", value=0)
    for number, fold in enumerate(folds):
        for side in ("train", "val", "test"):
            indices = np.asarray(getattr(fold, side))
            if len(indices) and (indices.min() < 0 or indices.max() >= len(features)):
                raise ConfigError(
                    f"fold {number}: {side} row indices reach {int(indices.max())}, but there are {len(features)} samples. "
                    "Build the features in the order of the split file.",
                    value=int(indices.max()),
                    limit=len(features) - 1,
                )
    return features, labels, groups
