"""Image-quality checks: artefacts on a brightfield thumbnail, and the sharpness of tiles.

Artefacts are found on the same low-resolution thumbnail as the tissue, in three kinds:

- ``pen``: blue, green or cyan ink, whose hue (70-240°) lies outside the pink-to-purple range of
  H&E (about 250-360°). Red ink has the colour of eosin, so it is not found.
- ``dark``: black or very dark marks (marker ink, dirt, scanner borders). Dense nuclei are as dark
  only in small specks at thumbnail scale.
- ``fold``: tissue folded onto itself. Two layers absorb about twice as much light, so a fold is
  darker (optical density about twice the slide's median tissue) and more saturated than the slide's
  own tissue. Dense nuclear regions can look the same, so the thresholds are conservative and a fold
  is only found when it covers a sizeable area.

Each kind keeps only connected regions of at least ``min_area_px`` mask pixels, because single dark
or bluish pixels are nuclei, not marks. On a grey slide only dark marks are looked for: pen marks
are found by their hue and folds partly by their saturation, and a grey slide has neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shared.errors import ConfigError

# OpenCV's 8-bit hue is half the angle in degrees (0-179). Blue, cyan and green ink lie in
# 70-240°, while haematoxylin starts at about 250° and eosin ends near 360°. On the real H&E slides
# in the test data at mask resolution, 0-1.5 % of tissue pixels fall in this range (nuclei and
# specks of margin dye), in regions of at most 750 µm², far below the minimum artefact area.
PEN_HUE_RANGE = (35, 120)
PEN_MIN_SATURATION = 60  # HSV saturation (0-255), above the noise of pale bluish glass

# HSV value (0-255) below which a pixel counts as a dark mark. At 3-8 µm/px, up to 1 % of the
# tissue pixels of the real H&E slides are this dark (nuclei), in regions of at most 1,000 µm².
DARK_MAX_VALUE = 50

# A fold has a mean optical density (log10 of incident over transmitted light, averaged over R, G
# and B) of at least FOLD_DENSITY_RATIO times the median of the slide's tissue. Its saturation is at
# least FOLD_SATURATION_RATIO times the median. Both are averaged over FOLD_SMOOTHING_UM. On the
# real 20x H&E slide, dense epithelium reaches a density ratio of 2.0 and a saturation ratio of
# 1.36, but the regions where both hold are at most 2,100 µm², below the minimum artefact area.
# The rolled, dark edges of the real TCGA section (up to 89,000 µm²) are found as folds.
FOLD_DENSITY_RATIO = 1.8
FOLD_SATURATION_RATIO = 1.3
FOLD_SMOOTHING_UM = 32.0  # standard deviation of the Gaussian, in µm

# Tiles at 0.5 µm/px whose variance of the Laplacian is below this are blurred. It was measured on
# 224 px tiles with the script in docs/tissue-detection.md. Below it fall 0 of the 58 in-focus
# tissue tiles of the real 20x H&E slide (minimum 323) and 1 of 300 LC25000 lung tiles (minimum 42).
# Blurred with a Gaussian of sigma 2 px (1 µm), 57 of those 58 tiles fall below it, and 25 with 1.5 px.
BLUR_THRESHOLD = 50.0


@dataclass(frozen=True, eq=False)
class Artefacts:
    """Boolean masks of each kind of artefact, all the shape of the thumbnail they were found on."""

    pen: np.ndarray
    dark: np.ndarray
    fold: np.ndarray

    def combined(self) -> np.ndarray:
        """Return the union of all kinds as one boolean mask."""
        return self.pen | self.dark | self.fold


def find_artefacts(
    thumbnail: np.ndarray, foreground: np.ndarray, *, pixel_um: float, min_area_px: float, colour: bool = True
) -> Artefacts:
    """Find pen marks, dark marks and folds among the ``foreground`` pixels of an RGB ``thumbnail``.

    ``foreground`` is every pixel that is not glass, ``pixel_um`` the thumbnail's resolution in
    µm/px, and ``min_area_px`` the smallest region, in thumbnail pixels, that counts as an artefact.
    ``colour=False``, for a grey slide, looks for dark marks only and returns no pen marks or folds.
    """
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]

    dark = keep_large_components((value < DARK_MAX_VALUE) & foreground, min_area_px)
    if not colour:
        none = np.zeros_like(dark)
        return Artefacts(pen=none, dark=dark, fold=none.copy())

    pen_pixels = (hue >= PEN_HUE_RANGE[0]) & (hue <= PEN_HUE_RANGE[1]) & (saturation >= PEN_MIN_SATURATION)
    pen = keep_large_components(pen_pixels & foreground, min_area_px)

    tissue = foreground & ~pen & ~dark
    fold = _find_folds(thumbnail, saturation, tissue, pixel_um=pixel_um, min_area_px=min_area_px)
    return Artefacts(pen=pen, dark=dark, fold=fold)


def _find_folds(
    thumbnail: np.ndarray, saturation: np.ndarray, tissue: np.ndarray, *, pixel_um: float, min_area_px: float
) -> np.ndarray:
    """Return tissue whose smoothed optical density and saturation are well above the tissue's medians."""
    if not tissue.any():
        return tissue

    # Optical density is 0 for white and about 2.4 for black. Adding 1 keeps black pixels finite.
    density = -np.log10((thumbnail.astype(np.float32) + 1.0) / 256.0).mean(axis=2)
    sigma_px = FOLD_SMOOTHING_UM / pixel_um
    smoothed_density = _smooth_over(density, tissue, sigma_px)
    smoothed_saturation = _smooth_over(saturation.astype(np.float32), tissue, sigma_px)
    density_threshold = FOLD_DENSITY_RATIO * float(np.median(smoothed_density[tissue]))
    saturation_threshold = FOLD_SATURATION_RATIO * float(np.median(smoothed_saturation[tissue]))

    cores = (smoothed_density >= density_threshold) & (smoothed_saturation >= saturation_threshold) & tissue
    cores = keep_large_components(cores, min_area_px)
    if not cores.any():
        return cores

    # Smoothing pulls a fold's edges below the thresholds. Take back the tissue within one sigma of
    # a core whose own, lightly smoothed, density is that of a fold.
    radius = max(1, round(sigma_px))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    near_core = cv2.dilate(cores.astype(np.uint8), disc).astype(bool)
    local_density = _smooth_over(density, tissue, max(1.0, 4.0 / pixel_um))
    return cores | (near_core & tissue & (local_density >= density_threshold))


def _smooth_over(values: np.ndarray, region: np.ndarray, sigma_px: float) -> np.ndarray:
    """Return the Gaussian average of ``values`` over the pixels of ``region`` only (0 outside it).

    Dividing the blurred masked values by the blurred mask keeps glass and ink next to the tissue
    from leaking into the average of the tissue near them.
    """
    weights = region.astype(np.float32)
    weighted_sum = cv2.GaussianBlur(values * weights, (0, 0), sigma_px)
    weight = cv2.GaussianBlur(weights, (0, 0), sigma_px)
    result = np.zeros_like(weighted_sum)
    np.divide(weighted_sum, weight, out=result, where=region & (weight > 1e-6))
    return result


def keep_large_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Return ``mask`` without its 8-connected regions smaller than ``min_area_px`` pixels."""
    if not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # label 0 is the background
    return keep[labels]


def sharpness(tiles: np.ndarray) -> np.ndarray:
    """Return the variance of the Laplacian of each tile's grey image, for (N, H, W, 3) uint8 RGB tiles.

    The Laplacian (OpenCV's 3x3 kernel, on grey values 0-255) responds to edges such as nuclear
    borders, so a focused tile has a high variance and a blurred or empty one a low variance. The
    value depends on the tile's resolution and content: compare it with :data:`BLUR_THRESHOLD` only
    for tiles of about 0.5 µm/px.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ConfigError(
            f"sharpness needs (N, H, W, 3) uint8 RGB tiles, got shape {tiles.shape} and dtype {tiles.dtype}. "
            "Pass the tiles as iter_tiles returns them.",
            value=list(tiles.shape),
        )
    scores = np.empty(len(tiles), dtype=np.float64)
    for index, tile in enumerate(tiles):
        grey = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY)
        scores[index] = cv2.Laplacian(grey, cv2.CV_64F, ksize=1).var()
    return scores
