"""Retrieval, as in Patho-Bench's retrieval protocol: the test samples query a database of the train samples.

Each query ranks the database by similarity, ``l2`` (the negative Euclidean distance) or ``cosine``,
and is scored on its k most similar samples, for k in 1, 5 and 10 by default. A retrieved sample is
a hit when its label equals the query's.

- ``top{k}_accuracy``: 1 when at least one of the k is a hit;
- ``majority_vote@{k}``: 1 when the most frequent label among the k is the query's label. A tie
  between labels goes to the one that ranks highest;
- ``mAP@{k}``: (1 / k) x sum over the hits at ranks i <= k of precision@i.

Each metric is the mean of its per-query values. The per-query values are returned too, so a
bootstrap can resample the queries against the fixed database. Equally similar database samples are
ranked by database row index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

METRICS = ("l2", "cosine")
DEFAULT_KS = (1, 5, 10)
# Queries scored at once: a block of (rows x database size) float64 similarities stays near 128 MiB.
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RetrievalResult:
    """The mean of each retrieval metric, its value per query, and the ranked database rows of each query."""

    metrics: dict[str, float]
    per_query: dict[str, np.ndarray]
    ranked: np.ndarray


def retrieval_metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Return the metric names that :func:`evaluate_retrieval` reports for ``ks``, in its order."""
    return [name for k in ks for name in (f"top{k}_accuracy", f"majority_vote@{k}", f"mAP@{k}")]


def rank_database(queries: np.ndarray, database: np.ndarray, *, k: int, metric: str = "l2") -> np.ndarray:
    """Return the (Q, k) database rows most similar to each query, most similar first.

    ``l2`` ranks by the negative Euclidean distance and ``cosine`` by the cosine similarity; a zero
    vector has cosine similarity 0 with everything. Ties are ranked by database row index.
    """
    queries = _as_matrix(queries, "queries")
    database = _as_matrix(database, "database")
    if metric not in METRICS:
        raise ConfigError(f"retrieval: metric is {metric!r}, expected one of {list(METRICS)}.", value=metric, limit=list(METRICS))
    if queries.shape[1] != database.shape[1]:
        raise ConfigError(
            f"retrieval: queries have {queries.shape[1]} dimensions and the database {database.shape[1]}. "
            "Use features of the same encoder and pooling for both.",
            value=[queries.shape[1], database.shape[1]],
        )
    if not 1 <= k <= len(database):
        raise ConfigError(
            f"retrieval: k is {k} for a database of {len(database)} samples, expected 1 <= k <= {len(database)}. "
            "Use smaller k values or more train samples.",
            value=k,
            limit=len(database),
        )

    queries = queries.astype(np.float64)
    database = database.astype(np.float64)
    if metric == "cosine":
        queries = _unit_rows(queries)
        database = _unit_rows(database)
    squared_norms = (database**2).sum(axis=1)

    ranked = np.empty((len(queries), k), dtype=np.int64)
    block = max(1, _BLOCK_ELEMENTS // len(database))
    for start in range(0, len(queries), block):
        rows = slice(start, start + block)
        similarity = queries[rows] @ database.T
        if metric == "l2":
            # -||q - d|| orders the database like 2 q.d - ||d||^2, because ||q||^2 is the same for every d.
            distance = (queries[rows] ** 2).sum(axis=1)[:, None] - 2.0 * similarity + squared_norms[None, :]
            similarity = -np.sqrt(np.maximum(distance, 0.0))
        # A stable sort of the negated similarity keeps equal values in row order.
        ranked[rows] = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return ranked


def evaluate_retrieval(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    metric: str = "l2",
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalResult:
    """Query the train samples (the database) with each test sample and return the retrieval metrics for ``ks``."""
    train_labels = _labels(train_labels, train_features, "train")
    test_labels = _labels(test_labels, test_features, "test")
    ks = sorted(set(int(k) for k in ks))
    if not ks:
        raise ConfigError("retrieval: no k values. Pass at least one, such as (1, 5, 10).", value=[])
    ranked = rank_database(test_features, train_features, k=ks[-1], metric=metric)
    per_query = retrieval_scores(test_labels, train_labels[ranked], ks)
    metrics = {name: float(values.mean()) for name, values in per_query.items()}
    return RetrievalResult(metrics=metrics, per_query=per_query, ranked=ranked)


def retrieval_scores(query_labels: np.ndarray, retrieved_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Return the per-query value of each metric from the labels of the retrieved samples, (Q, max k), most similar first."""
    query_labels = np.asarray(query_labels)
    retrieved_labels = np.asarray(retrieved_labels)
    hits = retrieved_labels == query_labels[:, None]
    ranks = np.arange(1, hits.shape[1] + 1)
    precision = np.cumsum(hits, axis=1) / ranks

    scores = {}
    for k in ks:
        scores[f"top{k}_accuracy"] = hits[:, :k].any(axis=1).astype(np.float64)
        scores[f"majority_vote@{k}"] = np.array(
            [_majority_label(row[:k]) == label for row, label in zip(retrieved_labels, query_labels)], dtype=np.float64
        )
        scores[f"mAP@{k}"] = (precision[:, :k] * hits[:, :k]).sum(axis=1) / k
    return scores


def _majority_label(retrieved: np.ndarray):
    """Return the most frequent label of ``retrieved``; a tie goes to the label that ranks highest."""
    values, first_rank, counts = np.unique(retrieved, return_index=True, return_counts=True)
    tied = np.flatnonzero(counts == counts.max())
    return values[tied[np.argmin(first_rank[tied])]]


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0.0, 1.0, norms)


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number) or len(array) == 0:
        raise ConfigError(f"retrieval: {name} have shape {array.shape}, expected (N, D) numbers with N >= 1.", value=list(array.shape))
    if not np.isfinite(array).all():
        raise ConfigError(f"retrieval: {name} contain NaN or infinity. Check the encoder's output.", value="non-finite")
    return array


def _labels(labels: np.ndarray, features: np.ndarray, side: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (len(features),):
        raise ConfigError(
            f"retrieval: {len(features)} {side} feature rows but labels of shape {labels.shape}, expected one label per row.",
            value=list(labels.shape),
        )
    return labels
