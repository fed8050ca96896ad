"""``unite tile``: tile slides from files, folders, globs or CSV lists in resumable, lockable jobs.

The slide sources, resolution overrides and tiling options are shared with ``unite teach`` and defined
in :mod:`unite_cli.slide_options`. The options only ``unite tile`` has are defined here. The slide
modules are imported only when the command runs, so ``unite --help`` stays fast. The limits stated in
the help match the checks in ``shared.jobs`` and ``shared.slides.tiling`` (a test compares them).
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from pathlib import Path

from unite_cli.slide_options import (
    add_resolution_arguments,
    add_slide_source_arguments,
    add_tiling_arguments,
    resolution_overrides,
    tile_options,
)

logger = logging.getLogger(__name__)

# Limits stated in the help of the options only ``unite tile`` has.
MAX_WORKERS = 256
MAX_READ_WORKERS = 64


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite tile`` to its subparser."""
    add_slide_source_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FOLDER",
        help="output folder: patches/NAME_patches.h5, contours_geojson/NAME.geojson, thumbnails/NAME.jpg, "
        "visualization/NAME.jpg and state/NAME.json per slide",
    )
    add_resolution_arguments(parser)
    add_tiling_arguments(parser)
    parser.add_argument(
        "--drop-blurry",
        action="store_true",
        help="read every patch and drop those out of focus, whose variance of the Laplacian is below a fixed threshold "
        "set for 0.5 µm/px tiles; slower (default: keep all)",
    )

    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=f"slides tiled at once, each in its own worker process, from 1 to {MAX_WORKERS} (default: 1, in this "
        "process)",
    )
    parser.add_argument(
        "--read-workers",
        type=int,
        default=1,
        metavar="N",
        help=f"threads per slide that read patches for --drop-blurry, from 1 to {MAX_READ_WORKERS} (default: 1)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="tile again the slides whose state records a failure with the same options (default: leave them failed)",
    )


def run_tile(args: argparse.Namespace) -> int:
    """Run ``unite tile`` and return its exit status.

    The status is 0 when every slide is done or skipped, 1 when any failed, and 128 plus the signal
    number when SIGINT (130) or SIGTERM (143) stopped the run. Invalid options raise
    :class:`ConfigError` before any slide is tiled. The summary goes to stdout, also after a signal.
    """
    try:
        return _run_tile(args)
    except KeyboardInterrupt as interruption:
        from shared.jobs import RunInterrupted, format_count

        if not isinstance(interruption, RunInterrupted):
            logger.error("unite tile: interrupted (SIGINT) before the run started, so no slide was tiled")
            return 128 + signal.SIGINT
        summary = interruption.summary
        logger.error(
            "unite tile: interrupted (%s) with %s not finished; run the same command again to resume",
            interruption.signal_name, format_count(summary.unfinished, "slide"),
        )
        print(summary.format("slide"), flush=True)
        return interruption.exit_status


def _run_tile(args: argparse.Namespace) -> int:
    from shared.jobs import run_jobs
    from shared.slides.sources import collect_slides
    from shared.slides.tile_job import output_folders, slide_jobs, tile_slide_job

    options = tile_options(args, drop_blurry=args.drop_blurry, read_workers=args.read_workers)
    mpp, mpp_table = resolution_overrides(args)

    # The outputs of an earlier run into a folder inside a source folder are not slides.
    slides = collect_slides(args.sources, recursive=args.recursive, exclude=output_folders(args.out))
    jobs = slide_jobs(slides, options, mpp=mpp, mpp_table=mpp_table)

    summary = run_jobs(
        jobs,
        functools.partial(tile_slide_job, options=options),
        out_dir=args.out,
        workers=args.workers,
        retry_failed=args.retry_failed,
        progress=sys.stderr.isatty(),
    )
    print(summary.format("slide"))
    return summary.exit_status
