"""Patch grids over tissue: level-0 coordinates of square patches at a target resolution.

The level-0 patch size is derived from the slide's own resolution,
``round(patch_size * target_mpp / slide_mpp)``, so a 224 px patch at 0.5 µm/px covers 224 level-0
pixels of a 0.5 µm/px scan and about 491 of a 0.228 µm/px scan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError
from shared.slides.reader import SlideInfo, magnification_for_mpp
from shared.slides.tissue import TissueMask

logger = logging.getLogger(__name__)

# Upsampling a slide by more than this factor to reach the target resolution is logged as a warning.
MAX_SILENT_UPSAMPLING = 1.1


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """Level-0 top-left corners of the patches kept over tissue, in row-major order."""

    coords: np.ndarray
    patch_size: int
    patch_size_level0: int
    target_mpp: float
    target_magnification: int
    overlap: int

    def __len__(self) -> int:
        return len(self.coords)


def grid_over_tissue(
    info: SlideInfo,
    tissue: TissueMask,
    *,
    patch_size: int = 224,
    target_mpp: float = 0.5,
    overlap: int = 0,
    min_tissue_fraction: float = 0.25,
) -> PatchGrid:
    """Lay a grid of ``patch_size`` px patches at ``target_mpp`` µm/px over the slide and keep those on tissue.

    ``overlap`` is in target pixels, so neighbouring patches start ``patch_size - overlap`` target
    pixels apart. Patches that would extend past the slide's edge are dropped, as are patches whose
    tissue fraction is below ``min_tissue_fraction``. The grid may be empty.
    """
    _validate_grid_options(patch_size, target_mpp, overlap, min_tissue_fraction)

    scale = target_mpp / info.mpp  # level-0 pixels per target pixel
    patch_size_level0 = round(patch_size * scale)
    stride_level0 = round((patch_size - overlap) * scale)
    if patch_size_level0 < 1 or stride_level0 < 1:
        raise ConfigError(
            f"slide {info.slide_id}: a {patch_size} px patch at {target_mpp} µm/px with overlap {overlap} gives "
            f"a level-0 patch of {patch_size_level0} px and a step of {stride_level0} px on this "
            f"{info.mpp:.4f} µm/px slide, but both must be at least 1 px. Use a larger patch_size or target_mpp.",
            value=[patch_size_level0, stride_level0],
        )
    if scale < 1 / MAX_SILENT_UPSAMPLING:
        logger.warning(
            "slide %s: target %.3f µm/px is finer than the scan's %.3f µm/px, so tiles are upsampled %.1fx",
            info.slide_id, target_mpp, info.mpp, 1 / scale,
        )

    xs = np.arange(0, info.level0_width - patch_size_level0 + 1, stride_level0, dtype=np.int64)
    ys = np.arange(0, info.level0_height - patch_size_level0 + 1, stride_level0, dtype=np.int64)
    grid_x, grid_y = np.meshgrid(xs, ys)  # rows follow y, so ravel() gives row-major order
    candidates = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).reshape(-1, 2)

    fractions = tissue.fractions(candidates, patch_size_level0)
    coords = np.ascontiguousarray(candidates[fractions >= min_tissue_fraction], dtype=np.int64)
    logger.debug(
        "slide %s: kept %d of %d grid patches (%d px at level 0, step %d px)",
        info.slide_id, len(coords), len(candidates), patch_size_level0, stride_level0,
    )
    return PatchGrid(
        coords=coords,
        patch_size=patch_size,
        patch_size_level0=patch_size_level0,
        target_mpp=float(target_mpp),
        target_magnification=magnification_for_mpp(target_mpp),
        overlap=overlap,
    )


def _validate_grid_options(patch_size: int, target_mpp: float, overlap: int, min_tissue_fraction: float) -> None:
    if patch_size <= 0:
        raise ConfigError(
            f"patch_size={patch_size} must be a positive number of pixels at the target resolution, for example 224.",
            value=patch_size,
        )
    if not 0 <= overlap < patch_size:
        raise ConfigError(
            f"overlap={overlap} px must be at least 0 and smaller than patch_size={patch_size} px.",
            value=overlap,
            limit=[0, patch_size - 1],
        )
    if not target_mpp > 0:
        raise ConfigError(
            f"target_mpp={target_mpp} must be a positive resolution in µm/px, for example 0.5 for 20x.",
            value=target_mpp,
        )
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ConfigError(
            f"min_tissue_fraction={min_tissue_fraction} must lie between 0 and 1.",
            value=min_tissue_fraction,
            limit=[0.0, 1.0],
        )
