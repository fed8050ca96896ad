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
"running" by a killed process is simply run again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
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


@dataclass
class JobSummary:
    """The outcomes of a run, by item name."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    failed: list[JobOutcome] = field(default_factory=list)

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
            f"{self.total} {noun}(s): {len(self.done)} done, {len(self.skipped)} skipped (done earlier), "
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

    def state_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def try_lock(self, name: str) -> JobLock | None:
        """Lock the item without waiting, or return None when another process, or another open lock of this one, has it."""
        path = self.lock_dir / f"{name}.lock"
        file_descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(file_descriptor)
            return None
        return JobLock(path, file_descriptor)

    def read_state(self, name: str) -> JobState | None:
        """Return the item's state record, or None when there is none or it cannot be parsed (logged)."""
        path = self.state_path(name)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return JobState(**record)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as error:
            logger.warning("ignoring state record %s, which cannot be read (%s); the item is run again", path, error)
            return None

    def write_state(self, state: JobState) -> Path:
        """Write the state record atomically: to ``NAME.json.partial``, then renamed over ``NAME.json``.

        Callers hold the item's lock, so no two processes write the same partial file, and a partial
        file left by a killed process is overwritten by the next write of that item.
        """
        path = self.state_path(state.name)
        partial = path.with_name(path.name + ".partial")
        text = json.dumps(asdict(state), indent=2, sort_keys=True, default=str)
        with partial.open("w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
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
    run in that many worker processes (``task`` must then be a picklable module-level function).
    A task's :class:`UniteError` is recorded with its reason (``SlideError.reason``, else its
    ``code``, for instance ``invalid_config``), any other exception as ``internal_error`` with its
    traceback logged, and the other jobs go on. Raises :class:`ConfigError` before any work for
    invalid options, duplicate names, or done jobs whose recorded options differ.
    """
    if workers <= 0:
        raise ConfigError(f"workers={workers} must be a positive number of worker processes (--workers).", value=workers)
    _check_unique_names(jobs)
    folder = JobFolder(out_dir)
    folder.create()
    _check_done_jobs_match(folder, jobs, noun)

    run_id = uuid.uuid4().hex
    summary = JobSummary()
    logger.info("starting a run over %d %s(s) in %s with %d worker(s)", len(jobs), noun, folder.root, workers)
    with tqdm(total=len(jobs), desc=f"{noun}s", unit=noun, file=sys.stderr, disable=not progress) as bar:
        if workers == 1:
            # Log lines of the jobs run here go through tqdm, so they do not break the progress bar.
            with logging_redirect_tqdm():
                for job in jobs:
                    _count(summary, bar, _run_one(job, task, folder.root, run_id, retry_failed))
        else:
            for outcome in _run_in_pool(jobs, task, folder, run_id, retry_failed, workers):
                _count(summary, bar, outcome)
    logger.info("finished the run: %s", summary.format(noun).splitlines()[0])
    return summary


def _count(summary: JobSummary, bar: tqdm, outcome: JobOutcome) -> None:
    summary.add(outcome)
    bar.set_postfix(done=len(summary.done), failed=len(summary.failed), refresh=False)
    bar.update(1)


def _run_one(job: Job, task: Task, root: Path, run_id: str, retry_failed: bool) -> JobOutcome:
    """Lock the job, decide again under the lock whether it must run, run it and record the result."""
    folder = JobFolder(root)
    lock = folder.try_lock(job.name)
    if lock is None:
        logger.info("%s is locked by another process, so this run leaves it", job.name)
        return JobOutcome(job.name, "locked")

    with lock:
        previous = folder.read_state(job.name)
        skip = _outcome_without_running(folder, job, previous, retry_failed)
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
        folder.write_state(state)
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
        folder.write_state(state)
    return JobOutcome(job.name, state.status, state.reason, state.message)


def _outcome_without_running(folder: JobFolder, job: Job, state: JobState | None, retry_failed: bool) -> JobOutcome | None:
    """Return the outcome of a job that must not run (done earlier, or failed with the same options), else None."""
    if state is None:
        return None
    same_config = state.config == _json_round_trip(job.config)
    if state.status == "done" and same_config:
        if folder.outputs_present(state):
            return JobOutcome(job.name, "skipped")
        logger.warning("%s is recorded as done but some of its outputs are missing, so it is run again", job.name)
    if state.status == "failed" and same_config and not retry_failed:
        return JobOutcome(job.name, "failed", state.reason, state.message, earlier=True)
    return None


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
        with _new_pool(min(workers, len(queue))) as pool:
            futures = {pool.submit(_run_one, job, task, folder.root, run_id, retry_failed): job for job in queue}
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
    with _new_pool(1) as pool:
        try:
            return pool.submit(_run_one, job, task, folder.root, run_id, retry_failed).result()
        except BrokenProcessPool:
            pass

    lock = folder.try_lock(job.name)
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
        folder.write_state(state)
    logger.error("%s failed (%s): %s", job.name, INTERNAL_ERROR, message)
    return JobOutcome(job.name, "failed", INTERNAL_ERROR, message)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: a forked child would inherit the parent's threads (tqdm's monitor) and library state.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_configure_worker_logging,
        initargs=(logging.getLogger().getEffectiveLevel(),),
    )


def _configure_worker_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s", datefmt="%H:%M:%S")


def _check_unique_names(jobs: Sequence[Job]) -> None:
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


def _check_done_jobs_match(folder: JobFolder, jobs: Sequence[Job], noun: str) -> None:
    """Raise :class:`ConfigError` when a done job was made with other options than this run's."""
    conflicts = []
    for job in jobs:
        state = folder.read_state(job.name)
        if state is None or state.status != "done":
            continue
        expected = _json_round_trip(job.config)
        differences = sorted(key for key in expected.keys() | state.config.keys() if expected.get(key) != state.config.get(key))
        if differences:
            changes = ", ".join(f"{key} {state.config.get(key)!r} -> {expected.get(key)!r}" for key in differences)
            conflicts.append(f"{job.name} ({changes})")
    if conflicts:
        listed = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise ConfigError(
            f"{folder.root} contains {len(conflicts)} {noun}(s) done with other options than this run's: {listed}. "
            f"Pass another output folder (--out), run only the {noun}s that need the new options, or delete the "
            f"state records of those to redo in {folder.state_dir}.",
            value=len(conflicts),
        )


def _json_round_trip(config: dict[str, Any]) -> dict[str, Any]:
    """Return ``config`` as it reads back from a state record (tuples become lists, paths strings)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _relative(path: Path | str, root: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
