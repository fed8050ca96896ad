"""Classical tissue detection on a low-resolution thumbnail, with no learned weights.

A pixel is tissue when its HSV saturation reaches an Otsu threshold and its brightness is neither
near white (glass) nor near black. Morphological closing and opening smooth the mask, enclosed holes
are filled, and connected components smaller than a minimum area are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image
from scipy import ndimage

from shared.errors import ConfigError, SlideError
from shared.slides.reader import Slide

logger = logging.getLogger(__name__)

# The mask's longer side has at least this many pixels, so small slides and crops still get a
# usable mask when `mask_mpp` would make it tiny.
MIN_MASK_SIDE = 512

# Bounds on the Otsu saturation threshold (0-255). On the H&E scans this was tuned on, glass has a
# saturation of about 0-10 and pale stroma about 30-60. On a thumbnail that is almost all tissue, Otsu splits eosin from haematoxylin
# instead of glass from tissue, so the threshold is capped. The floor keeps glass noise out when a
# slide is almost empty.
MIN_SATURATION_THRESHOLD = 20
MAX_SATURATION_THRESHOLD = 40
MAX_BRIGHTNESS = 240  # HSV value above which a pixel counts as glass
MIN_BRIGHTNESS = 30  # HSV value below which a pixel counts as black (pen, dark background)

SMOOTHING_RADIUS_UM = 16.0  # radius of the closing and opening, in µm

# A component smaller than `min_area_um2` is dropped, but the threshold never exceeds this share of
# the slide's area, so a small crop (a region of interest exported from a larger slide) keeps its tissue.
MAX_MIN_AREA_FRACTION = 0.05


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask of a slide at a reduced resolution."""

    mask: np.ndarray
    downsample: float

    @cached_property
    def _integral(self) -> np.ndarray:
        """Summed-area table with a zero first row and column, so any rectangle sum is four lookups."""
        height, width = self.mask.shape
        integral = np.zeros((height + 1, width + 1), dtype=np.int64)
        integral[1:, 1:] = self.mask.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
        return integral

    def fraction(self, x: int, y: int, size_level0: int) -> float:
        """Return the tissue fraction (0-1) of the level-0 square with top-left (x, y) and side ``size_level0``."""
        coords = np.array([[x, y]], dtype=np.int64)
        return float(self.fractions(coords, size_level0)[0])

    def fractions(self, coords: np.ndarray, size_level0: int) -> np.ndarray:
        """Return the tissue fraction of each level-0 square, for (N, 2) top-left corners (x, y).

        A mask pixel counts when the square covers any part of it. Squares entirely outside the mask
        get 0.
        """
        height, width = self.mask.shape
        integral = self._integral
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        x0 = np.clip(np.floor(coords[:, 0] / self.downsample), 0, width).astype(np.int64)
        y0 = np.clip(np.floor(coords[:, 1] / self.downsample), 0, height).astype(np.int64)
        x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / self.downsample), 0, width).astype(np.int64)
        y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / self.downsample), 0, height).astype(np.int64)

        tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = (x1 - x0) * (y1 - y0)
        result = np.zeros(len(coords), dtype=np.float64)
        np.divide(tissue, area, out=result, where=area > 0)
        return result


def detect_tissue(slide: Slide, *, mask_mpp: float = 8.0, min_area_um2: float = 20_000.0) -> TissueMask:
    """Detect tissue on a thumbnail of about ``mask_mpp`` µm/px and return its mask.

    Components smaller than ``min_area_um2`` (µm²) are dropped. Raises :class:`SlideError` naming the
    slide when no tissue is found.
    """
    if not mask_mpp > 0:
        raise ConfigError(f"mask_mpp={mask_mpp} must be a positive resolution in µm/px, for example 8.0.", value=mask_mpp)
    if not min_area_um2 >= 0:
        raise ConfigError(f"min_area_um2={min_area_um2} must be zero or a positive area in µm².", value=min_area_um2)

    info = slide.info
    longer_side = max(info.level0_width, info.level0_height)
    downsample = max(1.0, min(mask_mpp / info.mpp, longer_side / MIN_MASK_SIDE))
    thumbnail = slide.thumbnail(max(1, round(longer_side / downsample)))
    downsample = info.level0_width / thumbnail.shape[1]
    pixel_um = info.mpp * downsample

    mask = _threshold_tissue(thumbnail)
    mask = _smooth(mask, radius=max(1.0, SMOOTHING_RADIUS_UM / pixel_um))
    mask = ndimage.binary_fill_holes(mask)
    slide_area_um2 = info.level0_width * info.level0_height * info.mpp**2
    min_area_px = min(min_area_um2, MAX_MIN_AREA_FRACTION * slide_area_um2) / pixel_um**2
    mask = _drop_small_components(mask, min_area_px)

    tissue_fraction = float(mask.mean())
    logger.debug(
        "slide %s: tissue mask %dx%d px at %.2f µm/px, %.1f %% tissue",
        info.slide_id, mask.shape[1], mask.shape[0], pixel_um, 100 * tissue_fraction,
    )
    if not mask.any():
        raise SlideError(
            f"slide {info.path}: no tissue found on a {mask.shape[1]}x{mask.shape[0]} px thumbnail at "
            f"{pixel_um:.1f} µm/px. Check that the slide is a brightfield (H&E or IHC) scan with tissue on it, "
            f"and that its resolution ({info.mpp:.4f} µm/px from {info.mpp_source}) is right. A smaller "
            "min_area_um2 keeps smaller tissue fragments.",
            value=info.slide_id,
        )
    return TissueMask(mask=mask, downsample=downsample)


def otsu_threshold(values: np.ndarray) -> int:
    """Return the Otsu threshold of uint8 values: the level that maximises the between-class variance."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    probabilities = histogram / histogram.sum()
    weight_below = np.cumsum(probabilities)
    mean_below = np.cumsum(probabilities * np.arange(256))
    total_mean = mean_below[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between_variance = (total_mean * weight_below - mean_below) ** 2 / (weight_below * (1.0 - weight_below))
    between_variance = np.nan_to_num(between_variance, nan=0.0, posinf=0.0)
    # Class "below" contains values <= level, so the threshold for "tissue" is the next level up.
    return int(np.argmax(between_variance)) + 1


def _threshold_tissue(thumbnail: np.ndarray) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(thumbnail, mode="RGB").convert("HSV"))
    saturation, brightness = hsv[..., 1], hsv[..., 2]
    threshold = int(np.clip(otsu_threshold(saturation), MIN_SATURATION_THRESHOLD, MAX_SATURATION_THRESHOLD))
    return (saturation >= threshold) & (brightness <= MAX_BRIGHTNESS) & (brightness >= MIN_BRIGHTNESS)


def _smooth(mask: np.ndarray, *, radius: float) -> np.ndarray:
    """Close small gaps, then open to remove specks, with a disc of ``radius`` mask pixels.

    Dilation and erosion are thresholds on Euclidean distance transforms, whose cost does not grow
    with the radius. The distance transform ignores the area outside the image, so erosion treats it
    as tissue and keeps tissue that touches the image edge.
    """
    if not mask.any() or mask.all():
        return mask
    closed = _erode(_dilate(mask, radius), radius)
    if not closed.any():
        return closed
    return _dilate(_erode(closed, radius), radius)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    if mask.all() or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    if mask.all():
        return mask
    return ndimage.distance_transform_edt(mask) > radius


def _drop_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area_px
    keep[0] = False  # label 0 is the background
    return keep[labels]
