"""Pictures of a tissue mask for people to check: the thumbnail, and the mask, artefacts and patch grid drawn over it.

The overlay tints tissue green and outlines it, tints artefacts (pen marks, dark marks, folds) red,
and draws each patch of a grid as a square outline. Patches are blue on a brightfield slide and
yellow on a fluorescence slide, whose thumbnail is also brightened so that faint tissue shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from shared.slides.tissue import TissueMask

if TYPE_CHECKING:
    from shared.slides.grid import PatchGrid

TISSUE_COLOUR = (0, 190, 0)
ARTEFACT_COLOUR = (230, 0, 0)
GRID_COLOURS = {"brightfield": (0, 60, 255), "fluorescence": (255, 220, 0)}
TINT_ALPHA = 0.2  # weight of the tint colour over the thumbnail
FLUORESCENCE_DISPLAY_GAMMA = 0.5  # brightens the dim autofluorescence of tissue on a dark background
JPEG_QUALITY = 90


def render_overlay(tissue: TissueMask, grid: PatchGrid | None = None) -> Image.Image:
    """Return the thumbnail with tissue tinted and outlined, artefacts tinted, and each patch of ``grid`` outlined.

    Patches are drawn at their level-0 corners (``grid.coords``) scaled by the mask's downsample, so
    a patch is ``grid.patch_size_level0 / tissue.downsample`` thumbnail pixels wide. A mask without a
    thumbnail is drawn on white.
    """
    canvas = _display_image(tissue)
    line_width = max(1, round(max(canvas.shape[:2]) / 800))

    canvas = _tint(canvas, tissue.mask, TISSUE_COLOUR)
    canvas = _tint(canvas, tissue.artefacts, ARTEFACT_COLOUR)
    _outline(canvas, tissue.mask, TISSUE_COLOUR, line_width)
    _outline(canvas, tissue.artefacts, ARTEFACT_COLOUR, line_width)

    if grid is not None and len(grid) > 0:
        colour = GRID_COLOURS[tissue.illumination]
        size = grid.patch_size_level0 / tissue.downsample
        for x, y in np.asarray(grid.coords, dtype=np.float64) / tissue.downsample:
            top_left = (round(x), round(y))
            bottom_right = (round(x + size) - 1, round(y + size) - 1)
            cv2.rectangle(canvas, top_left, bottom_right, colour, 1)
    return Image.fromarray(canvas, mode="RGB")


def save_thumbnail(path: str | Path, tissue: TissueMask) -> Path:
    """Write the thumbnail the mask was computed on as a JPEG, atomically, and return its path.

    Raises OSError when the folder cannot be written, and leaves no partial file behind.
    """
    image = Image.fromarray(_display_image(tissue, brighten=False), mode="RGB")
    return _save_jpeg_atomically(Path(path), image)


def save_overlay(path: str | Path, tissue: TissueMask, grid: PatchGrid | None = None) -> Path:
    """Write :func:`render_overlay` of the mask and ``grid`` as a JPEG, atomically, and return its path.

    Raises OSError when the folder cannot be written, and leaves no partial file behind.
    """
    return _save_jpeg_atomically(Path(path), render_overlay(tissue, grid))


def _display_image(tissue: TissueMask, *, brighten: bool = True) -> np.ndarray:
    if tissue.thumbnail is None:
        return np.full((*tissue.mask.shape, 3), 255, dtype=np.uint8)
    image = np.array(tissue.thumbnail, dtype=np.uint8)
    if brighten and tissue.illumination == "fluorescence":
        lookup = (255.0 * (np.arange(256) / 255.0) ** FLUORESCENCE_DISPLAY_GAMMA).round().astype(np.uint8)
        image = cv2.LUT(image, lookup)
    return image


def _tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    if not mask.any():
        return image
    tinted = image.astype(np.float32)
    tinted[mask] = (1.0 - TINT_ALPHA) * tinted[mask] + TINT_ALPHA * np.asarray(colour, dtype=np.float32)
    return tinted.round().astype(np.uint8)


def _outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
    if not mask.any():
        return
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, width)


def _save_jpeg_atomically(path: Path, image: Image.Image) -> Path:
    """Write ``image`` to ``path.partial`` and rename it over ``path``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        image.save(partial, format="JPEG", quality=JPEG_QUALITY)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
