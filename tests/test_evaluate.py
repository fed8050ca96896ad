"""``unite evaluate`` end to end: lung-tile mosaics, a real gateway with the reference teacher, a real student server."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
from gateway_helpers import gateway_process, metric
from lung_mosaics import read_tile_rows, write_lung_mosaics
from servers import run_app
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from student_helpers import save_tiny_student

from shared.evaluation.folds import read_split_tsv
from shared.features import read_features
from shared.models.student import build_unite_student
from shared.pooling import pool_patch_features
from student_server.app import create_app
from student_server.settings import StudentSettings
from teacher_gateway.teachers.reference import DESCRIPTOR_DIM, REFERENCE_TEACHER_DIM
from unite_cli.main import main

SLIDES_PER_CLASS = 6
SLIDES_PER_CASE = 3
TILES_PER_SLIDE = 4  # 2 x 2


@pytest.fixture(scope="module")
def mosaics(shared_data: Path, tmp_path_factory) -> Path:
    """Write 6 mosaics of 2 x 2 real tiles per class, three slides per case, and return their folder."""
    tiles_dir = shared_data / "tiles" / "lc25000_lung_dedup"
    rows = read_tile_rows(tiles_dir)
    chosen = []
    for label in sorted({row["label"] for row in rows}):
        chosen += [row for row in rows if row["label"] == label][: SLIDES_PER_CLASS * TILES_PER_SLIDE]
    folder = tmp_path_factory.mktemp("mosaics")
    write_lung_mosaics(tiles_dir, chosen, folder, rows_per_slide=2, cols_per_slide=2, slides_per_case=SLIDES_PER_CASE)
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Yield the base URLs of a gateway serving the reference teacher and of a student server with a tiny student."""
    root = tmp_path_factory.mktemp("servers")
    environment = {"UNITE_GATEWAY_TEACHER": "reference", "UNITE_GATEWAY_CANARY_TILES": "0"}
    checkpoint = save_tiny_student(root / "student", seed=0)
    student_app = create_app(StudentSettings(checkpoint_dir=checkpoint, upload_dir=root / "uploads"))
    with gateway_process(root / "cache", root / "gateway.log", environment) as gateway, run_app(student_app) as student_url:
        yield gateway.url, student_url


def counter_total(url: str, name: str) -> float:
    """Return the sum of counter ``name`` on ``url``/metrics; 0 while a declared labelled counter has no sample yet."""
    text = httpx.get(f"{url}/metrics").text
    assert f"# HELP {name} " in text, f"counter {name} is not declared on {url}/metrics"
    try:
        return metric(text, name)
    except KeyError:
        return 0.0


def tiles_received(gateway_url: str, student_url: str) -> tuple[float, float]:
    """Return the tiles the gateway and the student server have received in embedding requests so far."""
    return counter_total(gateway_url, "unite_gateway_tiles_total"), counter_total(student_url, "unite_student_tiles_total")


def evaluate(mosaics: Path, servers: tuple[str, str], out: Path, *extra: str, labels: Path | None = None) -> int:
    """Run unite evaluate on the mosaics with 2 folds; 6 cases leave 3 train cases per fold, hence k of at most 3."""
    gateway_url, student_url = servers
    return main(
        [
            "evaluate", str(mosaics), "--labels", str(labels or mosaics / "labels.csv"),
            "--model", f"teacher={gateway_url}", "--model", f"student={student_url}",
            "--out", str(out), "--min-tissue", "0.1", "--folds", "2", "--bootstrap", "20", "--batch-size", "8", "--ks", "1,3", *extra,
        ]
    )


def read_labels(mosaics: Path) -> list[dict[str, str]]:
    with (mosaics / "labels.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def slides_by_case(mosaics: Path) -> dict[str, list[str]]:
    """Return each case's slide ids, cases in the order of their first slide in labels.csv."""
    cases: dict[str, list[str]] = {}
    for row in read_labels(mosaics):
        cases.setdefault(row["case_id"], []).append(row["slide_id"])
    return cases


def expected_corners(mosaics: Path) -> dict[str, list[tuple[int, int]]]:
    corners: dict[str, list[tuple[int, int]]] = {}
    with (mosaics / "tiles.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            corners.setdefault(row["slide_id"], []).append((int(row["x"]), int(row["y"])))
    return {slide_id: sorted(values) for slide_id, values in corners.items()}


def table_row(markdown: str, metric: str) -> list[str]:
    """Return the cells of the report table's row ``metric``, model columns only."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == metric:
            return cells[1:]
    raise AssertionError(f"report.md has no table row {metric!r}")


def throughputs(out: Path) -> dict[str, float]:
    report = json.loads((out / "report.json").read_text())
    return {name: model["throughput_tiles_per_s"] for name, model in report["models"].items()}


def test_evaluate_end_to_end_and_resume(mosaics, servers, tmp_path):
    out = tmp_path / "evaluation"
    before = tiles_received(*servers)

    assert evaluate(mosaics, servers, out) == 0

    after_first = tiles_received(*servers)
    slide_count = 3 * SLIDES_PER_CLASS
    tile_count = slide_count * TILES_PER_SLIDE
    assert after_first[0] - before[0] == tile_count
    assert after_first[1] - before[1] == tile_count
    for name in ("report.md", "report.json", "metrics.png", "embeddings.png", "split.tsv"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student"}
    assert report["models"]["teacher"]["embedding_dim"] == 1536
    assert report["models"]["student"]["embedding_dim"] == 384
    assert "unite-reference-teacher" in report["models"]["teacher"]["encoder"]
    assert "sha256:" in report["models"]["student"]["encoder"]
    markdown = (out / "report.md").read_text()
    assert "| metric | teacher | student |" in markdown
    assert "student" in markdown

    # Parameter counts come from each server's GET /v1/models, throughputs from timing the requests.
    teacher_parameters = DESCRIPTOR_DIM * REFERENCE_TEACHER_DIM
    student_parameters = sum(parameter.numel() for parameter in build_unite_student(depth=1).parameters())
    assert report["models"]["teacher"]["parameters"] == teacher_parameters
    assert report["models"]["student"]["parameters"] == student_parameters
    assert table_row(markdown, "parameters") == [f"{teacher_parameters:,}", f"{student_parameters:,}"]
    first_throughputs = throughputs(out)
    for name, rate in first_throughputs.items():
        assert rate is not None and rate > 0, name
        assert f"{tile_count} tiles in requests of up to 8 over HTTP to 127.0.0.1" in report["models"][name]["throughput_note"]
    assert table_row(markdown, "throughput (tiles/s)") == [f"{first_throughputs['teacher']:.1f}", f"{first_throughputs['student']:.1f}"]
    assert "not given" not in markdown
    assert "Throughput of student:" in markdown
    # The header names the labels file and each model's host, not a temporary folder or a local port.
    assert "- labels: labels.csv, column 'label'" in markdown
    assert str(tmp_path) not in markdown
    assert "127.0.0.1:" not in markdown
    assert "served on 127.0.0.1" in markdown

    corners = expected_corners(mosaics)
    assert len(corners) == slide_count
    for model in ("teacher", "student"):
        for slide_id, expected in corners.items():
            patches = read_features(out / "features" / model / f"{slide_id}.h5")
            pooled = read_features(out / "slide_features" / model / f"{slide_id}.h5")
            assert sorted(map(tuple, patches.coords.tolist())) == expected
            assert pooled.features.shape == (1, patches.features.shape[1])
            np.testing.assert_array_equal(pooled.features[0], pool_patch_features(patches.features, "mean"))
            assert pooled.attrs["encoder"] == patches.attrs["encoder"]

    # The labels have a case_id column, so each case is one sample: the mean of its slides' embeddings.
    cases = slides_by_case(mosaics)
    assert len(cases) == slide_count // SLIDES_PER_CASE
    assert report["task"]["samples"] == len(cases)
    assert report["task"]["classes"] == {"lung_aca": 2, "lung_n": 2, "lung_scc": 2}
    assert "- level: case (mean pooling of each slide's patch features, then the mean of the slide features of each case)" in markdown
    assert f"- cohort: {slide_count} slides in {len(cases)} cases" in markdown
    case_labels = np.array([next(row["label"] for row in read_labels(mosaics) if row["case_id"] == case_id) for case_id in cases], dtype=object)
    split = read_split_tsv(out / "split.tsv")
    assert split.slide_ids.tolist() == [row["slide_id"] for row in read_labels(mosaics)]
    case_index = {case_id: index for index, case_id in enumerate(cases)}
    case_folds = [
        {side: np.unique([case_index[case_id] for case_id in split.case_ids[getattr(fold, side)]]).astype(int) for side in ("train", "test")}
        for fold in split.folds
    ]
    for model in ("teacher", "student"):
        expected = []
        for case_id, slide_ids in cases.items():
            slide_files = [read_features(out / "slide_features" / model / f"{slide_id}.h5") for slide_id in slide_ids]
            slide_embeddings = np.stack([slide_file.features[0].astype(np.float64) for slide_file in slide_files])
            case_file = read_features(out / "case_features" / model / f"{case_id}.h5")
            assert case_file.features.shape == (1, slide_embeddings.shape[1])
            np.testing.assert_allclose(case_file.features[0], slide_embeddings.mean(axis=0), rtol=1e-6, atol=1e-7)
            expected.append(slide_embeddings.mean(axis=0))
        # The probe ran on the cases: scikit-learn on the numpy means gives the reported fold values.
        case_features = np.stack(expected).astype(np.float32)
        for number, fold in enumerate(case_folds):
            assert len(fold["train"]) + len(fold["test"]) == len(cases)
            probe = LogisticRegression(C=1.0, max_iter=10000, class_weight="balanced").fit(case_features[fold["train"]], case_labels[fold["train"]])
            direct = balanced_accuracy_score(case_labels[fold["test"]], probe.predict(case_features[fold["test"]]))
            reported = report["models"][model]["fold_metrics"]["linear_probe"][number]["balanced_accuracy"]
            assert reported == pytest.approx(direct, abs=1e-12), f"{model} fold {number}"

    # A rerun sends no tile again and writes the report again, with the throughputs the first run stored.
    (out / "report.md").unlink()
    assert evaluate(mosaics, servers, out) == 0
    assert tiles_received(*servers) == after_first
    assert (out / "report.md").is_file()
    assert throughputs(out) == first_throughputs
    assert json.loads((out / "report.json").read_text())["models"]["teacher"]["parameters"] == teacher_parameters

    # A slide whose student features are missing goes to the student only.
    (out / "features" / "student" / "lung_n-01.h5").unlink()
    assert evaluate(mosaics, servers, out) == 0
    after_partial = tiles_received(*servers)
    assert after_partial[0] == after_first[0]
    assert after_partial[1] - after_first[1] == TILES_PER_SLIDE
    # Only the student was sent tiles, so only its throughput is measured again, over those tiles.
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["teacher"]["throughput_tiles_per_s"] == first_throughputs["teacher"]
    assert report["models"]["student"]["throughput_note"].startswith(f"{TILES_PER_SLIDE} tiles in requests of up to 8")

    # Without a case_id column every slide is a sample, and the features on disk are reused.
    slide_labels = tmp_path / "slides-only" / "labels.csv"
    slide_labels.parent.mkdir()
    slide_labels.write_text("slide_id,label\n" + "".join(f"{row['slide_id']},{row['label']}\n" for row in read_labels(mosaics)))
    assert evaluate(mosaics, servers, out, labels=slide_labels) == 0
    assert tiles_received(*servers) == after_partial
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["samples"] == slide_count
    assert "- level: slide (mean pooling of the patch features)" in (out / "report.md").read_text()


def test_evaluate_tile_level(mosaics, servers, tmp_path):
    out = tmp_path / "tiles"

    assert evaluate(mosaics, servers, out, "--level", "tile", "--pooling", "mean+max") == 0

    report = json.loads((out / "report.json").read_text())
    assert report["models"]["student"]["embedding_dim"] == 384
    assert not (out / "slide_features").exists()
    assert not (out / "case_features").exists()
    markdown = (out / "report.md").read_text()
    assert "- level: tile (every patch is a sample)" in markdown
    # Every tile is a sample, and the bootstrap of the agreement draws cases with all their tiles.
    assert report["task"]["samples"] == 3 * SLIDES_PER_CLASS * TILES_PER_SLIDE
    assert report["task"]["bootstrap_unit"] == "case"
    assert report["task"]["bootstrap_cases"] == 3 * SLIDES_PER_CLASS // SLIDES_PER_CASE
    assert "Agreement with the reference is bootstrapped over all cases" in markdown


def test_evaluate_rejects_case_with_two_labels(mosaics, servers, tmp_path, caplog):
    rows = read_labels(mosaics)
    rows[1]["label"] = "lung_n"
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = tiles_received(*servers)

    with caplog.at_level(logging.ERROR, logger="unite"):
        status = evaluate(mosaics, servers, tmp_path / "out", labels=labels)

    assert status == 2
    assert tiles_received(*servers) == before
    assert rows[1]["case_id"] == "lung_aca-case00"
    assert "the slides of case 'lung_aca-case00' have different labels in column 'label'" in caplog.text
    assert "lung_aca-00 'lung_aca', lung_aca-01 'lung_n', lung_aca-02 'lung_aca'" in caplog.text
    assert "Give every slide of the case the same label" in caplog.text


def test_evaluate_unknown_slide_sends_nothing(mosaics, servers, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text((mosaics / "labels.csv").read_text() + "missing-slide,case-x,lung_aca\n")
    before = tiles_received(*servers)
    gateway_url, student_url = servers

    status = main(
        [
            "evaluate",
            str(mosaics),
            "--labels",
            str(labels),
            "--model",
            f"teacher={gateway_url}",
            "--model",
            f"student={student_url}",
            "--out",
            str(tmp_path / "out"),
        ]
    )

    assert status == 2
    assert tiles_received(*servers) == before


def test_evaluate_rejects_one_model(mosaics, tmp_path):
    status = main(["evaluate", str(mosaics), "--labels", str(mosaics / "labels.csv"), "--model", "a=http://127.0.0.1:9", "--out", str(tmp_path / "out")])

    assert status == 2
