"""Bad input and shutdown of the student server over real HTTP on 127.0.0.1.

Malformed paths, multipart boundaries and JSON bodies get 422 in the protocol's error shape instead of
500 or a bare 400. Long ids are shortened in errors, API keys with non-ASCII characters work when sent
as UTF-8, and a stalled upload does not keep ``unite serve-student`` from stopping on SIGTERM.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from job_helpers import job_settings, save_tiny_student, wait_for_job
from PIL import Image
from servers import run_app

from student_server.app import create_app
from student_server.jobs import MPP_FIELD_HINT

REPO = Path(__file__).resolve().parents[1]
CMU1 = "CMU-1-Small-Region.svs"
# Non-ASCII, so its UTF-8 bytes differ from its Latin-1 bytes.
KEY = "secret-kéy-1"
HEADERS = {"X-API-Key": KEY.encode("utf-8")}


def write_keys_file(path: Path) -> Path:
    digest = hashlib.sha256(KEY.encode("utf-8")).hexdigest()
    path.write_text(f'[[keys]]\nname = "lab-a"\nsha256 = "{digest}"\n', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("checkpoint") / "student")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    (root / "loopA").symlink_to(root / "loopB")
    (root / "loopB").symlink_to(root / "loopA")
    return root


@pytest.fixture(scope="module")
def server(checkpoint, data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    settings = job_settings(checkpoint, root, data_root=data_root, keys_file=write_keys_file(root / "keys.toml"))
    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=60, headers=HEADERS) as client:
        yield client, settings


@pytest.fixture()
def client(server) -> httpx.Client:
    return server[0]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


def png_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# API keys


def test_non_ascii_key_sent_as_utf8_works(client):
    assert client.get("/v1/models").status_code == 200


def test_non_ascii_key_sent_as_latin1_rejected(client):
    response = client.get("/v1/models", headers={"X-API-Key": KEY.encode("latin-1")})

    assert_error(response, 401, "unauthorized")


# Paths under the data root


def test_path_name_too_long_422(client):
    response = client.post("/v1/slides", json={"path": "a" * 300 + ".svs"})

    error = assert_error(response, 422, "invalid_request")
    assert "too long" in error["message"]
    assert len(error["value"]) <= 103


def test_path_symlink_loop_422(client):
    response = client.post("/v1/slides", json={"path": "loopA"})

    error = assert_error(response, 422, "invalid_request")
    assert "symlink loop" in error["message"]


def test_path_symlink_loop_outside_root_403(client, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")

    response = client.post("/v1/slides", json={"path": str(tmp_path / "loop")})

    assert_error(response, 403, "path_forbidden")


# Multipart and JSON bodies


@pytest.mark.parametrize("path", ["/v1/slides", "/v1/embeddings/upload"])
def test_long_multipart_boundary_422(client, path):
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nx\r\n--{boundary}--\r\n"

    response = client.post(path, content=body.encode(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    error = assert_error(response, 422, "invalid_request")
    assert "boundary" in error["message"]
    assert error["limit"] == 70


def test_deeply_nested_json_422(client):
    response = client.post("/v1/embeddings", content=b"[" * 100_000, headers={"content-type": "application/json"})

    error = assert_error(response, 422, "invalid_request")
    assert "not valid JSON" in error["message"]
    assert "nested too deeply" in error["message"]


def test_json_number_of_5000_digits_422(client):
    body = b'{"input": [], "mpp": ' + b"1" * 5000 + b"}"

    response = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})

    error = assert_error(response, 422, "invalid_request")
    assert "more than 4300 digits" in error["message"]


# Echoed values


def test_unknown_long_job_id_404_shortened(client):
    response = client.get("/v1/jobs/" + "x" * 5000)

    error = assert_error(response, 404, "job_not_found")
    assert "x" * 101 not in error["message"]
    assert len(error["value"]) <= 103


# Stored uploads


@pytest.mark.parametrize("filename", ["SECRETnoext", "../../etc/SECRET.PNG"])
def test_upload_error_names_uploaded_slide_once(client, filename):
    response = client.post("/v1/slides", files={"file": (filename, png_bytes())})
    assert response.status_code == 202, response.text

    job, _ = wait_for_job(client, response.json()["id"])

    assert job["status"] == "failed", job
    message = job["error"]["message"]
    assert "uploaded uploaded" not in message
    assert "slide uploaded" not in message
    assert MPP_FIELD_HINT in message
    assert "SECRET" not in json.dumps(job)
    assert "upload-" not in message


# Shutdown of `unite serve-student`


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not ready within {timeout_s} s:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)


def test_sigterm_with_stalled_upload_stops_server(checkpoint, slides_dir, tmp_path):
    grace_s = 2.0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("UNITE_STUDENT_")}
    env.update(
        {
            "UNITE_STUDENT_JOBS_DIR": str(tmp_path / "jobs"),
            "UNITE_STUDENT_UPLOAD_DIR": str(tmp_path / "uploads"),
            "UNITE_STUDENT_KEYS_FILE": str(write_keys_file(tmp_path / "keys.toml")),
            "UNITE_STUDENT_SHUTDOWN_GRACE_S": str(grace_s),
            # Batches of one tile keep the job running long enough for the stop to find it running.
            "UNITE_STUDENT_BATCH_SIZE": "1",
            "UNITE_STUDENT_READ_WORKERS": "1",
        }
    )
    command = [sys.executable, "-m", "unite_cli.main", "serve-student", "--host", "127.0.0.1", "--port", str(port), "--checkpoint", str(checkpoint)]
    log_path = tmp_path / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    stalled = None
    try:
        wait_ready(url, process, log_path)
        with httpx.Client(base_url=url, timeout=60, headers=HEADERS) as client:
            # A key in the query string is ignored by the server and must not reach the log.
            assert client.get("/v1/models", params={"api_key": "QUERYSECRET"}).status_code == 200
            with (slides_dir / CMU1).open("rb") as handle:
                # An mpp of 3 µm per pixel gives this small slide hundreds of patches.
                response = client.post("/v1/slides", files={"file": ("a.svs", handle)}, data={"mpp": "3.0"})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            job, _ = wait_for_job(client, job_id, statuses=("running",))
            while job["progress"]["done"] < 1:
                job = client.get(f"/v1/jobs/{job_id}").json()

        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            b"POST /v1/slides HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode("utf-8") + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=bb\r\nContent-Length: 100000\r\n\r\n"
            b'--bb\r\nContent-Disposition: form-data; name="file"; filename="a.svs"\r\n\r\nAAAA'
        )
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # uvicorn waits grace_s for the upload, then the app waits up to grace_s for the job.
        process.wait(timeout=2 * grace_s + 20)
        seconds = time.monotonic() - started
    finally:
        if stalled is not None:
            stalled.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    log_text = log_path.read_text()
    assert seconds < 2 * grace_s + 20, log_text[-3000:]
    record = json.loads((tmp_path / "jobs" / job_id / "job.json").read_text())
    assert record["status"] == "interrupted", log_text[-3000:]
    assert "QUERYSECRET" not in log_text
    assert "GET /v1/models" in log_text
