"""``unite teach``: send slides' tiles through the teacher gateway and export training shards.

The slide sources and tiling options are those of ``unite tile`` (see :mod:`unite_cli.slide_options`),
and ``--patches`` reads the patch grids that ``unite tile`` wrote instead of tiling again. The slide
and gateway modules are imported only when the command runs, so ``unite --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unite_cli.slide_options import (
    add_resolution_arguments,
    add_slide_source_arguments,
    add_tiling_arguments,
    resolution_overrides,
    tile_options,
)

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Send the tissue tiles of slides through the teacher gateway, which embeds the tiles it has not cached and "
    "charges them to its budget, then export training shards from the gateway's cache folder. Slides come from "
    "the same sources as `unite tile` and are tiled with the same options, or their patch grids are read from a "
    "`unite tile` output folder with --patches, so no slide is tiled twice. A slide that cannot be tiled or read "
    "is reported and skipped. A gateway with API keys needs the key in the environment variable UNITE_API_KEY "
    "(export UNITE_API_KEY=<key>), which is sent as a Bearer token and never logged. Exit status: 0 when every "
    "slide was taught, 1 when any slide failed (the others are still taught and exported), 2 for invalid options, "
    "an unusable folder, or a gateway error that stops the run, such as a missing or invalid API key (HTTP 401) "
    "or a used-up budget (HTTP 402)."
)


def add_teach_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite teach`` to its subparser."""
    add_slide_source_arguments(parser)
    parser.add_argument("--gateway", required=True, help="base URL of the teacher gateway, for example http://127.0.0.1:8100")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="the gateway's cache folder, read to export the shards (required unless --dry-run)"
    )
    parser.add_argument("--shards", type=Path, default=None, help="output folder for the training shards (required unless --dry-run)")
    parser.add_argument(
        "--patches",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="output folder of `unite tile` (or its patches/ folder): read each slide's patch grid from "
        "patches/NAME_patches.h5 instead of tiling the slide, so the tiling options below are not used; a slide "
        "without a patch file fails (default: tile every slide here)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per request to the gateway (default: 64)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tile the slides and print the tiles to pay for, the cache hits and the budget left; send nothing to the teacher",
    )
    add_resolution_arguments(parser)
    add_tiling_arguments(parser)


def run_teach(args: argparse.Namespace) -> int:
    """Run ``unite teach`` (or its dry run) and return its exit status: 0, or 1 when any slide failed.

    Invalid options raise :class:`ConfigError` before any slide is tiled, and gateway errors raise
    :class:`TeacherError`. The summary goes to stdout.
    """
    from shared.errors import ConfigError
    from shared.slides.sources import collect_slides
    from shared.slides.tile_job import TileOptions, output_folders

    if args.batch_size < 1:
        raise ConfigError(
            f"--batch-size {args.batch_size} is invalid: expected at least 1 tile per request. Pass for example 64.", value=args.batch_size, limit=1
        )
    options = tile_options(args)
    mpp, mpp_table = resolution_overrides(args)
    if args.patches is not None and options != TileOptions():
        logger.warning(
            "unite teach: --patches %s gives the patch grids, so the tiling options given here are not used; "
            "pass them to `unite tile` instead",
            args.patches,
        )
    # The outputs of a tiling run in a folder inside a source folder are not slides.
    exclude = output_folders(args.patches) if args.patches is not None else []
    slides = collect_slides(args.sources, recursive=args.recursive, exclude=exclude)
    common = {
        "gateway_url": args.gateway,
        "options": options,
        "mpp": mpp,
        "mpp_table": mpp_table,
        "patches_dir": args.patches,
        "batch_size": args.batch_size,
    }

    if args.dry_run:
        from unite_cli.teach_plan import plan_teach

        plan = plan_teach(slides, **common)
        print(plan.summary())
        return plan.exit_status

    from unite_cli.pipeline import teach_slides

    result = teach_slides(slides, cache_dir=args.cache_dir, shard_dir=args.shards, **common)
    print(result.summary())
    return result.exit_status
