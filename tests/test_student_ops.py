"""Operations of the student server over real HTTP: metrics, API keys, JSON logs and graceful shutdown."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from servers import run_app
from student_helpers import direct_embeddings, lung_tiles, post_embeddings, response_embeddings, save_tiny_student, scrape

from shared.api_keys import hash_key
from shared.logs import configure_logging
from student_server.app import create_app
from student_server.settings import StudentSettings

LAB_KEY = "student-lab-key-0123456789"
ATOL = 0.05


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("ops") / "student", seed=3)


@pytest.fixture(scope="module")
def tiles(shared_data):
    return lung_tiles(shared_data, 2)


def serve(checkpoint, tmp_path, **overrides):
    settings = StudentSettings(checkpoint_dir=checkpoint, jobs_dir=tmp_path / "jobs", upload_dir=tmp_path / "uploads", **overrides)
    return create_app(settings)


@pytest.fixture()
def log_stream():
    """Send every log record to a string in the JSON format, and restore the root logger afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("json", level=logging.INFO, stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def test_metrics_expose_listed_series(checkpoint, tiles, tmp_path):
    app = serve(checkpoint, tmp_path)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        assert post_embeddings(client, tiles).status_code == 200
        samples = scrape(client)
    sha256 = app.state.student.loaded.sha256
    name = app.state.student.loaded.name

    assert samples['unite_student_requests_total{route="/v1/embeddings",status="200"}'] == 1
    assert samples['unite_student_request_seconds_count{route="/v1/embeddings"}'] == 1
    assert samples["unite_student_batch_size_count"] == 1
    assert samples["unite_student_batch_size_sum"] == 2
    assert samples["unite_student_tiles_total"] == 2
    assert samples["unite_student_queue_tiles"] == 0
    assert samples[f'unite_student_checkpoint_info{{model="{name}",sha256="{sha256}"}}'] == 1
    assert samples['unite_student_reloads_total{outcome="success"}'] == 1
    assert samples['unite_student_reloads_total{outcome="failed"}'] == 0
    for state in ("queued", "running", "succeeded", "failed", "interrupted"):
        assert samples[f'unite_student_slide_jobs{{state="{state}"}}'] == 0


def test_api_keys_reject_missing_and_wrong_key(checkpoint, tiles, tmp_path, log_stream):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f"[[keys]]\nname = 'lab-a'\nsha256 = '{hash_key(LAB_KEY)}'\nrequests_per_minute = 60\n")
    app = serve(checkpoint, tmp_path, keys_file=keys_file)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        missing = post_embeddings(client, tiles)
        wrong = post_embeddings(client, tiles, headers={"X-API-Key": LAB_KEY + "x"})
        basic = client.get("/v1/models", headers={"Authorization": f"Basic {LAB_KEY}"})
        metrics_without_key = client.get("/metrics")
        bearer = post_embeddings(client, tiles, headers={"Authorization": f"Bearer {LAB_KEY}"})
        header = client.get("/v1/models", headers={"X-API-Key": LAB_KEY})
        probes = [client.get(path).status_code for path in ("/healthz", "/readyz")]

    for response in (missing, wrong, basic, metrics_without_key):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "unauthorized"
        assert LAB_KEY not in response.text
    assert "missing API key" in missing.json()["error"]["message"]
    assert "matches no key" in wrong.json()["error"]["message"]
    assert "does not use the Bearer scheme" in basic.json()["error"]["message"]
    assert bearer.status_code == 200, bearer.text
    assert header.status_code == 200, header.text
    assert probes == [200, 200]
    assert LAB_KEY not in log_stream.getvalue()


def test_json_log_lines_carry_request_id(checkpoint, tiles, tmp_path, log_stream):
    app = serve(checkpoint, tmp_path, log_format="json")
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        embedded = post_embeddings(client, tiles)
        rejected = client.post("/v1/embeddings", json={"input": []})

    lines = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.startswith("{")]
    by_request = {}
    for line in lines:
        assert set(line) >= {"time", "level", "logger", "message", "request_id"}
        by_request.setdefault(line["request_id"], []).append(line)
    for response in (embedded, rejected):
        request_id = response.headers["x-request-id"]
        assert request_id in by_request, f"no log line carries request id {request_id}"
        assert any("/v1/embeddings" in line["message"] for line in by_request[request_id])
    assert any(line["level"] == "WARNING" for line in by_request[rejected.headers["x-request-id"]])


def test_shutdown_finishes_queued_request(checkpoint, tiles, tmp_path):
    # The request waits 3 s for a batch that never fills, and the server stops meanwhile.
    app = serve(checkpoint, tmp_path, batch_size=64, max_batch_wait_ms=3_000)
    _, expected = direct_embeddings(checkpoint, tiles)
    answer: dict[str, httpx.Response] = {}
    with run_app(app) as base_url:
        client = httpx.Client(base_url=base_url, timeout=120)
        thread = threading.Thread(target=lambda: answer.update(response=post_embeddings(client, tiles)))
        thread.start()
        deadline = time.monotonic() + 30
        while app.state.engine.queued_tiles == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.engine.queued_tiles == 2
    thread.join(timeout=60)
    client.close()

    assert answer["response"].status_code == 200, answer["response"].text
    np.testing.assert_allclose(response_embeddings(answer["response"]), expected, atol=ATOL)
    assert app.state.engine.queued_tiles == 0
