"""Classical tissue detection on a low-resolution thumbnail, with no learned weights.

The thumbnail is first classified as brightfield (bright glass, stained tissue absorbs light) or
fluorescence (dark background, tissue emits light), because the two need opposite thresholds:

- brightfield: a pixel is foreground when its HSV saturation reaches an Otsu threshold and it is
  not near-white glass, or when it is very dark. Pen marks, dark marks and folds are then removed
  (see :mod:`shared.slides.quality`).
- fluorescence, only when the caller opts in: a pixel is tissue when its smoothed brightest channel
  is above an Otsu threshold on a log scale, which separates the tissue's faint autofluorescence
  from the dark background, so the grid never covers that background.

Morphological closing and opening smooth the mask, small enclosed holes are filled by choice,
artefacts are cut out again, and connected regions smaller than a minimum area are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from scipy import ndimage

from shared.errors import ConfigError, SlideError
from shared.slides.quality import DARK_MAX_VALUE, find_artefacts, keep_large_components
from shared.slides.reader import Slide

logger = logging.getLogger(__name__)

ILLUMINATIONS = ("brightfield", "fluorescence")

# The mask's longer side has at least this many pixels, so small slides and crops still get a
# usable mask when `mask_mpp` would make it tiny.
MIN_MASK_SIDE = 512

# A thumbnail whose median HSV value (the brightest of R, G and B, 0-255) is below this is a
# fluorescence scan. Brightfield glass is above 200, and even the real H&E crop without any glass
# has a median of 182, while the real DAPI scan, mostly dark background, has a median of 14.
FLUORESCENCE_MAX_MEDIAN_VALUE = 60

# Bounds on the Otsu saturation threshold (0-255). On the H&E scans this was tuned on, glass has a
# saturation of about 0-10 and pale stroma about 30-60. On a thumbnail that is almost all tissue,
# Otsu splits eosin from haematoxylin instead of glass from tissue, so the threshold is capped. The
# floor keeps glass noise out when a slide is almost empty.
MIN_SATURATION_THRESHOLD = 20
MAX_SATURATION_THRESHOLD = 40
MAX_BRIGHTNESS = 240  # HSV value above which a pixel counts as glass

SMOOTHING_RADIUS_UM = 16.0  # radius of the closing and opening, in µm
# Standard deviation of the Gaussian applied to a fluorescence thumbnail before thresholding, in µm.
# It spreads each nucleus's light over the tissue between nuclei (nuclei are 5-10 µm across).
FLUORESCENCE_SMOOTHING_UM = 20.0

# A region smaller than `min_area_um2` (or than ARTEFACT_MIN_AREA_UM2, for an artefact) is dropped,
# but the threshold never exceeds this share of the slide's area, so a small crop (a region of
# interest exported from a larger slide) keeps its tissue.
MAX_MIN_AREA_FRACTION = 0.05
ARTEFACT_MIN_AREA_UM2 = 20_000.0  # about 140 x 140 µm; a marker stroke is 300-1,000 µm wide

# `fill_holes` fills holes up to this area: gland and vessel lumens, gaps in loose stroma. Larger
# holes (tears, cysts, glass inside a ring of tissue) stay holes, so patches over their glass are
# not kept. 0.05 mm² is a disc 250 µm across, about four 224 px patches at 0.5 µm/px.
MAX_FILLED_HOLE_UM2 = 50_000.0


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask of a slide at a reduced resolution, with the thumbnail it was computed on.

    ``downsample`` is level-0 pixels per mask pixel. ``thumbnail`` is the (H, W, 3) uint8 RGB image
    of the whole slide at that resolution, ``artefacts`` the (H, W) bool mask of pixels removed as
    pen marks, dark marks or folds, and ``illumination`` is "brightfield" or "fluorescence".
    ``thumbnail`` may be None for a mask built by hand, and ``artefacts`` then defaults to none.
    """

    mask: np.ndarray
    downsample: float
    thumbnail: np.ndarray | None = None
    artefacts: np.ndarray | None = None
    illumination: str = "brightfield"

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != bool:
            raise ConfigError(
                f"TissueMask.mask has shape {self.mask.shape} and dtype {self.mask.dtype}, expected a 2-D bool array.",
                value=list(self.mask.shape),
            )
        if self.thumbnail is not None and self.thumbnail.shape != (*self.mask.shape, 3):
            raise ConfigError(
                f"TissueMask.thumbnail has shape {self.thumbnail.shape}, expected {(*self.mask.shape, 3)} "
                "to match the mask.",
                value=list(self.thumbnail.shape),
            )
        if self.artefacts is None:
            object.__setattr__(self, "artefacts", np.zeros_like(self.mask))
        elif self.artefacts.shape != self.mask.shape:
            raise ConfigError(
                f"TissueMask.artefacts has shape {self.artefacts.shape}, expected {self.mask.shape} to match the mask.",
                value=list(self.artefacts.shape),
            )
        if self.illumination not in ILLUMINATIONS:
            raise ConfigError(
                f"TissueMask.illumination={self.illumination!r}, expected one of {ILLUMINATIONS}.",
                value=self.illumination,
            )

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


def detect_tissue(
    slide: Slide,
    *,
    mask_mpp: float = 8.0,
    min_area_um2: float = 20_000.0,
    fill_holes: bool = True,
    remove_artefacts: bool = True,
    allow_fluorescence: bool = False,
) -> TissueMask:
    """Detect tissue on a thumbnail of about ``mask_mpp`` µm/px and return its mask.

    Regions smaller than ``min_area_um2`` (µm²) are dropped. ``fill_holes`` fills holes enclosed by
    tissue up to :data:`MAX_FILLED_HOLE_UM2` (lumens, gaps in loose stroma). ``remove_artefacts``
    cuts pen marks, dark marks and folds out of a brightfield mask. A fluorescence slide raises
    :class:`SlideError` (reason ``not_brightfield``) unless ``allow_fluorescence`` is true. A slide
    without tissue raises :class:`SlideError` (reason ``no_tissue``).
    """
    if not mask_mpp > 0:
        raise ConfigError(
            f"mask_mpp={mask_mpp} must be a positive resolution in µm/px, for example 8.0.", value=mask_mpp
        )
    if not min_area_um2 >= 0:
        raise ConfigError(f"min_area_um2={min_area_um2} must be zero or a positive area in µm².", value=min_area_um2)

    info = slide.info
    thumbnail, downsample = _read_mask_thumbnail(slide, mask_mpp)
    pixel_um = info.mpp * downsample
    slide_area_um2 = info.level0_width * info.level0_height * info.mpp**2
    min_area_px = min(min_area_um2, MAX_MIN_AREA_FRACTION * slide_area_um2) / pixel_um**2
    artefact_min_area_px = min(ARTEFACT_MIN_AREA_UM2, MAX_MIN_AREA_FRACTION * slide_area_um2) / pixel_um**2

    illumination, median_value = classify_illumination(thumbnail)
    if illumination == "fluorescence" and not allow_fluorescence:
        raise SlideError(
            f"slide {info.path} looks like a fluorescence (dark-field) scan, not brightfield: the median "
            f"brightness of its thumbnail is {median_value:.0f} of 255, while a brightfield slide on bright glass "
            f"has at least {FLUORESCENCE_MAX_MEDIAN_VALUE}. Pass allow_fluorescence=True (--allow-fluorescence on "
            "the command line) to detect its tissue as signal above the dark background.",
            reason="not_brightfield",
            value=median_value,
            limit=FLUORESCENCE_MAX_MEDIAN_VALUE,
        )

    artefacts = np.zeros(thumbnail.shape[:2], dtype=bool)
    if illumination == "fluorescence":
        logger.info(
            "slide %s: fluorescence scan (median brightness %.0f), detecting signal above the dark background",
            info.slide_id, median_value,
        )
        foreground = _fluorescence_foreground(thumbnail, pixel_um)
    else:
        foreground = brightfield_foreground(thumbnail)
        if remove_artefacts:
            found = find_artefacts(thumbnail, foreground, pixel_um=pixel_um, min_area_px=artefact_min_area_px)
            artefacts = _dilate(found.combined(), SMOOTHING_RADIUS_UM / pixel_um) & foreground
            logger.debug(
                "slide %s: artefacts cover %.2f %% of the thumbnail (pen %d px, dark %d px, fold %d px)",
                info.slide_id, 100 * artefacts.mean(), found.pen.sum(), found.dark.sum(), found.fold.sum(),
            )

    mask = _smooth(foreground & ~artefacts, radius=max(1.0, SMOOTHING_RADIUS_UM / pixel_um))
    if fill_holes:
        mask = _fill_small_holes(mask, MAX_FILLED_HOLE_UM2 / pixel_um**2)
    mask = keep_large_components(mask & ~artefacts, min_area_px)

    logger.debug(
        "slide %s: %s tissue mask %dx%d px at %.2f µm/px, %.1f %% tissue",
        info.slide_id, illumination, mask.shape[1], mask.shape[0], pixel_um, 100 * mask.mean(),
    )
    if not mask.any():
        raise SlideError(
            f"slide {info.path}: no tissue found on a {mask.shape[1]}x{mask.shape[0]} px {illumination} thumbnail "
            f"at {pixel_um:.1f} µm/px ({100 * artefacts.mean():.1f} % removed as artefacts). Check that the slide "
            f"has tissue on it and that its resolution ({info.mpp:.4f} µm/px from {info.mpp_source}) is right. "
            f"A smaller min_area_um2 (now {min_area_um2:g} µm², --min-area-um2) keeps smaller fragments, and "
            "remove_artefacts=False (--keep-artefacts) keeps regions removed as artefacts.",
            reason="no_tissue",
            value=info.slide_id,
        )
    return TissueMask(
        mask=mask, downsample=downsample, thumbnail=thumbnail, artefacts=artefacts, illumination=illumination
    )


def classify_illumination(thumbnail: np.ndarray) -> tuple[str, float]:
    """Return "brightfield" or "fluorescence" for an RGB thumbnail, and the median HSV value it rests on."""
    median_value = float(np.median(thumbnail.max(axis=2)))
    if median_value < FLUORESCENCE_MAX_MEDIAN_VALUE:
        return "fluorescence", median_value
    return "brightfield", median_value


def _read_mask_thumbnail(slide: Slide, mask_mpp: float) -> tuple[np.ndarray, float]:
    """Read the thumbnail for a mask of about ``mask_mpp`` µm/px and return it with its downsample."""
    info = slide.info
    longer_side = max(info.level0_width, info.level0_height)
    downsample = max(1.0, min(mask_mpp / info.mpp, longer_side / MIN_MASK_SIDE))
    thumbnail = slide.thumbnail(max(1, round(longer_side / downsample)))
    return thumbnail, info.level0_width / thumbnail.shape[1]


def brightfield_foreground(thumbnail: np.ndarray) -> np.ndarray:
    """Return the pixels of an RGB brightfield thumbnail that are not glass.

    Those are the pixels that are saturated and not near white, and those darker than
    :data:`~shared.slides.quality.DARK_MAX_VALUE` (ink, dirt), which :func:`find_artefacts` removes
    where they cover a sizeable area.
    """
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1], hsv[..., 2]
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # OpenCV's Otsu level is the last one of the lower class, so tissue starts one level above it.
    threshold = int(np.clip(otsu + 1, MIN_SATURATION_THRESHOLD, MAX_SATURATION_THRESHOLD))
    return ((saturation >= threshold) & (value <= MAX_BRIGHTNESS)) | (value < DARK_MAX_VALUE)


def _fluorescence_foreground(thumbnail: np.ndarray, pixel_um: float) -> np.ndarray:
    """Return pixels whose smoothed brightest channel is above an Otsu threshold on log brightness.

    A log scale keeps the few saturated nuclei from pulling the threshold up, so faint tissue
    autofluorescence (a few grey levels above the background) still counts as tissue.
    """
    signal = thumbnail.max(axis=2).astype(np.float32)
    signal = cv2.GaussianBlur(signal, (0, 0), FLUORESCENCE_SMOOTHING_UM / pixel_um)
    log_signal = np.log1p(signal) * (255.0 / np.log(256.0))
    otsu, _ = cv2.threshold(log_signal.astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return log_signal > otsu


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Return ``mask`` with its enclosed holes of fewer than ``max_hole_px`` pixels filled."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    large_holes = keep_large_components(holes, max_hole_px)
    return mask | (holes & ~large_holes)


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
