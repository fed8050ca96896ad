"""``unite evaluate`` end to end: lung-tile mosaics, a real gateway with the reference teacher, a real student server."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from gateway_helpers import gateway_process, metric
from lung_mosaics import read_tile_rows, write_lung_mosaics
from servers import run_app
from student_helpers import save_tiny_student

from shared.features import read_features
from shared.models.student import build_unite_student
from shared.pooling import pool_patch_features
from student_server.app import create_app
from student_server.settings import StudentSettings
from teacher_gateway.teachers.reference import DESCRIPTOR_DIM, REFERENCE_TEACHER_DIM
from unite_cli.main import main

SLIDES_PER_CLASS = 4
TILES_PER_SLIDE = 4  # 2 x 2


@pytest.fixture(scope="module")
def mosaics(shared_data: Path, tmp_path_factory) -> Path:
    """Write 4 mosaics of 2 x 2 real tiles per class, two slides per case, and return their folder."""
    tiles_dir = shared_data / "tiles" / "lc25000_lung_dedup"
    rows = read_tile_rows(tiles_dir)
    chosen = []
    for label in sorted({row["label"] for row in rows}):
        chosen += [row for row in rows if row["label"] == label][: SLIDES_PER_CLASS * TILES_PER_SLIDE]
    folder = tmp_path_factory.mktemp("mosaics")
    write_lung_mosaics(tiles_dir, chosen, folder, rows_per_slide=2, cols_per_slide=2, slides_per_case=2)
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


def evaluate(mosaics: Path, servers: tuple[str, str], out: Path, *extra: str) -> int:
    gateway_url, student_url = servers
    return main(
        [
            "evaluate", str(mosaics), "--labels", str(mosaics / "labels.csv"),
            "--model", f"teacher={gateway_url}", "--model", f"student={student_url}",
            "--out", str(out), "--min-tissue", "0.1", "--folds", "2", "--bootstrap", "20", "--batch-size", "8", "--ks", "1,5", *extra,
        ]
    )


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


def test_evaluate_tile_level(mosaics, servers, tmp_path):
    out = tmp_path / "tiles"

    assert evaluate(mosaics, servers, out, "--level", "tile", "--pooling", "mean+max") == 0

    report = json.loads((out / "report.json").read_text())
    assert report["models"]["student"]["embedding_dim"] == 384
    assert not (out / "slide_features").exists()
    assert "tile" in (out / "report.md").read_text()


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
