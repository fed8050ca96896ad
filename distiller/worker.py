"""The distiller's worker mode: train a new student whenever enough new tiles arrived, then publish it.

:class:`DistillWorker` watches a shards folder. At each check it counts the tiles of the complete shards
(:func:`shared.shards.list_shards`) and, when at least ``min_new_tiles`` arrived since the last training,
runs :func:`distiller.train.distill` into a run folder and publishes the export with
:func:`shared.publish.publish_student`, where a student server whose checkpoint folder is the publish
root picks it up. With ``WorkerOptions.onnx`` the export also gets a ``model.onnx``
(:func:`distiller.onnx_export.export_onnx`) before it is published, for the student server's onnx
runtime. A failed ONNX export is logged, and the student is published without the file. Output folder
layout::

    out_dir/
        worker-state.json       tiles trained on, trainings, published version, the run in progress (atomic)
        runs/RUN/               one `unite distill` output folder per training (lightning/, logs/, student/,
                                and student/model.onnx with the onnx option)

Resume: the state file names the run in progress before it trains. A worker that starts and finds one
resumes it from ``runs/RUN/lightning/last.ckpt`` when the shards have the names and lengths that run started
with, because then the split and the data order are the same. Otherwise it starts a new run.

Stopping: :meth:`DistillWorker.request_stop` (the command calls it on SIGTERM) ends the polling wait at
once. During a training, Lightning's own SIGTERM handler is replaced for the fit, and the training stops
after the current optimiser step with ``last.ckpt`` saved, so the next start continues from there; a
stop request during the last step lets the run finish and publish.

Distributed training: with a DDP strategy on one machine, Lightning's launcher starts the other processes of
each training by running the worker's command again with ``LOCAL_RANK`` set (:func:`training_rank`). Such
a process calls :meth:`DistillWorker.join_training`: it trains the run that the state file names and exits,
while the worker (rank 0) alone counts tiles, writes the state, publishes and prunes. A stop requested in any
process stops all of them after the same optimiser step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch.distributed
from lightning.pytorch.callbacks import Callback

from distiller.callbacks import LAST_CHECKPOINT, LastCheckpoint
from distiller.config import LOGS_SUBDIR, DistillConfig
from distiller.onnx_export import export_onnx
from distiller.train import LIGHTNING_SUBDIR, distill
from shared.checkpoint import CHECKPOINT_WEIGHTS
from shared.checkpoint_format import ONNX_WEIGHTS
from shared.errors import ConfigError, ModelError
from shared.publish import DEFAULT_KEEP, current_version, publish_student
from shared.shards import SHARD_GLOB, ShardInfo, list_shards

logger = logging.getLogger(__name__)

STATE_FILE = "worker-state.json"
RUNS_SUBDIR = "runs"
STATE_FORMAT_VERSION = 1
# One full shard of `unite teach`'s default shard size: fewer new tiles barely change a student.
DEFAULT_MIN_NEW_TILES = 2048
DEFAULT_POLL_S = 60.0
# The file that the student server's onnx runtime loads.
ONNX_FILE = ONNX_WEIGHTS
# The variables that Lightning 2.6's DDP launcher (_SubprocessScriptLauncher) sets in the process that starts
# the other processes of a training.
_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class WorkerOptions:
    """Settings of the worker loop; the training settings are a :class:`DistillConfig`.

    ``publish_root`` is the folder the student server reads (its ``UNITE_STUDENT_CHECKPOINT_DIR``).
    A training starts when at least ``min_new_tiles`` tiles arrived since the last one. The shards are
    checked every ``poll_s`` seconds, and ``once`` makes :meth:`DistillWorker.run` return after one check.
    ``keep`` published versions and as many run folders stay on disk. ``warm_start`` initialises each
    new training from the student currently published (its backbone; the mimic projector starts anew).
    ``onnx`` writes ``model.onnx`` into each export before it is published. When that export fails, the
    student is published without the file.
    """

    publish_root: Path
    min_new_tiles: int = DEFAULT_MIN_NEW_TILES
    poll_s: float = DEFAULT_POLL_S
    keep: int = DEFAULT_KEEP
    warm_start: bool = False
    once: bool = False
    onnx: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "publish_root", Path(self.publish_root))
        for name, value, minimum in (("min_new_tiles", self.min_new_tiles, 1), ("keep", self.keep, 1)):
            if value < minimum:
                raise ConfigError(f"distill-worker: {name} is {value}, expected an integer >= {minimum}.", value=value, limit=minimum)
        if not self.poll_s > 0:
            raise ConfigError(f"distill-worker: poll_s is {self.poll_s}, expected a positive number of seconds.", value=self.poll_s, limit=0)


@dataclass
class WorkerState:
    """Contents of ``worker-state.json``, kept between checks and across restarts.

    ``trained_tiles`` is the number of tiles the last finished training read. ``running`` describes the
    training in progress (``run``: its folder name under runs/, ``shards``: the [name, length] pairs it
    started with), or is None between trainings.
    """

    trained_tiles: int = 0
    trainings: int = 0
    published: str | None = None
    running: dict[str, Any] | None = None
    format_version: int = STATE_FORMAT_VERSION


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``trained`` is True when a student was trained and published."""

    trained: bool
    total_tiles: int
    new_tiles: int
    published: Path | None = None
    resumed: bool = False


class WorkerStopped(Exception):
    """Raised when a stop request ended a training after a step, with last.ckpt saved for the next start."""

    def __init__(self, run_dir: Path, step: int) -> None:
        self.run_dir = run_dir
        self.step = step
        super().__init__(f"training in {run_dir} stopped at global step {step} on request; last.ckpt is saved and the next start resumes it")


def read_state(path: Path) -> WorkerState:
    """Read ``worker-state.json``, or return a fresh state when the file does not exist."""
    if not path.is_file():
        return WorkerState()
    try:
        values = json.loads(path.read_text())
        state = WorkerState(**values)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"distill-worker: state file {path} cannot be read ({error}). Move it aside to start counting tiles from zero.",
            value=str(path),
        ) from error
    if state.format_version != STATE_FORMAT_VERSION:
        raise ConfigError(
            f"distill-worker: state file {path} has format_version {state.format_version}, expected {STATE_FORMAT_VERSION}. "
            "Move it aside to start counting tiles from zero.",
            value=state.format_version,
            limit=STATE_FORMAT_VERSION,
        )
    return state


def training_rank() -> int:
    """Return this process's rank in a distributed training: 0 for the worker, above 0 for a process Lightning started.

    Lightning's DDP launcher starts the other processes of a training by running the same command again with
    ``LOCAL_RANK`` set to their rank. The worker trains on one machine, so that is also their global rank.
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_not_launched() -> None:
    """Raise :class:`ConfigError` when an outside launcher (torchrun, srun) started this worker as one of several processes.

    The worker starts the processes of each training itself, through Lightning's DDP launcher, and only for
    the length of that training. Processes started by torchrun or srun would follow its first training and
    exit, so its next training would wait for them forever.
    """
    launched_by = [name for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE") if name in os.environ]
    if int(os.environ.get("SLURM_NTASKS", "1") or "1") > 1:
        launched_by.append("SLURM_NTASKS")
    if launched_by:
        raise ConfigError(
            f"distill-worker: started with {', '.join(launched_by)} set, as torchrun or srun start each of several processes. "
            "The worker starts the processes of each training itself: start it once, as one process, with --strategy ddp "
            "--devices N. To train across machines, run `unite distill` under your launcher and publish with `unite publish add`.",
            value=launched_by,
        )


def write_state(path: Path, state: WorkerState) -> None:
    """Write ``state`` to ``path`` through a temporary file and ``os.replace``, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    with open(partial, "w") as file:
        json.dump(dataclasses.asdict(state), file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


class DistillWorker:
    """Trains and publishes a student each time enough new tiles arrive in ``config.shard_dir``.

    ``config`` contains the training settings, and its ``out_dir`` is the worker's folder, and each training
    runs in ``out_dir/runs/RUN``. ``command`` is recorded in each model card, ``progress`` shows
    Lightning's progress bar, and ``callbacks`` are added to each training's Trainer.
    """

    def __init__(
        self,
        config: DistillConfig,
        options: WorkerOptions,
        *,
        command: str | None = None,
        progress: bool = False,
        callbacks: list[Callback] | None = None,
    ) -> None:
        if config.resume_from is not None:
            raise ConfigError(
                f"distill-worker: resume_from is {config.resume_from!r}, but the worker resumes its own runs from "
                f"{config.out_dir / RUNS_SUBDIR}/RUN/{LIGHTNING_SUBDIR}/{LAST_CHECKPOINT}. Leave it unset.",
                value=str(config.resume_from),
            )
        if config.num_nodes != 1:
            raise ConfigError(
                f"distill-worker: num_nodes is {config.num_nodes}, expected 1, because the worker starts the processes of each "
                f"training on its own machine. To train on several machines, run `unite distill --num-nodes {config.num_nodes}` "
                "on each and publish its student with `unite publish add`.",
                value=config.num_nodes,
                limit=1,
            )
        self.config = config
        self.options = options
        self.command = command
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self.state_path = config.out_dir / STATE_FILE
        self.runs_dir = config.out_dir / RUNS_SUBDIR
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Ask the worker to stop: at once when it waits, after the current optimiser step when it trains."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Check the shards every ``poll_s`` seconds until a stop request (or once); return the trainings run."""
        logger.info(
            "distill worker watching %s: training when %d new tiles arrived, publishing to %s, checking every %.0f s",
            self.config.shard_dir,
            self.options.min_new_tiles,
            self.options.publish_root,
            self.options.poll_s,
        )
        trainings = 0
        while not self.stop_requested:
            result = self.check()
            trainings += int(result.trained)
            if self.options.once:
                break
            self._stop.wait(self.options.poll_s)
        logger.info("distill worker stopped after %d trainings", trainings)
        return trainings

    def check(self) -> CheckResult:
        """Resume a run left unfinished, or train when enough new tiles arrived; publish what was trained."""
        state = read_state(self.state_path)
        shards = self._list_shards()
        total = sum(info.length for info in shards)

        if state.running is not None:
            run_dir = self.runs_dir / state.running["run"]
            if self._can_resume(state.running, shards, run_dir):
                logger.info("resuming the unfinished training in %s from its %s", run_dir, LAST_CHECKPOINT)
                try:
                    return self._train(state, shards, run_dir, resume=True)
                except ConfigError as error:
                    # Such as a checkpoint saved after the last step but before the export: nothing is left to
                    # train. An error that is not about the resume comes back from the new run below.
                    logger.warning("cannot resume the training in %s (%s), so a new training starts", run_dir, error.message)
            shutil.rmtree(run_dir, ignore_errors=True)
            state.running = None
            write_state(self.state_path, state)

        if total < state.trained_tiles:
            logger.warning(
                "the shards in %s contain %d tiles, fewer than the %d of the last training; counting new tiles from %d. "
                "Move %s aside to count all tiles as new.",
                self.config.shard_dir, total, state.trained_tiles, total, self.state_path,
            )
            state.trained_tiles = total
            write_state(self.state_path, state)
        new_tiles = total - state.trained_tiles
        if new_tiles < self.options.min_new_tiles:
            logger.info("%d new tiles in %s since the last training, waiting for %d", new_tiles, self.config.shard_dir, self.options.min_new_tiles)
            return CheckResult(trained=False, total_tiles=total, new_tiles=new_tiles)

        run_dir = self.runs_dir / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        logger.info("%d new tiles since the last training (%d in all): training in %s", new_tiles, total, run_dir)
        return self._train(state, shards, run_dir, resume=False, new_tiles=new_tiles)

    def _list_shards(self) -> list[ShardInfo]:
        folder = self.config.shard_dir
        # An empty or missing folder is the normal state before the first `unite teach`.
        if not folder.is_dir() or not any(folder.glob(SHARD_GLOB)):
            return []
        return list_shards(folder)

    def _can_resume(self, running: dict[str, Any], shards: list[ShardInfo], run_dir: Path) -> bool:
        checkpoint = run_dir / LIGHTNING_SUBDIR / LAST_CHECKPOINT
        if not checkpoint.is_file():
            logger.warning("the unfinished training in %s saved no %s, so a new training starts", run_dir, LAST_CHECKPOINT)
            return False
        if running["shards"] != _fingerprint(shards):
            logger.warning(
                "the shards changed since the unfinished training in %s started, so its split and data order cannot be "
                "reproduced and a new training starts",
                run_dir,
            )
            return False
        return True

    def _train(self, state: WorkerState, shards: list[ShardInfo], run_dir: Path, *, resume: bool, new_tiles: int = 0) -> CheckResult:
        config = self._run_config(run_dir, resume=resume)
        state.running = {"run": run_dir.name, "shards": _fingerprint(shards)}
        write_state(self.state_path, state)

        stop_callback = _StopAfterStep(run_dir / LIGHTNING_SUBDIR, self._stop)
        with _separate_launches():
            result = distill(config, progress=self.progress, command=self.command, callbacks=[*self.callbacks, stop_callback])
        if self.options.onnx:
            self._export_onnx(result.checkpoint_dir, run_dir)
        published = publish_student(result.checkpoint_dir, self.options.publish_root, keep=self.options.keep)

        state.trained_tiles = result.train_tiles + result.val_tiles
        state.trainings += 1
        state.published = published.name
        state.running = None
        write_state(self.state_path, state)
        self._prune_runs(keep=run_dir.name)
        logger.info(
            "trained on %d tiles in %d steps (last loss %.4f) and published %s",
            state.trained_tiles, result.steps, result.last_loss, published,
        )
        return CheckResult(trained=True, total_tiles=state.trained_tiles, new_tiles=new_tiles, published=published, resumed=resume)

    def join_training(self) -> None:
        """Train as one of the other processes of the distributed training that the worker (rank 0) runs now.

        The worker names the run in the state file before its training starts these processes, and it alone
        publishes. Returns when the training finished, stopped on request, or resumed a checkpoint with nothing
        left to train. The worker handles each of these cases itself, and an error exit here would make
        Lightning's launcher kill every process of the training.
        """
        state = read_state(self.state_path)
        if state.running is None:
            raise ConfigError(
                f"distill-worker: process of rank {training_rank()} found no run in progress in {self.state_path}, expected the "
                "one that the worker of rank 0 started. Do not set LOCAL_RANK when you start the worker.",
                value=str(self.state_path),
            )
        run_dir = self.runs_dir / state.running["run"]
        # The worker resumes a run only when it has last.ckpt. A new run cannot have one yet, because a save needs
        # every process of the training, this one included.
        resume = (run_dir / LIGHTNING_SUBDIR / LAST_CHECKPOINT).is_file()
        config = self._run_config(run_dir, resume=resume)
        stop_callback = _StopAfterStep(run_dir / LIGHTNING_SUBDIR, self._stop)
        logger.info("process of rank %d joins the training in %s", training_rank(), run_dir)
        try:
            distill(config, progress=False, command=self.command, callbacks=[*self.callbacks, stop_callback])
        except WorkerStopped as stopped:
            logger.info("process of rank %d: %s", training_rank(), stopped)
        except ConfigError as error:
            if not resume:
                raise
            logger.info("process of rank %d: the resumed training in %s has nothing left to train (%s)", training_rank(), run_dir, error.message)

    def _export_onnx(self, checkpoint_dir: Path, run_dir: Path) -> None:
        """Write ``checkpoint_dir/model.onnx``, or log why not: a failed ONNX export never stops the torch student's publishing."""
        started = time.monotonic()
        try:
            export = export_onnx(checkpoint_dir, checkpoint_dir / ONNX_FILE)
        except (ModelError, ConfigError) as error:
            # export_onnx replaces the target only after its check, so a failure leaves no model.onnx. Nor can one
            # remain from an earlier attempt, because save_student wrote checkpoint_dir anew.
            logger.warning(
                "ONNX export of the student trained in %s failed, so it is published without %s: a running student server "
                "with the onnx runtime keeps serving the previous version, and one started now is not ready. The error: %s",
                run_dir, ONNX_FILE, error.message,
            )
            return
        logger.info("ONNX export of the student trained in %s took %.1f s: %s", run_dir, time.monotonic() - started, export.summary())

    def _run_config(self, run_dir: Path, *, resume: bool) -> DistillConfig:
        config = self.config
        # A log folder left at its default follows the run; one given explicitly is shared by every run.
        log_dir = run_dir / LOGS_SUBDIR if config.log_dir == config.out_dir / LOGS_SUBDIR else config.log_dir
        overrides: dict[str, Any] = {"out_dir": run_dir, "log_dir": log_dir, "resume_from": "last" if resume else None}
        serving = current_version(self.options.publish_root)
        # A resumed run restores its student from last.ckpt, so only a new run is warm-started.
        if self.options.warm_start and not resume and serving is not None:
            overrides["student_weights"] = serving / CHECKPOINT_WEIGHTS
            logger.info("warm start: the new student starts from the published %s", serving)
        return dataclasses.replace(config, **overrides)

    def _prune_runs(self, *, keep: str) -> None:
        runs = sorted(path for path in self.runs_dir.iterdir() if path.is_dir())
        for path in runs[: -self.options.keep]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed the old run folder %s", path)


@contextlib.contextmanager
def _separate_launches():
    """Let the next distributed training start its own processes, as the first one did.

    After a fit, Lightning's DDP launcher leaves ``LOCAL_RANK`` and the rendezvous variables in the environment
    and the process group open. The next Trainer would then take the processes as started by a launcher such as
    torchrun and wait for ones that already exited. Without a distributed training this changes nothing.
    """
    saved = {name: os.environ.get(name) for name in _LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fingerprint(shards: list[ShardInfo]) -> list[list[Any]]:
    # Exports rewrite shards in cache order, so a shard with the same name and length contains the same rows.
    return [[info.path.name, info.length] for info in shards]


class _StopAfterStep(LastCheckpoint):
    """Stops a training after the optimiser step during which a stop was requested, with last.ckpt saved.

    Lightning 2.6's own SIGTERM handler would stop it too, but after the final epoch as well, which leaves
    a finished checkpoint and no export. So this callback puts back the handler that was in place before
    the fit (the worker's, which requests the stop), and decides itself where to stop.
    """

    def __init__(self, folder: Path, stop: threading.Event) -> None:
        super().__init__(folder)
        self.stop = stop
        self._handler_before_fit: Any = None

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        # Lightning 2.6 registers its SIGTERM handler after on_fit_start and before on_train_start, and puts
        # this one back when the fit ends.
        self._handler_before_fit = signal.getsignal(signal.SIGTERM)

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if callable(self._handler_before_fit) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler_before_fit)

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _is_final_step(trainer):
            return
        # A batch that only accumulates gradients cannot be saved without losing them.
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        # Every process of a distributed training stops after the same step, because a save waits for all of
        # them. So a stop requested in any process stops all. With one process the request is used as it is.
        if not trainer.strategy.reduce_boolean_decision(self.stop.is_set(), all=False):
            return
        self._save(trainer)
        raise WorkerStopped(self.path.parent.parent, int(trainer.global_step))

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        pass


def _is_final_step(trainer: lightning.Trainer) -> bool:
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


__all__ = [
    "CheckResult",
    "DEFAULT_MIN_NEW_TILES",
    "DEFAULT_POLL_S",
    "DistillWorker",
    "ONNX_FILE",
    "STATE_FILE",
    "RUNS_SUBDIR",
    "WorkerOptions",
    "WorkerState",
    "WorkerStopped",
    "check_not_launched",
    "read_state",
    "training_rank",
    "write_state",
]
