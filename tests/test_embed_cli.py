"""``unite embed`` on the real slides: outputs per slide, resolution overrides, skipping done slides, resuming a killed run.

The student is the one-block export of :mod:`test_slide_pipeline`. CMU-1 has its resolution in its
metadata, the BRACS crop reports an absurd 1000 µm/px and gets its estimate from a CSV, and the
fluorescence NDPI slide is rejected because the student embeds brightfield H&E only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from slide_data import BRACS, BRACS_MPP_ESTIMATE, CMU1, NDPI, TCGA, TCGA_MPP_ESTIMATE
from test_slide_pipeline import save_tiny_student

from shared.features import read_features
from shared.slides import tiling
from student_server import slide_pipeline
from student_server.slide_pipeline import LocalEmbedder, SlidePipelineOptions, run_slide_pipeline
from unite_cli import embed as embed_cli
from unite_cli.embed import OUTPUT_FOLDERS
from unite_cli.main import build_parser, main

STATE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("checkpoint") / "student")


def write_slide_list(path: Path, slides_dir: Path, rows: list[tuple[str, float | None]]) -> Path:
    lines = ["slide,mpp"] + [f"{slides_dir / name},{'' if mpp is None else mpp}" for name, mpp in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_state(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / "state" / f"{name}.json").read_text())


def stem(file_name: str) -> str:
    return Path(file_name).stem


@pytest.fixture(scope="module")
def listed_run(slides_dir, checkpoint, tmp_path_factory):
    """Run ``unite embed`` over a CSV list of three slides, one of which fails, and return its folder and status."""
    folder = tmp_path_factory.mktemp("listed")
    slide_list = write_slide_list(folder / "slides.csv", slides_dir, [(CMU1, None), (BRACS, BRACS_MPP_ESTIMATE), (NDPI, None)])
    out_dir = folder / "out"
    status = main(["embed", str(slide_list), "--checkpoint", str(checkpoint), "--out", str(out_dir), "--batch-size", "16"])
    return out_dir, status, slide_list


def test_embed_help():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["embed", "--help"])

    assert exit_info.value.code == 0


def test_embed_help_limits_match_checks():
    assert embed_cli.POOLINGS == slide_pipeline.POOLINGS
    assert embed_cli.MAX_READ_WORKERS == tiling.MAX_READ_WORKERS


def test_embed_writes_outputs_per_slide(listed_run):
    out_dir, status, _ = listed_run

    # The fluorescence slide fails and the others are embedded, so the status is 1.
    assert status == 1
    for name in (stem(CMU1), stem(BRACS)):
        assert read_state(out_dir, name)["status"] == "done"
        for folder, suffix in OUTPUT_FOLDERS.values():
            assert (out_dir / folder / f"{name}{suffix}").is_file(), f"{folder}/{name}{suffix} missing"
    assert not list((out_dir / ".work").iterdir())


def test_embed_rejects_fluorescence_slide(listed_run):
    out_dir, _, _ = listed_run

    state = read_state(out_dir, stem(NDPI))

    assert state["status"] == "failed"
    assert state["reason"] == "not_brightfield"
    assert not (out_dir / "features" / f"{stem(NDPI)}.h5").exists()


def test_embed_applies_csv_resolution(listed_run):
    out_dir, _, _ = listed_run

    features = read_features(out_dir / "features" / f"{stem(BRACS)}.h5")

    assert features.attrs["mpp"] == pytest.approx(BRACS_MPP_ESTIMATE)
    assert read_state(out_dir, stem(BRACS))["config"]["mpp_override"] == BRACS_MPP_ESTIMATE
    assert features.features.shape[1] == 384


def test_embed_features_equal_pipeline(listed_run, slides_dir, checkpoint, tmp_path):
    out_dir, _, _ = listed_run
    options = SlidePipelineOptions(batch_size=16)
    expected = run_slide_pipeline(slides_dir / CMU1, tmp_path, LocalEmbedder(checkpoint, batch_size=16), options)

    written = read_features(out_dir / "features" / f"{stem(CMU1)}.h5")
    pipeline = read_features(tmp_path / "features.h5")

    np.testing.assert_array_equal(written.coords, pipeline.coords)
    np.testing.assert_allclose(written.features, pipeline.features, rtol=0, atol=1e-6)
    assert written.attrs["encoder"] == expected.encoder
    pooled = read_features(out_dir / "slide_features" / f"{stem(CMU1)}.h5")
    np.testing.assert_allclose(pooled.features, read_features(tmp_path / "slide.h5").features, rtol=0, atol=1e-6)


def test_embed_rerun_skips_done_slides(listed_run, checkpoint, capsys):
    out_dir, _, slide_list = listed_run
    features_path = out_dir / "features" / f"{stem(CMU1)}.h5"
    modified = features_path.stat().st_mtime_ns
    capsys.readouterr()

    status = main(["embed", str(slide_list), "--checkpoint", str(checkpoint), "--out", str(out_dir), "--batch-size", "16"])

    assert status == 1
    assert "2 skipped" in capsys.readouterr().out
    assert features_path.stat().st_mtime_ns == modified
    assert read_state(out_dir, stem(CMU1))["attempts"] == 1


def test_embed_other_checkpoint_rejected(listed_run, tmp_path, caplog):
    out_dir, _, slide_list = listed_run
    other = save_tiny_student(tmp_path / "other", seed=1)

    status = main(["embed", str(slide_list), "--checkpoint", str(other), "--out", str(out_dir)])

    assert status == 2
    assert "done with other options" in caplog.text
    assert "checkpoint_sha256" in caplog.text


def test_embed_fluorescence_option_retries_slide(slides_dir, checkpoint, tmp_path, caplog):
    arguments = ["embed", str(slides_dir / NDPI), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--batch-size", "16"]
    name = stem(NDPI)

    assert main(arguments) == 1
    failed = read_state(tmp_path / "out", name)
    assert failed["reason"] == "not_brightfield"
    assert "--allow-fluorescence" in failed["message"]

    # The option changes the recorded options, so the failed slide runs again without --retry-failed.
    assert main([*arguments, "--allow-fluorescence"]) == 0
    done = read_state(tmp_path / "out", name)
    assert done["status"] == "done"
    assert done["attempts"] == 2
    assert done["config"]["allow_fluorescence"] is True
    assert done["details"]["illumination"] == "fluorescence"
    features = read_features(tmp_path / "out" / "features" / f"{name}.h5")
    assert features.features.shape == (done["details"]["patches"], 384)


def test_embed_logs_mpp_override_once(slides_dir, checkpoint, tmp_path, caplog):
    arguments = ["embed", str(slides_dir / CMU1), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--mpp", "0.25"]

    with caplog.at_level(logging.INFO):
        assert main(arguments) == 0

    assert caplog.text.count("using the mpp override 0.2500 µm/px") == 1


def test_embed_ray_rejects_allow_fluorescence(slides_dir, checkpoint, tmp_path, caplog):
    arguments = ["embed", str(slides_dir / NDPI), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]

    status = main([*arguments, "--engine", "ray", "--allow-fluorescence"])

    assert status == 2
    assert "--allow-fluorescence applies only to --engine local" in caplog.text


def test_embed_missing_checkpoint_exit_2(slides_dir, tmp_path, caplog):
    missing = tmp_path / "no-student"

    status = main(["embed", str(slides_dir / CMU1), "--checkpoint", str(missing), "--out", str(tmp_path / "out")])

    assert status == 2
    assert "--checkpoint" in caplog.text
    assert str(missing) in caplog.text


def test_embed_invalid_read_workers_exit_2(slides_dir, checkpoint, tmp_path, caplog):
    status = main(
        ["embed", str(slides_dir / CMU1), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--read-workers", "0"]
    )

    assert status == 2
    assert "read_workers=0" in caplog.text


def test_killed_run_redoes_slide(slides_dir, checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    name = stem(CMU1)
    command = [
        sys.executable, "-m", "unite_cli.main", "embed", str(slides_dir / CMU1), "--checkpoint", str(checkpoint),
        "--out", str(out_dir), "--batch-size", "1", "--read-workers", "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        state_path = out_dir / "state" / f"{name}.json"
        while not (state_path.is_file() and '"running"' in state_path.read_text()):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the slide never started"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()

    assert read_state(out_dir, name)["status"] == "running"
    assert list(out_dir.glob("features/*")) == []

    status = main(["embed", str(slides_dir / CMU1), "--checkpoint", str(checkpoint), "--out", str(out_dir)])

    assert status == 0
    state = read_state(out_dir, name)
    assert state["status"] == "done"
    assert state["attempts"] == 2
    assert read_features(out_dir / "features" / f"{name}.h5").features.shape[0] == state["details"]["patches"]


@pytest.mark.slow
def test_embed_slides_folder_with_overrides(slides_dir, checkpoint, tmp_path, capsys):
    # The TCGA section has no resolution and gets 3,199 patches at its estimate: one to two minutes on 2 CPU cores.
    overrides = write_slide_list(tmp_path / "mpp.csv", slides_dir, [(TCGA, TCGA_MPP_ESTIMATE), (BRACS, BRACS_MPP_ESTIMATE)])
    out_dir = tmp_path / "out"
    arguments = ["embed", str(slides_dir), "--mpp-csv", str(overrides), "--checkpoint", str(checkpoint), "--out", str(out_dir)]

    status = main([*arguments, "--batch-size", "64"])

    assert status == 1
    assert read_state(out_dir, stem(NDPI))["reason"] == "not_brightfield"
    for name in (CMU1, TCGA, BRACS):
        assert read_state(out_dir, stem(name))["status"] == "done"
    assert read_features(out_dir / "features" / f"{stem(TCGA)}.h5").attrs["mpp"] == pytest.approx(TCGA_MPP_ESTIMATE)
    capsys.readouterr()

    assert main([*arguments, "--batch-size", "64"]) == 1
    assert "3 skipped" in capsys.readouterr().out
