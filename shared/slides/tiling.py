"""The whole path from a slide file to RGB tiles: open, detect tissue, lay the grid, read the tiles."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import ConfigError, SlideError
from shared.features import patch_attrs, write_patch_coords
from shared.slides.grid import PatchGrid, grid_over_tissue
from shared.slides.reader import Slide, SlideInfo, open_slide
from shared.slides.tissue import TissueMask, detect_tissue

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TiledSlide:
    """A slide's metadata with its tissue mask and the patch grid laid over that tissue."""

    info: SlideInfo
    grid: PatchGrid
    tissue: TissueMask


def tile_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    patch_size: int = 224,
    target_mpp: float = 0.5,
    overlap: int = 0,
    min_tissue_fraction: float = 0.25,
) -> TiledSlide:
    """Open a slide, detect its tissue and lay a patch grid over it. The slide is closed on return.

    ``mpp`` overrides the slide's resolution in µm/px. Raises :class:`SlideError` when the slide
    cannot be opened, has no usable resolution, or has no tissue patch.
    """
    with open_slide(path, mpp=mpp) as slide:
        info = slide.info
        tissue = detect_tissue(slide)
    grid = grid_over_tissue(
        info,
        tissue,
        patch_size=patch_size,
        target_mpp=target_mpp,
        overlap=overlap,
        min_tissue_fraction=min_tissue_fraction,
    )
    if len(grid) == 0:
        raise SlideError(
            f"slide {info.path}: no {patch_size} px patch at {target_mpp} µm/px ({grid.patch_size_level0} px at "
            f"level 0) has a tissue fraction of at least {min_tissue_fraction}. The slide is "
            f"{info.level0_width}x{info.level0_height} px at {info.mpp:.4f} µm/px (from {info.mpp_source}). "
            "Check that resolution, or lower min_tissue_fraction.",
            value=info.slide_id,
        )
    logger.info(
        "tiled slide %s: %.4f µm/px (%s), %d patches of %d px at %.2f µm/px (%d px at level 0)",
        info.slide_id, info.mpp, info.mpp_source, len(grid), grid.patch_size, grid.target_mpp,
        grid.patch_size_level0,
    )
    return TiledSlide(info=info, grid=grid, tissue=tissue)


def iter_tiles(slide: Slide, grid: PatchGrid, *, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batches of ``(coords, tiles)``: (B, 2) int64 level-0 corners and (B, patch_size, patch_size, 3) uint8 RGB.

    Batches follow the grid's row order, and only the last one may be shorter than ``batch_size``.
    Raises :class:`SlideError` when the grid reaches past this slide, which means it was laid over
    another slide.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be a positive number of tiles, for example 64.", value=batch_size)
    _check_grid_fits(slide.info, grid)

    for start in range(0, len(grid.coords), batch_size):
        coords = grid.coords[start : start + batch_size].copy()
        tiles = np.empty((len(coords), grid.patch_size, grid.patch_size, 3), dtype=np.uint8)
        for index, (x, y) in enumerate(coords):
            tiles[index] = slide.read_region_level0(int(x), int(y), grid.patch_size_level0, grid.patch_size)
        yield coords, tiles


def write_patch_file(path: Path, tiled: TiledSlide) -> Path:
    """Write the TRIDENT patches file of a tiled slide (dataset ``coords`` with its attributes) and return its path."""
    return write_patch_coords(Path(path), coords=tiled.grid.coords, attrs=patch_attrs(tiled.info, tiled.grid))


def _check_grid_fits(info: SlideInfo, grid: PatchGrid) -> None:
    if len(grid.coords) == 0:
        return
    max_x = int(grid.coords[:, 0].max()) + grid.patch_size_level0
    max_y = int(grid.coords[:, 1].max()) + grid.patch_size_level0
    if grid.coords.min() < 0 or max_x > info.level0_width or max_y > info.level0_height:
        raise SlideError(
            f"slide {info.slide_id}: the patch grid reaches ({max_x}, {max_y}) px but the slide is "
            f"{info.level0_width}x{info.level0_height} px at level 0. Lay the grid over this slide with "
            "grid_over_tissue or tile_slide.",
            value=[max_x, max_y],
        )
