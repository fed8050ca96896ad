"""The gateway under faults: a stuck or misbehaving teacher, a cache that cannot be written, drift, bad settings, SIGTERM.

Every test runs a real gateway on 127.0.0.1, in this process or as ``unite serve-gateway`` in a subprocess.
Misbehaving providers are raw TCP servers on 127.0.0.1 (silent, or sending an endless body).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from fake_teacher import FakeTeacher
from gateway_helpers import REPO, block_tiles, gateway, gateway_process, metric, remote_config, wait_for
from servers import run_app

from shared.errors import TeacherError
from shared.imaging import encode_base64_png
from teacher_gateway.app import create_app
from teacher_gateway.errors import TeacherDriftError
from teacher_gateway.settings import GatewaySettings
from teacher_gateway.teachers.remote import RemoteTeacher
from unite_cli.main import main


class _GatedTeacher:
    """A cheap teacher (mean colour of 16 cells) whose calls wait, while ``gate`` is closed, until it opens."""

    identity = "gated-test-teacher/1"
    name = "gated"
    dim = 48
    licence = "CC0-1.0"
    thread_safe = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls = 0
        self.tiles_embedded = 0

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        if not self.gate.wait(timeout=120):
            raise TeacherError("test teacher gate never opened")
        self.tiles_embedded += len(tiles)
        cells = tiles.reshape(len(tiles), 4, tiles.shape[1] // 4, 4, tiles.shape[2] // 4, 3).mean(axis=(2, 4))
        return (cells.reshape(len(tiles), -1) / 255.0).astype(np.float32)


def _payload(tiles) -> dict:
    return {"input": [{"image": encode_base64_png(tile)} for tile in tiles]}


@contextmanager
def _app_gateway(tmp_path, teacher, **settings) -> Iterator[tuple[httpx.Client, object]]:
    """Serve a gateway in this process and yield a client and the app, whose state holds the service."""
    settings.setdefault("canary_tiles", 0)
    app = create_app(GatewaySettings(cache_dir=tmp_path / "cache", **settings), teacher=teacher)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http, app


@contextmanager
def _raw_provider(mode: str) -> Iterator[str]:
    """Serve a misbehaving provider on 127.0.0.1 and yield its URL.

    ``silent`` reads the request and never answers; ``endless`` answers 200 with a body that never ends.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    connections: list[socket.socket] = []

    def handle(connection: socket.socket) -> None:
        try:
            connection.recv(65536)
            if mode == "endless":
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
                chunk = b" " * 65536
                while not stop.is_set():
                    connection.sendall(chunk)
            else:
                stop.wait()
        except OSError:
            pass

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            threading.Thread(target=handle, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/embeddings"
    finally:
        stop.set()
        listener.close()
        for connection in connections:
            connection.close()


@contextmanager
def _taken_port() -> Iterator[str]:
    """Yield a port of 127.0.0.1 held by a listening socket, so a gateway that got as far as serving fails to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield str(holder.getsockname()[1])


def _provider_settings(url: str, **overrides) -> dict:
    options = {"url": url, "model": "raw-provider", "dim": 8, "licence": "test licence", "max_attempts": 1}
    options.update(overrides)
    return options


# A stuck teacher must not take the threads that /healthz, /readyz and /metrics need.


def test_probes_answer_while_teacher_stuck(tmp_path):
    teacher = _GatedTeacher()
    cached = block_tiles(1, seed=1)
    waiting = block_tiles(40, seed=2)
    with _app_gateway(tmp_path, teacher, max_teacher_requests=2) as (http, _app):
        assert http.post("/v1/embeddings", json=_payload(cached)).status_code == 200
        teacher.gate.clear()
        teacher.entered.clear()

        responses: list[httpx.Response] = []

        def send(tile) -> None:
            responses.append(http.post("/v1/embeddings", json=_payload([tile]), timeout=120))

        senders = [threading.Thread(target=send, args=(tile,)) for tile in waiting]
        for sender in senders:
            sender.start()
        assert teacher.entered.wait(timeout=60)
        wait_for(lambda: len(responses) >= len(waiting) - 2, timeout_s=60, what="all but 2 requests refused")

        probes = {path: http.get(path, timeout=30) for path in ("/healthz", "/readyz", "/metrics", "/v1/usage")}
        cache_hit = http.post("/v1/embeddings", json=_payload(cached), timeout=30)

        teacher.gate.set()
        for sender in senders:
            sender.join(timeout=120)

    for path, response in probes.items():
        assert response.status_code == 200, path
    assert cache_hit.status_code == 200
    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(200) == 2
    assert statuses.count(503) == len(waiting) - 2
    busy = next(response for response in responses if response.status_code == 503)
    assert busy.json()["error"]["code"] == "gateway_busy"
    assert "UNITE_GATEWAY_MAX_TEACHER_REQUESTS = 2" in busy.json()["error"]["message"]
    assert busy.headers["Retry-After"].isdigit()


# A credential in the remote URL's query string would spread to the identity, the logs and every route, so it is rejected.


def test_query_string_in_remote_url_rejected(tmp_path, monkeypatch, caplog):
    secret = "QUERYSECRET-9f8e7d"
    monkeypatch.setenv("UNITE_GATEWAY_TEACHER", "remote")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__URL", f"http://127.0.0.1:9/v1/embeddings?api_key={secret}")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__MODEL", "m")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__DIM", "8")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__LICENCE", "test licence")
    caplog.set_level(logging.DEBUG)

    with _taken_port() as port:
        status = main(["serve-gateway", "--host", "127.0.0.1", "--port", port, "--cache-dir", str(tmp_path / "cache")])

    assert status == 2
    assert "query string" in caplog.text
    assert "api_key_env" in caplog.text
    assert secret not in caplog.text


def test_readyz_names_no_provider_url(tmp_path):
    fake = FakeTeacher(dim=8)
    with fake.serve(), gateway(tmp_path / "cache", fake=fake) as http:
        ready = http.get("/readyz")

    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


# A local teacher without its weights or model name stops with an error naming the setting, not a traceback.


@pytest.mark.parametrize(
    "options, variable, option",
    [
        (["--teacher", "uni2-h"], "UNITE_GATEWAY_WEIGHTS", "--weights"),
        (["--teacher", "timm", "--weights", "/nonexistent/weights.pt"], "UNITE_GATEWAY_MODEL_NAME", "--model-name"),
    ],
    ids=["uni2-h-weights", "timm-model-name"],
)
def test_local_teacher_missing_setting_named(tmp_path, options, variable, option):
    env = {name: value for name, value in os.environ.items() if not name.startswith("UNITE_GATEWAY_")}
    command = [sys.executable, "-m", "unite_cli.main", "serve-gateway", "--host", "127.0.0.1", "--port", "9"]
    command += ["--cache-dir", str(tmp_path / "cache"), *options]

    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    output = finished.stdout + finished.stderr
    assert finished.returncode == 2, output
    assert variable in output
    assert option in output
    assert "Traceback" not in output


# After drift, the embeddings that the changed model may have produced leave the cache.


def test_drift_quarantines_entries_since_last_pass(tmp_path):
    teacher = _GatedTeacher()
    old_tiles = block_tiles(3, seed=3)
    new_tiles = block_tiles(4, seed=4)
    with _app_gateway(tmp_path, teacher) as (http, app):
        assert http.post("/v1/embeddings", json=_payload(old_tiles)).status_code == 200
        service = app.state.service
        last_passed_at = time.time()
        while time.time() <= last_passed_at:
            time.sleep(0.001)
        assert http.post("/v1/embeddings", json=_payload(new_tiles)).status_code == 200
        calls_before = teacher.calls

        block = TeacherDriftError("teacher gated-test-teacher/1 drifted (test)", limit=0.98, value=0.1)
        moved = service.block_for_drift(block, last_passed_at=last_passed_at)

        old_again = http.post("/v1/embeddings", json=_payload(old_tiles))
        new_again = http.post("/v1/embeddings", json=_payload(new_tiles))
        quarantined = service.cache.count_quarantined(teacher.identity)

    assert moved == len(new_tiles)
    assert quarantined == len(new_tiles)
    assert old_again.status_code == 200
    assert old_again.json()["usage"]["cache_hits"] == len(old_tiles)
    assert new_again.status_code == 503
    assert new_again.json()["error"]["code"] == "teacher_drift"
    assert teacher.calls == calls_before


def test_drift_without_recorded_pass_quarantines_all(tmp_path):
    teacher = _GatedTeacher()
    with _app_gateway(tmp_path, teacher) as (http, app):
        assert http.post("/v1/embeddings", json=_payload(block_tiles(3, seed=5))).status_code == 200
        service = app.state.service
        block = TeacherDriftError("teacher gated-test-teacher/1 drifted (test)", limit=0.98, value=0.1)
        moved = service.block_for_drift(block)
        remaining = service.cache.count(teacher.identity)

    assert moved == 3
    assert remaining == 0


# Every teacher call has a total deadline, and SIGTERM cancels calls in flight.


def test_silent_provider_ends_at_total_timeout():
    with _raw_provider("silent") as url:
        teacher = RemoteTeacher(remote_config_for(url, read_timeout_s=600, total_timeout_s=1))
        try:
            with pytest.raises(TeacherError) as raised:
                teacher.embed(np.stack(block_tiles(1, seed=6)))
        finally:
            teacher.close()

    assert "total_timeout_s = 1 s" in raised.value.message
    assert teacher.stats()["failures"]["timeout"] == 1


@pytest.mark.parametrize("value", [float("inf"), 1e308])
def test_infinite_timeout_rejected(value):
    with pytest.raises(ValueError) as raised:
        remote_config_for("http://127.0.0.1:9/v1/embeddings", read_timeout_s=value)

    assert "read_timeout_s" in str(raised.value)


def test_sigterm_stops_gateway_with_call_in_flight(tmp_path):
    with _raw_provider("silent") as url:
        environment = {
            "UNITE_GATEWAY_TEACHER": "remote",
            "UNITE_GATEWAY_REMOTE__URL": url,
            "UNITE_GATEWAY_REMOTE__MODEL": "raw-provider",
            "UNITE_GATEWAY_REMOTE__DIM": "8",
            "UNITE_GATEWAY_REMOTE__LICENCE": "test licence",
            "UNITE_GATEWAY_REMOTE__MAX_ATTEMPTS": "1",
            "UNITE_GATEWAY_REMOTE__READ_TIMEOUT_S": "600",
            "UNITE_GATEWAY_REMOTE__TOTAL_TIMEOUT_S": "600",
            "UNITE_GATEWAY_SHUTDOWN_GRACE_S": "1",
            "UNITE_GATEWAY_CANARY_TILES": "0",
        }
        with gateway_process(tmp_path / "cache", tmp_path / "gateway.log", environment) as running:
            outcome: list[object] = []

            def send() -> None:
                try:
                    outcome.append(httpx.post(f"{running.url}/v1/embeddings", json=_payload(block_tiles(1, seed=7)), timeout=120))
                except httpx.HTTPError as error:
                    outcome.append(error)

            def tiles_in_flight() -> float:
                return metric(httpx.get(f"{running.url}/metrics", timeout=30).text, "unite_gateway_inflight_tiles")

            sender = threading.Thread(target=send)
            sender.start()
            wait_for(lambda: tiles_in_flight() > 0, timeout_s=60, what="a teacher call in flight")
            running.process.send_signal(signal.SIGTERM)
            try:
                status = running.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                status = None
            sender.join(timeout=120)

    assert status is not None, running.log()[-3000:]
    # uvicorn raises the signal it caught again once it has shut down, so -SIGTERM is a clean stop too.
    assert status in (0, -signal.SIGTERM), f"exit status {status}"
    assert outcome


def remote_config_for(url: str, **overrides):
    from teacher_gateway.teachers.remote_config import RemoteTeacherConfig

    return RemoteTeacherConfig(**_provider_settings(url, **overrides))


# A provider's response is read up to a size limit, never whole into memory.


def test_endless_response_cut_at_limit():
    with _raw_provider("endless") as url:
        teacher = RemoteTeacher(remote_config_for(url, max_response_bytes=1024 * 1024))
        try:
            with pytest.raises(TeacherError) as raised:
                teacher.embed(np.stack(block_tiles(1, seed=8)))
        finally:
            teacher.close()

    assert "max_response_bytes = 1048576" in raised.value.message
    assert teacher.stats()["failures"]["response_too_large"] == 1


def test_declared_large_response_rejected(tmp_path):
    fake = FakeTeacher(dim=32)
    with fake.serve():
        teacher = RemoteTeacher(remote_config(fake, max_response_bytes=1024, max_attempts=3))
        try:
            with pytest.raises(TeacherError) as raised:
                teacher.embed(np.stack(block_tiles(4, seed=9)))
        finally:
            teacher.close()

    assert "max_response_bytes = 1024" in raised.value.message
    assert "response_too_large" in raised.value.message
    # Not retried: the same batch would get the same response, and the provider may bill each one.
    assert len(fake.calls) == 1


# A failed cache write keeps the paid embeddings, names the cause in the log and makes /readyz fail.


def test_cache_write_failure_keeps_paid_embeddings(tmp_path, caplog):
    teacher = _GatedTeacher()
    first, second, third = (block_tiles(1, seed=seed) for seed in (10, 11, 12))
    caplog.set_level(logging.INFO)
    with _app_gateway(tmp_path, teacher) as (http, app):
        assert http.post("/v1/embeddings", json=_payload(first)).status_code == 200
        service = app.state.service
        cache = service.cache

        def disk_full(*args, **kwargs):
            with cache._sqlite_errors("store embeddings"):
                raise sqlite3.OperationalError("database or disk is full")

        cache.put_many = disk_full
        cache.check_writable = disk_full
        paid = http.post("/v1/embeddings", json=_payload(first + second))
        not_ready = http.get("/readyz")
        refused = http.post("/v1/embeddings", json=_payload(third))
        again = http.post("/v1/embeddings", json=_payload(first + second))
        tiles_paid = teacher.tiles_embedded

        del cache.put_many
        del cache.check_writable
        wait_for(lambda: http.get("/readyz").status_code == 200, timeout_s=60, what="/readyz ready after the write")
        stored = cache.count(teacher.identity)

    assert paid.status_code == 200
    assert not_ready.status_code == 503
    assert not_ready.json()["error"]["code"] == "cache_unavailable"
    assert str(tmp_path) not in not_ready.text
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "cache_unavailable"
    assert "Retry-After" in refused.headers
    assert str(tmp_path) not in refused.text
    assert again.status_code == 200
    assert again.json()["data"] == paid.json()["data"]
    assert tiles_paid == 2
    assert stored == 2
    assert "database or disk is full" in caplog.text
    assert str(cache.path) in caplog.text


# Bad JSON in a nested setting is an error naming the variable, not a pydantic-settings traceback.


def test_bad_json_in_nested_setting_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("UNITE_GATEWAY_TEACHER", "remote")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__URL", "http://127.0.0.1:9/v1/embeddings")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__ADAPTER", "{oops")

    with _taken_port() as port:
        status = main(["serve-gateway", "--host", "127.0.0.1", "--port", port, "--cache-dir", str(tmp_path / "cache")])

    assert status == 2
    assert "UNITE_GATEWAY_REMOTE__ADAPTER is not valid JSON" in caplog.text
    assert "UNITE_GATEWAY_REMOTE__URL" not in caplog.text
