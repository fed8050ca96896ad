"""Slide jobs of the student server: kept on disk, run a few at a time, resumed after a restart.

Each job is a folder ``jobs_dir/<id>/`` holding:

- ``job.json``, the job's record (status, options, progress, error), written to a temporary name and
  renamed into place, so a killed server never leaves half a record;
- ``upload-<id><ext>``, the uploaded slide, deleted once the job has finished. A job submitted by path reads
  the slide where it lies under the data root instead;
- ``outputs/``, the files the slide pipeline writes: ``features.h5``, ``slide.h5``, ``result.json``,
  ``thumbnail.jpg``, ``overlay.jpg`` and ``map.json``.

A job's status moves ``queued`` -> ``running`` -> ``succeeded`` or ``failed``. A job still running when
the server stops becomes ``interrupted``. At start the manager re-queues every job it finds ``queued``,
``running`` (the server was killed) or ``interrupted``, and runs it again from the beginning.

At most ``max_concurrent_slide_jobs`` jobs run at once, each in its own thread, and at most
``max_queued_slide_jobs`` wait. A submission beyond that raises :class:`JobQueueFullError` (503 with
Retry-After). The manager also runs :class:`student_server.housekeeping.Housekeeper`, which removes
old finished jobs.

Each job belongs to the caller that submitted it: the name of its API key, or ``anonymous`` on a server
without a keys file. The name is stored in ``job.json`` as ``owner``, never the key or its digest, so
ownership survives a restart. The query methods take the caller and treat another caller's job exactly
as an unknown id, so a client cannot learn that the job exists. A record written before owners were
stored has none and belongs to ``anonymous``. So on a server with a keys file, ownerless and anonymous
jobs are visible to no key, because such a job cannot be tied to a key and no key may be named
``anonymous``. They still run, and housekeeping removes them after their retention time. On a server
without keys, jobs of named keys stay hidden until the server runs with its keys file again.

One server owns a jobs folder: :meth:`JobManager.start` takes an exclusive ``fcntl.flock`` lock on
``jobs_dir/server.lock`` and holds it until :meth:`JobManager.stop`, so a second server started on the
same folder fails at start instead of running the first server's jobs again.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, NotReadyError, UniteError
from shared.http import shorten_echoed
from shared.slides.reader import MPP_OVERRIDE_HINT
from student_server.auth import ANONYMOUS
from student_server.errors import JobNotFinishedError, JobNotFoundError, JobQueueFullError
from student_server.housekeeping import Housekeeper, folder_bytes
from student_server.settings import StudentSettings
from student_server.slide_pipeline import SlidePipelineOptions, TileEmbedder, run_slide_pipeline
from student_server.uploads import resolve_data_path

logger = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, INTERRUPTED = "queued", "running", "succeeded", "failed", "interrupted"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, INTERRUPTED)
FINISHED_STATUSES = frozenset({SUCCEEDED, FAILED})
# Statuses from which a job found on disk at start is resumed.
RESUMED_STATUSES = frozenset({QUEUED, RUNNING, INTERRUPTED})

RECORD_FILE = "job.json"
# Locked by the server that owns the jobs folder. It is never deleted, because deleting a lock file that
# another process has open would let two processes lock the same folder.
LOCK_FILE = "server.lock"
OUTPUTS_DIR = "outputs"
# Stored uploads are named upload-<job id><extension>, a name that no message text contains by chance.
UPLOAD_PREFIX = "upload-"
MPP_FIELD_HINT = "the field 'mpp' (µm per level-0 pixel) of POST /v1/slides"
# NOTE: this must match the hint of the not_brightfield error in shared.slides.tissue.detect_tissue word
# for word. tests/test_student_jobs.py checks that a job's error names the field instead.
FLUORESCENCE_CALL_HINT = "allow_fluorescence=True (--allow-fluorescence on the command line)"
FLUORESCENCE_FIELD_HINT = "the field 'allow_fluorescence': true of POST /v1/slides"

SlidePipeline = Callable[..., Any]


def utc_now() -> str:
    """Return the current time as ISO 8601 UTC text with milliseconds, the format of every job timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def is_job_id(text: str) -> bool:
    """Return whether ``text`` has the form of a job id (32 lowercase hex digits), so it is safe as a folder name."""
    return len(text) == 32 and all(char in "0123456789abcdef" for char in text)


@dataclass
class JobRecord:
    """The state of one slide job, as ``job.json`` stores it.

    ``slide`` is where the slide is read: the upload's file name inside the job folder, or the path the
    client sent, resolved under the data root again each time the job runs. ``slide_label`` names the
    slide in messages to clients, as "uploaded slide" or by the path the client sent. Neither the
    server path nor the uploaded file's name is ever sent to a client.

    ``owner`` is the name of the API key that submitted the job, or "anonymous" without a keys file.
    Records written before owners were stored load with None, which counts as "anonymous".
    """

    id: str
    status: str
    source: str  # "upload" or "path"
    slide: str
    slide_label: str
    options: dict[str, Any]
    created: str
    owner: str | None = None
    started: str | None = None
    finished: str | None = None
    attempts: int = 0
    upload_bytes: int | None = None
    error: dict[str, Any] | None = None
    slide_id: str | None = None
    num_patches: int | None = None
    progress_done: int = 0
    progress_total: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """Return the job as ``GET /v1/jobs/{id}`` shows it, without server paths."""
        total = self.progress_total
        if self.status == SUCCEEDED:
            fraction = 1.0
        elif total:
            fraction = self.progress_done / total
        else:
            fraction = 0.0
        base = f"/v1/jobs/{self.id}"
        return {
            "id": self.id,
            "object": "slide.job",
            "status": self.status,
            "progress": {"done": self.progress_done, "total": total, "fraction": round(fraction, 4)},
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "slide_id": self.slide_id,
            "num_patches": self.num_patches,
            "options": dict(self.options),
            "links": {
                "self": base,
                "result": f"{base}/result",
                "features": f"{base}/features.h5",
                "overlay": f"{base}/overlay.jpg",
                "thumbnail": f"{base}/thumbnail.jpg",
                "map": f"{base}/map",
            },
        }


class JobManager:
    """The slide jobs of one server: their records, the queue and the worker threads that run them.

    ``embedder`` computes the tile embeddings (the server passes its batching engine).
    ``pipeline`` is :func:`student_server.slide_pipeline.run_slide_pipeline` unless a caller gives another
    function with its signature. Every public method is safe to call from any thread.
    """

    def __init__(self, settings: StudentSettings, embedder: TileEmbedder, *, pipeline: SlidePipeline = run_slide_pipeline) -> None:
        self.settings = settings
        self.jobs_dir = settings.jobs_dir
        self.embedder = embedder
        self.pipeline = pipeline
        self._lock = threading.Condition()
        self._records: dict[str, JobRecord] = {}
        self._queue: collections.deque[str] = collections.deque()
        # Ids of submissions whose folder exists but whose record is not queued yet.
        self._reserved: set[str] = set()
        self._running: set[str] = set()
        self._stopping = threading.Event()
        # Set once stop() gave up waiting. Results that its threads return later are not recorded.
        self._abandoned = False
        self._workers: list[threading.Thread] = []
        self._folder_lock: int | None = None
        self.housekeeper = Housekeeper(
            self,
            upload_dir=settings.upload_dir,
            retention_s=settings.retention_s,
            disk_budget_bytes=settings.disk_budget_bytes,
            interval_s=settings.housekeeping_interval_s,
        )

    # Start and stop

    def start(self) -> None:
        """Lock ``jobs_dir``, load the jobs found there, re-queue the unfinished ones and start the worker threads.

        Raises :class:`ConfigError` when another server holds the lock on ``jobs_dir`` or the folder
        cannot be used, before any job is touched.
        """
        self._lock_jobs_dir()
        try:
            self._start_locked()
        except BaseException:
            self._unlock_jobs_dir()
            raise

    def _start_locked(self) -> None:
        resumed = []
        for record in self._load_records():
            self._records[record.id] = record
            if record.status in RESUMED_STATUSES:
                record.status = QUEUED
                record.progress_done = 0
                self._save(record)
                resumed.append(record)
        for record in sorted(resumed, key=lambda item: item.created):
            self._queue.append(record.id)

        for index in range(self.settings.max_concurrent_slide_jobs):
            worker = threading.Thread(target=self._work, name=f"slide-job-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.housekeeper.start()
        logger.info(
            "slide jobs started: %d found in the jobs folder, %d resumed, %d at once",
            len(self._records),
            len(resumed),
            len(self._workers),
        )

    def stop(self, grace_s: float) -> None:
        """Ask running jobs to stop, wait up to ``grace_s`` seconds for them, and mark the unfinished ones interrupted.

        The pipeline checks for the stop between batches of tiles, so a job usually stops within one
        batch. Queued jobs stay queued. Both kinds resume at the next start.
        """
        self.housekeeper.stop()
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))

        with self._lock:
            self._abandoned = True
            for job_id in sorted(self._running):
                record = self._records[job_id]
                record.status = INTERRUPTED
                self._save(record)
                logger.warning("slide job %s did not stop within %.1f s; it resumes at the next start", job_id, grace_s)
            self._running.clear()
        self._unlock_jobs_dir()
        logger.info("slide jobs stopped: %d still queued for the next start", len(self._queue))

    def _lock_jobs_dir(self) -> None:
        """Take the exclusive lock on ``jobs_dir/server.lock`` without waiting, or raise :class:`ConfigError`."""
        lock_path = self.jobs_dir / LOCK_FILE
        try:
            self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            file_descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise ConfigError(
                f"the slide jobs folder {self.jobs_dir} cannot be used: creating {lock_path} failed ({error}). "
                "Set UNITE_STUDENT_JOBS_DIR to a folder this user can write to.",
                value=str(self.jobs_dir),
            ) from error
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            os.close(file_descriptor)
            raise ConfigError(
                f"the slide jobs folder {self.jobs_dir} is in use by another student server, which has locked {lock_path}. "
                "Two servers on one folder would run each other's jobs. Give each server its own folder with the "
                "setting UNITE_STUDENT_JOBS_DIR, or stop the other server.",
                value=str(self.jobs_dir),
            ) from error
        self._folder_lock = file_descriptor
        logger.debug("slide jobs folder %s locked through %s", self.jobs_dir, lock_path)

    def _unlock_jobs_dir(self) -> None:
        if self._folder_lock is not None:
            fcntl.flock(self._folder_lock, fcntl.LOCK_UN)
            os.close(self._folder_lock)
            self._folder_lock = None

    # Submission

    def check_capacity(self) -> None:
        """Raise :class:`JobQueueFullError` when no more jobs may wait, before a client sends a large upload."""
        with self._lock:
            self._check_capacity_locked()

    def submit_upload(self, upload_path: Path, *, size: int, options: dict[str, Any], owner: str) -> JobRecord:
        """Queue a job of ``owner`` for an uploaded slide, moving the file into the new job's folder, and return its record.

        The upload is deleted when the job cannot be queued.
        """
        job_id = uuid.uuid4().hex
        try:
            self._reserve(job_id)
        except BaseException:
            upload_path.unlink(missing_ok=True)
            raise
        folder = self.jobs_dir / job_id
        try:
            folder.mkdir(mode=0o700)
            slide_name = f"{UPLOAD_PREFIX}{job_id}{upload_path.suffix}"
            _move_file(upload_path, folder / slide_name)
            record = JobRecord(
                id=job_id,
                status=QUEUED,
                source="upload",
                slide=slide_name,
                slide_label="uploaded slide",
                options=options,
                created=utc_now(),
                owner=owner,
                upload_bytes=size,
            )
            self._save(record)
        except BaseException:
            upload_path.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            self._release(job_id)
            raise
        return self._enqueue(record)

    def submit_path(self, requested: str, *, options: dict[str, Any], owner: str) -> JobRecord:
        """Queue a job of ``owner`` for the slide at ``requested`` under the data root and return its record.

        Raises the errors of :func:`student_server.uploads.resolve_data_path` for a path outside the
        data root or not naming a file, before anything is queued.
        """
        resolve_data_path(requested, self.settings.data_root)
        job_id = uuid.uuid4().hex
        self._reserve(job_id)
        folder = self.jobs_dir / job_id
        try:
            folder.mkdir(mode=0o700)
            record = JobRecord(
                id=job_id,
                status=QUEUED,
                source="path",
                slide=requested,
                slide_label=f"slide {requested!r}",
                options=options,
                created=utc_now(),
                owner=owner,
            )
            self._save(record)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            self._release(job_id)
            raise
        return self._enqueue(record)

    # Queries

    def get(self, job_id: str, *, caller: str | None = None) -> JobRecord:
        """Return a copy of the job's record, or raise :class:`JobNotFoundError` (404).

        With ``caller``, a job of another owner raises the same error as an unknown id. Without ``caller``,
        as the metrics call it, the job is returned whatever its owner.
        """
        with self._lock:
            record = self._records.get(job_id)
            if record is None or (caller is not None and not is_owner(record, caller)):
                raise JobNotFoundError(
                    f"slide job {shorten_echoed(job_id)!r} not found. It never existed, another API key submitted it, or it "
                    "was deleted or removed after its retention time (setting UNITE_STUDENT_RETENTION_S). Submit the "
                    "slide again with POST /v1/slides.",
                    value=shorten_echoed(job_id),
                )
            return JobRecord(**asdict(record))

    def jobs_of(self, caller: str) -> list[JobRecord]:
        """Return copies of the records of ``caller``'s jobs, in any status, newest first."""
        with self._lock:
            owned = [JobRecord(**asdict(record)) for record in self._records.values() if is_owner(record, caller)]
        return sorted(owned, key=lambda record: record.created, reverse=True)

    def outputs_dir(self, job_id: str) -> Path:
        """Return the folder of a job's pipeline outputs."""
        return self.jobs_dir / job_id / OUTPUTS_DIR

    def require_succeeded(self, job_id: str, *, caller: str | None = None) -> JobRecord:
        """Return the record of a succeeded job, or raise :class:`JobNotFinishedError` (409) naming its status.

        ``caller`` is checked as in :meth:`get`, before the status.
        """
        record = self.get(job_id, caller=caller)
        if record.status == SUCCEEDED:
            return record
        if record.status == FAILED:
            reason = (record.error or {}).get("message", "no reason recorded")
            raise JobNotFinishedError(
                f"slide job {job_id} failed, so it has no result: {reason}",
                value=record.status,
                limit=SUCCEEDED,
            )
        raise JobNotFinishedError(
            f"slide job {job_id} is {record.status}, so it has no result yet. Poll GET /v1/jobs/{job_id} until "
            "its status is 'succeeded'.",
            value=record.status,
            limit=SUCCEEDED,
        )

    def finished_jobs(self) -> list[JobRecord]:
        """Return copies of the records of succeeded and failed jobs, oldest finish first."""
        with self._lock:
            finished = [JobRecord(**asdict(record)) for record in self._records.values() if record.status in FINISHED_STATUSES]
        return sorted(finished, key=lambda record: record.finished or record.created)

    def status_counts(self) -> dict[str, int]:
        """Return the number of jobs in each status, every status included, for the metrics."""
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for record in self._records.values():
                counts[record.status] += 1
        return counts

    def known_ids(self) -> set[str]:
        """Return the ids of every job the manager holds, in any status, and of submissions in progress."""
        with self._lock:
            return set(self._records) | self._reserved

    def orphan_folders(self) -> list[Path]:
        """Return job folders whose job the manager does not hold: a submission cut off, or an unreadable record."""
        if not self.jobs_dir.is_dir():
            return []
        known = self.known_ids()
        return [folder for folder in self.jobs_dir.iterdir() if folder.is_dir() and is_job_id(folder.name) and folder.name not in known]

    # Removal

    def delete(self, job_id: str, *, caller: str | None = None) -> None:
        """Remove a finished job's folder, or raise :class:`JobNotFinishedError` (409) while it is queued or running.

        ``caller`` is checked as in :meth:`get`, so another owner's job is 404 and stays.
        """
        record = self.get(job_id, caller=caller)
        if self.remove_finished(job_id) is None:
            raise JobNotFinishedError(
                f"slide job {job_id} is {record.status}; only a succeeded or failed job can be deleted. "
                f"Wait until GET /v1/jobs/{job_id} shows it finished.",
                value=record.status,
                limit=sorted(FINISHED_STATUSES),
            )

    def remove_finished(self, job_id: str) -> int | None:
        """Remove a succeeded or failed job and its folder, and return the bytes freed.

        Returns None, removing nothing, when the job is unknown or not finished, so a queued or running
        job is never removed.
        """
        with self._lock:
            record = self._records.get(job_id)
            if record is None or record.status not in FINISHED_STATUSES:
                return None
            del self._records[job_id]
        folder = self.jobs_dir / job_id
        size = folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        return size

    # Workers

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping.is_set():
                    self._lock.wait()
                if self._stopping.is_set():
                    return
                record = self._records[self._queue.popleft()]
                record.status = RUNNING
                record.started = utc_now()
                record.attempts += 1
                record.progress_done = 0
                record.error = None
                self._running.add(record.id)
                self._save(record)
            try:
                self._run(record.id)
            except OSError:
                # _run records every pipeline failure itself, so this is writing the record or deleting the upload.
                logger.exception("slide job %s: writing its %s or deleting its upload failed", record.id, RECORD_FILE)

    def _run(self, job_id: str) -> None:
        with self._lock:
            record = JobRecord(**asdict(self._records[job_id]))
        folder = self.jobs_dir / job_id
        slide_path = Path(record.slide) if record.source == "path" else folder / record.slide
        outputs = folder / OUTPUTS_DIR
        options = SlidePipelineOptions(
            mpp=record.options.get("mpp"),
            pooling=record.options.get("pooling", "mean"),
            batch_size=self.settings.batch_size,
            read_workers=self.settings.read_workers,
            max_patches=self.settings.max_patches_per_slide,
            allow_fluorescence=record.options.get("allow_fluorescence", False),
        )
        logger.info("slide job %s started (attempt %d, %s)", job_id, record.attempts, record.source)
        started = time.perf_counter()
        try:
            # Outputs of an interrupted attempt are complete files of that attempt, and this attempt rewrites them.
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir(mode=0o700)
            if record.source == "path":
                # Resolved again, so a symlink placed under the data root since submission cannot lead out of it.
                slide_path = resolve_data_path(record.slide, self.settings.data_root)
            result = self.pipeline(
                slide_path,
                outputs,
                self.embedder,
                options,
                progress=lambda done, total: self._progress(job_id, done, total),
                should_stop=self._stopping.is_set,
            )
        except Exception as error:  # noqa: BLE001 - every failure is recorded, so no job stays "running"
            if self._stopping.is_set():
                logger.info("slide job %s interrupted by the server stopping; it resumes at the next start", job_id)
                self._finish(job_id, INTERRUPTED)
            else:
                self._finish(job_id, FAILED, error=self._public_error(record, slide_path, error))
            return

        seconds = time.perf_counter() - started
        logger.info("slide job %s succeeded: %d patches in %.2f s", job_id, result.num_patches, seconds)
        timings = {name: round(value, 3) for name, value in result.timings.items()}
        self._finish(job_id, SUCCEEDED, slide_id=result.slide_id, num_patches=result.num_patches, timings=timings)

    def _progress(self, job_id: str, done: int, total: int) -> None:
        with self._lock:
            record = self._records.get(job_id)
            if record is not None:
                record.progress_done = done
                record.progress_total = total

    def _finish(self, job_id: str, status: str, *, error: dict[str, Any] | None = None, **result: Any) -> None:
        with self._lock:
            if self._abandoned:
                logger.warning("slide job %s ended as %s after the server stopped waiting; it resumes at the next start", job_id, status)
                return
            self._running.discard(job_id)
            record = self._records[job_id]
            record.status = status
            if status in FINISHED_STATUSES:
                record.finished = utc_now()
                record.error = error
                if status == SUCCEEDED:
                    record.slide_id = result["slide_id"]
                    record.num_patches = result["num_patches"]
                    record.progress_done = record.progress_total
                    record.timings = result["timings"]
            self._save(record)
        if status in FINISHED_STATUSES and record.source == "upload":
            # The upload is needed only to run the job again, and it may be patient data.
            (self.jobs_dir / job_id / record.slide).unlink(missing_ok=True)

    def _public_error(self, record: JobRecord, slide_path: Path, error: BaseException) -> dict[str, Any]:
        """Return the job's error in the protocol's shape, with server paths replaced by the slide's label."""
        if isinstance(error, UniteError) and (error.status_code < 500 or isinstance(error, NotReadyError)):
            logger.warning("slide job %s failed: %s", record.id, error.message)
            body = error.to_dict()["error"]
            body["message"] = _replace_paths(error.message, record, slide_path)
            if isinstance(body.get("value"), str):
                body["value"] = _replace_paths(body["value"], record, slide_path)
            return body

        logger.error("slide job %s failed with an unexpected error", record.id, exc_info=error)
        code = error.code if isinstance(error, UniteError) else "internal_error"
        message = f"internal error while embedding the slide of job {record.id}. The server log has the cause."
        return {"code": code, "message": message, "limit": None, "value": None}

    # Records

    def _reserve(self, job_id: str) -> None:
        with self._lock:
            self._check_capacity_locked()
            self._reserved.add(job_id)

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._reserved.discard(job_id)

    def _enqueue(self, record: JobRecord) -> JobRecord:
        with self._lock:
            self._reserved.discard(record.id)
            self._records[record.id] = record
            self._queue.append(record.id)
            self._lock.notify()
            copy = JobRecord(**asdict(record))
        logger.info("slide job %s queued for %s (%s, %d waiting)", record.id, record.owner, record.source, len(self._queue))
        return copy

    def _check_capacity_locked(self) -> None:
        if self._stopping.is_set():
            raise NotReadyError("the student server is stopping and accepts no new slide jobs. Submit the slide again after it restarts.")
        waiting = len(self._queue) + len(self._reserved)
        limit = self.settings.max_queued_slide_jobs
        # A job taken by an idle worker at once does not wait, so idle workers add to the room.
        idle_workers = max(0, self.settings.max_concurrent_slide_jobs - len(self._running))
        if waiting >= limit + idle_workers:
            raise JobQueueFullError(
                f"{waiting} slide jobs already wait, the limit is {limit} (setting UNITE_STUDENT_MAX_QUEUED_SLIDE_JOBS). "
                "Submit the slide again after the Retry-After seconds.",
                retry_after_s=self.settings.retry_after_s,
                limit=limit,
                value=waiting,
            )

    def _save(self, record: JobRecord) -> None:
        folder = self.jobs_dir / record.id
        temporary = folder / f".{RECORD_FILE}.{uuid.uuid4().hex[:8]}.partial"
        temporary.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
        os.replace(temporary, folder / RECORD_FILE)

    def _load_records(self) -> list[JobRecord]:
        records = []
        for folder in sorted(self.jobs_dir.iterdir()):
            if not folder.is_dir() or not is_job_id(folder.name):
                continue
            path = folder / RECORD_FILE
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                record = JobRecord(**data)
            except FileNotFoundError:
                # Submission was cut off before the record was written; housekeeping removes the folder.
                continue
            except (OSError, ValueError, TypeError) as error:
                logger.error("slide job folder %s has an unreadable %s and is skipped: %s", folder.name, RECORD_FILE, error)
                continue
            if record.id != folder.name or record.status not in STATUSES:
                logger.error("slide job folder %s has a %s for another job or an unknown status; it is skipped", folder.name, RECORD_FILE)
                continue
            records.append(record)
        return records


def is_owner(record: JobRecord, caller: str) -> bool:
    """Return whether ``caller`` (a key name, or "anonymous" without a keys file) owns the job.

    A record without an owner was written before owners were stored and belongs to "anonymous".
    """
    return (record.owner or ANONYMOUS) == caller


def _replace_paths(text: str, record: JobRecord, slide_path: Path) -> str:
    # The hints go first, because the mpp hint contains the word "slide".
    replacements = [
        (MPP_OVERRIDE_HINT, MPP_FIELD_HINT),
        (FLUORESCENCE_CALL_HINT, FLUORESCENCE_FIELD_HINT),
        (str(slide_path.resolve()), record.slide_label),
        (str(slide_path), record.slide_label),
    ]
    if record.source == "upload" and slide_path.name.startswith(UPLOAD_PREFIX):
        # Some readers name only the file. Uploads stored before this naming were called "slide", a common word.
        replacements.append((slide_path.name, record.slide_label))
    for old, new in replacements:
        text = text.replace(old, new)
    return text.replace(f"slide {record.slide_label}", record.slide_label)


def _move_file(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, copying when the upload and jobs folders are on different file systems."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        shutil.move(source, target)

