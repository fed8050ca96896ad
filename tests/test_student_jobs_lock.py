"""One student server per jobs folder: a second server on the same folder fails at start and touches no job.

Two servers on one folder would each resume the other's running jobs, so the jobs folder is locked with
``fcntl.flock`` for the life of the server that owns it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from job_helpers import job_settings, save_tiny_student, wait_for_job
from servers import run_app

from shared.errors import ConfigError
from student_server.app import create_app
from student_server.jobs import LOCK_FILE, JobManager

REPO_ROOT = Path(__file__).resolve().parents[1]
CMU1 = "CMU-1-Small-Region.svs"


class NoEmbedder:
    def embed_tiles(self, tiles):
        raise AssertionError("no job runs in these tests")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("checkpoint") / "student")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_running_job(jobs_dir: Path) -> tuple[Path, str]:
    """Write the record of a job left running by another server, and return its path and text."""
    job_id = "0123456789abcdef0123456789abcdef"
    folder = jobs_dir / job_id
    folder.mkdir(parents=True)
    record = {
        "id": job_id,
        "status": "running",
        "source": "upload",
        "slide": f"upload-{job_id}.svs",
        "slide_label": "uploaded slide",
        "options": {},
        "created": "2024-01-01T00:00:00.000+00:00",
        "attempts": 1,
    }
    path = folder / "job.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    return path, path.read_text(encoding="utf-8")


def test_second_manager_on_folder_rejected(checkpoint, tmp_path):
    settings = job_settings(checkpoint, tmp_path)
    first = JobManager(settings, NoEmbedder())
    first.start()
    try:
        record_path, record_text = write_running_job(settings.jobs_dir)
        second = JobManager(settings, NoEmbedder())
        with pytest.raises(ConfigError) as raised:
            second.start()
    finally:
        first.stop(grace_s=5.0)

    message = raised.value.message
    assert str(settings.jobs_dir) in message
    assert "UNITE_STUDENT_JOBS_DIR" in message
    assert "its own folder" in message
    assert raised.value.value == str(settings.jobs_dir)
    # The second manager neither re-queued nor rewrote the first one's running job.
    assert record_path.read_text(encoding="utf-8") == record_text
    assert second.known_ids() == set()


def test_folder_free_after_first_stops(checkpoint, tmp_path):
    settings = job_settings(checkpoint, tmp_path)
    first = JobManager(settings, NoEmbedder())
    first.start()
    first.stop(grace_s=5.0)

    second = JobManager(settings, NoEmbedder())
    second.start()
    second.stop(grace_s=5.0)

    assert (settings.jobs_dir / LOCK_FILE).is_file()


def test_managers_on_own_folders_start(checkpoint, tmp_path):
    first = JobManager(job_settings(checkpoint, tmp_path / "a"), NoEmbedder())
    second = JobManager(job_settings(checkpoint, tmp_path / "b"), NoEmbedder())
    first.start()
    try:
        second.start()
        second.stop(grace_s=5.0)
    finally:
        first.stop(grace_s=5.0)


# uvicorn ends its server thread with SystemExit(3) when the app's startup fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_second_app_on_folder_fails_start(checkpoint, slides_dir, tmp_path, capfd):
    settings = job_settings(checkpoint, tmp_path)
    first_app = create_app(settings)
    second_app = create_app(settings)
    with run_app(first_app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        with pytest.raises(RuntimeError, match="stopped during startup"):
            with run_app(second_app):
                pass
        second_app.state.engine.stop(5.0)
        startup_log = capfd.readouterr().err

        # The first server still owns the folder and runs its jobs.
        with (slides_dir / CMU1).open("rb") as handle:
            response = client.post("/v1/slides", files={"file": ("a.svs", handle)})
        assert response.status_code == 202, response.text
        job, _ = wait_for_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job

    assert second_app.state.jobs is None
    assert str(settings.jobs_dir) in startup_log
    assert "UNITE_STUDENT_JOBS_DIR" in startup_log


# About 30 s on two busy cores, most of it importing torch and loading the student in the subprocess.
@pytest.mark.slow
def test_serve_student_exits_when_folder_locked(checkpoint, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    # This process takes the lock, as a first server on the folder would.
    lock = os.open(jobs_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    environment = {
        **os.environ,
        "UNITE_STUDENT_JOBS_DIR": str(jobs_dir),
        "UNITE_STUDENT_UPLOAD_DIR": str(tmp_path / "uploads"),
        "UNITE_STUDENT_CHECKPOINT_DIR": str(checkpoint),
        "UNITE_STUDENT_PORT": str(free_port()),
    }
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "unite_cli.main", "serve-student"],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(lock)

    assert completed.returncode != 0, completed.stderr
    assert str(jobs_dir) in completed.stderr
    assert "UNITE_STUDENT_JOBS_DIR" in completed.stderr
    assert "Application startup failed" in completed.stderr
