"""Patch grids over tissue: level-0 coordinates of square patches at a target resolution.

The level-0 patch size is derived from the slide's own resolution,
``round(patch_size * target_mpp / slide_mpp)``, so a 224 px patch at 0.5 µm/px covers 224 level-0
pixels of a 0.5 µm/px scan and about 491 of a 0.228 µm/px scan. A target magnification is converted
with the usual rule that 10x is 1 µm/px: 20x is 0.5 µm/px and 40x is 0.25 µm/px.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.slides.reader import MAX_MPP, MIN_MPP, SlideInfo, magnification_for_mpp
from shared.slides.tissue import TissueMask

logger = logging.getLogger(__name__)

# Upsampling a slide by more than this factor to reach the target resolution is logged as a warning.
MAX_SILENT_UPSAMPLING = 1.1

DEFAULT_TARGET_MPP = 0.5  # µm/px, about 20x, the resolution most pathology encoders were trained at

# The target resolution must lie in the range accepted for slides, 0.05-20 µm/px, that is 200x to 0.5x.
MIN_TARGET_MPP = MIN_MPP
MAX_TARGET_MPP = MAX_MPP
MIN_TARGET_MAGNIFICATION = 10.0 / MAX_TARGET_MPP
MAX_TARGET_MAGNIFICATION = 10.0 / MIN_TARGET_MPP

# The largest patch side in pixels at the target resolution. It is 8 times the 512 px that the largest
# common encoders take, and one 4096 px RGB patch is 48 MiB.
MAX_PATCH_SIZE = 4096

# Edge modes for patches at the right and bottom edges: "drop" keeps only patches that lie wholly inside
# the slide, and "pad" also keeps patches that start inside it and overhang, whose pixels outside are white.
EDGE_MODES = ("drop", "pad")


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """Level-0 top-left corners of the patches kept over tissue, in row-major order.

    With ``edge="pad"`` the last patch of a row or column may reach past the slide's right or bottom
    edge, and reads there return white.
    """

    coords: np.ndarray
    patch_size: int
    patch_size_level0: int
    target_mpp: float
    target_magnification: int
    overlap: int
    edge: str = "drop"

    def __len__(self) -> int:
        return len(self.coords)


def resolve_target_mpp(target_mpp: float | None = None, target_magnification: float | None = None) -> float:
    """Return the target resolution in µm/px from a resolution or a magnification (10 / magnification).

    At most one may be given. With neither, the result is :data:`DEFAULT_TARGET_MPP`. Raises
    :class:`ConfigError` for both at once, for a value that is not a number, and for a resolution
    outside :data:`MIN_TARGET_MPP`-:data:`MAX_TARGET_MPP` µm/px (a magnification outside
    :data:`MIN_TARGET_MAGNIFICATION`-:data:`MAX_TARGET_MAGNIFICATION`).
    """
    if target_mpp is not None and target_magnification is not None:
        raise ConfigError(
            f"target_mpp={target_mpp} and target_magnification={target_magnification} were both given, but they "
            "set the same thing. Pass only one (--target-mpp or --target-mag).",
            value=[target_mpp, target_magnification],
        )
    if target_magnification is not None:
        if not (_is_real(target_magnification) and MIN_TARGET_MAGNIFICATION <= target_magnification <= MAX_TARGET_MAGNIFICATION):
            raise ConfigError(
                f"target_magnification={target_magnification!r} must be an objective power from "
                f"{MIN_TARGET_MAGNIFICATION:g} to {MAX_TARGET_MAGNIFICATION:g}, for example 20 for 0.5 µm/px or 40 "
                "for 0.25 µm/px (--target-mag).",
                value=target_magnification,
                limit=[MIN_TARGET_MAGNIFICATION, MAX_TARGET_MAGNIFICATION],
            )
        return 10.0 / target_magnification
    if target_mpp is None:
        return DEFAULT_TARGET_MPP
    if not (_is_real(target_mpp) and MIN_TARGET_MPP <= target_mpp <= MAX_TARGET_MPP):
        raise ConfigError(
            f"target_mpp={target_mpp!r} must be a resolution from {MIN_TARGET_MPP:g} to {MAX_TARGET_MPP:g} µm/px, "
            "for example 0.5 for 20x (--target-mpp).",
            value=target_mpp,
            limit=[MIN_TARGET_MPP, MAX_TARGET_MPP],
        )
    return float(target_mpp)


def grid_over_tissue(
    info: SlideInfo,
    tissue: TissueMask,
    *,
    patch_size: int = 224,
    target_mpp: float | None = None,
    target_magnification: float | None = None,
    overlap: int = 0,
    min_tissue_fraction: float = 0.25,
    edge: str = "drop",
) -> PatchGrid:
    """Lay a grid of ``patch_size`` px patches at the target resolution over the slide and keep those on tissue.

    The target is ``target_mpp`` µm/px or ``target_magnification`` (see :func:`resolve_target_mpp`),
    by default 0.5 µm/px. ``overlap`` is in target pixels, so neighbouring patches start
    ``patch_size - overlap`` target pixels apart. ``edge="drop"`` drops patches that would extend past
    the slide's right or bottom edge, and ``edge="pad"`` keeps those that start inside the slide.
    A patch is kept when its tissue fraction, over the whole patch including any part outside the
    slide, is at least ``min_tissue_fraction`` and above 0. The grid may be empty.
    """
    target_mpp = resolve_target_mpp(target_mpp, target_magnification)
    validate_grid_options(patch_size=patch_size, overlap=overlap, min_tissue_fraction=min_tissue_fraction, edge=edge)

    scale = target_mpp / info.mpp  # level-0 pixels per target pixel
    patch_size_level0 = round(patch_size * scale)
    stride_level0 = round((patch_size - overlap) * scale)
    if patch_size_level0 < 1 or stride_level0 < 1:
        raise ConfigError(
            f"slide {info.path}: a {patch_size} px patch at {target_mpp} µm/px with overlap {overlap} gives "
            f"a level-0 patch of {patch_size_level0} px and a step of {stride_level0} px on this "
            f"{info.mpp:.4f} µm/px slide, but both must be at least 1 px. Use a larger patch_size or target_mpp.",
            value=[patch_size_level0, stride_level0],
        )
    if scale < 1 / MAX_SILENT_UPSAMPLING:
        logger.warning(
            "slide %s: target %.3f µm/px is finer than the scan's %.3f µm/px, so tiles are upsampled %.1fx",
            info.path, target_mpp, info.mpp, 1 / scale,
        )

    candidates = _candidate_corners(info, patch_size_level0, stride_level0, edge)
    fractions = tissue.fractions(candidates, patch_size_level0) * _inside_fractions(info, candidates, patch_size_level0)
    # A patch needs some tissue even at min_tissue_fraction=0, so no patch lies on background only.
    keep = (fractions >= min_tissue_fraction) & (fractions > 0)
    coords = np.ascontiguousarray(candidates[keep], dtype=np.int64)
    logger.debug(
        "slide %s: kept %d of %d grid patches (%d px at level 0, step %d px, edge %s)",
        info.path, len(coords), len(candidates), patch_size_level0, stride_level0, edge,
    )
    return PatchGrid(
        coords=coords,
        patch_size=patch_size,
        patch_size_level0=patch_size_level0,
        target_mpp=float(target_mpp),
        target_magnification=magnification_for_mpp(target_mpp),
        overlap=overlap,
        edge=edge,
    )


def _candidate_corners(info: SlideInfo, patch_size_level0: int, stride_level0: int, edge: str) -> np.ndarray:
    """Return the (N, 2) level-0 corners of every grid patch in row-major order, before the tissue test."""
    if edge == "pad":
        x_stop, y_stop = info.level0_width, info.level0_height
    else:
        x_stop = info.level0_width - patch_size_level0 + 1
        y_stop = info.level0_height - patch_size_level0 + 1
    xs = np.arange(0, max(0, x_stop), stride_level0, dtype=np.int64)
    ys = np.arange(0, max(0, y_stop), stride_level0, dtype=np.int64)
    grid_x, grid_y = np.meshgrid(xs, ys)  # rows follow y, so ravel() gives row-major order
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).reshape(-1, 2)


def _inside_fractions(info: SlideInfo, coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """Return the share of each patch's area that lies inside the slide (1.0 unless the patch overhangs an edge).

    :meth:`TissueMask.fractions` measures tissue over the part of a square inside the mask, so this
    factor turns it into a fraction of the whole padded patch.
    """
    inside_width = np.clip(info.level0_width - coords[:, 0], 0, patch_size_level0)
    inside_height = np.clip(info.level0_height - coords[:, 1], 0, patch_size_level0)
    return (inside_width * inside_height) / float(patch_size_level0**2)


def validate_grid_options(*, patch_size: int, overlap: int, min_tissue_fraction: float, edge: str) -> None:
    """Raise :class:`ConfigError` naming the option and its valid range when a grid option is invalid.

    ``patch_size`` and ``overlap`` must be whole numbers (a bool is not one), and ``min_tissue_fraction`` a number.
    """
    if not (_is_integer(patch_size) and 1 <= patch_size <= MAX_PATCH_SIZE):
        raise ConfigError(
            f"patch_size={patch_size!r} must be a whole number of pixels at the target resolution from 1 to "
            f"{MAX_PATCH_SIZE}, for example 224 (--patch-size).",
            value=patch_size,
            limit=[1, MAX_PATCH_SIZE],
        )
    if not (_is_integer(overlap) and 0 <= overlap < patch_size):
        raise ConfigError(
            f"overlap={overlap!r} px must be a whole number of at least 0 and smaller than patch_size={patch_size} px, "
            f"because neighbouring patches start patch_size - overlap px apart. Pass an --overlap from 0 to "
            f"{patch_size - 1}.",
            value=overlap,
            limit=[0, patch_size - 1],
        )
    if not (_is_real(min_tissue_fraction) and 0.0 <= min_tissue_fraction <= 1.0):
        raise ConfigError(
            f"min_tissue_fraction={min_tissue_fraction!r} must be a number from 0 to 1 (--min-tissue).",
            value=min_tissue_fraction,
            limit=[0.0, 1.0],
        )
    if edge not in EDGE_MODES:
        raise ConfigError(
            f"edge={edge!r} is not an edge mode. Pass one of {', '.join(EDGE_MODES)} (--edge): 'drop' keeps only "
            "patches wholly inside the slide, 'pad' also keeps patches that overhang its right or bottom edge.",
            value=edge,
            limit=list(EDGE_MODES),
        )


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """Return True for a finite int or float that is not a bool (numpy numbers included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
