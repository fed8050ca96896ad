"""Slide sources and tiling options shared by ``unite tile`` and ``unite teach``.

Both commands take slides from the same sources and tile them with the same options, so a patch file
written by ``unite tile`` and the tiles ``unite teach`` sends come from one definition. The slide modules
are imported only when a command runs, so ``unite --help`` stays fast. The defaults match
:class:`shared.slides.tile_job.TileOptions`, and the limits stated in the help match the checks in
``shared.slides.grid`` and ``shared.slides.tiling`` (a test compares them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.slides.resolution import MppTable
    from shared.slides.tile_job import TileOptions

# Limits stated in the help text. The checks that enforce them are in the modules named above, which
# this module does not import at start so that ``unite --help`` stays fast.
MAX_PATCH_SIZE = 4096
TARGET_MPP_RANGE = (0.05, 20.0)
TARGET_MAG_RANGE = (0.5, 200.0)
MAX_MIN_AREA_UM2 = 1e10


def add_slide_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the positional SOURCE arguments and ``--recursive``."""
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="slide files, folders of slides, glob patterns (quote them, ** matches subfolders) or CSV lists of "
        "slides with a 'slide' (or 'wsi') column and an optional 'mpp' column in µm per pixel",
    )
    parser.add_argument("--recursive", action="store_true", help="also take slides from the subfolders of folder sources")


def add_resolution_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--mpp`` and ``--mpp-csv``, which override the slides' resolution; only one may be given."""
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


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the patch grid and tissue detection options: every field of ``TileOptions`` but the blur filter."""
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


def tile_options(args: argparse.Namespace, **extra: object) -> TileOptions:
    """Return the validated :class:`TileOptions` of the options that :func:`add_tiling_arguments` added.

    ``extra`` sets the fields that only some commands have, such as ``drop_blurry``. Raises
    :class:`ConfigError` for an invalid value, before any slide is opened.
    """
    from shared.slides.tile_job import TileOptions

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
        **extra,
    )
    options.validate()
    return options


def resolution_overrides(args: argparse.Namespace) -> tuple[float | None, MppTable | None]:
    """Return the checked ``--mpp`` and the table read from ``--mpp-csv`` (None for an option not given).

    Raises :class:`ConfigError` for an ``--mpp`` outside the plausible range or an unreadable CSV.
    """
    from shared.errors import ConfigError
    from shared.slides.reader import MAX_MPP, MIN_MPP
    from shared.slides.resolution import MppTable

    if args.mpp is not None and not MIN_MPP <= args.mpp <= MAX_MPP:
        raise ConfigError(
            f"--mpp {args.mpp} µm/px is outside the plausible range {MIN_MPP}-{MAX_MPP} µm/px. Pass the scans' "
            "resolution, for example 0.25 for 40x or 0.5 for 20x.",
            value=args.mpp,
            limit=[MIN_MPP, MAX_MPP],
        )
    mpp_table = MppTable.from_csv(args.mpp_csv) if args.mpp_csv is not None else None
    return args.mpp, mpp_table
