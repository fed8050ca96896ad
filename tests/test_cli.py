"""The ``unite`` command line: its parser, its errors and the demo end to end on a real slide."""

from __future__ import annotations

import argparse
import subprocess
import sys

import h5py
import httpx
import numpy as np
import pytest
import torch
from servers import run_app
from test_distiller import _lung_tiles, _write_shards

from teacher_gateway.app import create_app as create_gateway_app
from teacher_gateway.settings import GatewaySettings
from unite_cli.main import build_parser, main

SUBCOMMANDS = [
    "fetch-sample",
    "tile",
    "teach",
    "distill",
    "distill-worker",
    "export-onnx",
    "embed",
    "pool",
    "bench",
    "evaluate",
    "publish",
    "cache",
    "serve-gateway",
    "serve-student",
    "demo",
]


def test_every_subcommand_has_a_help_test():
    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))

    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])

    assert exit_info.value.code == 0
    assert "usage: unite" in capsys.readouterr().out


def test_tile_missing_slide_is_clear_error(tmp_path, caplog):
    missing = tmp_path / "no-such-slide.svs"

    status = main(["tile", str(missing), "--out", str(tmp_path / "out")])

    assert status == 2
    assert str(missing) in caplog.text
    assert "not found" in caplog.text


def test_tile_file_that_is_not_slide(tmp_path, caplog):
    fake = tmp_path / "notes.svs"
    fake.write_text("this is not a slide")

    status = main(["tile", str(fake), "--out", str(tmp_path / "out")])

    # The slide is recorded as failed and the run goes on, so the exit status is 1, not the 2 of invalid options.
    assert status == 1
    assert str(fake) in caplog.text


def test_tile_writes_patch_file(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"

    status = main(["tile", str(slide), "--out", str(tmp_path)])

    assert status == 0
    with h5py.File(tmp_path / "patches" / "CMU-1-Small-Region_patches.h5", "r") as file:
        assert file["coords"].shape[1] == 2
        assert file["coords"].shape[0] > 50


def _run_cli(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unite_cli.main", *arguments], capture_output=True, text=True, timeout=timeout
    )


# User errors: one log line and exit status 2, never a traceback.


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["serve-gateway", "--port", "0"], ["--port", "port is 0", "greater than or equal to 1"]),
        (["serve-gateway", "--port", "70000"], ["--port", "port is 70000", "less than or equal to 65535"]),
        (["serve-student", "--port", "0"], ["--port", "port is 0", "greater than or equal to 1"]),
    ],
    ids=["gateway-port-0", "gateway-port-70000", "student-port-0"],
)
def test_invalid_port_option_is_one_line(arguments, expected, tmp_path, caplog, capsys):
    status = main(arguments)

    assert status == 2
    for text in expected:
        assert text in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("UNITE_STUDENT_MAX_UPLOAD_BYTES", "abc", "serve-student"),
        ("UNITE_GATEWAY_MAX_TILES_PER_REQUEST", "0", "serve-gateway"),
    ],
    ids=["student-upload-bytes", "gateway-tiles-per-request"],
)
def test_invalid_setting_from_environment(variable, value, command, monkeypatch, caplog, capsys):
    monkeypatch.setenv(variable, value)

    status = main([command])

    assert status == 2
    assert f"environment variable {variable}" in caplog.text
    assert f"is {value!r}" in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err


def test_invalid_setting_names_cli_option(monkeypatch, caplog):
    # A setting that also has an option names both, so the user can fix either.
    monkeypatch.setenv("UNITE_GATEWAY_PORT", "http")

    status = main(["serve-gateway"])

    assert status == 2
    assert "environment variable UNITE_GATEWAY_PORT" in caplog.text
    assert "or pass --port" in caplog.text
    assert "'http'" in caplog.text


def test_serve_gateway_unknown_teacher(tmp_path):
    completed = _run_cli("serve-gateway", "--teacher", "nope", "--cache-dir", str(tmp_path / "cache"))
    output = completed.stdout + completed.stderr

    assert completed.returncode == 2, output
    assert "Traceback" not in output
    assert "unknown teacher 'nope'" in output
    assert "--teacher" in output
    assert not (tmp_path / "cache").exists(), "the cache was opened for a gateway that could not start"


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["serve-gateway", "--cache-dir", "{file}"], "--cache-dir"),
        (["tile", "slide.svs", "--out", "{file}"], "--out"),
        (["tile", "slide.svs", "--out", "{file}/patches"], "--out"),
        (["distill", "--shards", "{folder}", "--out", "{file}"], "--out"),
        (["distill", "--shards", "{file}", "--out", "{folder}/run"], "--shards"),
        (["teach", "slide.svs", "--gateway", "http://127.0.0.1:9", "--cache-dir", "{folder}", "--shards", "{file}"], "--shards"),
        (["demo", "--out", "{file}"], "--out"),
        (["fetch-sample", "--data-dir", "{file}"], "--data-dir"),
    ],
    ids=["gateway-cache-dir", "tile-out", "tile-out-under-file", "distill-out", "distill-shards", "teach-shards", "demo-out", "fetch-data-dir"],
)
def test_file_in_place_of_folder(arguments, option, tmp_path, caplog, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("a file where a folder is expected")
    arguments = [argument.format(file=file, folder=tmp_path) for argument in arguments]
    path_argument = arguments[arguments.index(option) + 1]

    status = main(arguments)

    assert status == 2
    assert f"{option} " in caplog.text
    assert path_argument in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err


def test_teach_checks_shards_before_sending_tiles(shared_data, tmp_path, caplog):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    cache_dir = tmp_path / "cache"
    shards = tmp_path / "shards.h5"
    shards.write_text("a file where the shards folder is expected")
    app = create_gateway_app(GatewaySettings(cache_dir=cache_dir, teacher="reference"))

    with run_app(app) as gateway_url:
        status = main(["teach", str(slide), "--gateway", gateway_url, "--cache-dir", str(cache_dir), "--shards", str(shards)])
        stats = httpx.get(f"{gateway_url}/v1/cache/stats", timeout=30).json()

    assert status == 2
    assert f"--shards {shards}" in caplog.text
    assert stats["total"] == 0, f"{stats['total']} tiles were embedded before the shards folder was checked"


def test_distill_gpu_without_gpu(tmp_path, caplog, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so --accelerator gpu is valid here")

    status = main(["distill", "--shards", str(tmp_path), "--out", str(tmp_path / "run"), "--accelerator", "gpu"])

    assert status == 2
    assert "accelerator is 'gpu'" in caplog.text
    assert "no GPU is visible" in caplog.text
    assert "--accelerator cpu or auto" in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err


@pytest.mark.slow
def test_distill_prints_only_result_on_stdout(shared_data, tmp_path):
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 4), slides_per_shard=2, tiles_per_slide=2)

    completed = _run_cli(
        "distill", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--batch-size", "2",
        "--max-steps", "1", "--val-fraction", "0",
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, f"stdout should hold only the result line, got {lines}"
    assert lines[0].startswith("first loss ")
    assert lines[0].endswith(f"student exported to {tmp_path / 'run' / 'student'}")


@pytest.mark.slow
def test_demo_end_to_end_on_real_slide(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    out = tmp_path / "demo"

    completed = subprocess.run(
        [sys.executable, "-m", "unite_cli.main", "demo", "--slide", str(slide), "--out", str(out), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=1200,
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "UNITE demo finished" in completed.stdout
    assert "slide embedding        (384,)" in completed.stdout
    assert "served checkpoint      sha256" in completed.stdout

    features_path = out / "features" / "CMU-1-Small-Region.h5"
    with h5py.File(features_path, "r") as file:
        features = file["features"][:]
        coords = file["coords"][:]
        assert file["features"].attrs["patch_size"] == 224
    assert features.shape == (len(coords), 384)
    assert np.isfinite(features).all()
    assert (out / "distill" / "student" / "model.safetensors").is_file()
    assert len(list((out / "shards").glob("shard-*.h5"))) >= 1
