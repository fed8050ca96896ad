"""Removal of old slide jobs and stale uploads, so the jobs folder stays within its retention time and disk budget.

Each pass, in this order:

1. removes succeeded and failed jobs that finished more than ``retention_s`` seconds ago;
2. while ``jobs_dir`` contains more than ``disk_budget_bytes``, removes the finished job that finished first;
3. removes job folders without a readable ``job.json`` (a submission cut off by a crash) and partial
   uploads in ``upload_dir`` (``upload-*`` files) last modified more than ``retention_s`` seconds ago.

A queued, running or interrupted job is never removed, even when the jobs folder stays over its budget.
:meth:`JobManager.remove_finished` checks the job's status under the manager's lock, so a job cannot
start between the check and the removal.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from student_server.jobs import JobManager

logger = logging.getLogger(__name__)

UPLOAD_PATTERN = "upload-*"


@dataclass
class HousekeepingReport:
    """The outcome of one pass: removed job ids by cause, orphan folders, stale uploads, bytes freed and bytes still used."""

    expired: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale_uploads: int = 0
    bytes_freed: int = 0
    bytes_used: int = 0


class Housekeeper:
    """A background thread that runs :meth:`sweep` every ``interval_s`` seconds, started and stopped by :class:`JobManager`."""

    def __init__(
        self,
        jobs: JobManager,
        *,
        upload_dir: Path,
        retention_s: float,
        disk_budget_bytes: int,
        interval_s: float,
    ) -> None:
        self.jobs = jobs
        self.upload_dir = upload_dir
        self.retention_s = retention_s
        self.disk_budget_bytes = disk_budget_bytes
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_over_budget = False

    def start(self) -> None:
        """Start the background thread, whose first pass runs at once."""
        self._thread = threading.Thread(target=self._loop, name="slide-housekeeping", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread, waiting up to ``timeout`` seconds for a pass in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def sweep(self, now: float | None = None) -> HousekeepingReport:
        """Run one pass at time ``now`` (POSIX seconds, default the current time) and return what it removed."""
        now = time.time() if now is None else now
        report = HousekeepingReport()
        jobs_dir = self.jobs.jobs_dir

        finished = self.jobs.finished_jobs()
        unexpired = []
        for record in finished:
            age = now - datetime.fromisoformat(record.finished or record.created).timestamp()
            if age > self.retention_s:
                self._remove(record.id, report.expired, report)
            else:
                unexpired.append(record)

        report.bytes_used = folder_bytes(jobs_dir)
        for record in unexpired:
            if report.bytes_used <= self.disk_budget_bytes:
                break
            freed = self._remove(record.id, report.over_budget, report)
            report.bytes_used -= freed
        self._warn_if_over_budget(report.bytes_used)

        self._remove_orphans(now, report)
        self._remove_stale_uploads(now, report)

        if report.expired or report.over_budget or report.orphans or report.stale_uploads:
            logger.info(
                "housekeeping removed %d expired jobs %s, %d jobs over the disk budget %s, %d orphan job folders "
                "and %d stale uploads, freeing %d bytes; the jobs folder now uses %d bytes",
                len(report.expired),
                report.expired,
                len(report.over_budget),
                report.over_budget,
                len(report.orphans),
                report.stale_uploads,
                report.bytes_freed,
                report.bytes_used,
            )
        return report

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except OSError:
                logger.exception("housekeeping pass over %s failed, and the next pass retries", self.jobs.jobs_dir)
            self._stop.wait(self.interval_s)

    def _remove(self, job_id: str, removed: list[str], report: HousekeepingReport) -> int:
        freed = self.jobs.remove_finished(job_id)
        if freed is None:
            return 0
        removed.append(job_id)
        report.bytes_freed += freed
        return freed

    def _warn_if_over_budget(self, bytes_used: int) -> None:
        over = bytes_used > self.disk_budget_bytes
        if over and not self._warned_over_budget:
            logger.warning(
                "the jobs folder uses %d bytes, over the budget of %d bytes (setting UNITE_STUDENT_DISK_BUDGET_BYTES), "
                "and only queued or running jobs are left; they are kept",
                bytes_used,
                self.disk_budget_bytes,
            )
        self._warned_over_budget = over

    def _remove_orphans(self, now: float, report: HousekeepingReport) -> None:
        for folder in self.jobs.orphan_folders():
            try:
                age = now - folder.stat().st_mtime
            except FileNotFoundError:
                continue
            # A folder left by a crash is kept for the retention time, as a finished job would be.
            if age > self.retention_s:
                report.bytes_freed += folder_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
                report.orphans.append(folder.name)

    def _remove_stale_uploads(self, now: float, report: HousekeepingReport) -> None:
        if not self.upload_dir.is_dir():
            return
        for path in self.upload_dir.glob(UPLOAD_PATTERN):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            # An upload still streaming is written to continuously, so its modification time stays recent.
            if now - stat.st_mtime > self.retention_s:
                path.unlink(missing_ok=True)
                report.stale_uploads += 1
                report.bytes_freed += stat.st_size


def folder_bytes(folder: Path) -> int:
    """Return the bytes of the regular files under ``folder``, skipping files removed while it counts."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total
