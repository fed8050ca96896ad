"""``unite embed --engine ray`` on the real slides: the same outputs as the single-process run, on a two-actor local Ray cluster.

CMU-1 has its resolution in its metadata, the BRACS crop gets 0.25 µm/px from the CSV list, and the
fluorescence NDPI slide fails in the decoding stage. The Ray run starts in a subprocess inside its own
network namespace (``unshare --net``, which needs root), because Ray's servers bind to the host's
address and this test must not listen beyond loopback. That run is limited to 2 CPUs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slide_data import BRACS, BRACS_MPP_ESTIMATE, CMU1, NDPI
from test_slide_pipeline import save_tiny_student

from shared.errors import ConfigError
from shared.features import read_features
from unite_cli import embed_ray
from unite_cli.embed import OUTPUT_FOLDERS
from unite_cli.main import main

RAY_MISSING = importlib.util.find_spec("ray") is None
requires_ray = pytest.mark.skipif(
    RAY_MISSING, reason="Ray is not installed; install the 'distributed' extra (pip install 'ray[data]>=2.9') to run this test"
)
RAY_RUN_TIMEOUT_S = 600
BATCH_SIZE = 16
EMBEDDED = (CMU1, BRACS)

# The Ray run: a two-CPU local cluster that the command then uses, instead of one of all this machine's CPUs.
RAY_DRIVER = """
import sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False)
from unite_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def stem(file_name: str) -> str:
    return Path(file_name).stem


def network_namespace_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


def embed_arguments(slide_list: Path, checkpoint: Path, out_dir: Path) -> list[str]:
    return ["embed", str(slide_list), "--checkpoint", str(checkpoint), "--out", str(out_dir), "--batch-size", str(BATCH_SIZE)]


@pytest.fixture(scope="module")
def runs(slides_dir, tmp_path_factory):
    """Embed three slides with both engines and return the folders, exit statuses and the Ray run's log."""
    if RAY_MISSING:
        pytest.skip("Ray is not installed; install the 'distributed' extra to run the Ray engine")
    if not network_namespace_available():
        pytest.skip("the Ray run needs a private network namespace (unshare --net as root, and ip) so that it listens on loopback only")
    folder = tmp_path_factory.mktemp("distributed")
    checkpoint = save_tiny_student(folder / "student")
    slide_list = folder / "slides.csv"
    rows = [f"{slides_dir / CMU1},", f"{slides_dir / BRACS},{BRACS_MPP_ESTIMATE}", f"{slides_dir / NDPI},"]
    slide_list.write_text("slide,mpp\n" + "\n".join(rows) + "\n")

    local_dir, ray_dir = folder / "local", folder / "ray"
    local_status = main(embed_arguments(slide_list, checkpoint, local_dir))

    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    environment.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-c", RAY_DRIVER, *embed_arguments(slide_list, checkpoint, ray_dir), "--engine", "ray", "--workers", "2"]
    # Inside the new namespace only the loopback interface exists, and it starts down.
    wrapped = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    completed = subprocess.run(wrapped, capture_output=True, text=True, timeout=RAY_RUN_TIMEOUT_S, env=environment)
    return {
        "checkpoint": checkpoint,
        "slide_list": slide_list,
        "local": local_dir,
        "ray": ray_dir,
        "local_status": local_status,
        "ray_status": completed.returncode,
        "ray_log": completed.stdout + completed.stderr,
    }


@requires_ray
def test_ray_run_exit_status(runs):
    # The fluorescence slide fails in both runs, so both exit with 1.
    assert runs["local_status"] == 1
    assert runs["ray_status"] == 1, runs["ray_log"][-4000:]


@requires_ray
def test_ray_features_equal_local(runs):
    for name in map(stem, EMBEDDED):
        ray_file = read_features(runs["ray"] / "features" / f"{name}.h5")
        local_file = read_features(runs["local"] / "features" / f"{name}.h5")

        np.testing.assert_array_equal(ray_file.coords, local_file.coords, err_msg=name)
        np.testing.assert_allclose(ray_file.features, local_file.features, rtol=0, atol=1e-5, err_msg=name)
        assert ray_file.attrs == local_file.attrs, name


@requires_ray
def test_ray_slide_features_equal_local(runs):
    for name in map(stem, EMBEDDED):
        ray_file = read_features(runs["ray"] / "slide_features" / f"{name}.h5")
        local_file = read_features(runs["local"] / "slide_features" / f"{name}.h5")

        np.testing.assert_allclose(ray_file.features, local_file.features, rtol=0, atol=1e-5, err_msg=name)
        assert ray_file.attrs == local_file.attrs, name


@requires_ray
def test_ray_writes_every_output(runs):
    for name in map(stem, EMBEDDED):
        for folder, suffix in OUTPUT_FOLDERS.values():
            assert (runs["ray"] / folder / f"{name}{suffix}").is_file(), f"{folder}/{name}{suffix} missing"
    assert not list((runs["ray"] / ".work").iterdir())


@requires_ray
def test_ray_result_matches_local(runs):
    for name in map(stem, EMBEDDED):
        ray_result = json.loads((runs["ray"] / "results" / f"{name}.json").read_text())
        local_result = json.loads((runs["local"] / "results" / f"{name}.json").read_text())

        assert ray_result["encoder"] == local_result["encoder"]
        assert ray_result["metadata"] == local_result["metadata"]
        np.testing.assert_allclose(ray_result["slide_embedding"], local_result["slide_embedding"], rtol=0, atol=1e-5)


@requires_ray
def test_ray_state_records_match_local(runs):
    for name in map(stem, EMBEDDED):
        ray_state = json.loads((runs["ray"] / "state" / f"{name}.json").read_text())
        local_state = json.loads((runs["local"] / "state" / f"{name}.json").read_text())

        assert ray_state["status"] == "done"
        assert ray_state["config"] == local_state["config"]
        assert ray_state["outputs"] == local_state["outputs"]
        assert ray_state["details"]["engine"] == "ray"


@requires_ray
def test_ray_records_decoding_failure(runs):
    state = json.loads((runs["ray"] / "state" / f"{stem(NDPI)}.json").read_text())

    assert state["status"] == "failed"
    assert state["reason"] == "not_brightfield"
    assert not (runs["ray"] / "features" / f"{stem(NDPI)}.h5").exists()


@requires_ray
def test_ray_stages_run_separately(runs):
    plan = next(line for line in runs["ray_log"].splitlines() if "Execution plan" in line)

    assert "ActorPoolMapOperator[MapBatches(SlideDecoder)] -> ActorPoolMapOperator[MapBatches(StudentEmbedder)]" in plan


@requires_ray
def test_ray_rerun_skips_done_slides(runs, capsys):
    features_path = runs["ray"] / "features" / f"{stem(CMU1)}.h5"
    modified = features_path.stat().st_mtime_ns
    capsys.readouterr()

    # Nothing is left to embed, so no Ray cluster starts.
    status = main([*embed_arguments(runs["slide_list"], runs["checkpoint"], runs["ray"]), "--engine", "ray", "--workers", "2"])

    assert status == 1
    assert "2 skipped" in capsys.readouterr().out
    assert features_path.stat().st_mtime_ns == modified


@requires_ray
def test_local_engine_skips_ray_outputs(runs, capsys):
    capsys.readouterr()

    status = main(embed_arguments(runs["slide_list"], runs["checkpoint"], runs["ray"]))

    assert status == 1
    assert "2 skipped" in capsys.readouterr().out


def test_import_ray_missing_names_extra(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, as when Ray is not installed.
    monkeypatch.setitem(sys.modules, "ray", None)

    with pytest.raises(ConfigError) as error_info:
        embed_ray.import_ray()

    assert "'distributed' extra" in error_info.value.message


def test_ray_engine_missing_ray_exit_2(monkeypatch, slides_dir, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "ray", None)
    checkpoint = save_tiny_student(tmp_path / "student")

    status = main(["embed", str(slides_dir / CMU1), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--engine", "ray"])

    assert status == 2
    assert "distributed" in caplog.text


def test_local_engine_rejects_workers(slides_dir, tmp_path, caplog):
    checkpoint = save_tiny_student(tmp_path / "student")

    status = main(["embed", str(slides_dir / CMU1), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--workers", "2"])

    assert status == 2
    assert "--engine ray" in caplog.text


@pytest.mark.parametrize("workers", [0, -1, 2.5, True])
def test_ray_engine_rejects_invalid_workers(workers, tmp_path):
    with pytest.raises(ConfigError) as error_info:
        embed_ray.run_distributed_embed([], tmp_path / "student", tmp_path / "out", workers=workers)

    assert "workers" in error_info.value.message


@pytest.mark.parametrize("overrides", [0.0, -0.25, float("nan"), "0.25"])
def test_ray_engine_rejects_invalid_mpp_overrides(overrides):
    with pytest.raises(ConfigError) as error_info:
        embed_ray._split_overrides(overrides)

    assert "mpp_overrides" in error_info.value.message
