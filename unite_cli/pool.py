"""``unite pool``: pool patch feature files into slide feature files, or slides into case feature files.

Inputs are TRIDENT-layout feature files (``SLIDE_ID.h5``) or folders of them. Without ``--cases`` each
slide is pooled into ``OUT/SLIDE_ID.h5``. With ``--cases`` the slides of each case are pooled into
``OUT/CASE_ID.h5``. The pooling itself is in :mod:`shared.pooling`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from shared.errors import ConfigError
from shared.pooling import FUSION_MODES, POOLING_METHODS, pool_case_files, pool_slide_file, read_case_map

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Pool per-patch features into one vector per slide, or per case with --cases. mean: the mean over patches (D); "
    "max: the elementwise maximum (D); mean+max: both, concatenated (2 D). With --cases, early fusion pools the patches "
    "of all slides of a case together, and late fusion pools each slide and averages the slide features. Output files "
    "keep TRIDENT's layout, with features of shape (1, D) and the attributes pooling, fusion and encoder."
)


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite pool`` to its subparser."""
    parser.add_argument(
        "features",
        nargs="+",
        type=Path,
        metavar="FEATURES",
        help="feature files (SLIDE_ID.h5, TRIDENT layout) or folders whose *.h5 files are read; the file name without "
        ".h5 is the slide id",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="output folder: OUT/SLIDE_ID.h5, or OUT/CASE_ID.h5 with --cases")
    parser.add_argument("--pooling", choices=POOLING_METHODS, default="mean", help="how patch features are pooled (default: mean)")
    parser.add_argument(
        "--cases",
        type=Path,
        default=None,
        metavar="CSV",
        help="CSV with columns slide_id and case_id: pool the slides of each case into one case feature file "
        "(default: one file per slide)",
    )
    parser.add_argument(
        "--fusion",
        choices=FUSION_MODES,
        default="late",
        help="with --cases: early pools all patches of a case together, late averages the pooled slides (default: late)",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder identity written when an input file has no encoder attribute, as in TRIDENT's own files "
        "(default: take it from each file, and fail when a file has none)",
    )


def run_pool(args: argparse.Namespace) -> int:
    """Run ``unite pool``, print a one-line summary and return the exit status 0.

    Raises :class:`ConfigError` for a missing input, a duplicated slide id, or a case whose slides have
    no feature file, before any file is written.
    """
    inputs = collect_feature_files(args.features)

    if args.cases is None:
        for slide_id, path in inputs.items():
            pool_slide_file(path, args.out / f"{slide_id}.h5", method=args.pooling, encoder=args.encoder)
            logger.debug("pooled slide %s", slide_id)
        print(f"pooled {len(inputs)} slides with {args.pooling} pooling into {args.out}")
        return 0

    cases = read_case_map(args.cases)
    missing = sorted(slide_id for slide_ids in cases.values() for slide_id in slide_ids if slide_id not in inputs)
    if missing:
        raise ConfigError(
            f"--cases {args.cases} lists {len(missing)} slides with no feature file among the inputs (first: {missing[:5]}). "
            "Pass their feature files, or remove their rows from the CSV.",
            value=missing[:5],
        )
    unmapped = sorted(set(inputs) - {slide_id for slide_ids in cases.values() for slide_id in slide_ids})
    if unmapped:
        logger.warning("%d feature files are not in --cases %s and are not pooled (first: %s)", len(unmapped), args.cases, unmapped[:5])

    for case_id, slide_ids in cases.items():
        paths = {slide_id: inputs[slide_id] for slide_id in slide_ids}
        pool_case_files(paths, args.out / f"{case_id}.h5", case_id=case_id, method=args.pooling, fusion=args.fusion, encoder=args.encoder)
        logger.debug("pooled case %s from %d slides", case_id, len(slide_ids))
    slide_count = sum(len(slide_ids) for slide_ids in cases.values())
    print(f"pooled {slide_count} slides into {len(cases)} cases with {args.pooling} pooling and {args.fusion} fusion into {args.out}")
    return 0


def collect_feature_files(sources: list[Path]) -> dict[str, Path]:
    """Return the feature files of ``sources`` (files, or folders of ``*.h5``) by slide id, sorted by slide id."""
    files: dict[str, Path] = {}
    for source in sources:
        if source.is_dir():
            found = sorted(source.glob("*.h5"))
            if not found:
                raise ConfigError(f"folder {source} contains no .h5 feature files. Pass a folder of SLIDE_ID.h5 files.", value=str(source))
        elif source.is_file():
            found = [source]
        else:
            raise ConfigError(f"feature file or folder {source} not found. Check the path.", value=str(source))
        for path in found:
            if path.stem in files and files[path.stem] != path:
                raise ConfigError(
                    f"slide id {path.stem!r} has two feature files: {files[path.stem]} and {path}. Pass one of them.",
                    value=path.stem,
                )
            files[path.stem] = path
    return dict(sorted(files.items()))
