"""``unite embed --engine ray``: embed many slides on a Ray cluster, with the outputs and state records of ``unite embed``.

The run is a Ray Data pipeline of three stages:

1. Decoding, in a pool of CPU actors (:class:`SlideDecoder`), one slide at a time. Each actor tiles the
   slide and writes the tiled slide (slide metadata, tissue mask and patch grid) to
   ``OUT/.work/NAME/tiled.pickle``. It then yields the tiles in batches of ``batch_size``, with the
   slide name, the row of each patch in the grid and its level-0 corner.
2. Embedding, a pool of ``workers`` actors (:class:`StudentEmbedder`), each holding the student on its
   device, that replace the tiles by their embeddings.
3. Writing, in the driver: rows are grouped by slide as they stream in, and once every patch of a slide
   has arrived its outputs are written with the same code as ``unite embed``
   (:func:`student_server.slide_pipeline.write_outputs`) and renamed into place, and its state record
   is written by the job runner of :mod:`shared.jobs`.

Because the state records and the outputs are the same, a Ray run and a single-process run skip each
other's done slides, and either resumes the other. Every process reads the slides and the checkpoint and
writes ``OUT`` by path, so on a cluster those paths must be on storage that every node mounts at the
same place. Ray is an optional dependency (the ``distributed`` extra) imported only when a run starts.

This module sits beside :mod:`unite_cli.embed` because it writes the output layout that module defines
(:func:`unite_cli.embed.output_paths`), so ``student_server`` need not import the command line.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import pickle
import shutil
import signal
import socket
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import CacheError, ConfigError, ModelError, UniteError

# The job steps of shared.jobs (check_*, outcome_without_running, run_one, sigterm_raises) make a Ray run decide
# what to skip, lock slides and record their state exactly as run_jobs does.
from shared.jobs import (
    INTERNAL_ERROR,
    Job,
    JobFolder,
    JobResult,
    JobSummary,
    RunInterrupted,
    Terminated,
    WriteError,
    check_done_jobs_match,
    check_unique_names,
    format_count,
    outcome_without_running,
    run_one,
    sigterm_raises,
)
from shared.slides.resolution import MppTable
from shared.slides.sources import SlideSource
from unite_cli.embed import WORK_FOLDER, output_paths

logger = logging.getLogger(__name__)

RAY_EXTRA = "distributed"
RAY_REQUIREMENT = "ray[data]>=2.9"
# Files that the decoding stage writes into OUT/.work/NAME/ for the writing stage.
TILED_FILE = "tiled.pickle"
FAILURE_FILE = "failure.json"
# The maximum number of student actors. It is far above the GPUs of one cluster and stops a typo.
MAX_WORKERS = 1024


class DistributedRunError(UniteError):
    """The Ray pipeline failed as a whole (a lost node, an actor that cannot load the student), not one slide.

    The slides written before the failure keep their records, and the others have none, so the next run
    embeds them.
    """

    code = "distributed_run_failed"
    status_code = 500


class RecordedSlideFailure(UniteError):
    """A slide's failure in the decoding stage, raised again in the driver so that the job runner records it.

    It carries the ``code`` and ``reason`` of the original error, which ran in another process.
    """

    def __init__(self, message: str, *, code: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RayResources:
    """Ray resources of the two stages: CPUs per decoding actor, and CPUs and GPUs per student actor.

    None for a CPU count means 1 CPU, or, where the cluster has fewer than ``workers + 1`` CPUs, an
    equal share of them among the student actors and one decoding actor.
    """

    decode_cpus: float | None = None
    embed_cpus: float | None = None
    embed_gpus: float = 0.0


@dataclass
class _EmbeddedSlide:
    """The rows of one slide that have reached the driver so far."""

    patches: int
    rows: list[np.ndarray] = field(default_factory=list)
    coords: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    received: int = 0


def import_ray() -> Any:
    """Import and return the ``ray`` module with Ray Data, or raise :class:`ConfigError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate extra of ray
    except ImportError as error:
        raise ConfigError(
            f"the Ray engine needs Ray Data, which is not installed here ({error}). Install the project's "
            f"'{RAY_EXTRA}' extra (pip install 'unite-distill[{RAY_EXTRA}]', or pip install '{RAY_REQUIREMENT}'), "
            "or run without --engine ray.",
            value=RAY_EXTRA,
        ) from error
    return ray


def run_distributed_embed(
    slides: Sequence[SlideSource],
    checkpoint: Path,
    out: Path,
    *,
    workers: int = 1,
    batch_size: int = 32,
    mpp_overrides: float | MppTable | None = None,
    pooling: str = "mean",
    read_workers: int = 2,
    max_patches: int = 100_000,
    device: str = "cpu",
    retry_failed: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    resources: RayResources | None = None,
    progress: bool = False,
) -> JobSummary:
    """Embed ``slides`` with the student in ``checkpoint`` on Ray and write the outputs of ``unite embed`` under ``out``.

    ``mpp_overrides`` is the resolution in µm/px of every slide (as ``--mpp``) or a per-slide table (as
    ``--mpp-csv``). A slide's own ``mpp`` from a CSV slide list comes first. ``workers`` is the number
    of student actors, ``batch_size`` the tiles per batch of both stages, and ``read_workers`` the tile
    reading threads of each decoding actor. ``device`` is the student's torch device in each actor. With
    "cuda" each actor takes one GPU unless ``resources`` sets another amount.

    ``address`` is the Ray cluster to join. None means the ``RAY_ADDRESS`` environment variable, else a
    new local cluster of ``num_cpus`` CPUs (default: all of this machine's) that stops when the run ends.
    When Ray is already initialised in this process, the run uses that cluster and leaves it running.

    Returns the run's summary, as :func:`shared.jobs.run_jobs` does. Raises :class:`ConfigError` for
    invalid options, a missing Ray, or done slides with other options. Raises :class:`ModelError` for a
    checkpoint that cannot be loaded, :class:`DistributedRunError` when the pipeline fails as a whole,
    and :class:`RunInterrupted` on SIGINT or SIGTERM.
    """
    from shared.checkpoint import load_student
    from shared.slides.tile_job import TileOptions, slide_jobs
    from student_server.slide_pipeline import SlidePipelineOptions

    options = SlidePipelineOptions(pooling=pooling, batch_size=batch_size, read_workers=read_workers, max_patches=max_patches)
    options.validate()
    _validate_workers(workers)
    resources = resources or RayResources(embed_gpus=1.0 if str(device).startswith("cuda") else 0.0)
    ray = import_ray()

    # The driver loads the student once to fail early on a bad checkpoint and to learn its sha256, which
    # each actor checks again, so that a checkpoint replaced during the run cannot mix two students.
    student = load_student(Path(checkpoint), device="cpu")
    sha256, model_name = student.sha256, student.name
    del student

    mpp, mpp_table = _split_overrides(mpp_overrides)
    shaping = {"pooling": options.pooling, "checkpoint_sha256": sha256}
    jobs = [replace(job, config={**job.config, **shaping}) for job in slide_jobs(list(slides), TileOptions(), mpp=mpp, mpp_table=mpp_table)]

    check_unique_names(jobs)
    folder = JobFolder(out)
    folder.prepare()
    check_done_jobs_match(folder, jobs, "slide")

    summary = JobSummary()
    pending = []
    for job in jobs:
        outcome = outcome_without_running(folder, job, folder.read_state(job.name), retry_failed)
        if outcome is None:
            pending.append(job)
        else:
            summary.add(outcome)
    logger.info(
        "starting a Ray run over %s in %s: %d to embed with %s",
        format_count(len(jobs), "slide"), folder.root, len(pending), format_count(workers, "student actor"),
    )
    if not pending:
        return summary

    started_ray = _start_ray(ray, address, num_cpus)
    try:
        with sigterm_raises():
            _run_pipeline(ray, pending, folder, summary, checkpoint=Path(checkpoint), sha256=sha256, model_name=model_name,
                          options=options, workers=workers, device=device, resources=resources, retry_failed=retry_failed,
                          progress=progress)
    except (KeyboardInterrupt, Terminated) as interruption:
        signal_number = signal.SIGTERM if isinstance(interruption, Terminated) else signal.SIGINT
        summary.unfinished = len(jobs) - summary.total
        raise RunInterrupted(signal_number, summary) from None
    finally:
        if started_ray:
            ray.shutdown()
    logger.info("finished the Ray run: %s", summary.format("slide").splitlines()[0])
    return summary


def _validate_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(
            f"workers={workers!r} must be a whole number of student actors from 1 to {MAX_WORKERS} (--workers).",
            value=repr(workers),
            limit=[1, MAX_WORKERS],
        )


def _split_overrides(mpp_overrides: float | MppTable | None) -> tuple[float | None, MppTable | None]:
    if mpp_overrides is None or isinstance(mpp_overrides, MppTable):
        return None, mpp_overrides
    if isinstance(mpp_overrides, numbers.Real) and not isinstance(mpp_overrides, bool) and math.isfinite(mpp_overrides) and mpp_overrides > 0:
        return float(mpp_overrides), None
    raise ConfigError(
        f"mpp_overrides={mpp_overrides!r} must be a resolution in µm/px (such as 0.25), an MppTable read from a CSV, or None.",
        value=repr(mpp_overrides),
    )


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to or start a Ray cluster and return whether this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    # No usage statistics are sent from runs of this command unless the user asks for them.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        # "local" starts a new single-machine cluster even when another one runs here. The dashboard is
        # not started, so no web server listens.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info("started a local Ray cluster with %s CPUs", ray.cluster_resources().get("CPU"))
    else:
        ray.init(address=address, log_to_driver=True)
        logger.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
    return True


def _stage_resources(ray: Any, workers: int, resources: RayResources) -> tuple[float, float, int]:
    """Return the CPUs per decoding actor and per student actor, and the maximum number of decoding actors.

    The decoding actors get the CPUs that the student actors leave. Raises :class:`ConfigError` when the
    cluster cannot hold the student actors and one decoding actor.
    """
    cluster = ray.cluster_resources()
    cpus = float(cluster.get("CPU", 0.0))
    share = min(1.0, cpus / (workers + 1)) if cpus > 0 else 1.0
    decode_cpus = share if resources.decode_cpus is None else resources.decode_cpus
    embed_cpus = share if resources.embed_cpus is None else resources.embed_cpus
    needed_cpus = workers * embed_cpus + decode_cpus
    if needed_cpus > cpus + 1e-9:
        raise ConfigError(
            f"{format_count(workers, 'student actor')} of {embed_cpus:g} CPUs and one decoding actor of {decode_cpus:g} "
            f"CPUs need {needed_cpus:g} CPUs, but the Ray cluster has {cpus:g}. Pass fewer --workers or add nodes.",
            value=needed_cpus,
            limit=cpus,
        )
    gpus = float(cluster.get("GPU", 0.0))
    if resources.embed_gpus > 0 and workers * resources.embed_gpus > gpus + 1e-9:
        raise ConfigError(
            f"{format_count(workers, 'student actor')} of {resources.embed_gpus:g} GPUs need {workers * resources.embed_gpus:g} "
            f"GPUs, but the Ray cluster has {gpus:g}. Pass fewer --workers, add GPU nodes, or pass --device cpu.",
            value=workers * resources.embed_gpus,
            limit=gpus,
        )
    # The small margin keeps a rounding error, as in 2 - 2 * (2/3) = 0.666..5, from dropping a decoder.
    decoders = max(1, int((cpus - workers * embed_cpus) / decode_cpus + 1e-6)) if decode_cpus > 0 else 1
    return decode_cpus, embed_cpus, decoders


def _run_pipeline(
    ray: Any,
    jobs: list[Job],
    folder: JobFolder,
    summary: JobSummary,
    *,
    checkpoint: Path,
    sha256: str,
    model_name: str,
    options: Any,
    workers: int,
    device: str,
    resources: RayResources,
    retry_failed: bool,
    progress: bool,
) -> None:
    """Build and run the three stages, recording each slide in ``summary`` as soon as it is written or has failed."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    decode_cpus, embed_cpus, decoders = _stage_resources(ray, workers, resources)
    work_root = folder.root / WORK_FOLDER
    jobs_by_name = {job.name: job for job in jobs}
    run_id = uuid.uuid4().hex

    items = [
        {"name": job.name, "path": str(job.payload.path), "mpp": math.nan if job.payload.mpp is None else float(job.payload.mpp)}
        for job in jobs
    ]
    # One block per slide, so that every slide is its own decoding task.
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # The decoding runs in a pool of actors too, because Ray Data (2.60) fuses a task stage into the actor
    # stage after it, which would put decoding and embedding in one process. Actor stages are never fused.
    dataset = dataset.map_batches(
        SlideDecoder,
        batch_size=1,
        batch_format="numpy",
        num_cpus=decode_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders),
        fn_constructor_kwargs={"work_root": str(work_root), "batch_size": options.batch_size, "read_workers": options.read_workers,
                               "max_patches": options.max_patches},
    )
    dataset = dataset.map_batches(
        StudentEmbedder,
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=embed_cpus,
        num_gpus=resources.embed_gpus or None,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "device": device, "batch_size": options.batch_size, "sha256": sha256},
    )

    arriving: dict[str, _EmbeddedSlide] = {}
    finished: set[str] = set()

    def finish(name: str, task: Any) -> None:
        outcome = run_one(jobs_by_name[name], task, folder.root, run_id, retry_failed)
        summary.add(outcome)
        finished.add(name)

    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for name in _add_rows(arriving, batch):
                embedded = arriving.pop(name)
                finish(name, _SlideWriter(embedded, model_name=model_name, sha256=sha256, pooling=options.pooling))
    except Exception as error:  # noqa: BLE001 - Ray wraps the cause in its own exception types
        raise DistributedRunError(
            f"the Ray pipeline failed after {format_count(len(finished), 'slide')} of {len(jobs)} were recorded: "
            f"{type(error).__name__}: {error}. The recorded slides are kept, so run the same command again to embed the others.",
            value=len(finished),
            limit=len(jobs),
        ) from error

    for job in jobs:
        if job.name not in finished:
            finish(job.name, _FailureRecorder(arriving.get(job.name)))


def _add_rows(arriving: dict[str, _EmbeddedSlide], batch: dict[str, np.ndarray]) -> list[str]:
    """Add a batch of embedded rows to their slides and return the names of the slides now complete."""
    complete = []
    names = batch["slide"]
    for name in dict.fromkeys(names.tolist()):
        mask = names == name
        patches = int(batch["patches"][mask][0])
        slide = arriving.setdefault(name, _EmbeddedSlide(patches=patches))
        slide.rows.append(batch["row"][mask])
        slide.coords.append(batch["coords"][mask])
        slide.features.append(batch["features"][mask])
        slide.received += int(mask.sum())
        if slide.received == slide.patches:
            complete.append(name)
    return complete


# Stage 1: decoding, in Ray actors.


class SlideDecoder:
    """The actor of the decoding stage: it tiles each slide it is given and yields the slide's tiles in batches."""

    def __init__(self, *, work_root: str, batch_size: int, read_workers: int, max_patches: int) -> None:
        self.work_root = work_root
        self.batch_size = batch_size
        self.read_workers = read_workers
        self.max_patches = max_patches

    def __call__(self, slides: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Yield the tile batches of a batch of slide rows, as :func:`decode_slides` describes."""
        yield from decode_slides(
            slides, work_root=self.work_root, batch_size=self.batch_size, read_workers=self.read_workers, max_patches=self.max_patches
        )


def decode_slides(
    slides: dict[str, np.ndarray], *, work_root: str, batch_size: int, read_workers: int, max_patches: int
) -> Iterator[dict[str, np.ndarray]]:
    """Tile each slide of a batch of slide rows (``name``, ``path``, ``mpp`` or NaN) and yield its tiles in batches.

    Yields ``slide`` (name), ``row`` (the patch's row in the grid), ``patches`` (the slide's patch count),
    ``coords`` (level-0 corner, int64) and ``tile`` (uint8 RGB). A slide that fails writes its error to
    ``work_root/NAME/failure.json`` for the driver to record, and the other slides go on.
    """
    from shared.slides.reader import open_slide
    from shared.slides.tiling import iter_tiles, tile_slide
    from student_server.slide_pipeline import check_patch_count

    for name, path, mpp in zip(slides["name"].tolist(), slides["path"].tolist(), slides["mpp"].tolist(), strict=True):
        mpp = None if math.isnan(mpp) else mpp
        work_dir = Path(work_root) / name
        # Files left here by a killed run are incomplete, so the slide starts from an empty folder.
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            started = time.perf_counter()
            tiled = tile_slide(path, mpp=mpp)
            check_patch_count(tiled, max_patches)
            _write_pickle(work_dir / TILED_FILE, {"tiled": tiled, "tiling_s": time.perf_counter() - started})
            total = len(tiled.grid)
            start = 0
            with open_slide(path, mpp=mpp) as slide:
                for coords, tiles in iter_tiles(slide, tiled.grid, batch_size=batch_size, workers=read_workers):
                    count = len(coords)
                    yield {
                        "slide": np.full(count, name),
                        "row": np.arange(start, start + count, dtype=np.int64),
                        "patches": np.full(count, total, dtype=np.int64),
                        "coords": np.asarray(coords, dtype=np.int64),
                        "tile": tiles,
                    }
                    start += count
        except UniteError as error:
            logger.error("%s failed in the decoding stage (%s): %s", name, getattr(error, "reason", error.code), error.message)
            _write_failure(work_dir, code=error.code, reason=getattr(error, "reason", error.code), message=error.message)
        except Exception as error:  # noqa: BLE001 - one slide's fault must not stop the other slides
            message = f"{type(error).__name__}: {error}"
            logger.error("%s failed in the decoding stage with an internal error: %s\n%s", name, message, traceback.format_exc())
            _write_failure(work_dir, code=INTERNAL_ERROR, reason=INTERNAL_ERROR, message=message)


def _write_pickle(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, path)


def _write_failure(work_dir: Path, *, code: str, reason: str, message: str) -> None:
    partial = work_dir / (FAILURE_FILE + ".partial")
    partial.write_text(json.dumps({"code": code, "reason": reason, "message": message, "worker": f"{socket.gethostname()}:{os.getpid()}"}))
    os.replace(partial, work_dir / FAILURE_FILE)


# Stage 2: embedding, in Ray actors.


class StudentEmbedder:
    """The actor of the embedding stage: it loads the student onto its device and replaces tiles by embeddings."""

    def __init__(self, *, checkpoint: str, device: str, batch_size: int, sha256: str) -> None:
        from shared.checkpoint import load_student

        # Ray makes an actor's GPUs visible as cuda:0 onwards, so an index given for the driver's machine does not apply.
        self.device = "cuda" if device.startswith("cuda") else device
        self.student = load_student(Path(checkpoint), device=self.device)
        self.batch_size = batch_size
        if self.student.sha256 != sha256:
            raise ModelError(
                f"student checkpoint {checkpoint} has sha256 {self.student.sha256} on {socket.gethostname()}, but the run "
                f"started with {sha256}. The checkpoint changed during the run or differs between nodes; put one "
                "checkpoint on storage that every node mounts, and run again.",
                value=self.student.sha256,
                limit=sha256,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from shared.models.inference import embed_tiles

        features = embed_tiles(self.student.model, batch["tile"], batch_size=self.batch_size, device=self.device)
        return {key: batch[key] for key in ("slide", "row", "patches", "coords")} | {"features": features}


# Stage 3: writing, in the driver through shared.jobs.run_one.


class _SlideWriter:
    """The job task that writes one fully embedded slide's outputs, as :func:`unite_cli.embed.embed_slide_job` does."""

    def __init__(self, embedded: _EmbeddedSlide, *, model_name: str, sha256: str, pooling: str) -> None:
        self.embedded = embedded
        self.model_name = model_name
        self.sha256 = sha256
        self.pooling = pooling

    def __call__(self, job: Job, out_dir: Path) -> JobResult:
        from student_server.slide_pipeline import OUTPUT_FILES, pool_features, slide_metadata, write_outputs

        started = time.perf_counter()
        work_dir = Path(out_dir) / WORK_FOLDER / job.name
        paths = output_paths(out_dir, job.name)
        with (work_dir / TILED_FILE).open("rb") as file:
            tiled_record = pickle.load(file)
        tiled = tiled_record["tiled"]
        coords, features = self._ordered_rows(job.name, tiled.grid.coords)

        encoder = f"{self.model_name} sha256:{self.sha256}"
        pooled = pool_features(features, self.pooling)
        metadata = slide_metadata(tiled, self.pooling, pooled.shape[1])
        timings = {"tiling_s": tiled_record["tiling_s"]}
        try:
            write_outputs(work_dir, tiled, features, pooled, encoder=encoder, model=self.model_name, sha256=self.sha256,
                           metadata=metadata, timings=timings)
            for kind, path in paths.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(work_dir / OUTPUT_FILES[kind], path)
            shutil.rmtree(work_dir)
        except OSError as error:
            raise WriteError.from_os_error(error.filename or work_dir, error, subject=f"slide {job.name}") from error
        except CacheError as error:
            # The feature file writer reports a failed write as a CacheError chained to the OSError.
            if isinstance(error.__cause__, OSError):
                raise WriteError.from_os_error(error.value or work_dir, error.__cause__, subject=f"slide {job.name}") from error
            raise
        timings["writing_s"] = time.perf_counter() - started

        logger.info("embedded slide %s: %s, encoder %s", tiled.info.slide_id, format_count(len(features), "patch", "patches"), encoder)
        details = {
            "slide_id": tiled.info.slide_id,
            "patches": len(features),
            "embedding_dim": int(features.shape[1]),
            "encoder": encoder,
            **metadata,
            "engine": "ray",
            "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
        }
        return JobResult(outputs=paths, details=details)

    def _ordered_rows(self, name: str, grid_coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the coords and features in grid row order, checking that each row arrived once at its grid corner."""
        rows = np.concatenate(self.embedded.rows)
        order = np.argsort(rows, kind="stable")
        coords = np.concatenate(self.embedded.coords)[order]
        features = np.concatenate(self.embedded.features)[order].astype(np.float32, copy=False)
        if not np.array_equal(rows[order], np.arange(len(grid_coords))) or not np.array_equal(coords, grid_coords):
            raise ModelError(
                f"slide {name}: the pipeline returned {len(rows)} rows that do not match the {len(grid_coords)} patches of "
                "its grid one to one. Run the slide again.",
                value=len(rows),
                limit=len(grid_coords),
            )
        return coords, features


class _FailureRecorder:
    """The job task of a slide that the pipeline did not complete: it raises the failure that the decoding stage wrote."""

    def __init__(self, partial: _EmbeddedSlide | None) -> None:
        self.partial = partial

    def __call__(self, job: Job, out_dir: Path) -> JobResult:
        work_dir = Path(out_dir) / WORK_FOLDER / job.name
        try:
            failure = json.loads((work_dir / FAILURE_FILE).read_text())
        except FileNotFoundError:
            received = 0 if self.partial is None else self.partial.received
            expected = "?" if self.partial is None else self.partial.patches
            raise RecordedSlideFailure(
                f"the Ray pipeline ended with {received} of {expected} patches of this slide embedded and no error recorded "
                "for it. Check the Ray worker logs, then pass --retry-failed to embed it again.",
                code=INTERNAL_ERROR,
                reason=INTERNAL_ERROR,
            ) from None
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise RecordedSlideFailure(failure["message"], code=failure["code"], reason=failure["reason"])
