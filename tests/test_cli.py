"""The ``unite`` command line: its parser, its errors and the demo end to end on a real slide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from unite_cli.main import build_parser, main

SUBCOMMANDS = ["fetch-sample", "tile", "teach", "distill", "serve-gateway", "serve-student", "demo"]


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

    assert status == 2
    assert str(fake) in caplog.text


def test_tile_writes_patch_file(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"

    status = main(["tile", str(slide), "--out", str(tmp_path)])

    assert status == 0
    with h5py.File(tmp_path / "patches" / "CMU-1-Small-Region_patches.h5", "r") as file:
        assert file["coords"].shape[1] == 2
        assert file["coords"].shape[0] > 50


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
