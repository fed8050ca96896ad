"""Tile throughput of the slide pipeline against raw openslide ``read_region`` calls, measured in the same run.

For each slide the pipeline detects tissue, lays the patch grid and reads every patch as an RGB tile
at the target resolution (level choice, compositing on white, Lanczos resize), once with one reader
thread and once with ``--workers`` threads. The baseline reads the same coordinates with plain
``openslide.OpenSlide.read_region`` calls at the same pyramid level and size, with no conversion
or resize. The ratio is pipeline tiles per second over baseline tiles per second.

    python benchmarks/tiling.py --slides ../shared/data/slides
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import openslide

from shared.slides import iter_tiles, open_slide, tile_slide

# Slides of the shared test data and the options each needs: two have no usable resolution in their
# metadata, and one is a fluorescence scan that is tiled only with the opt-in.
KNOWN_SLIDES = {
    "CMU-1-Small-Region.svs": {},
    "tcga-cr-7395-01a-01-ts1.svs": {"mpp": 2.0},
    "BRACS_1640_N_3_cropped.tiff": {"mpp": 0.25},
    "test3-DAPI-2.ndpi": {"allow_fluorescence": True},
}


def raw_reads_per_second(path: Path, coords, level: int, size: int, repeats: int) -> float:
    """Read ``size`` x ``size`` px at ``level`` for every level-0 corner with openslide, ``repeats`` times."""
    with openslide.OpenSlide(str(path)) as handle:
        started = time.perf_counter()
        for _ in range(repeats):
            for x, y in coords:
                handle.read_region((int(x), int(y)), level, (size, size))
        seconds = time.perf_counter() - started
    return repeats * len(coords) / seconds


def pipeline_tiles_per_second(path: Path, tiled, workers: int, repeats: int, mpp: float | None) -> float:
    """Read every patch of ``tiled.grid`` through :func:`iter_tiles`, ``repeats`` times."""
    with open_slide(path, mpp=mpp) as slide:
        started = time.perf_counter()
        for _ in range(repeats):
            for _coords, _tiles in iter_tiles(slide, tiled.grid, batch_size=64, workers=workers):
                pass
        seconds = time.perf_counter() - started
    return repeats * len(tiled.grid) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, required=True, help="folder with the shared test slides")
    parser.add_argument("--workers", type=int, default=2, help="reader threads of the parallel run (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over each slide's patches (default: 3)")
    args = parser.parse_args()

    print(f"{'slide':32} {'patches':>7} {'detect s':>8} {'raw/s':>8} {'1 thread/s':>10} {'ratio':>6} "
          f"{f'{args.workers} threads/s':>11} {'ratio':>6}")
    for name, options in KNOWN_SLIDES.items():
        path = args.slides / name
        if not path.is_file():
            print(f"{name:32} not found in {args.slides}, skipped")
            continue

        started = time.perf_counter()
        tiled = tile_slide(path, **options)
        detect_seconds = time.perf_counter() - started
        grid = tiled.grid
        with open_slide(path, mpp=options.get("mpp")) as slide:
            level = slide.best_level_for_downsample(grid.patch_size_level0 / grid.patch_size)
            level_size = round(grid.patch_size_level0 / slide.info.level_downsamples[level])

        raw = raw_reads_per_second(path, grid.coords, level, level_size, args.repeats)
        single = pipeline_tiles_per_second(path, tiled, 1, args.repeats, options.get("mpp"))
        parallel = pipeline_tiles_per_second(path, tiled, args.workers, args.repeats, options.get("mpp"))
        print(f"{name:32} {len(grid):7d} {detect_seconds:8.2f} {raw:8.0f} {single:10.0f} {single / raw:5.2f}x "
              f"{parallel:11.0f} {parallel / raw:5.2f}x")


if __name__ == "__main__":
    main()
