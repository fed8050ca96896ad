"""``unite tile``: tile slides from files, folders, globs or CSV lists in resumable, lockable jobs.

The options are defined here, and the slide modules are imported only when the command runs, so
``unite --help`` stays fast. The defaults match :class:`shared.slides.tile_job.TileOptions`, and the
limits stated in the help match the checks in ``shared.slides.grid``, ``shared.slides.tiling`` and
``shared.jobs`` (a test compares them).
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Limits stated in the help text. The checks that enforce them are in the modules named above, which
# this module does not import at start so that ``unite --help`` stays fast.
MAX_PATCH_SIZE = 4096
TARGET_MPP_RANGE = (0.05, 20.0)
TARGET_MAG_RANGE = (0.5, 200.0)
MAX_MIN_AREA_UM2 = 1e10
MAX_WORKERS = 256
MAX_READ_WORKERS = 64


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite tile`` to its subparser."""
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="slide files, folders of slides, glob patterns (quote them, ** matches subfolders) or CSV lists of "
        "slides with a 'slide' (or 'wsi') column and an optional 'mpp' column in µm per pixel",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FOLDER",
        help="output folder: patches/NAME_patches.h5, contours_geojson/NAME.geojson, thumbnails/NAME.jpg, "
        "visualization/NAME.jpg and state/NAME.json per slide",
    )
    parser.add_argument("--recursive", action="store_true", help="also take slides from the subfolders of folder sources")

    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="resolution of every slide in µm per pixel, overriding their metadata (default: read from each slide)",
    )
    resolution.add_argument(
        "--mpp-csv",
        type=Path,
        default=None,
        metavar="CSV",
        help="CSV with 'slide' and 'mpp' columns giving per-slide resolutions in µm per pixel; slides it does not "
        "name use their metadata (default: none)",
    )

    parser.add_argument(
        "--patch-size",
        type=int,
        default=224,
        metavar="PX",
        help=f"patch size in pixels at the target resolution, from 1 to {MAX_PATCH_SIZE} (default: 224)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--target-mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help=f"target resolution in µm per pixel, from {TARGET_MPP_RANGE[0]:g} to {TARGET_MPP_RANGE[1]:g} (default: 0.5, "
        "that is 20x)",
    )
    target.add_argument(
        "--target-mag",
        type=float,
        default=None,
        metavar="MAG",
        help=f"target magnification from {TARGET_MAG_RANGE[0]:g} to {TARGET_MAG_RANGE[1]:g}, converted as 10 / MAG µm "
        "per pixel: 20 gives 0.5, 40 gives 0.25 (default: 20)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=0,
        metavar="PX",
        help="overlap of neighbouring patches in pixels at the target resolution, smaller than --patch-size (default: 0)",
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="minimum tissue fraction of a patch, from 0 to 1, for the patch to be kept (default: 0.25)",
    )
    parser.add_argument(
        "--edge",
        choices=("drop", "pad"),
        default="drop",
        help="patches at the right and bottom edges: 'drop' keeps only patches wholly inside the slide, 'pad' also "
        "keeps patches that overhang it, filled with white (default: drop)",
    )

    parser.add_argument(
        "--min-area-um2",
        type=float,
        default=20_000.0,
        metavar="UM2",
        help=f"smallest tissue fragment kept, in µm², from 0 to {MAX_MIN_AREA_UM2:g} (default: 20000, a square about "
        "140 µm a side)",
    )
    parser.add_argument("--no-fill-holes", action="store_true", help="keep holes inside the tissue out of the mask (default: holes are filled)")
    parser.add_argument(
        "--keep-artefacts",
        action="store_true",
        help="keep pen marks, dark marks and folds in the tissue mask (default: they are removed)",
    )
    parser.add_argument(
        "--allow-fluorescence",
        action="store_true",
        help="tile fluorescence (dark-field) slides, taking signal above the dark background as tissue (default: such "
        "slides fail with reason not_brightfield)",
    )
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
        from shared.jobs import RunInterrupted

        if not isinstance(interruption, RunInterrupted):
            logger.error("unite tile: interrupted (SIGINT) before the run started, so no slide was tiled")
            return 128 + signal.SIGINT
        summary = interruption.summary
        logger.error(
            "unite tile: interrupted (%s) with %d slide(s) not finished; run the same command again to resume",
            interruption.signal_name, summary.unfinished,
        )
        print(summary.format("slide"), flush=True)
        return interruption.exit_status


def _run_tile(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError
    from shared.jobs import run_jobs
    from shared.slides.reader import MAX_MPP, MIN_MPP
    from shared.slides.resolution import MppTable
    from shared.slides.sources import collect_slides
    from shared.slides.tile_job import TileOptions, output_folders, slide_jobs, tile_slide_job

    options = TileOptions(
        patch_size=args.patch_size,
        target_mpp=args.target_mpp,
        target_magnification=args.target_mag,
        overlap=args.overlap,
        min_tissue_fraction=args.min_tissue,
        edge=args.edge,
        min_area_um2=args.min_area_um2,
        fill_holes=not args.no_fill_holes,
        remove_artefacts=not args.keep_artefacts,
        allow_fluorescence=args.allow_fluorescence,
        drop_blurry=args.drop_blurry,
        read_workers=args.read_workers,
    )
    options.validate()
    if args.mpp is not None and not MIN_MPP <= args.mpp <= MAX_MPP:
        raise ConfigError(
            f"--mpp {args.mpp} µm/px is outside the plausible range {MIN_MPP}-{MAX_MPP} µm/px. Pass the scans' "
            "resolution, for example 0.25 for 40x or 0.5 for 20x.",
            value=args.mpp,
            limit=[MIN_MPP, MAX_MPP],
        )

    # The outputs of an earlier run into a folder inside a source folder are not slides.
    slides = collect_slides(args.sources, recursive=args.recursive, exclude=output_folders(args.out))
    mpp_table = MppTable.from_csv(args.mpp_csv) if args.mpp_csv is not None else None
    jobs = slide_jobs(slides, options, mpp=args.mpp, mpp_table=mpp_table)

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
