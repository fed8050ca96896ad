"""``unite bench`` on the labelled LC25000 lung tiles, with two colour-histogram feature sets written as HDF5 files.

The two models are the 48-bin RGB histogram of each tile (16 bins per channel) and the same histogram
with adjacent bins summed (8 per channel, 24-d), so their spaces are related but not equal. The
report's numbers are checked against shared.evaluation and shared.agreement called directly.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.agreement import knn_overlap, linear_cka, nearest_neighbour_label_agreement
from shared.errors import ConfigError
from shared.evaluation import bootstrap as bootstrap_module
from shared.evaluation import make_folds, read_split_tsv, run_linear_probe, run_retrieval, write_split_tsv
from shared.evaluation.bench import BenchOptions, run_bench
from shared.evaluation.bench_inputs import LEVELS as INPUT_LEVELS
from shared.evaluation.bench_inputs import FeatureSet, ModelInfo, expand_fold
from shared.evaluation.report import MAP_METHODS as REPORT_MAP_METHODS
from shared.evaluation.report import write_report
from shared.features import read_features, write_features
from tests.lung_features import load_lung_tiles
from unite_cli import bench as bench_cli
from unite_cli.main import main

NAMES = ("hist16", "hist8")


def _coarse(features: np.ndarray) -> np.ndarray:
    """Sum adjacent pairs of the 16 bins of each channel: 8 bins per channel, 24-d."""
    return features.reshape(len(features), 3, 8, 2).sum(axis=3).reshape(len(features), -1)


def _write_pooled(folder: Path, tile_ids, features: np.ndarray, encoder: str, attrs: dict | None = None) -> Path:
    for tile_id, row in zip(tile_ids, features):
        write_features(
            folder / f"{tile_id}.h5", coords=np.zeros((1, 2), dtype=np.int64), features=row[None], attrs={"encoder": encoder, **(attrs or {})}, pooled=True
        )
    return folder


def _write_labels(path: Path, rows) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["slide_id", "case_id", "label"])
        writer.writerows(rows)
    return path


def _bench_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "unite_cli.main", "bench", *arguments]


@pytest.fixture(scope="module")
def lung(shared_data):
    return load_lung_tiles(shared_data / "tiles" / "lc25000_lung_dedup")


@pytest.fixture(scope="module")
def lung_inputs(lung, tmp_path_factory):
    """Pooled feature folders of both models (one file per tile) and a labels CSV with made-up cases."""
    root = tmp_path_factory.mktemp("bench_inputs")
    folders = {
        "hist16": _write_pooled(root / "hist16", lung.tile_ids, lung.features, "colour-histogram-16"),
        "hist8": _write_pooled(root / "hist8", lung.tile_ids, _coarse(lung.features), "colour-histogram-8", attrs={"parameters": 0}),
    }
    labels = _write_labels(root / "labels.csv", zip(lung.tile_ids, lung.case_ids, lung.labels))
    return {"root": root, "folders": folders, "labels": labels}


@pytest.fixture(scope="module")
def five_fold_report(lung_inputs, tmp_path_factory):
    """Run unite bench as a subprocess with five folds made by the tool."""
    out = tmp_path_factory.mktemp("bench_report")
    folders = lung_inputs["folders"]
    completed = subprocess.run(
        _bench_command(
            "--features", f"hist16={folders['hist16']}", "--features", f"hist8={folders['hist8']}",
            "--labels", str(lung_inputs["labels"]), "--out", str(out), "--cost", "0.5",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    return {"out": out, "stdout": completed.stdout, "json": json.loads((out / "report.json").read_text())}


def _parse_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """Return the model names of the table header and each row's cells by metric name."""
    lines = markdown.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| metric |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header[1:], rows


def _numbers(cell: str) -> list[float]:
    return [float(value.replace(",", "")) for value in re.findall(r"-?\d[\d,]*\.?\d*", cell)]


def _expected_cell_numbers(summary: dict) -> list[float]:
    if summary["method"] == "bootstrap":
        return [summary["estimate"], summary["low"], summary["high"]]
    return [summary["estimate"], summary["standard_error"]]


def _check_table_against_json(markdown: str, report: dict) -> int:
    """Assert that every number of the markdown table is the rounded JSON value, and return how many were checked."""
    names, rows = _parse_table(markdown)
    assert names == list(report["models"])
    checked = 0
    for metric, cells in rows.items():
        for name, cell in zip(names, cells):
            model = report["models"][name]
            if metric == "parameters":
                expected = [] if model["parameters"] is None else [model["parameters"]]
            elif metric == "embedding dimension":
                expected = [model["embedding_dim"]]
            elif metric == "throughput (tiles/s)":
                expected = [] if model["throughput_tiles_per_s"] is None else [round(model["throughput_tiles_per_s"], 1)]
            elif metric.startswith("agreement."):
                if name == report["task"]["reference"]:
                    assert cell == "reference"
                    continue
                expected = [round(value, 3) for value in _expected_cell_numbers(report["agreement"][name]["metrics"][metric.removeprefix("agreement.")])]
            else:
                expected = [round(value, 3) for value in _expected_cell_numbers(model["metrics"][metric])]
            if not expected:
                assert cell == "not given", f"{metric} of {name}: {cell!r}"
                continue
            found = _numbers(cell)
            assert found == pytest.approx(expected, abs=6e-4), f"{metric} of {name}: table {cell!r}, JSON {expected}"
            checked += len(found)
    return checked


# The report of a five-fold run


def test_report_files_written(five_fold_report):
    out = five_fold_report["out"]

    assert (out / "report.md").is_file()
    assert (out / "split.tsv").is_file()
    for name in ("metrics.png", "embeddings.png"):
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width > 400
            assert image.height > 300
    assert "hist16: balanced accuracy" in five_fold_report["stdout"]
    markdown = (out / "report.md").read_text()
    assert "![metrics with error bars](metrics.png)" in markdown
    assert "mean ± standard error over folds" in markdown


def test_table_numbers_match_json(five_fold_report):
    report = five_fold_report["json"]
    markdown = (five_fold_report["out"] / "report.md").read_text()

    checked = _check_table_against_json(markdown, report)

    names, rows = _parse_table(markdown)
    # 3 probe metrics and 18 retrieval metrics per model, 3 agreement metrics for hist8.
    assert len([metric for metric in rows if metric.startswith(("linear_probe.", "retrieval_"))]) == 21
    assert rows["agreement.knn_overlap@10"][1] != "reference"
    assert rows["parameters"] == ["not given", "0"]
    assert rows["embedding dimension"] == ["48", "24"]
    assert checked >= 2 * 21 * 2 + 3 * 2
    assert report["task"]["interval"] == "folds"
    assert report["task"]["folds"] == 5
    assert report["task"]["classes"] == {"lung_aca": 100, "lung_n": 100, "lung_scc": 100}


def test_missing_information_is_stated(five_fold_report):
    report = five_fold_report["json"]
    markdown = (five_fold_report["out"] / "report.md").read_text()

    assert report["models"]["hist16"]["parameters"] is None
    assert report["models"]["hist8"]["parameters"] == 0
    assert report["models"]["hist8"]["info_source"] == "feature file attributes"
    assert any("No parameter count was given for hist16." in sentence for sentence in report["missing"])
    assert any("No measured throughput was given for hist16, hist8." in sentence for sentence in report["missing"])
    assert "--model-info NAME=JSON" in markdown


def test_probe_and_retrieval_equal_direct_results(five_fold_report, lung_inputs):
    report = five_fold_report["json"]
    split = read_split_tsv(five_fold_report["out"] / "split.tsv")
    for fold in split.folds:
        assert not set(split.case_ids[fold.train]) & set(split.case_ids[fold.test])

    for name in NAMES:
        features = np.stack([read_features(lung_inputs["folders"][name] / f"{sample}.h5").features[0] for sample in split.slide_ids])
        direct = {"linear_probe": run_linear_probe(features, split.labels, split.folds, cost=0.5, balanced=True)}
        for metric in ("l2", "cosine"):
            direct[f"retrieval_{metric}"] = run_retrieval(features, split.labels, split.folds, metric=metric)

        ours = report["models"][name]
        for protocol, result in direct.items():
            for fold_number, (reported, expected) in enumerate(zip(ours["fold_metrics"][protocol], result.fold_metrics)):
                for metric, value in expected.items():
                    assert reported[metric] == pytest.approx(value, abs=1e-12), f"{name} {protocol} fold {fold_number} {metric}"
            for metric, summary in result.summary.items():
                reported = ours["metrics"][f"{protocol}.{metric}"]
                assert reported["estimate"] == pytest.approx(summary.mean, abs=1e-12), f"{name} {protocol}.{metric}"
                assert reported["standard_error"] == pytest.approx(summary.standard_error, abs=1e-12)
                assert reported["method"] == "folds"


def test_agreement_equals_direct_results(five_fold_report, lung_inputs):
    report = five_fold_report["json"]
    split = read_split_tsv(five_fold_report["out"] / "split.tsv")
    reference, model = (
        np.stack([read_features(lung_inputs["folders"][name] / f"{sample}.h5").features[0] for sample in split.slide_ids]) for name in NAMES
    )

    agreement = report["agreement"]["hist8"]
    assert agreement["reference"] == "hist16"
    assert agreement["metrics"]["linear_cka"]["estimate"] == pytest.approx(linear_cka(reference, model), abs=1e-12)
    assert agreement["metrics"]["knn_overlap@10"]["estimate"] == pytest.approx(knn_overlap(reference, model, k=10), abs=1e-12)
    assert agreement["metrics"]["nn_label_agreement"]["estimate"] == pytest.approx(
        nearest_neighbour_label_agreement(reference, model, split.labels), abs=1e-12
    )
    assert agreement["knn_overlap_chance"] == pytest.approx(10 / 299)
    for summary in agreement["metrics"].values():
        assert summary["method"] == "bootstrap"
        assert summary["low"] <= summary["estimate"] <= summary["high"]
    assert "hist16" not in report["agreement"]


# One fold, model information, no torch


def test_one_fold_bootstraps_without_torch(lung, lung_inputs, tmp_path):
    folders = lung_inputs["folders"]
    info = tmp_path / "hist16.json"
    info.write_text(json.dumps({"parameters": 18092160, "embedding_dim": 48, "throughput_tiles_per_s": 3000.0, "throughput_note": "numpy on 2 CPU cores"}))
    out = tmp_path / "report"
    script = "import sys; from unite_cli.main import main; status = main(sys.argv[1:]); sys.exit(3 if 'torch' in sys.modules else status)"

    completed = subprocess.run(
        [
            sys.executable, "-c", script, "bench",
            "--features", f"hist8={folders['hist8']}", "--features", f"hist16={folders['hist16']}",
            "--reference", "hist16", "--labels", str(lung_inputs["labels"]), "--out", str(out),
            "--folds", "1", "--test-size", "0.3", "--no-balanced", "--bootstrap", "50",
            "--model-info", f"hist16={info}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert completed.returncode == 0, f"exit {completed.returncode} (3 means torch was imported): {completed.stderr}"
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    _check_table_against_json(markdown, report)
    names, rows = _parse_table(markdown)
    assert names == ["hist8", "hist16"]
    assert rows["parameters"] == ["0", "18,092,160"]
    assert rows["throughput (tiles/s)"] == ["not given", "3000.0"]
    assert rows["agreement.linear_cka"][1] == "reference"
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", rows["linear_probe.balanced_accuracy"][0])
    assert report["task"]["interval"] == "bootstrap"
    assert report["options"]["balanced"] is False
    assert report["models"]["hist16"]["metrics"]["linear_probe.balanced_accuracy"]["count"] == 50
    # The labels give made-up cases of several tiles each, so the bootstraps draw cases.
    assert report["task"]["bootstrap_unit"] == "case"
    assert report["task"]["bootstrap_cases"] == len(set(lung.case_ids))
    assert "bootstrap resamples of the test cases" in markdown
    assert "Throughput of hist16: numpy on 2 CPU cores." in markdown
    with Image.open(out / "embeddings.png") as image:
        assert image.format == "PNG"


def test_cli_constants_match_library():
    assert bench_cli.LEVELS == INPUT_LEVELS
    assert bench_cli.MAP_METHODS == REPORT_MAP_METHODS
    assert bench_cli.BOOTSTRAP_RESAMPLES == bootstrap_module.BOOTSTRAP_RESAMPLES


# Tile level with a Patho-Bench split


def test_tile_level_with_split(lung, tmp_path, caplog):
    """Each made-up case becomes a slide whose patch file contains its tiles; the split TSV lists the slides."""
    rng = np.random.default_rng(0)
    noisy = lung.features + rng.normal(scale=0.01, size=lung.features.shape)
    slides = sorted(set(lung.case_ids))
    folders = {"hist16": tmp_path / "hist16", "noisy": tmp_path / "noisy"}
    for slide_id in slides:
        rows = np.flatnonzero(lung.case_ids == slide_id)
        coords = np.stack([np.arange(len(rows)) * 224, np.zeros(len(rows))], axis=1).astype(np.int64)
        write_features(folders["hist16"] / f"{slide_id}.h5", coords=coords, features=lung.features[rows], attrs={"encoder": "hist16"})
        write_features(folders["noisy"] / f"{slide_id}.h5", coords=coords, features=noisy[rows], attrs={"encoder": "noisy"})
    slide_labels = np.array([lung.labels[lung.case_ids == slide_id][0] for slide_id in slides], dtype=object)
    slide_folds = make_folds(slide_labels, np.array(slides, dtype=object), n_folds=3, seed=2)
    split_path = write_split_tsv(tmp_path / "split.tsv", case_ids=slides, slide_ids=slides, labels=slide_labels, folds=slide_folds, label_column="subtype")
    out = tmp_path / "report"

    status = main(
        [
            "bench", "--features", f"hist16={folders['hist16']}", "--features", f"noisy={folders['noisy']}",
            "--split", str(split_path), "--level", "tile", "--out", str(out),
        ]
    )

    assert status == 0, caplog.text
    assert not (out / "split.tsv").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["samples"] == 300
    assert report["task"]["folds"] == 3
    slide_of_row = np.concatenate([np.full(int((lung.case_ids == slide_id).sum()), index) for index, slide_id in enumerate(slides)])
    tile_rows = np.concatenate([np.flatnonzero(lung.case_ids == slide_id) for slide_id in slides])
    tile_folds = [expand_fold(fold, slide_of_row) for fold in slide_folds]
    direct = run_linear_probe(lung.features[tile_rows], lung.labels[tile_rows], tile_folds)
    for reported, expected in zip(report["models"]["hist16"]["fold_metrics"]["linear_probe"], direct.fold_metrics):
        assert reported["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"], abs=1e-12)
    # Noise of 0.01 on histograms whose bins are about 0.02 leaves the geometry mostly intact.
    assert report["agreement"]["noisy"]["metrics"]["linear_cka"]["estimate"] > 0.8


def test_tile_level_rejects_other_coords(tmp_path, caplog):
    coords = np.array([[0, 0], [224, 0]], dtype=np.int64)
    folders = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for slide_id in ("s1", "s2", "s3", "s4"):
        write_features(folders["a"] / f"{slide_id}.h5", coords=coords, features=np.eye(2, 4), attrs={"encoder": "a"})
        write_features(folders["b"] / f"{slide_id}.h5", coords=coords if slide_id != "s3" else coords + 1, features=np.eye(2, 4), attrs={"encoder": "b"})
    labels = _write_labels(tmp_path / "labels.csv", [("s1", "c1", "x"), ("s2", "c2", "y"), ("s3", "c3", "x"), ("s4", "c4", "y")])

    with caplog.at_level(logging.ERROR, logger="unite"):
        status = main(
            [
                "bench", "--features", f"a={folders['a']}", "--features", f"b={folders['b']}",
                "--labels", str(labels), "--level", "tile", "--folds", "2", "--out", str(tmp_path / "out"),
            ]
        )

    assert status == 2
    assert f"--features b: {folders['b'] / 's3.h5'} has 2 patches whose coords differ from those of model 'a'" in caplog.text
    assert "Embed the same patch files, in the same order, with every model." in caplog.text


# In-memory entry point


def test_run_bench_in_memory(lung, tmp_path):
    # 30 tiles per class keep the t-SNE map quick.
    rows = np.concatenate([np.flatnonzero(lung.labels == label)[:30] for label in ("lung_aca", "lung_n", "lung_scc")])
    labels = lung.labels[rows]
    folds = make_folds(labels, lung.case_ids[rows], n_folds=2, seed=1)
    sets = [FeatureSet("teacher", lung.features[rows], ModelInfo(parameters=681394176)), FeatureSet("student", _coarse(lung.features[rows]))]

    result = run_bench(sets, labels, folds, BenchOptions(ks=(1, 5), retrieval_metrics=("cosine",), knn_k=5))
    files = write_report(result, tmp_path, map_method="tsne")

    assert result.reference == "teacher"
    assert [model.name for model in result.models] == ["teacher", "student"]
    assert set(result.models[0].protocols) == {"linear_probe", "retrieval_cosine"}
    assert "retrieval_cosine.top5_accuracy" in result.models[1].metrics()
    assert "knn_overlap@5" in result.agreement[0].metrics
    assert "| parameters | 681,394,176 | not given |" in files.markdown.read_text()
    with Image.open(files.embeddings_figure) as image:
        assert image.format == "PNG"


def _resample_by_group(groups: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Draw groups with replacement (numbered by first row) and return each resample's rows, as a plain loop."""
    first_seen = list(dict.fromkeys(groups.tolist()))
    members = {group: np.flatnonzero(groups == group) for group in first_seen}
    generator = np.random.default_rng(seed)
    return [np.concatenate([members[first_seen[index]] for index in generator.integers(0, len(first_seen), len(first_seen))]) for _ in range(n)]


def _cosine_nearest_labels(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return labels[np.argmax(similarity, axis=1)]


def test_run_bench_resamples_cases(lung, tmp_path):
    rows = np.concatenate([np.flatnonzero(lung.labels == label)[:30] for label in ("lung_aca", "lung_n", "lung_scc")])
    labels, groups = lung.labels[rows], lung.case_ids[rows]
    folds = make_folds(labels, groups, n_folds=1, test_size=0.3, seed=1)
    teacher, student = lung.features[rows], _coarse(lung.features[rows])
    sets = [FeatureSet("teacher", teacher), FeatureSet("student", student)]
    options = BenchOptions(ks=(1,), retrieval_metrics=("cosine",), knn_k=5, bootstrap_resamples=40, seed=4)

    result = run_bench(sets, labels, folds, options, groups=groups)
    files = write_report(result, tmp_path / "grouped")

    resamples = _resample_by_group(groups, 40, 4)
    agreement = (_cosine_nearest_labels(teacher, labels) == _cosine_nearest_labels(student, labels)).astype(np.float64)
    for name, values in (
        ("nn_label_agreement", [agreement[rows].mean() for rows in resamples]),
        ("linear_cka", [linear_cka(teacher[rows], student[rows]) for rows in resamples]),
    ):
        summary = result.agreement[0].metrics[name]
        low, high = np.percentile(values, [2.5, 97.5])
        assert summary.standard_error == pytest.approx(np.std(values, ddof=1), abs=1e-12), name
        assert summary.low == pytest.approx(low, abs=1e-12), name
        assert summary.high == pytest.approx(high, abs=1e-12), name
    assert result.agreement[0].metrics["nn_label_agreement"].mean == pytest.approx(agreement.mean(), abs=1e-12)

    report = json.loads(files.json.read_text())
    markdown = files.markdown.read_text()
    assert report["task"]["bootstrap_unit"] == "case"
    assert report["task"]["bootstrap_cases"] == len(set(groups))
    assert "bootstrap resamples of the test cases" in markdown
    assert "Agreement with the reference is bootstrapped over all cases" in markdown
    assert f"- bootstrap unit: case. Each resample draws cases with replacement and takes every sample of each drawn case ({len(set(groups))} cases" in markdown


def test_run_bench_without_groups_says_samples(lung, tmp_path):
    rows = np.concatenate([np.flatnonzero(lung.labels == label)[:20] for label in ("lung_aca", "lung_n", "lung_scc")])
    folds = make_folds(lung.labels[rows], lung.case_ids[rows], n_folds=1, test_size=0.3, seed=1)
    sets = [FeatureSet("teacher", lung.features[rows]), FeatureSet("student", _coarse(lung.features[rows]))]

    result = run_bench(sets, lung.labels[rows], folds, BenchOptions(ks=(1,), retrieval_metrics=("l2",), knn_k=5, bootstrap_resamples=20))
    files = write_report(result, tmp_path)

    report = json.loads(files.json.read_text())
    markdown = files.markdown.read_text()
    assert report["task"]["bootstrap_unit"] == "sample"
    assert report["task"]["bootstrap_cases"] is None
    assert "bootstrap resamples of the test samples" in markdown
    assert "- bootstrap unit: sample. Each resample draws single samples with replacement, because no case ids were given." in markdown
    assert "these intervals are too narrow when a case contributes several samples" in markdown
    with pytest.raises(ConfigError, match=r"groups have shape \(59,\), expected one case id per labelled sample"):
        run_bench(sets, lung.labels[rows], folds, groups=lung.case_ids[rows][:-1])


def test_run_bench_rejects_bad_sets(lung):
    folds = make_folds(lung.labels, lung.case_ids, n_folds=2, seed=1)
    one = [FeatureSet("teacher", lung.features)]
    with pytest.raises(ConfigError, match="expected at least 2 models"):
        run_bench(one, lung.labels, folds)
    with pytest.raises(ConfigError, match="reference 'uni' is not one of the models"):
        run_bench([one[0], FeatureSet("student", lung.features)], lung.labels, folds, BenchOptions(reference="uni"))
    with pytest.raises(ConfigError, match=r"has features of shape \(299, 48\), expected \(300, D\)"):
        run_bench([one[0], FeatureSet("student", lung.features[:-1])], lung.labels, folds)


# Bad inputs: each error names the file and the fix


@pytest.fixture
def bad_inputs(lung_inputs, tmp_path):
    """Copies of both feature folders and the labels, which a test may damage."""
    folders = {name: Path(shutil.copytree(folder, tmp_path / name)) for name, folder in lung_inputs["folders"].items()}
    labels = Path(shutil.copy(lung_inputs["labels"], tmp_path / "labels.csv"))
    return {"folders": folders, "labels": labels, "out": tmp_path / "report"}


def _run_failing(inputs: dict, caplog, *extra: str) -> str:
    folders = inputs["folders"]
    arguments = [
        "bench", "--features", f"hist16={folders['hist16']}", "--features", f"hist8={folders['hist8']}",
        "--labels", str(inputs["labels"]), "--out", str(inputs["out"]), *extra,
    ]
    with caplog.at_level(logging.ERROR, logger="unite"):
        status = main(arguments)
    assert status == 2
    assert not (inputs["out"] / "report.md").exists()
    return caplog.text


def test_sample_missing_from_one_model(bad_inputs, lung, caplog):
    missing = bad_inputs["folders"]["hist8"] / f"{lung.tile_ids[7]}.h5"
    missing.unlink()

    message = _run_failing(bad_inputs, caplog)

    assert f"--features hist8={bad_inputs['folders']['hist8']}: 1 labelled samples have no feature file (first: {missing})" in message
    assert "but model 'hist16' has them" in message
    assert "embed and pool them with 'hist8', or remove their rows from" in message


def test_labels_for_unknown_slides(bad_inputs, caplog):
    with bad_inputs["labels"].open("a", newline="") as file:
        csv.writer(file).writerow(["ghost-slide", "ghost-case", "lung_n"])

    message = _run_failing(bad_inputs, caplog)

    assert f"labels file {bad_inputs['labels']} lists 1 samples that have no feature file in any --features folder" in message
    assert "ghost-slide" in message
    assert "Remove their rows from the labels file" in message


def test_dimension_mismatch_within_one_model(bad_inputs, lung, caplog):
    stray = bad_inputs["folders"]["hist8"] / f"{lung.tile_ids[42]}.h5"
    write_features(stray, coords=np.zeros((1, 2), dtype=np.int64), features=np.ones((1, 20)), attrs={"encoder": "colour-histogram-8"}, pooled=True)

    message = _run_failing(bad_inputs, caplog)

    assert f"--features hist8: {stray} has features of dimension 20" in message
    assert "has 24" in message
    assert "embed and pool that sample again, or remove the stray file" in message


def test_patch_file_at_slide_level(bad_inputs, lung, caplog):
    patch_file = bad_inputs["folders"]["hist16"] / f"{lung.tile_ids[0]}.h5"
    write_features(patch_file, coords=np.zeros((3, 2), dtype=np.int64), features=np.ones((3, 48)), attrs={"encoder": "colour-histogram-16"})

    message = _run_failing(bad_inputs, caplog)

    assert f"{patch_file} has 3 feature rows, expected one pooled row for --level slide" in message
    assert "Pool it with unite pool first, or pass --level tile" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"embedding_dim": 384}, "embedding_dim is 384, but the features of 'hist16' have dimension 48"),
        ({"params": 5}, "unknown keys ['params']"),
        ({"parameters": "many"}, "parameters is 'many', expected an integer"),
    ],
    ids=["dimension", "unknown-key", "wrong-type"],
)
def test_invalid_model_info(bad_inputs, caplog, content, expected):
    info = bad_inputs["out"].parent / "info.json"
    info.write_text(json.dumps(content))

    message = _run_failing(bad_inputs, caplog, "--model-info", f"hist16={info}")

    assert f"--model-info hist16={info}" in message
    assert expected in message


def test_single_model_rejected(bad_inputs, caplog):
    folders = bad_inputs["folders"]
    with caplog.at_level(logging.ERROR, logger="unite"):
        status = main(["bench", "--features", f"hist16={folders['hist16']}", "--labels", str(bad_inputs["labels"]), "--out", str(bad_inputs["out"])])

    assert status == 2
    assert "--features is given 1 time, expected at least 2 models" in caplog.text


def test_model_name_with_pipe_rejected(bad_inputs, caplog):
    folders = bad_inputs["folders"]
    with caplog.at_level(logging.ERROR, logger="unite"):
        status = main(
            [
                "bench", "--features", f"a|b={folders['hist16']}", "--features", f"hist8={folders['hist8']}",
                "--labels", str(bad_inputs["labels"]), "--out", str(bad_inputs["out"]),
            ]
        )

    assert status == 2
    assert "--features: name 'a|b' is invalid" in caplog.text


def test_bench_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])

    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--features NAME=DIR" in text
    assert "(default: 1.0)" in text
    assert "(default: --balanced)" in text
    assert "(default: 5)" in text
    assert "(default: pca)" in text
