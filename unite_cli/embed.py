"""``unite embed``: embed slides with an exported student, no server needed, in resumable jobs.

Slides come from the same sources as ``unite tile`` (see :mod:`unite_cli.slide_options`) and are tiled
with the default grid (224 px patches at 0.5 µm/px). Each slide goes through
:func:`student_server.slide_pipeline.run_slide_pipeline` into a scratch folder ``OUT/.work/NAME/``, and
its outputs are then renamed into one folder per kind (see :data:`OUTPUT_FOLDERS`), so a slide's
feature file appears under its final name only when it is complete. :func:`shared.jobs.run_jobs`
records each slide's state, so a second run skips the slides done and redoes a slide left unfinished
by a killed run. The torch and slide modules are imported only when the command runs, so
``unite --help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from shared.pooling import POOLING_METHODS
from unite_cli.slide_options import add_resolution_arguments, add_slide_source_arguments, resolution_overrides

if TYPE_CHECKING:
    from shared.jobs import Job, JobResult
    from student_server.slide_pipeline import SlidePipelineOptions, TileEmbedder

logger = logging.getLogger(__name__)

# The folder under OUT for each output of the pipeline, by kind, and the file name ending there.
OUTPUT_FOLDERS = {
    "features": ("features", ".h5"),
    "slide_features": ("slide_features", ".h5"),
    "thumbnail": ("thumbnails", ".jpg"),
    "overlay": ("visualization", ".jpg"),
    "map": ("maps", ".json"),
    "result": ("results", ".json"),
}
WORK_FOLDER = ".work"
# Limits stated in the help. The checks that enforce them are in student_server.slide_pipeline and shared.slides.tiling.
MAX_READ_WORKERS = 64
POOLINGS = POOLING_METHODS

DESCRIPTION = (
    "Embed every tissue patch of slides with an exported student and pool the patches into a slide embedding, "
    "without a server. Writes OUT/features/NAME.h5 (TRIDENT layout: coords and features, with the encoder's name "
    "and weights sha256), OUT/slide_features/NAME.h5 (the pooled features, (1, D), or (1, 2D) for mean+max), OUT/results/NAME.json, "
    "OUT/maps/NAME.json, OUT/thumbnails/NAME.jpg and OUT/visualization/NAME.jpg. Slides already done with the same "
    "options and checkpoint are skipped, so the same command resumes an interrupted run. Exit status: 0 when every "
    "slide is done or skipped, 1 when any failed, 2 for invalid options, an unusable --out folder or a checkpoint "
    "that cannot be loaded, 130 after Ctrl-C (SIGINT) and 143 after SIGTERM."
)


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite embed`` to its subparser."""
    add_slide_source_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="FOLDER",
        help="exported student folder (model.safetensors, config.json), as `unite distill` writes it (OUT/student)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="output folder, with the files listed in the description")
    add_resolution_arguments(parser)
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="mean",
        help="how patch embeddings become the slide embedding: 'mean', 'max', or 'mean+max' (both concatenated, "
        "mean first, twice as wide) (default: mean)",
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="tiles per forward pass, at least 1 (default: 32)")
    parser.add_argument(
        "--read-workers",
        type=int,
        default=2,
        metavar="N",
        help=f"threads per slide that read tiles while the student embeds the previous batch, from 1 to {MAX_READ_WORKERS} (default: 2)",
    )
    parser.add_argument(
        "--max-patches",
        type=int,
        default=100_000,
        metavar="N",
        help="slides with more tissue patches than this fail with reason too_many_patches (default: 100000)",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the student: 'cpu', 'cuda' or 'cuda:N' (default: cpu)")
    parser.add_argument(
        "--allow-fluorescence",
        action="store_true",
        help="embed fluorescence (dark-field) slides, taking signal above the dark background as tissue (default: such "
        "slides fail with reason not_brightfield; only the local engine takes it)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="embed again the slides whose state records a failure with the same options (default: leave them failed)",
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="'local' embeds in this process; 'ray' runs tiling tasks and --workers student actors on the Ray cluster "
        "at RAY_ADDRESS, or on a new local one, with the same outputs (needs the 'distributed' extra) (default: local)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="student actors of --engine ray, each on one GPU with --device cuda (default: 1; the local engine takes no --workers)",
    )


def run_embed(args: argparse.Namespace) -> int:
    """Run ``unite embed`` and return its exit status: 0, 1, or 128 plus the signal number, as :data:`DESCRIPTION` states.

    Invalid options and an unloadable checkpoint raise :class:`ConfigError` or :class:`ModelError`
    before any slide is read. The summary goes to stdout, also after a signal.
    """
    try:
        return _run_embed(args)
    except KeyboardInterrupt as interruption:
        from shared.jobs import RunInterrupted, format_count

        if not isinstance(interruption, RunInterrupted):
            logger.error("unite embed: interrupted (SIGINT) before the run started, so no slide was embedded")
            return 128 + signal.SIGINT
        summary = interruption.summary
        logger.error(
            "unite embed: interrupted (%s) with %s not finished; run the same command again to resume",
            interruption.signal_name, format_count(summary.unfinished, "slide"),
        )
        print(summary.format("slide"), flush=True)
        return interruption.exit_status


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """Return the path of each output of the slide named ``name``, by kind."""
    return {kind: Path(out_dir) / folder / f"{name}{suffix}" for kind, (folder, suffix) in OUTPUT_FOLDERS.items()}


def output_folders(out_dir: Path) -> list[Path]:
    """Return every folder that ``unite embed`` writes under ``out_dir``, so none is taken for a slide source."""
    folders = [folder for folder, _ in OUTPUT_FOLDERS.values()]
    return [Path(out_dir) / folder for folder in (*folders, WORK_FOLDER, "state", "locks")]


def embed_slide_job(job: Job, out_dir: Path, *, embedder: TileEmbedder, options: SlidePipelineOptions) -> JobResult:
    """Embed one slide and move its outputs into place. It is the task given to :func:`shared.jobs.run_jobs`.

    Raises what :func:`run_slide_pipeline` raises, and :class:`shared.jobs.WriteError` (reason
    ``write_failed``) for an output that cannot be written.
    """
    from shared.errors import CacheError
    from shared.jobs import JobResult, WriteError
    from student_server.slide_pipeline import run_slide_pipeline

    source = job.payload
    work_dir = Path(out_dir) / WORK_FOLDER / job.name
    paths = output_paths(out_dir, job.name)
    try:
        # Files left here by a killed run are incomplete, so the slide starts from an empty folder.
        shutil.rmtree(work_dir, ignore_errors=True)
        result = run_slide_pipeline(source.path, work_dir, embedder, replace(options, mpp=source.mpp))
        for kind, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(result.outputs[kind], path)
        work_dir.rmdir()
    except OSError as error:
        raise WriteError.from_os_error(error.filename or work_dir, error, subject=f"slide {job.name}") from error
    except CacheError as error:
        # The feature file writer reports a failed write as a CacheError chained to the OSError.
        if isinstance(error.__cause__, OSError):
            raise WriteError.from_os_error(error.value or work_dir, error.__cause__, subject=f"slide {job.name}") from error
        raise

    details = {
        "slide_id": result.slide_id,
        "patches": result.num_patches,
        "embedding_dim": result.embedding_dim,
        "encoder": result.encoder,
        **result.metadata,
        "timings": {name: round(seconds, 3) for name, seconds in result.timings.items()},
    }
    return JobResult(outputs=paths, details=details)


def _run_embed(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError
    from shared.jobs import run_jobs
    from shared.slides.sources import collect_slides
    from shared.slides.tile_job import TileOptions, slide_jobs
    from student_server.slide_pipeline import SlidePipelineOptions

    options = SlidePipelineOptions(
        pooling=args.pooling,
        batch_size=args.batch_size,
        read_workers=args.read_workers,
        max_patches=args.max_patches,
        allow_fluorescence=args.allow_fluorescence,
    )
    options.validate()
    mpp, mpp_table = resolution_overrides(args)
    slides = collect_slides(args.sources, recursive=args.recursive, exclude=output_folders(args.out))
    if args.engine == "ray" and args.allow_fluorescence:
        # NOTE: the Ray engine tiles with the default tissue options, so it cannot embed fluorescence slides yet.
        raise ConfigError(
            "--allow-fluorescence applies only to --engine local, because the ray engine tiles with the default "
            "tissue options and rejects fluorescence slides with reason not_brightfield. Embed those slides with --engine local.",
            value="ray",
        )
    if args.engine == "ray":
        return _run_embed_on_ray(args, slides, mpp if mpp_table is None else mpp_table)
    if args.workers is not None:
        raise ConfigError(f"--workers {args.workers} applies only to --engine ray; the local engine embeds in one process.", value=args.workers)
    embedder = _load_embedder(args)

    # The recorded options are those that shape the outputs: the grid (the defaults of unite tile), whether
    # fluorescence slides are allowed, the resolution override, the pooling and the checkpoint. A done slide
    # with other options stops the run.
    tiling = TileOptions(allow_fluorescence=options.allow_fluorescence)
    shaping = {"pooling": options.pooling, "checkpoint_sha256": embedder.student.sha256}
    jobs = [replace(job, config={**job.config, **shaping}) for job in slide_jobs(slides, tiling, mpp=mpp, mpp_table=mpp_table)]

    # One worker: the student is loaded once, in this process, and each slide's reading overlaps its embedding.
    summary = run_jobs(
        jobs,
        functools.partial(embed_slide_job, embedder=embedder, options=options),
        out_dir=args.out,
        workers=1,
        retry_failed=args.retry_failed,
        progress=sys.stderr.isatty(),
    )
    print(summary.format("slide"))
    return summary.exit_status


def _run_embed_on_ray(args: argparse.Namespace, slides: list, mpp_overrides: object) -> int:
    from unite_cli.embed_ray import run_distributed_embed

    summary = run_distributed_embed(
        slides,
        args.checkpoint,
        args.out,
        workers=1 if args.workers is None else args.workers,
        batch_size=args.batch_size,
        mpp_overrides=mpp_overrides,
        pooling=args.pooling,
        read_workers=args.read_workers,
        max_patches=args.max_patches,
        device=args.device,
        retry_failed=args.retry_failed,
        progress=sys.stderr.isatty(),
    )
    print(summary.format("slide"))
    return summary.exit_status


def _load_embedder(args: argparse.Namespace):
    from shared.errors import ConfigError
    from student_server.slide_pipeline import LocalEmbedder

    try:
        return LocalEmbedder(args.checkpoint, device=args.device, batch_size=args.batch_size)
    except (RuntimeError, AssertionError) as error:
        # torch raises these for a device that does not exist here, such as CUDA on a CPU-only build.
        raise ConfigError(
            f"loading the student onto --device {args.device!r} failed ({error}). Pass an available device such as 'cpu'.",
            value=args.device,
        ) from error
