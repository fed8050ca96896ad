"""Helpers of the gateway tests: distinct cheap tiles, gateways in this process or in a subprocess, metrics.

A subprocess gateway runs ``python -m unite_cli.main serve-gateway`` on 127.0.0.1, so it can be killed
with SIGKILL like a real deployment, and is configured only through ``UNITE_GATEWAY_*`` variables.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fake_teacher import FakeTeacher
from prometheus_client.parser import text_string_to_metric_families
from servers import run_app

from teacher_gateway.app import create_app
from teacher_gateway.settings import GatewaySettings
from teacher_gateway.teachers.remote_config import RemoteTeacherConfig

REPO = Path(__file__).resolve().parents[1]
TEST_LICENCE = "test licence"


def block_tiles(count: int, *, seed: int = 0) -> list[np.ndarray]:
    """Return ``count`` distinct 224 px RGB tiles, each a 4 x 4 grid of random flat colours.

    Flat cells keep the PNGs small, and random colours give every tile its own embedding under the
    fake teacher, which averages colours over a 4 x 4 grid.
    """
    colours = np.random.default_rng(seed).integers(0, 256, size=(count, 4, 4, 3), dtype=np.uint8)
    return [np.repeat(np.repeat(cells, 56, axis=0), 56, axis=1) for cells in colours]


def remote_config(fake: FakeTeacher, **overrides: Any) -> RemoteTeacherConfig:
    """Return the settings of a remote teacher that calls ``fake``, with short retry waits."""
    options: dict[str, Any] = {
        "url": fake.url,
        "model": fake.model,
        "dim": fake.dim,
        "licence": TEST_LICENCE,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
    }
    options.update(overrides)
    return RemoteTeacherConfig(**options)


@contextmanager
def gateway(cache_dir: Path, *, fake: FakeTeacher | None = None, teacher: Any = None, remote: dict | None = None, **settings: Any) -> Iterator[httpx.Client]:
    """Serve a gateway app in this process on 127.0.0.1 and yield an HTTP client of it.

    With ``fake`` the gateway's teacher is the remote teacher calling it (``remote`` overrides its
    settings); with ``teacher`` it is that object. The canary check is off unless ``canary_tiles`` is given,
    so that a gateway opened on a filled cache calls the teacher only when a test requests it.
    """
    settings.setdefault("canary_tiles", 0)
    if fake is not None:
        settings.update(teacher="remote", remote=remote_config(fake, **(remote or {})))
    app = create_app(GatewaySettings(cache_dir=cache_dir, **settings), teacher=teacher)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def remote_environment(fake: FakeTeacher, **settings: str) -> dict[str, str]:
    """Return ``UNITE_GATEWAY_*`` variables that make a subprocess gateway call ``fake``, plus ``settings``."""
    variables = {
        "UNITE_GATEWAY_TEACHER": "remote",
        "UNITE_GATEWAY_REMOTE__URL": fake.url,
        "UNITE_GATEWAY_REMOTE__MODEL": fake.model,
        "UNITE_GATEWAY_REMOTE__DIM": str(fake.dim),
        "UNITE_GATEWAY_REMOTE__LICENCE": TEST_LICENCE,
        "UNITE_GATEWAY_REMOTE__BACKOFF_BASE_S": "0.01",
        "UNITE_GATEWAY_REMOTE__BACKOFF_CAP_S": "0.05",
        "UNITE_GATEWAY_CANARY_TILES": "0",
    }
    variables.update({f"UNITE_GATEWAY_{name.upper()}": value for name, value in settings.items()})
    return variables


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """Kill the gateway with SIGKILL, so no shutdown code runs, and wait for it to end."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@contextmanager
def gateway_process(cache_dir: Path, log_path: Path, environment: dict[str, str], *, startup_timeout_s: float = 120.0) -> Iterator[GatewayProcess]:
    """Start ``unite serve-gateway`` in a subprocess on 127.0.0.1 and yield it once ``/readyz`` returns 200.

    The subprocess sees this process's environment without its ``UNITE_GATEWAY_*`` and ``UNITE_API_KEY``
    variables, plus ``environment``. It is stopped at the end unless it already ended.
    """
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("UNITE_GATEWAY_") and name != "UNITE_API_KEY"}
    env.update(environment)
    command = [sys.executable, "-m", "unite_cli.main", "serve-gateway", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache_dir)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    running = GatewayProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with status {process.returncode} during startup:\n{running.log()[-3000:]}")
            try:
                if httpx.get(f"{running.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready within {startup_timeout_s} s:\n{running.log()[-3000:]}")
            time.sleep(0.1)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """Return the sum of the samples called ``name`` in a Prometheus text page whose labels include ``labels``.

    Raises KeyError when no sample matches, so a renamed metric fails the test instead of reading as 0.
    """
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    ]
    if not values:
        raise KeyError(f"no sample {name} with labels {labels} in the metrics page")
    return sum(values)


def wait_for(condition, *, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` every 20 ms until it is true; raise AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)
