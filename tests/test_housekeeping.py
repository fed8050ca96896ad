"""Housekeeping of slide jobs: expired and over-budget finished jobs go, queued and running jobs stay.

Jobs are submitted and observed over real HTTP on 127.0.0.1 and run the real slide pipeline on a real
slide. Passes are run by the server's own thread, or by calling ``sweep`` on the server's job manager
with a chosen time or budget, so a test does not wait out a retention time.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest
from job_helpers import job_settings, save_tiny_student, wait_for_job
from servers import run_app

from student_server.app import create_app
from student_server.housekeeping import Housekeeper, folder_bytes

BRACS = "BRACS_1640_N_3_cropped.tiff"
CMU1 = "CMU-1-Small-Region.svs"
HOUR_S = 3600.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("checkpoint") / "student")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, slides_dir) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    shutil.copy(slides_dir / BRACS, root / BRACS)
    shutil.copy(slides_dir / CMU1, root / CMU1)
    return root


def submit(client: httpx.Client, path: str = BRACS) -> str:
    body = {"path": path, "mpp": 0.5} if path == BRACS else {"path": path}
    response = client.post("/v1/slides", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_sweep_removes_expired_jobs(checkpoint, data_root, tmp_path):
    settings = job_settings(checkpoint, tmp_path, data_root=data_root, retention_s=HOUR_S, housekeeping_interval_s=HOUR_S)
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        job_id = submit(client)
        job, _ = wait_for_job(client, job_id)
        assert job["status"] == "succeeded", job
        housekeeper = app.state.jobs.housekeeper

        early = housekeeper.sweep(now=time.time() + HOUR_S / 2)
        assert early.expired == []
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200

        late = housekeeper.sweep(now=time.time() + HOUR_S + 60)
        assert late.expired == [job_id]
        assert late.bytes_freed > 0
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert not (settings.jobs_dir / job_id).exists()


def test_sweep_removes_oldest_over_budget(checkpoint, data_root, tmp_path):
    settings = job_settings(checkpoint, tmp_path, data_root=data_root, retention_s=HOUR_S, housekeeping_interval_s=HOUR_S)
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        first = submit(client)
        wait_for_job(client, first)
        second = submit(client)
        wait_for_job(client, second)
        newest_bytes = folder_bytes(settings.jobs_dir / second)
        assert newest_bytes > 0
        housekeeper = Housekeeper(
            app.state.jobs,
            upload_dir=settings.upload_dir,
            retention_s=HOUR_S,
            disk_budget_bytes=newest_bytes,
            interval_s=HOUR_S,
        )

        report = housekeeper.sweep()

        assert report.over_budget == [first]
        assert report.expired == []
        assert report.bytes_used <= newest_bytes
        assert client.get(f"/v1/jobs/{first}").status_code == 404
        assert client.get(f"/v1/jobs/{second}").json()["status"] == "succeeded"


def test_sweep_keeps_queued_and_running_jobs(checkpoint, data_root, tmp_path):
    # One job at a time, in batches of one tile, so the second job waits while the first runs.
    settings = job_settings(
        checkpoint, tmp_path, data_root=data_root, batch_size=1, retention_s=HOUR_S, housekeeping_interval_s=HOUR_S
    )
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        running = submit(client, CMU1)
        queued = submit(client, CMU1)
        wait_for_job(client, running, statuses=("running",))
        housekeeper = Housekeeper(
            app.state.jobs, upload_dir=settings.upload_dir, retention_s=1.0, disk_budget_bytes=0, interval_s=HOUR_S
        )

        report = housekeeper.sweep(now=time.time() + HOUR_S)

        assert report.expired == []
        assert report.over_budget == []
        assert report.bytes_used > 0
        assert client.get(f"/v1/jobs/{running}").json()["status"] in ("running", "succeeded")
        assert client.get(f"/v1/jobs/{queued}").json()["status"] in ("queued", "running", "succeeded")
        assert (settings.jobs_dir / running / "job.json").is_file()
        assert (settings.jobs_dir / queued / "job.json").is_file()

        for job_id in (running, queued):
            job, _ = wait_for_job(client, job_id)
            assert job["status"] == "succeeded", job
        finished = housekeeper.sweep(now=time.time() + HOUR_S)
        assert sorted(finished.expired) == sorted([running, queued])


def test_background_pass_removes_finished_job(checkpoint, data_root, tmp_path):
    settings = job_settings(checkpoint, tmp_path, data_root=data_root, retention_s=1.0, housekeeping_interval_s=0.2)
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        job_id = submit(client)
        statuses = []
        deadline = time.monotonic() + 120
        while True:
            response = client.get(f"/v1/jobs/{job_id}")
            if response.status_code == 404:
                break
            statuses.append(response.json()["status"])
            assert time.monotonic() < deadline, statuses
            time.sleep(0.02)

    # The job was never removed before it finished.
    assert statuses[-1] == "succeeded", statuses
    assert not (settings.jobs_dir / job_id).exists()


def test_sweep_removes_stale_uploads_and_orphans(checkpoint, tmp_path):
    settings = job_settings(checkpoint, tmp_path, retention_s=HOUR_S, housekeeping_interval_s=HOUR_S)
    settings.upload_dir.mkdir(parents=True)
    stale_upload = settings.upload_dir / "upload-0123.svs"
    fresh_upload = settings.upload_dir / "upload-4567.svs"
    other_file = settings.upload_dir / "notes.txt"
    for path in (stale_upload, fresh_upload, other_file):
        path.write_bytes(b"partial slide")
    settings.jobs_dir.mkdir(parents=True)
    orphan = settings.jobs_dir / uuid.uuid4().hex
    orphan.mkdir()
    (orphan / "slide.svs").write_bytes(b"upload without a record")
    fresh_orphan = settings.jobs_dir / uuid.uuid4().hex
    fresh_orphan.mkdir()
    old = time.time() - 2 * HOUR_S
    for path in (stale_upload, other_file, orphan):
        os.utime(path, (old, old))

    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        assert client.get("/healthz").status_code == 200
        # The pass at start may have removed them already, so this one only makes sure a pass has run.
        app.state.jobs.housekeeper.sweep()

    assert not orphan.exists()
    assert fresh_orphan.is_dir()
    assert not stale_upload.exists()
    assert fresh_upload.is_file()
    assert other_file.is_file()
