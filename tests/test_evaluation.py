"""Benchmark protocols on real labelled lung tiles with colour-histogram features.

The probe and retrieval numbers are checked against scikit-learn and plain numpy loops written here,
independently of shared.evaluation.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from shared.errors import ConfigError
from shared.evaluation import (
    Fold,
    evaluate_retrieval,
    load_pooled_features,
    make_folds,
    read_split_tsv,
    run_linear_probe,
    run_retrieval,
    write_split_tsv,
)
from shared.evaluation.bench_inputs import read_split_labels
from shared.evaluation.cases import cases_from_slides
from shared.features import write_features
from shared.pooling import pool_case_files
from tests.lung_features import load_lung_tiles


@pytest.fixture(scope="module")
def lung(shared_data):
    return load_lung_tiles(shared_data / "tiles" / "lc25000_lung_dedup")


@pytest.fixture(scope="module")
def lung_folds(lung):
    return make_folds(lung.labels, lung.case_ids, n_folds=5, seed=0)


def _direct_probe_metrics(train_x, train_y, test_x, test_y, *, cost, balanced):
    model = LogisticRegression(C=cost, max_iter=10000, class_weight="balanced" if balanced else None).fit(train_x, train_y)
    probabilities = model.predict_proba(test_x)
    predictions = model.predict(test_x)
    return {
        "balanced_accuracy": balanced_accuracy_score(test_y, predictions),
        "macro_auc": roc_auc_score(test_y, probabilities, multi_class="ovr", average="macro"),
        "weighted_f1": f1_score(test_y, predictions, average="weighted"),
    }


def _direct_retrieval_metrics(train_x, train_y, test_x, test_y, *, metric, ks=(1, 5, 10)):
    totals = {f"{name}{k}": 0.0 for k in ks for name in ("top", "vote", "map")}
    for query, query_label in zip(test_x, test_y):
        if metric == "l2":
            similarity = [-float(np.linalg.norm(row - query)) for row in train_x]
        else:
            similarity = [float(row @ query / (np.linalg.norm(row) * np.linalg.norm(query))) for row in train_x]
        order = sorted(range(len(train_x)), key=lambda j: (-similarity[j], j))
        for k in ks:
            retrieved = [train_y[j] for j in order[:k]]
            hits = [label == query_label for label in retrieved]
            totals[f"top{k}"] += float(any(hits))

            counts = Counter(retrieved)
            best = max(counts.values())
            winner = next(label for label in retrieved if counts[label] == best)
            totals[f"vote{k}"] += float(winner == query_label)

            precision_sum = 0.0
            for rank, hit in enumerate(hits, start=1):
                if hit:
                    precision_sum += sum(hits[:rank]) / rank
            totals[f"map{k}"] += precision_sum / k
    count = len(test_x)
    return {
        **{f"top{k}_accuracy": totals[f"top{k}"] / count for k in ks},
        **{f"majority_vote@{k}": totals[f"vote{k}"] / count for k in ks},
        **{f"mAP@{k}": totals[f"map{k}"] / count for k in ks},
    }


# Folds


def test_grouped_folds_keep_cases_together(lung, lung_folds):
    cases, sizes = np.unique(lung.case_ids, return_counts=True)
    assert 50 <= len(cases) <= 60
    assert sizes.min() >= 1
    assert sizes.max() > 5
    tested = np.concatenate([fold.test for fold in lung_folds])
    assert sorted(tested.tolist()) == list(range(len(lung.labels)))
    for fold in lung_folds:
        train_cases = set(lung.case_ids[fold.train])
        test_cases = set(lung.case_ids[fold.test])
        assert not train_cases & test_cases
        assert len(fold.train) + len(fold.test) == len(lung.labels)
        assert set(lung.labels[fold.test]) == {"lung_aca", "lung_n", "lung_scc"}


def test_single_grouped_split(lung):
    (fold,) = make_folds(lung.labels, lung.case_ids, n_folds=1, test_size=0.25, seed=3)

    assert not set(lung.case_ids[fold.train]) & set(lung.case_ids[fold.test])
    assert 0.15 < len(fold.test) / len(lung.labels) < 0.35
    for label in ("lung_aca", "lung_n", "lung_scc"):
        assert (lung.labels[fold.test] == label).sum() > 0


def test_make_folds_rejects_too_few_groups():
    with pytest.raises(ConfigError, match="3 groups"):
        make_folds(["a", "a", "b", "b"], ["g1", "g1", "g2", "g3"], n_folds=5)


def test_split_tsv_round_trip(lung, lung_folds, tmp_path):
    path = write_split_tsv(
        tmp_path / "split.tsv", case_ids=lung.case_ids, slide_ids=lung.tile_ids, labels=lung.labels, folds=lung_folds, label_column="subtype"
    )

    split = read_split_tsv(path)

    assert split.label_column == "subtype"
    assert split.slide_ids.tolist() == lung.tile_ids.tolist()
    assert split.labels.tolist() == lung.labels.tolist()
    assert len(split.folds) == 5
    for read_fold, made_fold in zip(split.folds, lung_folds):
        np.testing.assert_array_equal(read_fold.train, made_fold.train)
        np.testing.assert_array_equal(read_fold.test, made_fold.test)
        assert len(read_fold.val) == 0


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


GOOD_ROWS = [
    ["case1", "slide1", "aca", "train", "test"],
    ["case1", "slide2", "aca", "train", "test"],
    ["case2", "slide3", "scc", "test", "train"],
    ["case3", "slide4", "scc", "val", "train"],
]


def test_split_tsv_accepts_val_cells(tmp_path):
    path = _write_tsv(tmp_path / "split.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], GOOD_ROWS)

    split = read_split_tsv(path)

    assert split.folds[0].train.tolist() == [0, 1]
    assert split.folds[0].val.tolist() == [3]
    assert split.folds[0].test.tolist() == [2]
    assert split.folds[1].train.tolist() == [2, 3]


def test_split_tsv_missing_column(tmp_path):
    rows = [row[1:] for row in GOOD_ROWS]
    path = _write_tsv(tmp_path / "no_case.tsv", ["slide_id", "label", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError) as caught:
        read_split_tsv(path, label_column="label")

    assert str(path) in caught.value.message
    assert "column 'case_id' is missing" in caught.value.message


def test_split_tsv_fold_gap(tmp_path):
    path = _write_tsv(tmp_path / "gap.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_2"], GOOD_ROWS)

    with pytest.raises(ConfigError) as caught:
        read_split_tsv(path)

    assert str(path) in caught.value.message
    assert "'fold_1' is missing" in caught.value.message


def test_split_tsv_unknown_cell(tmp_path):
    rows = [list(row) for row in GOOD_ROWS]
    rows[2][4] = "training"
    path = _write_tsv(tmp_path / "cell.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError) as caught:
        read_split_tsv(path)

    assert str(path) in caught.value.message
    assert "column 'fold_1', line 4" in caught.value.message
    assert "value 'training'" in caught.value.message


def test_split_tsv_case_on_both_sides(tmp_path):
    rows = [list(row) for row in GOOD_ROWS]
    rows[1][4] = "train"
    path = _write_tsv(tmp_path / "leak.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError) as caught:
        read_split_tsv(path)

    assert str(path) in caught.value.message
    assert "column 'fold_1'" in caught.value.message
    assert "case_id 'case1' is on both the train and test sides" in caught.value.message


def test_split_tsv_repeated_slide(tmp_path):
    rows = [list(row) for row in GOOD_ROWS]
    rows[1][1] = "slide1"
    path = _write_tsv(tmp_path / "repeat.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError, match="column 'slide_id': value 'slide1' appears on 2 rows"):
        read_split_tsv(path)


def test_split_tsv_ambiguous_label_column(tmp_path):
    rows = [[*row[:3], "x", *row[3:]] for row in GOOD_ROWS]
    path = _write_tsv(tmp_path / "labels.tsv", ["case_id", "slide_id", "label", "site", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError, match="cannot tell the label column"):
        read_split_tsv(path)
    assert read_split_tsv(path, label_column="site").labels.tolist() == ["x"] * 4


# Linear probe


@pytest.mark.parametrize(("cost", "balanced"), [(1.0, True), (0.1, False)], ids=["cost1-balanced", "cost0.1-unweighted"])
def test_probe_matches_sklearn(lung, lung_folds, cost, balanced):
    result = run_linear_probe(lung.features, lung.labels, lung_folds, cost=cost, balanced=balanced)

    direct = [
        _direct_probe_metrics(
            lung.features[fold.train], lung.labels[fold.train], lung.features[fold.test], lung.labels[fold.test], cost=cost, balanced=balanced
        )
        for fold in lung_folds
    ]
    for number, (ours, expected) in enumerate(zip(result.fold_metrics, direct)):
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, abs=1e-9), f"fold {number} {name}: ours {ours[name]}, sklearn {value}"

    for name in ("balanced_accuracy", "macro_auc", "weighted_f1"):
        values = np.array([metrics[name] for metrics in direct])
        summary = result.summary[name]
        assert summary.method == "folds"
        assert summary.count == 5
        assert summary.mean == pytest.approx(values.mean())
        assert summary.standard_error == pytest.approx(values.std(ddof=1) / np.sqrt(5))


def test_probe_beats_chance_on_histograms(lung, lung_folds):
    result = run_linear_probe(lung.features, lung.labels, lung_folds, cost=100.0)

    # Colour histograms separate these classes well above chance (1/3): 0.89 on these five folds when written.
    assert result.summary["balanced_accuracy"].mean > 0.6


def test_probe_bootstrap_with_one_fold(lung):
    folds = make_folds(lung.labels, lung.case_ids, n_folds=1, test_size=0.3, seed=1)

    result = run_linear_probe(lung.features, lung.labels, folds, cost=1.0, bootstrap_resamples=100, seed=5)
    again = run_linear_probe(lung.features, lung.labels, folds, cost=1.0, bootstrap_resamples=100, seed=5)

    fold = folds[0]
    direct = _direct_probe_metrics(
        lung.features[fold.train], lung.labels[fold.train], lung.features[fold.test], lung.labels[fold.test], cost=1.0, balanced=True
    )
    summary = result.summary["balanced_accuracy"]
    assert summary.method == "bootstrap"
    assert summary.count == 100
    assert summary.mean == pytest.approx(direct["balanced_accuracy"])
    assert 0.0 < summary.standard_error < 0.2
    assert summary.low <= summary.high
    assert summary.low <= direct["balanced_accuracy"] + 0.05
    assert summary.high >= direct["balanced_accuracy"] - 0.05
    assert again.summary == result.summary


def test_probe_rejects_unseen_test_label(lung):
    train = np.flatnonzero(lung.labels != "lung_scc")
    test = np.flatnonzero(lung.labels == "lung_scc")[:10]

    with pytest.raises(ConfigError, match=r"test labels \['lung_scc'\] never occur"):
        run_linear_probe(lung.features, lung.labels, [Fold(train=train, val=np.array([], dtype=int), test=test)])


# Retrieval


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_retrieval_matches_numpy_loop(lung, lung_folds, metric):
    fold = lung_folds[0]
    train_x, train_y = lung.features[fold.train], lung.labels[fold.train]
    test_x, test_y = lung.features[fold.test], lung.labels[fold.test]

    ours = evaluate_retrieval(train_x, train_y, test_x, test_y, metric=metric).metrics
    expected = _direct_retrieval_metrics(train_x, train_y, test_x, test_y, metric=metric)

    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), f"{metric} {name}: ours {ours[name]}, direct {value}"
    assert ours["top5_accuracy"] >= ours["top1_accuracy"]
    assert ours["top1_accuracy"] == pytest.approx(ours["mAP@1"])
    assert ours["top1_accuracy"] == pytest.approx(ours["majority_vote@1"])


def test_retrieval_hand_computed_example():
    database = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    database_labels = np.array(["a", "b", "a", "b", "a"])
    queries = np.array([[0.1], [2.9]])
    query_labels = np.array(["a", "b"])

    result = evaluate_retrieval(database, database_labels, queries, query_labels, metric="l2", ks=(1, 3))

    # Query 0 retrieves a, b, a: hits at ranks 1 and 3, so mAP@3 = (1/1 + 2/3) / 3.
    # Query 1 retrieves b, a, b: hits at ranks 1 and 3, the same.
    assert result.ranked.tolist() == [[0, 1, 2], [3, 2, 1]]
    assert result.metrics["top1_accuracy"] == 1.0
    assert result.metrics["majority_vote@3"] == 1.0
    assert result.metrics["mAP@3"] == pytest.approx((1.0 + 2.0 / 3.0) / 3.0)


def test_majority_vote_tie_goes_to_nearest():
    database = np.array([[0.0], [1.0], [2.0], [3.0]])
    database_labels = np.array(["b", "a", "a", "b"])

    result = evaluate_retrieval(database, database_labels, np.array([[0.0]]), np.array(["b"]), metric="l2", ks=(4,))

    assert result.metrics["majority_vote@4"] == 1.0


def test_retrieval_bootstrap_with_one_fold(lung):
    folds = make_folds(lung.labels, lung.case_ids, n_folds=1, test_size=0.3, seed=1)

    result = run_retrieval(lung.features, lung.labels, folds, metric="cosine", bootstrap_resamples=100, seed=0)

    summary = result.summary["mAP@5"]
    assert summary.method == "bootstrap"
    assert summary.count == 100
    assert summary.mean == pytest.approx(result.fold_metrics[0]["mAP@5"])
    assert 0.0 < summary.standard_error < 0.2


def test_retrieval_rejects_k_above_database():
    with pytest.raises(ConfigError, match="k is 10 for a database of 3 samples"):
        evaluate_retrieval(np.eye(3), np.array([0, 1, 2]), np.eye(3), np.array([0, 1, 2]))


# Slide-level task: pooled HDF5 features and a split TSV


def test_case_level_task_from_pooled_files(lung, tmp_path):
    """Split each made-up case into two slides, pool their HDF5 files into a case file, and probe the cases."""
    slide_folder = tmp_path / "patches"
    case_folder = tmp_path / "cases"
    case_rows = []
    for case_id in sorted(set(lung.case_ids)):
        rows = np.flatnonzero(lung.case_ids == case_id)
        halves = {f"{case_id}-s0": rows[: len(rows) // 2 or 1], f"{case_id}-s1": rows[len(rows) // 2 or 1 :]}
        paths = {}
        for slide_id, slide_rows in halves.items():
            if len(slide_rows) == 0:
                continue
            coords = np.stack([np.arange(len(slide_rows)) * 224, np.zeros(len(slide_rows))], axis=1).astype(np.int64)
            paths[slide_id] = write_features(
                slide_folder / f"{slide_id}.h5", coords=coords, features=lung.features[slide_rows], attrs={"encoder": "colour-histogram-48", "patch_size": 224}
            )
        pool_case_files(paths, case_folder / f"{case_id}.h5", case_id=case_id, method="mean", fusion="early")
        case_rows.append((case_id, lung.labels[rows[0]]))

    case_ids = np.array([case_id for case_id, _ in case_rows], dtype=object)
    labels = np.array([label for _, label in case_rows], dtype=object)
    folds = make_folds(labels, case_ids, n_folds=3, seed=0)
    split_path = write_split_tsv(tmp_path / "cases.tsv", case_ids=case_ids, slide_ids=case_ids, labels=labels, folds=folds)
    split = read_split_tsv(split_path)
    features = load_pooled_features(case_folder, split.slide_ids)

    expected_features = np.stack([lung.features[lung.case_ids == case_id].mean(axis=0) for case_id in split.slide_ids])
    np.testing.assert_allclose(features, expected_features, rtol=1e-5, atol=1e-7)
    result = run_linear_probe(features, split.labels, split.folds, cost=10.0)
    direct = [
        _direct_probe_metrics(features[fold.train], split.labels[fold.train], features[fold.test], split.labels[fold.test], cost=10.0, balanced=True)
        for fold in split.folds
    ]
    for ours, expected in zip(result.fold_metrics, direct):
        assert ours["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
        assert ours["macro_auc"] == pytest.approx(expected["macro_auc"])


def test_load_pooled_features_rejects_patch_file(tmp_path):
    write_features(tmp_path / "s1.h5", coords=np.zeros((2, 2), dtype=np.int64), features=np.ones((2, 4)), attrs={"encoder": "x"})

    with pytest.raises(ConfigError, match="has 2 rows, expected one pooled row"):
        load_pooled_features(tmp_path, ["s1"])


# Bootstrap by case


COPIES = 4


@pytest.fixture(scope="module")
def copied_tiles(lung):
    """Every real tile copied 4 times into a pseudo-slide of its own: the strongest within-group correlation."""
    features = np.repeat(lung.features, COPIES, axis=0)
    labels = np.repeat(lung.labels, COPIES)
    groups = np.repeat(lung.tile_ids, COPIES)
    (fold,) = make_folds(labels, groups, n_folds=1, test_size=0.3, seed=1)
    return features, labels, groups, fold


def _direct_group_resamples(test_groups: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Draw groups with replacement as a plain loop: groups numbered by first row, each drawn group adding all its rows."""
    order = []
    members = {}
    for row, group in enumerate(test_groups.tolist()):
        if group not in members:
            order.append(group)
            members[group] = []
        members[group].append(row)
    generator = np.random.default_rng(seed)
    resamples = []
    for _ in range(n):
        drawn = generator.integers(0, len(order), size=len(order))
        resamples.append(np.array([row for index in drawn for row in members[order[index]]]))
    return resamples


def _interval(values: list[float]) -> tuple[float, float, float]:
    values = np.array(values)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(values.std(ddof=1)), float(low), float(high)


def test_grouped_probe_bootstrap_matches_numpy(copied_tiles):
    features, labels, groups, fold = copied_tiles

    result = run_linear_probe(features, labels, [fold], cost=1.0, bootstrap_resamples=100, seed=7, groups=groups)

    model = LogisticRegression(C=1.0, max_iter=10000, class_weight="balanced").fit(features[fold.train], labels[fold.train])
    predictions = model.predict(features[fold.test])
    test_labels = labels[fold.test]
    resampled = [balanced_accuracy_score(test_labels[rows], predictions[rows]) for rows in _direct_group_resamples(groups[fold.test], 100, 7)]
    standard_error, low, high = _interval(resampled)
    summary = result.summary["balanced_accuracy"]
    assert summary.method == "bootstrap"
    assert summary.count == 100
    assert summary.mean == pytest.approx(balanced_accuracy_score(test_labels, predictions), abs=1e-12)
    assert summary.standard_error == pytest.approx(standard_error, abs=1e-12)
    assert summary.low == pytest.approx(low, abs=1e-12)
    assert summary.high == pytest.approx(high, abs=1e-12)


def test_grouped_retrieval_bootstrap_matches_numpy(copied_tiles):
    features, labels, groups, fold = copied_tiles

    result = run_retrieval(features, labels, [fold], metric="l2", ks=(1,), bootstrap_resamples=100, seed=3, groups=groups)

    train_x, test_x = features[fold.train], features[fold.test]
    distances = np.linalg.norm(test_x[:, None, :] - train_x[None, :, :], axis=2)
    hits = (labels[fold.train][np.argmin(distances, axis=1)] == labels[fold.test]).astype(np.float64)
    resampled = [hits[rows].mean() for rows in _direct_group_resamples(groups[fold.test], 100, 3)]
    standard_error, low, high = _interval(resampled)
    summary = result.summary["top1_accuracy"]
    assert summary.mean == pytest.approx(hits.mean(), abs=1e-12)
    assert summary.standard_error == pytest.approx(standard_error, abs=1e-12)
    assert summary.low == pytest.approx(low, abs=1e-12)
    assert summary.high == pytest.approx(high, abs=1e-12)


def test_grouped_interval_wider_than_per_sample(copied_tiles):
    """With 4 identical copies per group, drawing copies one by one shrinks the interval by about sqrt(4) = 2."""
    features, labels, groups, fold = copied_tiles
    options = {"bootstrap_resamples": 100, "seed": 0}

    probe = {unit: run_linear_probe(features, labels, [fold], groups=unit_groups, **options) for unit, unit_groups in (("case", groups), ("sample", None))}
    retrieval = {
        unit: run_retrieval(features, labels, [fold], metric="cosine", ks=(1,), groups=unit_groups, **options)
        for unit, unit_groups in (("case", groups), ("sample", None))
    }

    for name, results, metric in (("probe", probe, "balanced_accuracy"), ("retrieval", retrieval, "top1_accuracy")):
        grouped, per_sample = results["case"].summary[metric], results["sample"].summary[metric]
        assert grouped.mean == per_sample.mean, name
        assert grouped.standard_error > 1.5 * per_sample.standard_error, f"{name}: {grouped} against {per_sample}"
        assert grouped.high - grouped.low > 1.5 * (per_sample.high - per_sample.low), f"{name}: {grouped} against {per_sample}"


def test_singleton_groups_equal_per_sample_bootstrap(lung):
    folds = make_folds(lung.labels, lung.case_ids, n_folds=1, test_size=0.3, seed=1)

    grouped = run_linear_probe(lung.features, lung.labels, folds, bootstrap_resamples=30, seed=2, groups=lung.tile_ids)
    per_sample = run_linear_probe(lung.features, lung.labels, folds, bootstrap_resamples=30, seed=2)

    assert grouped.summary == per_sample.summary


def test_grouped_bootstrap_needs_two_test_cases(lung):
    train = np.flatnonzero(lung.case_ids != lung.case_ids[0])
    test = np.flatnonzero(lung.case_ids == lung.case_ids[0])
    fold = Fold(train=train, val=np.array([], dtype=int), test=test)

    with pytest.raises(ConfigError, match=r"1 groups \(cases\) among the test samples, expected at least 2"):
        run_retrieval(lung.features, lung.labels, [fold], groups=lung.case_ids)
    with pytest.raises(ConfigError, match=r"groups have shape \(299,\), expected one case id per feature row"):
        run_retrieval(lung.features, lung.labels, [fold], groups=lung.case_ids[:-1])


# Case-level tasks from a slide table


def test_cases_from_split_keep_each_case_side(tmp_path):
    path = _write_tsv(tmp_path / "split.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], GOOD_ROWS)

    table = cases_from_slides(read_split_labels(path))

    assert table.labels.sample_ids.tolist() == ["case1", "case2", "case3"]
    assert table.labels.labels.tolist() == ["aca", "scc", "scc"]
    assert table.slides == {"case1": ["slide1", "slide2"], "case2": ["slide3"], "case3": ["slide4"]}
    assert table.case_of_slide.tolist() == [0, 0, 1, 2]
    first, second = table.labels.folds
    assert (first.train.tolist(), first.val.tolist(), first.test.tolist()) == ([0], [2], [1])
    assert (second.train.tolist(), second.val.tolist(), second.test.tolist()) == ([1, 2], [], [0])


def test_cases_from_slides_rejects_mixed_labels(tmp_path):
    rows = [list(row) for row in GOOD_ROWS]
    rows[1][2] = "scc"
    path = _write_tsv(tmp_path / "mixed.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError) as caught:
        cases_from_slides(read_split_labels(path))

    message = caught.value.message
    assert f"labels file {path}: the slides of case 'case1' have different labels in column 'label' (slide1 'aca', slide2 'scc')" in message
    assert "Give every slide of the case the same label, give slides with other labels their own case_id, or pass --level tile." in message


def test_cases_from_slides_rejects_path_in_case_id(tmp_path):
    rows = [list(row) for row in GOOD_ROWS]
    rows[2][0] = "site/case2"
    path = _write_tsv(tmp_path / "slash.tsv", ["case_id", "slide_id", "label", "fold_0", "fold_1"], rows)

    with pytest.raises(ConfigError, match=r"case_id 'site/case2' cannot name a feature file"):
        cases_from_slides(read_split_labels(path))
