"""Tests of the agreement metrics between embedding spaces, each against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from shared.agreement import (
    bootstrap_interval,
    knn_overlap,
    knn_overlap_chance,
    knn_overlap_per_tile,
    linear_cka,
    nearest_neighbour_label_agreement,
    nearest_neighbours,
)
from shared.errors import ConfigError


def _embeddings(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim))


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA through HSIC with the centring matrix H: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))."""
    count = len(x)
    centring = np.eye(count) - np.ones((count, count)) / count
    gram_k, gram_l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ centring @ b @ centring))

    return hsic(gram_k, gram_l) / np.sqrt(hsic(gram_k, gram_k) * hsic(gram_l, gram_l))


def _brute_force_neighbours(x: np.ndarray, k: int, metric: str) -> list[set[int]]:
    neighbours = []
    for i in range(len(x)):
        distances = []
        for j in range(len(x)):
            if i == j:
                continue
            if metric == "cosine":
                distance = -np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            else:
                distance = np.linalg.norm(x[i] - x[j])
            distances.append((distance, j))
        neighbours.append({j for _, j in sorted(distances)[:k]})
    return neighbours


# Linear CKA


def test_cka_matches_hsic_formula():
    x = _embeddings(40, 16, seed=0)
    y = x @ _embeddings(16, 8, seed=1) + 0.5 * _embeddings(40, 8, seed=2)

    actual = linear_cka(x, y)
    expected = _hsic_cka(x, y)

    assert actual == pytest.approx(expected, rel=1e-10), f"linear_cka {actual} != HSIC formula {expected}"
    assert 0.0 < actual < 1.0


def test_cka_of_self_is_one():
    x = _embeddings(30, 12, seed=3)

    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_rotation_and_scale():
    x = _embeddings(50, 10, seed=4)
    y = np.tanh(x @ _embeddings(10, 6, seed=5))
    rotation = ortho_group.rvs(6, random_state=6)

    reference = linear_cka(x, y)

    assert linear_cka(x, y @ rotation) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, 7.5 * y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(0.01 * x, y) == pytest.approx(reference, rel=1e-10)


def test_cka_not_invariant_to_anisotropic_scale():
    x = _embeddings(50, 4, seed=7)
    stretched = x * np.array([10.0, 1.0, 1.0, 1.0])

    assert linear_cka(x, stretched) < 0.9


def test_cka_of_independent_spaces_is_low():
    x = _embeddings(500, 5, seed=8)
    y = _embeddings(500, 5, seed=9)

    assert linear_cka(x, y) < 0.05


def test_cka_rejects_constant_embeddings():
    with pytest.raises(ConfigError, match="every row of y is the same vector"):
        linear_cka(_embeddings(5, 3, seed=10), np.ones((5, 3)))


# k-NN overlap


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_neighbours_match_brute_force(metric):
    x = _embeddings(25, 6, seed=11)

    actual = nearest_neighbours(x, k=4, metric=metric)
    expected = _brute_force_neighbours(x, 4, metric)

    for row, (found, wanted) in enumerate(zip(actual, expected)):
        assert set(found.tolist()) == wanted, f"row {row}: {sorted(found.tolist())} != {sorted(wanted)}"


def test_neighbours_nearest_first_never_self():
    x = _embeddings(20, 3, seed=12)
    neighbours = nearest_neighbours(x, k=5, metric="l2")

    for row, found in enumerate(neighbours):
        distances = np.linalg.norm(x[found] - x[row], axis=1)
        assert row not in found
        assert np.all(np.diff(distances) >= 0), f"row {row}: distances {distances} not ascending"


def test_neighbours_exclude_self_with_duplicates():
    x = np.repeat(_embeddings(4, 3, seed=13), 2, axis=0)

    neighbours = nearest_neighbours(x, k=1)

    assert neighbours[:, 0].tolist() == [1, 0, 3, 2, 5, 4, 7, 6]


def test_knn_overlap_matches_direct_count():
    x = _embeddings(30, 8, seed=14)
    y = x + 0.3 * _embeddings(30, 8, seed=15)
    k = 5

    x_sets = _brute_force_neighbours(x, k, "cosine")
    y_sets = _brute_force_neighbours(y, k, "cosine")
    expected = np.mean([len(a & b) / k for a, b in zip(x_sets, y_sets)])

    assert knn_overlap(x, y, k=k) == pytest.approx(expected, abs=1e-12)
    assert knn_overlap_per_tile(x, y, k=k) == pytest.approx([len(a & b) / k for a, b in zip(x_sets, y_sets)])


def test_knn_overlap_invariances():
    x = _embeddings(40, 6, seed=16)
    rotation = ortho_group.rvs(6, random_state=17)

    assert knn_overlap(x, x) == 1.0
    assert knn_overlap(x, x @ rotation) == 1.0
    # Cosine neighbours ignore each row's norm; Euclidean ones do not.
    row_scales = np.random.default_rng(18).uniform(0.1, 10.0, size=(40, 1))
    assert knn_overlap(x, x * row_scales, metric="cosine") == 1.0
    assert knn_overlap(x, x * row_scales, metric="l2") < 1.0


def test_knn_overlap_of_unrelated_spaces_near_chance():
    x = _embeddings(400, 8, seed=19)
    y = _embeddings(400, 8, seed=20)

    chance = knn_overlap_chance(400, 10)

    assert chance == pytest.approx(10 / 399)
    assert abs(knn_overlap(x, y) - chance) < 0.01


def test_knn_overlap_spans_blocks():
    """Rows are compared in blocks; a small block size gives the same neighbours as one block."""
    import shared.agreement as agreement

    x = _embeddings(60, 5, seed=21)
    expected = nearest_neighbours(x, k=3)
    block_elements = agreement._BLOCK_ELEMENTS
    agreement._BLOCK_ELEMENTS = 7 * 60
    try:
        blocked = nearest_neighbours(x, k=3)
    finally:
        agreement._BLOCK_ELEMENTS = block_elements

    assert np.array_equal(blocked, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"k": 0}, "k is 0"), ({"k": 10}, "k is 10 for 10 tiles"), ({"k": 3, "metric": "manhattan"}, "metric is 'manhattan'")],
    ids=["zero-k", "k-too-large", "unknown-metric"],
)
def test_knn_overlap_rejects_invalid_settings(kwargs, message):
    x = _embeddings(10, 3, seed=22)

    with pytest.raises(ConfigError, match=message):
        knn_overlap(x, x, **kwargs)


def test_metrics_reject_mismatched_rows():
    with pytest.raises(ConfigError, match="x has 5 rows and y has 4"):
        knn_overlap(_embeddings(5, 3, seed=23), _embeddings(4, 3, seed=24), k=2)


def test_metrics_reject_non_finite():
    x = _embeddings(5, 3, seed=25)
    x[2, 1] = np.nan

    with pytest.raises(ConfigError, match="1 NaN or infinite"):
        linear_cka(x, x)


# Label agreement


def test_label_agreement_matches_direct_computation():
    x = _embeddings(30, 4, seed=26)
    y = x + 0.8 * _embeddings(30, 4, seed=27)
    labels = np.random.default_rng(28).integers(0, 3, size=30)

    x_nearest = [next(iter(found)) for found in _brute_force_neighbours(x, 1, "cosine")]
    y_nearest = [next(iter(found)) for found in _brute_force_neighbours(y, 1, "cosine")]
    expected = np.mean([labels[a] == labels[b] for a, b in zip(x_nearest, y_nearest)])

    assert nearest_neighbour_label_agreement(x, y, labels) == pytest.approx(expected)
    assert nearest_neighbour_label_agreement(x, x, labels) == 1.0


def test_label_agreement_rejects_wrong_label_count():
    x = _embeddings(6, 2, seed=29)

    with pytest.raises(ConfigError, match=r"labels have shape \(5,\), expected \(6,\)"):
        nearest_neighbour_label_agreement(x, x, np.zeros(5))


# Bootstrap


def test_bootstrap_matches_direct_resampling():
    values = np.random.default_rng(30).standard_normal(50)

    interval = bootstrap_interval(np.mean, values, n=200, seed=31)

    generator = np.random.default_rng(31)
    means = [values[generator.integers(0, 50, size=50)].mean() for _ in range(200)]
    assert interval.estimate == pytest.approx(values.mean())
    assert interval.low == pytest.approx(np.quantile(means, 0.025))
    assert interval.high == pytest.approx(np.quantile(means, 0.975))
    assert interval.low < interval.estimate < interval.high
    assert (interval.resamples, interval.confidence) == (200, 0.95)


def test_bootstrap_keeps_arrays_paired():
    x = _embeddings(40, 5, seed=32)

    interval = bootstrap_interval(linear_cka, x, x.copy(), n=20, seed=33)

    # Paired rows give CKA 1 in every resample; unpaired rows would not.
    assert interval.low == pytest.approx(1.0)
    assert interval.high == pytest.approx(1.0)


def test_bootstrap_is_seeded():
    values = np.arange(30.0)

    assert bootstrap_interval(np.mean, values, seed=5) == bootstrap_interval(np.mean, values, seed=5)
    assert bootstrap_interval(np.mean, values, seed=5) != bootstrap_interval(np.mean, values, seed=6)


def test_bootstrap_rejects_unequal_arrays():
    with pytest.raises(ConfigError, match="array 1 has 4 rows, expected 5"):
        bootstrap_interval(linear_cka, np.zeros((5, 2)), np.zeros((4, 2)))
