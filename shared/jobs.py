"""Resumable jobs over many items (slides), safe to run from several processes on one output folder.

Each item has a name, and the job folder keeps two files per name:

- ``OUT/state/NAME.json``, the state record: status (pending, running, done or failed), the reason code
  and message of a failure, the attempts so far, timings, the options used and the outputs written.
  It is written to ``NAME.json.partial`` and renamed into place, so a killed process never leaves
  half a record.
- ``OUT/locks/NAME.lock``, locked with ``fcntl.flock`` while a process works on the item. The kernel
  releases the lock when the process exits or is killed, so a killed run leaves no stale lock.
  Lock files are never deleted, because deleting one that another process has open would let two
  processes lock the same item.

NOTE: the locks were tested between processes on one machine. Workers on several machines sharing a
network file system are excluded from each other only where that file system supports ``flock``
across clients.

:func:`run_jobs` skips items already done (state done, same options, outputs present), runs the rest
in worker processes, and records each failure without stopping the other items. A record left at
"running" by a killed process is simply run again. A file of one item that cannot be written (disk
full, name too long, permission denied) fails that item with reason ``write_failed``. SIGINT and
SIGTERM stop the run and its worker processes and raise :class:`RunInterrupted` with the summary so far.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from shared.errors import ConfigError, UniteError

logger = logging.getLogger(__name__)

STATUSES = ("pending", "running", "done", "failed")
INTERNAL_ERROR = "internal_error"  # the reason recorded for an exception that is not a UniteError
WRITE_FAILED = "write_failed"  # the reason recorded when a file of the item cannot be written
# The reason of an item that another run finished with other options after this run started. This run
# leaves its record and outputs as they are.
OTHER_OPTIONS = "other_options"

# The maximum number of worker processes a run may start. It is far above the cores of one machine and
# stops a typo, such as 2000 for 20, from starting a process per slide.
MAX_WORKERS = 256

# Linux prctl option that sends a signal to a process when its parent exits (linux/prctl.h).
PR_SET_PDEATHSIG = 1
# Seconds between the checks of a worker whose platform has no PR_SET_PDEATHSIG that its parent is alive.
PARENT_CHECK_SECONDS = 1.0
# Seconds to wait for each terminated worker process to exit before it is killed.
WORKER_STOP_SECONDS = 10.0

# Causes of write errors by errno, each with the fix to suggest.
_WRITE_ERROR_CAUSES = {
    errno.ENOSPC: ("the disk is full", "Free space on that disk, or pass an output folder on another disk."),
    errno.EDQUOT: ("the disk quota of this user is used up", "Free space in the quota, or pass an output folder on another disk."),
    errno.ENAMETOOLONG: (
        "the file name is longer than the file system allows",
        "Rename the source to a shorter name (a slide's outputs are named after its file name).",
    ),
    errno.EACCES: ("permission denied", "Make the folder writable for this user, or pass another output folder."),
    errno.EPERM: ("the operation is not permitted", "Make the folder writable for this user, or pass another output folder."),
    errno.EROFS: ("the file system is read-only", "Pass an output folder on a writable file system."),
    errno.EISDIR: ("a folder is in the way of the file", "Move that folder away."),
    errno.ENOTDIR: ("a file is in the way of a folder on the path", "Move that file away."),
    errno.EEXIST: ("a file is in the way of a folder", "Move that file away."),
}


class WriteError(UniteError):
    """A file of one job item (its state record or an output) cannot be written.

    Jobs record it with reason ``write_failed``, and the other items go on.
    """

    code = WRITE_FAILED
    status_code = 500

    @classmethod
    def from_os_error(cls, path: Path | str, error: OSError, *, subject: str) -> WriteError:
        """Build the error for ``error``, raised while writing ``path`` for ``subject`` (such as "slide NAME"): the file, the cause and the fix."""
        cause, fix = _write_error_cause(error)
        return cls(f"{subject}: writing {path} failed: {cause} ({error}). {fix}", value=str(path))


def _write_error_cause(error: OSError) -> tuple[str, str]:
    """Return the cause of a write error in plain words, and the fix to suggest."""
    return _WRITE_ERROR_CAUSES.get(error.errno, (error.strerror or type(error).__name__, "Check the output folder and its disk."))


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM, after its worker processes were stopped.

    ``summary`` counts the items finished before the signal, and its ``unfinished`` the others.
    Items that were running stay "running" in their state records and run again on the next run.
    ``exit_status`` is 128 plus the signal number, as a shell reports a process ended by it.
    It derives from :class:`KeyboardInterrupt`, so a caller that handles Ctrl-C handles it too.
    """

    def __init__(self, signal_number: int, summary: JobSummary) -> None:
        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name
        self.summary = summary
        self.exit_status = 128 + signal_number
        super().__init__(f"the run was interrupted by {self.signal_name}")


class Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler of :func:`run_jobs`.

    It derives from BaseException so that the ``except Exception`` around each task does not record it
    as the item's failure.
    """


@dataclass(frozen=True)
class Job:
    """One item of a job run.

    ``name`` names the state and lock files and must be unique in a run. ``source`` is recorded in the
    state (for a slide, its path). ``payload`` is passed to the task. ``config`` contains the options
    that shape this item's outputs: a done item whose recorded options differ is an error, and a failed
    item whose options differ is run again. Everything must be picklable for worker processes.
    """

    name: str
    source: str
    payload: Any = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    """The return value of a task: ``outputs`` maps a kind ("patches") to a path under the job folder, ``details`` is free-form."""

    outputs: dict[str, Path]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobState:
    """The state record of one item, stored as ``OUT/state/NAME.json``.

    Times are ISO 8601 in UTC, ``seconds`` is the duration of the last attempt, ``outputs`` are paths
    relative to the job folder, and ``worker`` is ``host:pid`` of the process of the last attempt.
    """

    name: str
    source: str = ""
    status: str = "pending"
    reason: str | None = None
    message: str | None = None
    attempts: int = 0
    run_id: str | None = None
    worker: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOutcome:
    """The outcome of one item in a run: done, skipped (done earlier), failed, or locked by another process.

    ``earlier`` marks a failure recorded by an earlier run and not retried in this one.
    """

    name: str
    status: str
    reason: str | None = None
    message: str | None = None
    earlier: bool = False


def format_count(count: int, noun: str, plural: str | None = None) -> str:
    """Return ``count`` with ``noun``, or with its plural unless the count is 1: "1 slide", "2 slides".

    ``plural`` defaults to ``noun`` with an "s" appended. Pass it for other nouns, such as "patches".
    """
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural or noun + 's'}"


@dataclass
class JobSummary:
    """The outcomes of a run, by item name. ``unfinished`` counts the items an interrupted run did not finish."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    failed: list[JobOutcome] = field(default_factory=list)
    unfinished: int = 0

    def add(self, outcome: JobOutcome) -> None:
        """Count one item's outcome."""
        if outcome.status == "failed":
            self.failed.append(outcome)
        else:
            getattr(self, outcome.status).append(outcome.name)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.locked) + len(self.failed)

    @property
    def exit_status(self) -> int:
        """0 when no item failed, else 1. Items locked by another process are not failures."""
        return 1 if self.failed else 0

    def failed_by_reason(self) -> dict[str, list[str]]:
        """Return the names of the failed items grouped by reason code."""
        groups: dict[str, list[str]] = {}
        for outcome in self.failed:
            groups.setdefault(outcome.reason or INTERNAL_ERROR, []).append(outcome.name)
        return groups

    def format(self, noun: str = "slide") -> str:
        """Describe the run in a few lines: the counts, then one line per failed item with its reason and message."""
        lines = [
            f"{format_count(self.total, noun)}: {len(self.done)} done, {len(self.skipped)} skipped (done earlier), "
            f"{len(self.failed)} failed, {len(self.locked)} locked by another process"
        ]
        if self.failed:
            reasons = ", ".join(f"{reason} {len(names)}" for reason, names in sorted(self.failed_by_reason().items()))
            lines.append(f"failed by reason: {reasons}")
        for outcome in self.failed:
            when = ", in an earlier run" if outcome.earlier else ""
            lines.append(f"  {outcome.name} ({outcome.reason}{when}): {outcome.message}")
        if any(outcome.earlier for outcome in self.failed):
            lines.append(f"{noun.capitalize()}s that failed in an earlier run with the same options were not retried. "
                         "Pass --retry-failed to try them again.")
        if self.unfinished:
            lines.append(f"interrupted: {format_count(self.unfinished, noun)} not finished. Run the same command again to resume.")
        return "\n".join(lines)


class JobLock:
    """An exclusive ``fcntl.flock`` lock on ``OUT/locks/NAME.lock``, held until :meth:`release` or process exit."""

    def __init__(self, path: Path, file_descriptor: int) -> None:
        self.path = path
        self._file_descriptor: int | None = file_descriptor

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Unlock and close the lock file; the file itself stays."""
        if self._file_descriptor is not None:
            fcntl.flock(self._file_descriptor, fcntl.LOCK_UN)
            os.close(self._file_descriptor)
            self._file_descriptor = None


class JobFolder:
    """The ``state/`` and ``locks/`` folders of a job's output folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state_dir = self.root / "state"
        self.lock_dir = self.root / "locks"

    def create(self) -> None:
        """Create the state and lock folders."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock_dir.mkdir(parents=True, exist_ok=True)

    def prepare(self) -> None:
        """Create the state and lock folders and check that files can be written in both.

        Raises :class:`ConfigError` naming the folder and the cause when the folder is unusable, so a run
        stops before its first item instead of failing every item.
        """
        try:
            self.create()
        except OSError as error:
            raise _unusable_folder_error(self.root, Path(error.filename or self.root), error) from error
        for folder in (self.state_dir, self.lock_dir):
            try:
                # The probe file is deleted on close. A file that cannot be created or written shows what
                # os.access misses: a root user on an immutable folder, a read-only mount, a full disk.
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-", suffix=".partial") as probe:
                    probe.write(b"write check\n")
                    probe.flush()
                    os.fsync(probe.fileno())
            except OSError as error:
                raise _unusable_folder_error(self.root, folder, error) from error

    def state_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def lock_path(self, name: str) -> Path:
        return self.lock_dir / f"{name}.lock"

    def try_lock(self, name: str) -> JobLock | None:
        """Lock the item without waiting, or return None when another process, or another open lock of this one, has it.

        Raises :class:`WriteError` when the lock file cannot be created, for instance because the name is too long.
        """
        path = self.lock_path(name)
        try:
            file_descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise WriteError.from_os_error(path, error, subject=name) from error
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(file_descriptor)
            return None
        return JobLock(path, file_descriptor)

    def read_state(self, name: str, *, warn: bool = True) -> JobState | None:
        """Return the item's state record, or None when there is none or it is invalid (logged when ``warn``).

        A record is invalid when it is not JSON, or when a field is missing, unknown or of the wrong type
        (see :func:`_state_from_record`). The item of an invalid record is then run again.
        """
        path = self.state_path(name)
        try:
            record = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
            return _state_from_record(record, name)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            if warn:
                logger.warning("ignoring state record %s, which is invalid (%s); the item is run again", path, error)
            return None

    def write_state(self, state: JobState) -> Path:
        """Write the state record atomically: to ``NAME.json.partial``, then renamed over ``NAME.json``.

        Callers hold the item's lock, so no two processes write the same partial file, and a partial
        file left by a killed process is overwritten by the next write of that item. Infinite and NaN
        numbers are written as null, because strict JSON has no such values. Raises :class:`WriteError`
        when the record cannot be written, and then removes the partial file where it can.
        """
        path = self.state_path(state.name)
        partial = path.with_name(path.name + ".partial")
        text = json.dumps(_finite_json(asdict(state), where=state.name), indent=2, sort_keys=True, allow_nan=False)
        try:
            with partial.open("w", encoding="utf-8") as file:
                file.write(text + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except OSError as error:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass  # the name may be too long or the folder unwritable, which the WriteError below reports
            raise WriteError.from_os_error(path, error, subject=state.name) from error
        return path

    def outputs_present(self, state: JobState) -> bool:
        return all((self.root / relative).exists() for relative in state.outputs.values())


Task = Callable[[Job, Path], JobResult]


def run_jobs(
    jobs: Sequence[Job],
    task: Task,
    *,
    out_dir: Path,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
    noun: str = "slide",
) -> JobSummary:
    """Run ``task(job, out_dir)`` for every job not yet done and return the summary.

    A job is skipped when its state is done with the same ``config`` and its outputs exist. A failed
    job is run again when ``retry_failed`` is true or its ``config`` changed, and otherwise counted
    as failed again. Jobs locked by another process are left to it. With ``workers`` > 1 the jobs
    run in that many worker processes (``task`` must then be a picklable module-level function),
    which exit when this process dies.

    A task's :class:`UniteError` is recorded with its reason (``SlideError.reason``, else its
    ``code``, for instance ``invalid_config`` or ``write_failed``), any other exception as
    ``internal_error`` with its traceback logged, and the other jobs go on. A state record that cannot
    be written fails its job with ``write_failed``. A job that another run finished with other options
    after this run started is left as it is and reported as failed with ``other_options``.

    Raises :class:`ConfigError` before any work for invalid options, duplicate names, an output folder
    where files cannot be written, or done jobs whose recorded options differ. Raises
    :class:`RunInterrupted` with the summary so far on SIGINT, and on SIGTERM where no other handler
    is installed and this is the main thread.
    """
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(
            f"workers={workers!r} must be a whole number of worker processes from 1 to {MAX_WORKERS} (--workers).",
            value=workers,
            limit=[1, MAX_WORKERS],
        )
    check_unique_names(jobs)
    folder = JobFolder(out_dir)
    folder.prepare()
    check_done_jobs_match(folder, jobs, noun)

    run_id = uuid.uuid4().hex
    summary = JobSummary()
    logger.info(
        "starting a run over %s in %s with %s", format_count(len(jobs), noun), folder.root, format_count(workers, "worker")
    )
    try:
        with sigterm_raises(), tqdm(total=len(jobs), desc=f"{noun}s", unit=noun, file=sys.stderr, disable=not progress) as bar:
            if workers == 1:
                # Log lines of the jobs run here go through tqdm, so they do not break the progress bar.
                with logging_redirect_tqdm():
                    for job in jobs:
                        _count(summary, bar, run_one(job, task, folder.root, run_id, retry_failed))
            else:
                with closing(_run_in_pool(jobs, task, folder, run_id, retry_failed, workers)) as outcomes:
                    for outcome in outcomes:
                        _count(summary, bar, outcome)
    except (KeyboardInterrupt, Terminated) as interruption:
        signal_number = signal.SIGTERM if isinstance(interruption, Terminated) else signal.SIGINT
        _count_recorded_outcomes(summary, folder, jobs, run_id)
        summary.unfinished = len(jobs) - summary.total
        raise RunInterrupted(signal_number, summary) from None
    logger.info("finished the run: %s", summary.format(noun).splitlines()[0])
    return summary


def _count_recorded_outcomes(summary: JobSummary, folder: JobFolder, jobs: Sequence[Job], run_id: str) -> None:
    """Add to ``summary`` the jobs that this run finished and recorded but whose outcome had not reached it.

    A worker may finish a job just before the run is interrupted, so its record is written while its
    outcome is still on the way back to this process.
    """
    counted = {*summary.done, *summary.skipped, *summary.locked, *(outcome.name for outcome in summary.failed)}
    for job in jobs:
        if job.name in counted:
            continue
        state = folder.read_state(job.name, warn=False)
        if state is not None and state.run_id == run_id and state.status in ("done", "failed"):
            summary.add(JobOutcome(job.name, state.status, state.reason, state.message))


def _count(summary: JobSummary, bar: tqdm, outcome: JobOutcome) -> None:
    summary.add(outcome)
    bar.set_postfix(done=len(summary.done), failed=len(summary.failed), refresh=False)
    bar.update(1)


def run_one(job: Job, task: Task, root: Path, run_id: str, retry_failed: bool) -> JobOutcome:
    """Lock the job, decide again under the lock whether it must run, run it and record the result."""
    folder = JobFolder(root)
    try:
        lock = folder.try_lock(job.name)
    except WriteError as error:
        return _write_failed(job, error)
    if lock is None:
        logger.info("%s is locked by another process, so this run leaves it", job.name)
        return JobOutcome(job.name, "locked")

    with lock:
        previous = folder.read_state(job.name)
        skip = outcome_without_running(folder, job, previous, retry_failed)
        if skip is not None:
            return skip

        state = JobState(
            name=job.name,
            source=job.source,
            status="running",
            attempts=(previous.attempts if previous else 0) + 1,
            run_id=run_id,
            worker=f"{socket.gethostname()}:{os.getpid()}",
            started_at=_now(),
            config=dict(job.config),
        )
        if previous is not None and previous.status == "running":
            logger.info("%s was left unfinished by an earlier run, so it is run again (attempt %d)", job.name, state.attempts)
        try:
            folder.write_state(state)
        except WriteError as error:
            return _write_failed(job, error)
        started = time.perf_counter()

        try:
            result = task(job, root)
        except UniteError as error:
            state.status, state.reason, state.message = "failed", getattr(error, "reason", error.code), error.message
            logger.error("%s failed (%s): %s", job.name, state.reason, error.message)
        except Exception as error:  # noqa: BLE001 - one item's bug must not stop the others; the traceback is logged
            state.status, state.reason = "failed", INTERNAL_ERROR
            state.message = f"{type(error).__name__}: {error}"
            logger.error("%s failed with an internal error: %s\n%s", job.name, state.message, traceback.format_exc())
        else:
            state.status = "done"
            state.outputs = {kind: _relative(path, root) for kind, path in result.outputs.items()}
            state.details = dict(result.details)

        state.finished_at = _now()
        state.seconds = round(time.perf_counter() - started, 3)
        try:
            folder.write_state(state)
        except WriteError as error:
            # The task's own outcome was logged above. This run reports the item as failed with
            # write_failed, and the next run runs it again.
            error.message += f" The record stays 'running', so {job.name} runs again on the next run."
            return _write_failed(job, error)
    return JobOutcome(job.name, state.status, state.reason, state.message)


def _write_failed(job: Job, error: WriteError) -> JobOutcome:
    logger.error("%s failed (%s): %s", job.name, WRITE_FAILED, error.message)
    return JobOutcome(job.name, "failed", WRITE_FAILED, error.message)


def outcome_without_running(folder: JobFolder, job: Job, state: JobState | None, retry_failed: bool) -> JobOutcome | None:
    """Return the outcome of a job that must not run, else None.

    A job must not run when it is done with the same options and its outputs exist, when it failed
    with the same options and ``retry_failed`` is false, or when it is done with other options. The
    last happens when another run with other options finished it after this run checked the folder
    at its start: its outputs are left as they are, so one folder never mixes outputs of both runs
    for one item.
    """
    if state is None:
        return None
    changes = _config_changes(state.config, _json_round_trip(job.config))
    if state.status == "done" and changes:
        message = (
            f"{job.name} was done with other options by another run (run id {state.run_id}, process "
            f"{state.worker}) after this run started ({', '.join(changes)}), so this run left its outputs as they "
            "are. Pass another output folder (--out) for the new options, or delete its state record to redo it."
        )
        logger.error("%s failed (%s): %s", job.name, OTHER_OPTIONS, message)
        return JobOutcome(job.name, "failed", OTHER_OPTIONS, message)
    if state.status == "done":
        if folder.outputs_present(state):
            return JobOutcome(job.name, "skipped")
        logger.warning("%s is recorded as done but some of its outputs are missing, so it is run again", job.name)
    if state.status == "failed" and not changes and not retry_failed:
        return JobOutcome(job.name, "failed", state.reason, state.message, earlier=True)
    return None


# Worker processes.


def _run_in_pool(
    jobs: Sequence[Job], task: Task, folder: JobFolder, run_id: str, retry_failed: bool, workers: int
) -> Iterator[JobOutcome]:
    """Yield the outcomes of jobs run in worker processes, restarting the pool when a worker dies.

    A dying worker (killed, out of memory, or crashed in a native library) breaks the whole pool, and
    every job not finished by then gets :class:`BrokenProcessPool`. The jobs that were running at that
    moment are suspects: each runs again alone in a one-worker pool, so a second death is that job's
    own and is recorded as failed. Jobs that had not started go to a fresh pool.
    """
    queue = list(jobs)
    while queue:
        suspects: list[Job] = []
        waiting: list[Job] = []
        with _worker_pool(min(workers, len(queue))) as pool:
            futures = {pool.submit(run_one, job, task, folder.root, run_id, retry_failed): job for job in queue}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool:
                    job = futures[future]
                    state = folder.read_state(job.name)
                    started = state is not None and state.status == "running" and state.run_id == run_id
                    (suspects if started else waiting).append(job)

        for job in suspects:
            logger.warning("a worker process died while %s was running, so it runs again alone in a new worker", job.name)
            yield _run_alone(job, task, folder, run_id, retry_failed)
        queue = waiting


def _run_alone(job: Job, task: Task, folder: JobFolder, run_id: str, retry_failed: bool) -> JobOutcome:
    """Run one job in its own worker process, and record it as failed if that process dies."""
    with _worker_pool(1) as pool:
        try:
            return pool.submit(run_one, job, task, folder.root, run_id, retry_failed).result()
        except BrokenProcessPool:
            pass

    try:
        lock = folder.try_lock(job.name)
    except WriteError as error:
        return _write_failed(job, error)
    if lock is None:
        return JobOutcome(job.name, "locked")
    with lock:
        state = folder.read_state(job.name) or JobState(name=job.name, source=job.source, config=dict(job.config))
        message = (
            f"the worker process died while running this item alone, in worker {state.worker}: it was killed, ran "
            "out of memory, or crashed in a native library such as a slide reader. Check the input, then pass "
            "--retry-failed to try again."
        )
        state.status, state.reason, state.message, state.finished_at = "failed", INTERNAL_ERROR, message, _now()
        try:
            folder.write_state(state)
        except WriteError as error:
            return _write_failed(job, error)
    logger.error("%s failed (%s): %s", job.name, INTERNAL_ERROR, message)
    return JobOutcome(job.name, "failed", INTERNAL_ERROR, message)


@contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """Yield a pool of ``workers`` worker processes; an exception (a signal included) stops them at once.

    ``ProcessPoolExecutor.__exit__`` would wait for the running tasks, so a Ctrl-C would wait for
    every slide being tiled. Here the workers are terminated instead, and their items stay "running".
    """
    # spawn, not fork: a forked child would inherit the parent's threads (tqdm's monitor) and library state.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_initialize_worker,
        initargs=(logging.getLogger().getEffectiveLevel(), os.getpid()),
    )
    try:
        yield pool
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes, wait until they exit, and shut the pool down.

    A worker still alive :data:`WORKER_STOP_SECONDS` after SIGTERM is killed. The wait watches each
    process's sentinel, which becomes ready when the process exits, because the pool's own thread may
    reap the processes first.
    """
    # NOTE: ProcessPoolExecutor has no public way to stop its workers before Python 3.14
    # (terminate_workers), so this reads its private ``_processes`` map of pid to process.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    running = {process.sentinel: process for process in processes}
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    while running and time.monotonic() < deadline:
        for sentinel in multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
            del running[sentinel]
    for process in running.values():
        logger.warning("worker process %s did not exit within %.0f s of SIGTERM, so it is killed", process.pid, WORKER_STOP_SECONDS)
        process.kill()
    # The pool's manager thread detects the dead workers, joins them and exits, so this returns once they are gone.
    pool.shutdown(wait=True, cancel_futures=True)


def _initialize_worker(level: int, parent_pid: int) -> None:
    """Set up a worker process: log like the parent, ignore Ctrl-C, and exit when the parent dies.

    A Ctrl-C in a terminal sends SIGINT to every process of the foreground group. The parent handles it
    and terminates the workers, so a worker ignores it instead of printing its own traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s", datefmt="%H:%M:%S")


def _exit_with_parent(parent_pid: int) -> None:
    """Make this process exit when the process ``parent_pid`` that started it dies, even by SIGKILL.

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``). The signal
    fires when the parent's thread that started this process exits: :func:`run_jobs` starts its workers
    from the thread that called it and waits for them there. Elsewhere, a daemon thread checks every
    :data:`PARENT_CHECK_SECONDS` whether the parent is still this process's parent.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # prctl is variadic in glibc and takes unsigned long arguments after the option.
            unused = ctypes.c_ulong(0)
            armed = libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), unused, unused, unused) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:  # the parent died before the death signal was armed
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Make SIGTERM raise :class:`Terminated` in the main thread while the block runs.

    Nothing changes when this is not the main thread (only it may set handlers) or when the program
    has its own SIGTERM handler, which then decides what a SIGTERM does.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_terminated(signal_number: int, frame: object) -> None:
    raise Terminated()


# Checks of names, options and state records.


def check_unique_names(jobs: Sequence[Job]) -> None:
    """Raise :class:`ConfigError` when two jobs have the same name, because they would share one state record."""
    sources_by_name: dict[str, str] = {}
    for job in jobs:
        earlier = sources_by_name.get(job.name)
        sources_by_name[job.name] = job.source
        if earlier is not None:
            raise ConfigError(
                f"{earlier} and {job.source} have the same job name {job.name!r}, so they would share one state "
                "record and one set of outputs. Rename one, or run them into different output folders.",
                value=[earlier, job.source],
            )


def check_done_jobs_match(folder: JobFolder, jobs: Sequence[Job], noun: str) -> None:
    """Raise :class:`ConfigError` when a done job was made with other options than this run's."""
    conflicts = []
    for job in jobs:
        state = folder.read_state(job.name, warn=False)  # the run warns when it reaches the job
        if state is None or state.status != "done":
            continue
        changes = _config_changes(state.config, _json_round_trip(job.config))
        if changes:
            conflicts.append(f"{job.name} ({', '.join(changes)})")
    if conflicts:
        listed = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise ConfigError(
            f"{folder.root} contains {format_count(len(conflicts), noun)} done with other options than this run's: {listed}. "
            f"Pass another output folder (--out), run only the {noun}s that need the new options, or delete the "
            f"state records of those to redo in {folder.state_dir}.",
            value=len(conflicts),
        )


def _config_changes(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Return ``"key old -> new"`` for each option that differs between a recorded config and this run's."""
    keys = sorted(key for key in recorded.keys() | expected.keys() if recorded.get(key) != expected.get(key))
    return [f"{key} {recorded.get(key)!r} -> {expected.get(key)!r}" for key in keys]


def _unusable_folder_error(root: Path, folder: Path, error: OSError) -> ConfigError:
    cause, fix = _write_error_cause(error)
    return ConfigError(
        f"output folder {root} cannot be used, because writing in {folder} failed: {cause} ({error}). {fix}",
        value=str(folder),
    )


# The type each field of a state record must have in JSON; None marks a field that may be null.
_STATE_FIELD_TYPES: dict[str, tuple[type | None, ...]] = {
    "name": (str,),
    "source": (str,),
    "status": (str,),
    "reason": (str, None),
    "message": (str, None),
    "attempts": (int,),
    "run_id": (str, None),
    "worker": (str, None),
    "started_at": (str, None),
    "finished_at": (str, None),
    "seconds": (int, float, None),
    "outputs": (dict,),
    "details": (dict,),
    "config": (dict,),
}


def _state_from_record(record: Any, name: str) -> JobState:
    """Return the :class:`JobState` of a parsed record, or raise ValueError saying what is invalid."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    unknown = sorted(set(record) - set(_STATE_FIELD_TYPES))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    for key, allowed in _STATE_FIELD_TYPES.items():
        if key not in record:
            if key == "name":
                raise ValueError("the field 'name' is missing")
            continue
        value = record[key]
        type_ok = any(value is None if kind is None else isinstance(value, kind) for kind in allowed)
        if not type_ok or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join("null" if kind is None else kind.__name__ for kind in allowed)
            raise ValueError(f"field {key!r} is {value!r}, expected {expected}")
    if record["name"] != name:
        raise ValueError(f"field 'name' is {record['name']!r}, expected {name!r}")
    if record.get("status", "pending") not in STATUSES:
        raise ValueError(f"field 'status' is {record['status']!r}, expected one of {', '.join(STATUSES)}")
    if record.get("attempts", 0) < 0:
        raise ValueError(f"field 'attempts' is {record['attempts']}, expected 0 or more")
    if not all(isinstance(path, str) for path in record.get("outputs", {}).values()):
        raise ValueError("field 'outputs' must map each kind to a path string")
    return JobState(**record)


def _reject_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite_json(value: Any, *, where: str) -> Any:
    """Return ``value`` as JSON-ready data: infinite and NaN numbers become None (logged), paths and other objects strings."""
    if isinstance(value, dict):
        return {str(key): _finite_json(item, where=where) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item, where=where) for item in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            logger.warning("%s: the value %r has no JSON form, so it is recorded as null", where, value)
            return None
        return float(value)
    return str(value)


def _json_round_trip(config: dict[str, Any]) -> dict[str, Any]:
    """Return ``config`` as it reads back from a state record (tuples become lists, paths strings, NaN null)."""
    return json.loads(json.dumps(_finite_json(config, where="options"), sort_keys=True, allow_nan=False))


def _relative(path: Path | str, root: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
