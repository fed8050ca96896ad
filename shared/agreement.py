"""Agreement between two embedding spaces of the same tiles: linear CKA, k-NN overlap and bootstrap intervals.

These metrics compare a student with its teacher without any projector between them, so they judge every
distillation loss alike, even when the two spaces have different dimensions (384 and 1536). Row ``i`` of
``x`` and of ``y`` must embed the same tile. numpy only, so the distiller's validation, the benchmarks
and a plain analysis script share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from shared.errors import ConfigError

METRICS = ("cosine", "l2")
# Rows of the similarity matrix computed at once: about 128 MiB of float64 per block whatever N is.
_BLOCK_ELEMENTS = 1 << 24


class BootstrapInterval(NamedTuple):
    """A statistic on the full sample and the percentile interval of its bootstrap resamples."""

    estimate: float
    low: float
    high: float
    resamples: int
    confidence: float


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Return the linear centred kernel alignment of (N, Dx) ``x`` and (N, Dy) ``y``, in [0, 1].

    With column-centred ``x`` and ``y``, CKA = ||y.T x||_F^2 / (||x.T x||_F ||y.T y||_F) (Kornblith et al.,
    "Similarity of neural network representations revisited", ICML 2019). It is 1 for the same
    representation, and unchanged by an orthogonal transform or an isotropic scaling of either side, so
    it compares the geometry of the two spaces rather than their coordinates. Raises ConfigError for
    fewer than 2 rows or a side whose rows are all equal.
    """
    x, y = _check_pair(x, y, minimum_rows=2)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    x_norm = np.linalg.norm(x.T @ x)
    y_norm = np.linalg.norm(y.T @ y)
    for name, norm in (("x", x_norm), ("y", y_norm)):
        if norm == 0.0:
            raise ConfigError(
                f"linear_cka: every row of {name} is the same vector, so its centred Gram matrix is zero and CKA "
                "is undefined. Pass embeddings of different tiles.",
                value=0.0,
            )
    return float(cross / (x_norm * y_norm))


def nearest_neighbours(x: np.ndarray, *, k: int = 10, metric: str = "cosine") -> np.ndarray:
    """Return the (N, k) row indices of each row's ``k`` nearest other rows of ``x``, nearest first.

    ``metric`` is "cosine" (largest cosine similarity) or "l2" (smallest Euclidean distance). A row is
    never its own neighbour, even when another row equals it. Among the k chosen, equally near rows are
    ordered by index; a tie at the k-th place is broken arbitrarily. The similarity matrix is computed in blocks of rows, so memory stays near 128 MiB for
    any N.
    """
    x = _as_matrix(x, "x")
    count = len(x)
    _check_k(k, count)
    _check_metric(metric)

    features = x.astype(np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        features = features / np.where(norms == 0.0, 1.0, norms)
    squared_norms = (features**2).sum(axis=1)

    neighbours = np.empty((count, k), dtype=np.int64)
    block = max(1, _BLOCK_ELEMENTS // count)
    for start in range(0, count, block):
        rows = np.arange(start, min(start + block, count))
        similarity = features[rows] @ features.T
        if metric == "l2":
            # -||a - b||^2 = 2 a.b - ||a||^2 - ||b||^2 orders rows like the negative distance.
            similarity = 2.0 * similarity - squared_norms[rows, None] - squared_norms[None, :]
        similarity[np.arange(len(rows)), rows] = -np.inf
        candidates = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        candidate_similarity = np.take_along_axis(similarity, candidates, axis=1)
        # lexsort sorts by its last key first: descending similarity, then ascending index.
        order = np.lexsort((candidates, -candidate_similarity), axis=1)
        neighbours[rows] = np.take_along_axis(candidates, order, axis=1)
    return neighbours


def knn_overlap_per_tile(x: np.ndarray, y: np.ndarray, *, k: int = 10, metric: str = "cosine") -> np.ndarray:
    """Return, for each row, the fraction of its ``k`` nearest neighbours in ``x`` that are also among them in ``y``.

    The mean of these values is :func:`knn_overlap`. Two unrelated spaces score ``k / (N - 1)`` on
    average (:func:`knn_overlap_chance`).
    """
    x, y = _check_pair(x, y, minimum_rows=2)
    x_neighbours = nearest_neighbours(x, k=k, metric=metric)
    y_neighbours = nearest_neighbours(y, k=k, metric=metric)
    shared = [len(np.intersect1d(row_x, row_y, assume_unique=True)) for row_x, row_y in zip(x_neighbours, y_neighbours)]
    return np.asarray(shared, dtype=np.float64) / k


def knn_overlap(x: np.ndarray, y: np.ndarray, *, k: int = 10, metric: str = "cosine") -> float:
    """Return the mean overlap of each tile's ``k`` nearest neighbours in ``x`` and in ``y``, in [0, 1].

    1 means that every tile has the same ``k`` neighbours in both spaces, which is what retrieval with the
    student needs to return the teacher's results. Raises ConfigError unless 1 <= k < N.
    """
    return float(knn_overlap_per_tile(x, y, k=k, metric=metric).mean())


def knn_overlap_chance(count: int, k: int) -> float:
    """Return the expected k-NN overlap of two unrelated spaces of ``count`` tiles: ``k / (count - 1)``."""
    _check_k(k, count)
    return k / (count - 1)


def nearest_neighbour_label_agreement(x: np.ndarray, y: np.ndarray, labels: np.ndarray, *, metric: str = "cosine") -> float:
    """Return the fraction of tiles whose nearest other tile has the same label in ``x`` as in ``y``.

    For each tile, the label of its nearest neighbour in ``x`` is compared with the label of its nearest
    neighbour in ``y``: 1 means that 1-NN classification (or top-1 retrieval) with the student returns the
    teacher's label for every tile, right or wrong. ``labels`` has one entry per row.
    """
    x, y = _check_pair(x, y, minimum_rows=2)
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise ConfigError(
            f"nearest_neighbour_label_agreement: labels have shape {labels.shape}, expected ({len(x)},), one per row. "
            "Pass the label of each embedded tile in row order.",
            value=list(labels.shape),
            limit=[len(x)],
        )
    x_labels = labels[nearest_neighbours(x, k=1, metric=metric)[:, 0]]
    y_labels = labels[nearest_neighbours(y, k=1, metric=metric)[:, 0]]
    return float(np.mean(x_labels == y_labels))


def bootstrap_interval(
    fn: Callable[..., float],
    *arrays: np.ndarray,
    n: int = 100,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapInterval:
    """Return ``fn(*arrays)`` and the percentile interval of ``fn`` over ``n`` bootstrap resamples of the rows.

    Each resample draws N row indices with replacement from ``numpy.random.default_rng(seed)`` and takes
    the same rows of every array, so paired arrays (teacher and student embeddings of one tile) stay
    paired. ``low`` and ``high`` are the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the
    resampled values.

    NOTE: a resample repeats rows, and a repeated row is its own nearest neighbour in both spaces, which
    inflates :func:`knn_overlap` on resamples. Bootstrap the per-tile values of
    :func:`knn_overlap_per_tile` with ``np.mean`` instead; CKA can be bootstrapped on the rows directly.
    """
    if not arrays:
        raise ConfigError("bootstrap_interval: no arrays to resample. Pass at least one array with one row per sample.")
    count = len(arrays[0])
    for position, array in enumerate(arrays):
        if len(array) != count:
            raise ConfigError(
                f"bootstrap_interval: array {position} has {len(array)} rows, expected {count} like array 0, "
                "because rows are resampled together. Pass arrays with one row per sample.",
                value=len(array),
                limit=count,
            )
    if count < 2:
        raise ConfigError(f"bootstrap_interval: {count} rows, expected at least 2 to resample.", value=count, limit=2)
    if n < 1:
        raise ConfigError(f"bootstrap_interval: n is {n}, expected at least 1 resample.", value=n, limit=1)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"bootstrap_interval: confidence is {confidence}, expected a value in (0, 1), such as 0.95.", value=confidence)

    arrays = tuple(np.asarray(array) for array in arrays)
    estimate = float(fn(*arrays))
    generator = np.random.default_rng(seed)
    values = np.empty(n, dtype=np.float64)
    for resample in range(n):
        rows = generator.integers(0, count, size=count)
        values[resample] = fn(*(array[rows] for array in arrays))
    low, high = np.quantile(values, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return BootstrapInterval(estimate=estimate, low=float(low), high=float(high), resamples=n, confidence=confidence)


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ConfigError(
            f"{name} has shape {array.shape} and dtype {array.dtype}, expected an (N, D) numeric array of embeddings, one row per tile.",
            value=list(array.shape),
        )
    if not np.isfinite(array).all():
        raise ConfigError(
            f"{name} contains {int((~np.isfinite(array)).sum())} NaN or infinite values, expected finite embeddings. "
            "Check the model's output for overflow (for example under float16).",
            value="non-finite",
        )
    return array


def _check_pair(x: np.ndarray, y: np.ndarray, *, minimum_rows: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if len(x) != len(y):
        raise ConfigError(
            f"x has {len(x)} rows and y has {len(y)}, expected the same tiles in the same order on both sides.",
            value=[len(x), len(y)],
        )
    if len(x) < minimum_rows:
        raise ConfigError(f"{len(x)} rows, expected at least {minimum_rows} tiles to compare.", value=len(x), limit=minimum_rows)
    return x, y


def _check_k(k: int, count: int) -> None:
    if not 1 <= k < count:
        raise ConfigError(
            f"k is {k} for {count} tiles, expected 1 <= k < {count} because a tile is not its own neighbour. "
            "Use a smaller k or more tiles.",
            value=k,
            limit=count - 1,
        )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"metric is {metric!r}, expected one of {list(METRICS)}.", value=metric, limit=list(METRICS))
