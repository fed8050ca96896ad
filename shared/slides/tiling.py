"""The whole path from a slide file to RGB tiles: open, detect tissue, lay the grid, read the tiles."""

from __future__ import annotations

import logging
import math
import numbers
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from shared.errors import ConfigError, SlideError
from shared.features import patch_attrs, write_patch_coords
from shared.jobs import format_count
from shared.slides.grid import PatchGrid, grid_over_tissue, resolve_target_mpp, validate_grid_options
from shared.slides.quality import BLUR_THRESHOLD, sharpness
from shared.slides.reader import Slide, SlideInfo, log_mpp_override, open_slide
from shared.slides.tissue import TissueMask, detect_tissue

logger = logging.getLogger(__name__)

# The maximum of min_area_um2 in µm²: 100 cm², more than the whole of a 75 x 50 mm glass slide.
MAX_MIN_AREA_UM2 = 1e10
# The maximum number of threads that read the tiles of one slide. It is far above the cores of one machine
# and stops a typo from starting hundreds of threads.
MAX_READ_WORKERS = 64
# The maximum size in bytes of the tiles in one batch of drop_blurry_patches, whose batches shrink for large patches.
MAX_BATCH_BYTES = 256 * 2**20


@dataclass(frozen=True, eq=False)
class TiledSlide:
    """A slide's metadata with its tissue mask and the patch grid laid over that tissue.

    ``blurry_dropped`` counts the patches removed from the grid as out of focus (0 unless asked).
    """

    info: SlideInfo
    grid: PatchGrid
    tissue: TissueMask
    blurry_dropped: int = 0


def tile_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    patch_size: int = 224,
    target_mpp: float | None = None,
    target_magnification: float | None = None,
    overlap: int = 0,
    min_tissue_fraction: float = 0.25,
    edge: str = "drop",
    min_area_um2: float = 20_000.0,
    fill_holes: bool = True,
    remove_artefacts: bool = True,
    allow_fluorescence: bool = False,
    drop_blurry: bool = False,
    workers: int = 1,
) -> TiledSlide:
    """Open a slide, detect its tissue and lay a patch grid over it. The slide is closed on return.

    ``mpp`` overrides the slide's resolution in µm/px. The grid options are those of
    :func:`~shared.slides.grid.grid_over_tissue` and the tissue options those of
    :func:`~shared.slides.tissue.detect_tissue`. ``drop_blurry`` reads every patch, with ``workers``
    threads, and removes those whose sharpness is below :data:`shared.slides.quality.BLUR_THRESHOLD`.
    Raises :class:`ConfigError` for an invalid option before the slide is opened, and
    :class:`SlideError` when the slide cannot be opened, has no usable resolution, no tissue, or no
    patch with enough tissue (reason ``no_patches``).
    """
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, numbers.Real)):
        raise ConfigError(f"mpp={mpp!r} must be a number of µm per pixel, for example 0.5, or None to use the metadata (--mpp).", value=repr(mpp))
    resolve_target_mpp(target_mpp, target_magnification)
    validate_grid_options(patch_size=patch_size, overlap=overlap, min_tissue_fraction=min_tissue_fraction, edge=edge)
    validate_min_area_um2(min_area_um2)
    validate_read_workers(workers, name="workers")

    with open_slide(path, mpp=mpp) as slide:
        info = slide.info
        log_mpp_override(info)
        tissue = detect_tissue(
            slide,
            min_area_um2=min_area_um2,
            fill_holes=fill_holes,
            remove_artefacts=remove_artefacts,
            allow_fluorescence=allow_fluorescence,
        )
        grid = grid_over_tissue(
            info,
            tissue,
            patch_size=patch_size,
            target_mpp=target_mpp,
            target_magnification=target_magnification,
            overlap=overlap,
            min_tissue_fraction=min_tissue_fraction,
            edge=edge,
        )
        require_patches(info, grid, min_tissue_fraction)
        blurry_dropped = 0
        if drop_blurry:
            grid, blurry_dropped = drop_blurry_patches(slide, grid, workers=workers)

    logger.info(
        "tiled slide %s: %.4f µm/px (%s), %s of %d px at %.2f µm/px (%d px at level 0)",
        info.path, info.mpp, info.mpp_source, format_count(len(grid), "patch", "patches"), grid.patch_size, grid.target_mpp,
        grid.patch_size_level0,
    )
    return TiledSlide(info=info, grid=grid, tissue=tissue, blurry_dropped=blurry_dropped)


def validate_min_area_um2(min_area_um2: float) -> None:
    """Raise :class:`ConfigError` unless ``min_area_um2`` is a number from 0 to :data:`MAX_MIN_AREA_UM2`."""
    valid = isinstance(min_area_um2, numbers.Real) and not isinstance(min_area_um2, bool) and math.isfinite(min_area_um2)
    if not (valid and 0 <= min_area_um2 <= MAX_MIN_AREA_UM2):
        raise ConfigError(
            f"min_area_um2={min_area_um2!r} must be an area in µm² from 0 to {MAX_MIN_AREA_UM2:g}, for example 20000 "
            "for a square about 140 µm a side (--min-area-um2).",
            value=repr(min_area_um2),
            limit=[0, MAX_MIN_AREA_UM2],
        )


def validate_read_workers(workers: int, *, name: str = "read_workers") -> None:
    """Raise :class:`ConfigError` unless ``workers`` is a whole number of threads from 1 to :data:`MAX_READ_WORKERS`.

    ``name`` is the parameter's name in the caller, for the message.
    """
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or not 1 <= workers <= MAX_READ_WORKERS:
        raise ConfigError(
            f"{name}={workers!r} must be a whole number of reader threads from 1 to {MAX_READ_WORKERS}, for "
            "example 1 or 4 (--read-workers).",
            value=repr(workers),
            limit=[1, MAX_READ_WORKERS],
        )


def require_patches(info: SlideInfo, grid: PatchGrid, min_tissue_fraction: float) -> None:
    """Raise :class:`SlideError` with reason ``no_patches`` when the grid is empty.

    The message suggests only the changes that can help: a lower ``min_tissue_fraction`` when it is
    above 0, and ``edge="pad"`` when the edge mode is "drop" and the slide is smaller than one patch.
    """
    if len(grid) > 0:
        return
    fixes = ["check that resolution (--mpp)"]
    if min_tissue_fraction > 0:
        fixes.append("lower min_tissue_fraction (--min-tissue)")
    fixes.append("use a smaller patch (--patch-size)")
    smaller_than_patch = min(info.level0_width, info.level0_height) < grid.patch_size_level0
    if grid.edge == "drop" and smaller_than_patch:
        fixes.append("use edge='pad' (--edge pad), because the slide is smaller than one patch")
    raise SlideError(
        f"slide {info.path}: no {grid.patch_size} px patch at {grid.target_mpp:g} µm/px ({grid.patch_size_level0} px "
        f"at level 0, edge {grid.edge!r}) has a tissue fraction of at least {min_tissue_fraction}. The slide is "
        f"{info.level0_width}x{info.level0_height} px at {info.mpp:.4f} µm/px (from {info.mpp_source}). "
        f"{_capitalized(', or '.join(fixes))}.",
        reason="no_patches",
        value=str(info.path),
        limit=min_tissue_fraction,
    )


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def drop_blurry_patches(
    slide: Slide, grid: PatchGrid, *, threshold: float | None = None, workers: int = 1, batch_size: int = 64
) -> tuple[PatchGrid, int]:
    """Read every patch and return the grid without the out-of-focus ones, and how many were dropped.

    A patch is out of focus when :func:`shared.slides.quality.sharpness` is below ``threshold``
    (default :data:`shared.slides.quality.BLUR_THRESHOLD`). Raises :class:`SlideError` with reason
    ``no_patches`` when every patch is out of focus.
    """
    threshold = BLUR_THRESHOLD if threshold is None else threshold
    # Each batch, and with workers > 1 the batch read ahead too, contains at most MAX_BATCH_BYTES of tiles.
    batch_size = max(1, min(batch_size, MAX_BATCH_BYTES // (grid.patch_size**2 * 3)))
    keep = np.zeros(len(grid), dtype=bool)
    start = 0
    for coords, tiles in iter_tiles(slide, grid, batch_size=batch_size, workers=workers):
        keep[start : start + len(coords)] = sharpness(tiles) >= threshold
        start += len(coords)

    dropped = int((~keep).sum())
    logger.info(
        "slide %s: dropped %d of %s as out of focus", slide.info.path, dropped, format_count(len(grid), "patch", "patches")
    )
    if not keep.any():
        raise SlideError(
            f"slide {slide.info.path}: no tissue patch is in focus, because the sharpness (variance of the Laplacian) "
            f"of every patch is below {threshold:g} ({format_count(len(grid), 'patch', 'patches')} checked). Check the "
            "scan, or tile it without --drop-blurry.",
            reason="no_patches",
            value=str(slide.info.path),
            limit=threshold,
        )
    return replace(grid, coords=np.ascontiguousarray(grid.coords[keep])), dropped


def iter_tiles(
    slide: Slide, grid: PatchGrid, *, batch_size: int = 64, workers: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batches of ``(coords, tiles)``: (B, 2) int64 level-0 corners and (B, patch_size, patch_size, 3) uint8 RGB.

    Batches follow the grid's row order, and only the last one may be shorter than ``batch_size``.
    With ``workers`` > 1 a pool of that many threads reads the tiles, one batch ahead of the caller,
    and the output is the same as with one. Threads help because openslide (called through ctypes)
    and Pillow release the GIL while they decode and resize. Raises :class:`SlideError` when the grid reaches past this slide, which
    means it was laid over another slide.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be a positive number of tiles, for example 64.", value=batch_size)
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers <= 0:
        raise ConfigError(
            f"workers={workers!r} must be a positive number of reader threads, for example 1 or 4 (--read-workers).",
            value=repr(workers),
        )
    _check_grid_fits(slide.info, grid)
    batches = [grid.coords[start : start + batch_size].copy() for start in range(0, len(grid.coords), batch_size)]

    if workers == 1:
        for coords in batches:
            tiles = np.empty((len(coords), grid.patch_size, grid.patch_size, 3), dtype=np.uint8)
            for index, (x, y) in enumerate(coords):
                tiles[index] = slide.read_region_level0(int(x), int(y), grid.patch_size_level0, grid.patch_size)
            yield coords, tiles
        return

    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader")
    pending: deque[tuple[np.ndarray, list[Future]]] = deque()
    try:
        for coords in batches:
            futures = [
                executor.submit(slide.read_region_level0, int(x), int(y), grid.patch_size_level0, grid.patch_size)
                for x, y in coords
            ]
            pending.append((coords, futures))
            if len(pending) > 1:
                yield _collect_batch(*pending.popleft(), grid.patch_size)
        while pending:
            yield _collect_batch(*pending.popleft(), grid.patch_size)
    finally:
        # Runs when the caller stops early too, so no thread keeps reading a slide that is about to close.
        executor.shutdown(wait=True, cancel_futures=True)


def write_patch_file(path: Path, tiled: TiledSlide) -> Path:
    """Write the TRIDENT patches file of a tiled slide (dataset ``coords`` with its attributes) and return its path.

    Besides TRIDENT's attributes the file records ``target_mpp`` (µm/px) and ``edge`` ("drop" or "pad").
    """
    attrs = {**patch_attrs(tiled.info, tiled.grid), "target_mpp": float(tiled.grid.target_mpp), "edge": tiled.grid.edge}
    return write_patch_coords(Path(path), coords=tiled.grid.coords, attrs=attrs)


def _collect_batch(coords: np.ndarray, futures: list[Future], patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    tiles = np.empty((len(coords), patch_size, patch_size, 3), dtype=np.uint8)
    for index, future in enumerate(futures):
        tiles[index] = future.result()
    return coords, tiles


def _check_grid_fits(info: SlideInfo, grid: PatchGrid) -> None:
    """Raise :class:`SlideError` when the grid was laid over a slide of other dimensions.

    Patches of a padded grid may overhang the right and bottom edges but must start inside the slide.
    """
    if len(grid.coords) == 0:
        return
    max_x = int(grid.coords[:, 0].max()) + grid.patch_size_level0
    max_y = int(grid.coords[:, 1].max()) + grid.patch_size_level0
    overhang = grid.patch_size_level0 - 1 if grid.edge == "pad" else 0
    if grid.coords.min() < 0 or max_x > info.level0_width + overhang or max_y > info.level0_height + overhang:
        raise SlideError(
            f"slide {info.path}: the patch grid reaches ({max_x}, {max_y}) px but the slide is "
            f"{info.level0_width}x{info.level0_height} px at level 0. Lay the grid over this slide with "
            "grid_over_tissue or tile_slide.",
            value=[max_x, max_y],
        )
