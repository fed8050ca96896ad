"""Tests of the student server's onnx runtime: onnxruntime against torch, hot reload, errors, and a server without torch.

The server tests start ``unite serve-student --runtime onnx`` in a subprocess whose import system
rejects torch, timm, torchvision, lightning and safetensors.torch, as a slim image without them would.
That subprocess records every rejected import, so a module that tries torch and catches the ImportError
is caught too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from servers import run_app
from slide_data import BRACS
from student_helpers import embeddings_body, lung_tiles, response_embeddings, scrape

from distiller.onnx_export import export_onnx
from shared.checkpoint import load_mimic_projector, load_student, save_student
from shared.errors import ModelError
from shared.imaging import to_model_input
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from shared.publish import publish_student
from student_server.app import create_app
from student_server.model import StudentModel
from student_server.onnx_runtime import ONNX_WEIGHTS, LinearProjector, OnnxStudent, load_onnx_export
from student_server.settings import StudentSettings

REPO = Path(__file__).resolve().parents[1]
TINY_KWARGS = {**UNITE_STUDENT_KWARGS, "depth": 1}
TEACHER_DIM = 96
SERVER_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 180.0
BLOCKED_MODULES = ("torch", "timm", "torchvision", "lightning", "safetensors.torch")

# Run before any other import of the subprocess: a meta-path finder that rejects the blocked modules and
# appends each rejected name to the file UNITE_TEST_BLOCKED_LOG at once, because uvicorn ends the process
# by re-raising SIGTERM, which skips atexit handlers.
BLOCKER = textwrap.dedent(
    f"""
    import os, sys

    class TorchBlocker:
        blocked = {BLOCKED_MODULES!r}
        log = os.environ["UNITE_TEST_BLOCKED_LOG"]

        def find_spec(self, name, path=None, target=None):
            if any(name == module or name.startswith(module + ".") for module in self.blocked):
                with open(self.log, "a") as log:
                    log.write(name + "\\n")
                raise ImportError(f"{{name}} is blocked by the test: the onnx runtime must run without it")
            return None

    open(TorchBlocker.log, "w").close()
    sys.meta_path.insert(0, TorchBlocker())
    """
)


def export_tiny_student(folder: Path, *, seed: int) -> Path:
    """Export a one-block UNITE student with a mimic projector, plus its model.onnx, into ``folder``."""
    torch.manual_seed(seed)
    save_student(
        build_unite_student(depth=1),
        folder,
        architecture="unite-vit-small-14",
        architecture_kwargs=TINY_KWARGS,
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={"seed": seed},
        mimic_projector=torch.nn.Linear(384, TEACHER_DIM),
    )
    export_onnx(folder, folder / ONNX_WEIGHTS)
    return folder


def torch_reference(folder: Path, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the torch student's float32 embeddings of ``tiles`` and their teacher-space projection."""
    student = load_student(folder)
    projector = load_mimic_projector(folder)
    with torch.no_grad():
        embeddings = student.model(torch.from_numpy(to_model_input(tiles)))
        projected = projector(embeddings)
    return embeddings.numpy(), projected.numpy()


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def onnx_settings(checkpoint: Path, root: Path, **overrides) -> StudentSettings:
    values = {
        "checkpoint_dir": checkpoint,
        "runtime": "onnx",
        "jobs_dir": root / "jobs",
        "upload_dir": root / "uploads",
        "batch_size": 8,
        "read_workers": 1,
        **overrides,
    }
    return StudentSettings(**values)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("exports")
    return [export_tiny_student(root / f"student-{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def tiles(shared_data) -> np.ndarray:
    return lung_tiles(shared_data, 5)


# In this process


def test_onnx_model_matches_torch(exports, tiles, tmp_path):
    model = StudentModel(onnx_settings(exports[0], tmp_path))
    assert model.check_for_update()
    expected, expected_teacher = torch_reference(exports[0], tiles)

    embeddings = model.embed(tiles)
    teacher = model.embed(tiles, teacher_space=True)

    assert embeddings.shape == (len(tiles), 384)
    assert embeddings.dtype == np.float32
    assert np.abs(embeddings - expected).max() < 1e-3
    assert cosines(embeddings, expected).min() > 0.9999
    assert teacher.shape == (len(tiles), TEACHER_DIM)
    assert np.abs(teacher - expected_teacher).max() < 1e-3


def test_onnx_identity_matches_torch(exports, tmp_path):
    torch_student = load_student(exports[0])
    model = StudentModel(onnx_settings(exports[0], tmp_path))
    model.check_for_update()

    student, projector = model.snapshot()

    assert isinstance(student, OnnxStudent)
    assert student.name == torch_student.name
    assert student.sha256 == torch_student.sha256
    assert student.embed_dim == torch_student.embed_dim
    assert isinstance(projector, LinearProjector)
    assert model.teacher_dim == TEACHER_DIM


def test_onnx_projector_matches_torch_linear(exports):
    _, projector = load_onnx_export(exports[0])
    linear = load_mimic_projector(exports[0])
    embeddings = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)

    with torch.no_grad():
        expected = linear(torch.from_numpy(embeddings)).numpy()

    assert (projector.in_features, projector.out_features) == (384, TEACHER_DIM)
    assert np.abs(projector(embeddings) - expected).max() < 1e-5


def test_onnx_embeds_empty_batch(exports, tmp_path):
    model = StudentModel(onnx_settings(exports[0], tmp_path))
    model.check_for_update()

    empty = np.zeros((0, 224, 224, 3), dtype=np.uint8)

    assert model.embed(empty).shape == (0, 384)
    assert model.embed(empty, teacher_space=True).shape == (0, TEACHER_DIM)


def test_onnx_resizes_other_tile_sizes(exports, tiles, tmp_path):
    model = StudentModel(onnx_settings(exports[0], tmp_path))
    model.check_for_update()
    larger = np.repeat(np.repeat(tiles[:2], 2, axis=1), 2, axis=2)

    embeddings = model.embed(larger)

    assert embeddings.shape == (2, 384)
    assert np.isfinite(embeddings).all()


def test_onnx_reloads_published_student(exports, tiles, tmp_path):
    root = tmp_path / "published"
    model = StudentModel(onnx_settings(root, tmp_path))
    assert model.ensure_loaded() is None

    publish_student(exports[0], root)
    assert model.check_for_update()
    first = model.loaded.sha256
    first_embeddings = model.embed(tiles[:2])
    publish_student(exports[1], root)
    assert model.check_for_update()

    assert first == load_student(exports[0]).sha256
    assert model.loaded.sha256 == load_student(exports[1]).sha256
    assert not np.allclose(model.embed(tiles[:2]), first_embeddings)
    assert not model.check_for_update()


def test_onnx_missing_file_not_ready(exports, tmp_path):
    folder = tmp_path / "torch-only"
    shutil.copytree(exports[0], folder)
    (folder / ONNX_WEIGHTS).unlink()
    model = StudentModel(onnx_settings(folder, tmp_path))

    assert model.ensure_loaded() is None
    assert ONNX_WEIGHTS in model.public_reason
    assert "unite export-onnx" in model.public_reason
    assert str(folder) not in model.public_reason


def test_onnx_published_without_file_keeps_student(exports, tiles, tmp_path, caplog):
    root = tmp_path / "published"
    publish_student(exports[0], root)
    torch_only = tmp_path / "torch-only"
    shutil.copytree(exports[1], torch_only)
    (torch_only / ONNX_WEIGHTS).unlink()
    first_sha256 = load_student(exports[0]).sha256
    second_sha256 = load_student(exports[1]).sha256
    app = create_app(onnx_settings(root, tmp_path, reload_interval_s=0.2))

    with caplog.at_level(logging.WARNING, logger="student_server.model"), run_app(app) as base_url:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            wait_for_status(client, "/readyz", 200)
            version = publish_student(torch_only, root)
            wait_for_sample(client, 'unite_student_reloads_total{outcome="failed"}', 1)
            # More checks of the same folder neither log nor count the missing file again.
            app.state.student.check_for_update()
            app.state.student.check_for_update()
            ready = client.get("/readyz").json()
            response = client.post("/v1/embeddings", json=embeddings_body(tiles[:2]))
            failed = scrape(client)
            warnings = [record.getMessage() for record in caplog.records if record.name == "student_server.model" and record.levelno >= logging.WARNING]

            # Once the folder is given its model.onnx, the next check serves it.
            export_onnx(version, version / ONNX_WEIGHTS)
            wait_ready(client, None, sha256=second_sha256, timeout_s=60)
            reloaded = scrape(client)

    assert ready["checkpoint_sha256"] == first_sha256
    assert response.status_code == 200, response.text
    assert response.json()["checkpoint_sha256"] == first_sha256
    assert failed['unite_student_reloads_total{outcome="failed"}'] == 1
    assert failed['unite_student_reloads_total{outcome="success"}'] == 1
    assert len(warnings) == 1, warnings
    assert str(version) in warnings[0]
    assert f"has no {ONNX_WEIGHTS}" in warnings[0]
    assert f"unite export-onnx {version} --out {version / ONNX_WEIGHTS}" in warnings[0]
    assert "--onnx" in warnings[0]
    assert f"Still serving {ready['model']} (sha256 {first_sha256})" in warnings[0]
    assert reloaded['unite_student_reloads_total{outcome="success"}'] == 2
    assert reloaded['unite_student_reloads_total{outcome="failed"}'] == 1


def wait_for_status(client: httpx.Client, path: str, status: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(path).status_code != status:
        assert time.monotonic() < deadline, f"GET {path} did not answer {status} within {timeout_s} s"
        time.sleep(0.05)


def wait_for_sample(client: httpx.Client, sample: str, value: float, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while scrape(client).get(sample) != value:
        assert time.monotonic() < deadline, f"metric sample {sample} did not reach {value} within {timeout_s} s"
        time.sleep(0.05)


def test_onnx_from_other_export_rejected(exports, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(exports[0], folder)
    shutil.copy(exports[1] / ONNX_WEIGHTS, folder / ONNX_WEIGHTS)
    model = StudentModel(onnx_settings(folder, tmp_path))

    assert not model.check_for_update()
    assert model.loaded is None
    assert "was exported from weights with sha256" in model.reason
    assert "unite export-onnx" in model.public_reason


def test_onnx_changed_projector_rejected(exports, tmp_path):
    folder = tmp_path / "changed-projector"
    shutil.copytree(exports[0], folder)
    save_file({"weight": torch.zeros(TEACHER_DIM, 384), "bias": torch.zeros(TEACHER_DIM)}, folder / "mimic_projector.safetensors")

    with pytest.raises(ModelError) as error:
        load_onnx_export(folder)

    assert "mimic_projector.safetensors has sha256" in str(error.value)


def test_onnx_export_without_projector(exports, tmp_path):
    folder = tmp_path / "no-projector"
    shutil.copytree(exports[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["mimic_projector"] = None
    (folder / "config.json").write_text(json.dumps(config))

    student, projector = load_onnx_export(folder)

    assert projector is None
    assert student.embed_dim == 384


def test_onnx_damaged_graph_rejected(exports, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(exports[0], folder)
    (folder / ONNX_WEIGHTS).write_bytes(b"not an onnx graph")
    model = StudentModel(onnx_settings(folder, tmp_path))

    assert not model.check_for_update()
    assert "cannot load" in model.reason
    assert ONNX_WEIGHTS in model.reason


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this onnxruntime has a CUDA provider"
)
def test_onnx_cuda_without_provider_names_device(exports, tmp_path):
    model = StudentModel(onnx_settings(exports[0], tmp_path, device="cuda"))

    assert model.ensure_loaded() is None
    assert "UNITE_STUDENT_DEVICE" in model.public_reason
    assert "CUDAExecutionProvider" in model.reason


def test_runtime_setting_values(monkeypatch):
    monkeypatch.setenv("UNITE_STUDENT_RUNTIME", "onnx")
    assert StudentSettings().runtime == "onnx"
    monkeypatch.delenv("UNITE_STUDENT_RUNTIME")
    assert StudentSettings().runtime == "torch"
    with pytest.raises(ValidationError):
        StudentSettings(runtime="tensorrt")


# In a subprocess that cannot import torch


def blocked_python(code: str, *, env: dict[str, str], log: Path, **kwargs) -> subprocess.Popen:
    """Start ``python -c`` with the torch blocker installed before ``code``."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("UNITE_STUDENT_")}
    environment.update(env)
    environment["UNITE_TEST_BLOCKED_LOG"] = str(log)
    environment["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-c", BLOCKER + code], cwd=REPO, env=environment, **kwargs)


def test_app_imports_without_torch(tmp_path):
    log = tmp_path / "blocked.txt"
    code = "import student_server.app, student_server.onnx_runtime, unite_cli.main\nprint('imported')\n"

    process = blocked_python(code, env={}, log=log, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr
    assert stdout.strip() == "imported"
    assert log.read_text() == ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client: httpx.Client, process: subprocess.Popen | None, *, sha256: str, timeout_s: float) -> dict:
    """Poll /readyz until it reports the checkpoint ``sha256``; fail when the server ``process`` (None for one in this process) exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process is None or process.poll() is None, f"the server exited with status {process.returncode}"
        try:
            response = client.get("/readyz")
            if response.status_code == 200 and response.json()["checkpoint_sha256"] == sha256:
                return response.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not serve checkpoint {sha256} within {timeout_s} s"
        time.sleep(0.1)


@pytest.fixture()
def blocked_server(exports, slides_dir, tmp_path):
    """Serve the first export from a publish root with `unite serve-student --runtime onnx`, torch blocked."""
    root = tmp_path / "published"
    publish_student(exports[0], root)
    data_root = tmp_path / "data-root"
    data_root.mkdir()
    shutil.copy(slides_dir / BRACS, data_root / BRACS)

    port = free_port()
    log = tmp_path / "blocked.txt"
    env = {
        "UNITE_STUDENT_JOBS_DIR": str(tmp_path / "jobs"),
        "UNITE_STUDENT_UPLOAD_DIR": str(tmp_path / "uploads"),
        "UNITE_STUDENT_DATA_ROOT": str(data_root),
        "UNITE_STUDENT_BATCH_SIZE": "8",
        "UNITE_STUDENT_READ_WORKERS": "1",
        "UNITE_STUDENT_RELOAD_INTERVAL_S": "0.2",
    }
    code = (
        "from unite_cli.main import main\n"
        f"sys.exit(main(['serve-student', '--runtime', 'onnx', '--checkpoint', {str(root)!r}, '--port', '{port}']))\n"
    )
    process = blocked_python(code, env=env, log=log)

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, process, root, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_server_without_torch(blocked_server, exports, tiles):
    client, process, root, log = blocked_server
    first_sha256 = load_student(exports[0]).sha256
    expected, expected_teacher = torch_reference(exports[0], tiles)

    ready = wait_ready(client, process, sha256=first_sha256, timeout_s=SERVER_START_TIMEOUT_S)
    response = client.post("/v1/embeddings", json=embeddings_body(tiles))
    teacher_response = client.post("/v1/embeddings", json={**embeddings_body(tiles), "model": "teacher-space"})
    models = client.get("/v1/models").json()["data"]
    job_id = client.post("/v1/slides", json={"path": BRACS, "mpp": 0.5}).json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, f"slide job still {job['status']} after {JOB_TIMEOUT_S} s"
        time.sleep(0.1)
    result = client.get(f"/v1/jobs/{job_id}/result", params={"include_patches": "true"}).json()
    metrics = scrape(client)

    assert ready["model"] == load_student(exports[0]).name
    assert response.status_code == 200, response.text
    assert response.json()["checkpoint_sha256"] == first_sha256
    embeddings = response_embeddings(response)
    assert np.abs(embeddings - expected).max() < 1e-3
    assert cosines(embeddings, expected).min() > 0.9999
    assert teacher_response.status_code == 200, teacher_response.text
    assert np.abs(response_embeddings(teacher_response) - expected_teacher).max() < 1e-3
    assert [entry["dim"] for entry in models] == [384, TEACHER_DIM]
    assert job["status"] == "succeeded", job
    assert job["num_patches"] > 0
    assert result["checkpoint_sha256"] == first_sha256
    assert len(result["slide_embedding"]) == 384
    assert np.isfinite(result["slide_embedding"]).all()
    assert np.asarray(result["patch_embeddings"]).shape == (job["num_patches"], 384)
    assert metrics[f'unite_student_checkpoint_info{{model="{ready["model"]}",sha256="{first_sha256}"}}'] == 1

    # Hot reload: a newly published export is served without a restart.
    second_sha256 = load_student(exports[1]).sha256
    publish_student(exports[1], root)
    wait_ready(client, process, sha256=second_sha256, timeout_s=30)
    reloaded = client.post("/v1/embeddings", json=embeddings_body(tiles[:2]))
    assert reloaded.json()["checkpoint_sha256"] == second_sha256
    assert np.abs(response_embeddings(reloaded) - torch_reference(exports[1], tiles[:2])[0]).max() < 1e-3

    # uvicorn re-raises SIGTERM after its graceful shutdown, so the status is 0 or -SIGTERM.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert log.read_text() == ""
