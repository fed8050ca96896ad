"""Helpers of the slide job tests: a small exported student, server settings and polling a job."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import torch

from shared.checkpoint import save_student
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from student_server.settings import StudentSettings

# One transformer block instead of twelve keeps a slide of 58 patches at a few seconds on two cores,
# and the embeddings stay 384-d, as the served student's.
TINY_STUDENT_KWARGS = {**UNITE_STUDENT_KWARGS, "depth": 1}
JOB_TIMEOUT_S = 180.0
FINISHED = ("succeeded", "failed")


def save_tiny_student(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_student(
        build_unite_student(depth=1),
        folder,
        architecture="unite-vit-small-14",
        architecture_kwargs=TINY_STUDENT_KWARGS,
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={},
    )


def job_settings(checkpoint: Path, root: Path, **overrides) -> StudentSettings:
    """Return server settings whose jobs, uploads and data root are folders under ``root``."""
    values = {
        "checkpoint_dir": checkpoint,
        "jobs_dir": root / "jobs",
        "upload_dir": root / "uploads",
        "batch_size": 8,
        "read_workers": 1,
        "shutdown_grace_s": 20.0,
        **overrides,
    }
    return StudentSettings(**values)


def wait_for_job(client: httpx.Client, job_id: str, *, statuses=FINISHED, timeout_s: float = JOB_TIMEOUT_S) -> tuple[dict, list[dict]]:
    """Poll the job until its status is one of ``statuses``; return its last state and every state seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        seen.append(job)
        if job["status"] in statuses:
            return job, seen
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout_s} s: {job}"
        time.sleep(0.02)


def job_folders(jobs_dir: Path) -> list[str]:
    """Return the names of the folders in ``jobs_dir``. Files, such as the server's lock file, are left out."""
    return sorted(path.name for path in jobs_dir.iterdir() if path.is_dir()) if jobs_dir.is_dir() else []
