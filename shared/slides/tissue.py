"""Classical tissue detection on a low-resolution thumbnail, with no learned weights.

The thumbnail is first classified as brightfield (bright glass, stained tissue absorbs light) or
fluorescence (dark background, tissue emits light), because the two need opposite thresholds
(see :func:`classify_illumination`):

- brightfield: a pixel is foreground when its HSV saturation reaches an Otsu threshold and it is
  not near-white glass, or when it is very dark. A grey slide has no saturation, so its foreground
  is the pixels whose optical density is well above that of its glass. Pen marks, dark marks and
  folds are then removed (see :mod:`shared.slides.quality`).
- fluorescence, only when the caller opts in: a pixel is tissue when its smoothed brightest channel
  is above an Otsu threshold on a log scale, which separates the tissue's faint autofluorescence
  from the dark background, and at least a few grey levels above that background, so the grid never
  covers the background and a blank slide has no tissue.

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
from shared.slides.reader import Slide, SlideInfo

logger = logging.getLogger(__name__)

ILLUMINATIONS = ("brightfield", "fluorescence")

# The mask's longer side has at least this many pixels, so small slides and crops still get a
# usable mask when `mask_mpp` would make it tiny.
MIN_MASK_SIDE = 512

# Glass seen in transmitted light is bright in all three channels. A pixel whose R, G and B are all
# at least GLASS_MIN_VALUE is glass, and a thumbnail with at least MIN_GLASS_SHARE of such pixels is
# brightfield. The real H&E slides with glass have 40-66 % of it (CMU-1, TCGA). The real DAPI scan
# has none, because fluorescent light is one or two channels and its background is dark.
GLASS_MIN_VALUE = 200
MIN_GLASS_SHARE = 0.05

# Without that much glass, a thumbnail is a fluorescence scan when any of these holds:
# - its median HSV value (the brightest of R, G and B, 0-255) is below FLUORESCENCE_MAX_MEDIAN_VALUE:
#   most of it is dark. The real DAPI scan has a median of 14, the real H&E crop without glass 182.
# - the median HSV saturation of its pixels brighter than DARK_MAX_VALUE is at least
#   EMISSION_MIN_SATURATION: that light is the pure colour of one or two emission channels. It is
#   254 on the real DAPI scan, and 95-111 on the tissue of the real H&E slides.
# - it is grey (no colour to judge by, see GREY_MAX_COLOURED_SHARE) and at least
#   FLUORESCENCE_MIN_DARK_SHARE of it is darker than DARK_MAX_VALUE: a dark background.
FLUORESCENCE_MAX_MEDIAN_VALUE = 60
EMISSION_MIN_SATURATION = 200
FLUORESCENCE_MIN_DARK_SHARE = 0.1

# A thumbnail is grey when fewer than this share of its pixels brighter than DARK_MAX_VALUE reach a
# saturation of MIN_SATURATION_THRESHOLD: a slide scanned or stored in grey, or an RGB image with
# equal channels. Dark pixels are left out, because noise of a grey level or two gives them a high
# saturation. On the real H&E thumbnails 35 % (CMU-1), 62 % (TCGA) and 100 % (BRACS) are coloured.
GREY_MAX_COLOURED_SHARE = 0.01

# Bounds on the Otsu saturation threshold (0-255). On the H&E scans this was tuned on, glass has a
# saturation of about 0-10 and pale stroma about 30-60. On a thumbnail that is almost all tissue,
# Otsu splits eosin from haematoxylin instead of glass from tissue, so the threshold is capped. The
# floor keeps glass noise out when a slide is almost empty.
MIN_SATURATION_THRESHOLD = 20
MAX_SATURATION_THRESHOLD = 40
MAX_BRIGHTNESS = 240  # HSV value above which a pixel counts as glass

# On a grey brightfield slide, the glass's optical density (log10 of 256 over the grey level plus 1)
# is that of its brightest pixels, the GREY_GLASS_PERCENTILE-th percentile of density. Tissue is
# at least an Otsu threshold above it, held between MIN_DENSITY_CONTRAST and MAX_DENSITY_CONTRAST,
# for the same reasons as the saturation bounds. On glass at 240, these are grey levels 219 and 191.
# On the real H&E slides converted to grey, the mask matches the colour one to an intersection over
# union of 0.98 (TCGA) to 1.0 (CMU-1, BRACS).
GREY_GLASS_PERCENTILE = 95.0
MIN_DENSITY_CONTRAST = 0.04
MAX_DENSITY_CONTRAST = 0.10

SMOOTHING_RADIUS_UM = 16.0  # radius of the closing and opening, in µm
# Standard deviation of the Gaussian applied to a fluorescence thumbnail before thresholding, in µm.
# It spreads each nucleus's light over the tissue between nuclei (nuclei are 5-10 µm across).
FLUORESCENCE_SMOOTHING_UM = 20.0
# The background of a fluorescence thumbnail is the FLUORESCENCE_BACKGROUND_PERCENTILE-th percentile
# of its smoothed brightest channel: its darkest pixels. Tissue must be at least
# FLUORESCENCE_MIN_CONTRAST grey levels (0-255) above it, so that Otsu on a blank slide does not
# split noise from noise. On the real DAPI scan the background is 2-4 and tissue 8 or more, and the
# Otsu threshold (17) is above this floor (6).
FLUORESCENCE_BACKGROUND_PERCENTILE = 1.0
FLUORESCENCE_MIN_CONTRAST = 4.0

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


@dataclass(frozen=True)
class IlluminationCheck:
    """The brightfield-or-fluorescence decision on a thumbnail, and the statistics it rests on.

    Shares are fractions (0-1) of the thumbnail's pixels. ``evidence`` is a clause for logs and errors,
    and ``value`` and ``limit`` are the statistic that decided and its threshold.
    """

    illumination: str
    grey: bool
    median_value: float  # median HSV value (brightest of R, G and B), 0-255
    glass_share: float  # share of pixels with R, G and B all at least GLASS_MIN_VALUE
    dark_share: float  # share of pixels whose HSV value is below DARK_MAX_VALUE
    median_lit_saturation: float  # median HSV saturation of the other pixels, 0 when there are none
    coloured_share: float  # share of the other pixels with a saturation of at least MIN_SATURATION_THRESHOLD
    evidence: str
    value: float
    limit: float


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
    cuts pen marks, dark marks and folds out of a brightfield mask. A grey brightfield slide is
    detected by optical density instead of saturation, and that choice is logged at INFO level. A
    fluorescence slide (see :func:`classify_illumination`) raises :class:`SlideError` (reason
    ``not_brightfield``) unless ``allow_fluorescence`` is true. A slide without tissue, blank
    fluorescence slides included, raises :class:`SlideError` (reason ``no_tissue``).
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
    kept_area_um2 = min(min_area_um2, MAX_MIN_AREA_FRACTION * slide_area_um2)
    min_area_px = kept_area_um2 / pixel_um**2
    artefact_min_area_px = min(ARTEFACT_MIN_AREA_UM2, MAX_MIN_AREA_FRACTION * slide_area_um2) / pixel_um**2

    check = classify_illumination(thumbnail)
    illumination = check.illumination
    if illumination == "fluorescence" and not allow_fluorescence:
        raise SlideError(
            f"slide {info.path} looks like a fluorescence (dark-field) scan, not brightfield: {check.evidence}. "
            "Pass allow_fluorescence=True (--allow-fluorescence on the command line) to detect its tissue as "
            "signal above the dark background.",
            reason="not_brightfield",
            value=check.value,
            limit=check.limit,
        )

    artefacts = np.zeros(thumbnail.shape[:2], dtype=bool)
    if illumination == "fluorescence":
        logger.info(
            "slide %s: fluorescence scan (%s), detecting signal above the dark background",
            info.slide_id, check.evidence,
        )
        foreground, signal_levels = fluorescence_foreground(thumbnail, pixel_um)
    else:
        if check.grey:
            logger.info(
                "slide %s: grey brightfield slide (%.2f %% of its pixels have colour), detecting tissue by optical "
                "density above the glass and looking for dark marks only, because pen marks and folds are found "
                "by their colour",
                info.slide_id, 100 * check.coloured_share,
            )
        foreground = brightfield_foreground(thumbnail, grey=check.grey)
        signal_levels = None
        if remove_artefacts:
            found = find_artefacts(
                thumbnail, foreground, pixel_um=pixel_um, min_area_px=artefact_min_area_px, colour=not check.grey
            )
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
        raise _no_tissue_error(
            info, mask, pixel_um=pixel_um, check=check, artefacts=artefacts, min_area_um2=min_area_um2,
            kept_area_um2=kept_area_um2, signal_levels=signal_levels,
        )
    return TissueMask(
        mask=mask, downsample=downsample, thumbnail=thumbnail, artefacts=artefacts, illumination=illumination
    )


def _no_tissue_error(
    info: SlideInfo,
    mask: np.ndarray,
    *,
    pixel_um: float,
    check: IlluminationCheck,
    artefacts: np.ndarray,
    min_area_um2: float,
    kept_area_um2: float,
    signal_levels: tuple[float, float] | None,
) -> SlideError:
    """Build the ``no_tissue`` error, with the evidence and the options that keep more for the slide's kind.

    ``kept_area_um2`` is the smallest region kept: ``min_area_um2`` capped at a share of the slide.
    """
    size = f"{mask.shape[1]}x{mask.shape[0]} px"
    if signal_levels is not None:
        background, threshold = signal_levels
        message = (
            f"slide {info.path}: no tissue found on a {size} fluorescence thumbnail at {pixel_um:.1f} µm/px. No "
            f"region of at least {kept_area_um2:g} µm² has a smoothed signal above {threshold:.1f} of 255, which is "
            f"at least {FLUORESCENCE_MIN_CONTRAST:g} grey levels above the dark background at {background:.1f}. "
            f"Check that the slide has tissue on it. A smaller min_area_um2 (now {min_area_um2:g} µm², "
            "--min-area-um2) keeps smaller regions."
        )
    else:
        kind = "grey brightfield" if check.grey else "brightfield"
        message = (
            f"slide {info.path}: no tissue found on a {size} {kind} thumbnail at {pixel_um:.1f} µm/px "
            f"({check.evidence}, and {100 * artefacts.mean():.1f} % was removed as artefacts). Check that the slide "
            f"has tissue on it and that its resolution ({info.mpp:.4f} µm/px from {info.mpp_source}) is right. A "
            f"smaller min_area_um2 (now {min_area_um2:g} µm², --min-area-um2) keeps smaller fragments, and "
            "remove_artefacts=False (--keep-artefacts) keeps regions removed as artefacts."
        )
    return SlideError(message, reason="no_tissue", value=info.slide_id)


def classify_illumination(thumbnail: np.ndarray) -> IlluminationCheck:
    """Decide whether an RGB thumbnail is a brightfield or a fluorescence scan, by the rules beside the constants.

    Bright glass means brightfield. Without it, a dark majority, light of one or two pure colours, or
    a dark background on a grey slide means fluorescence. Anything else, such as an H&E crop with no
    glass, is brightfield.
    """
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1], hsv[..., 2]
    lit = value >= DARK_MAX_VALUE
    lit_saturation = saturation[lit]

    median_value = float(np.median(value))
    glass_share = float(np.mean(thumbnail.min(axis=2) >= GLASS_MIN_VALUE))
    dark_share = 1.0 - float(lit.mean())
    median_lit_saturation = float(np.median(lit_saturation)) if lit_saturation.size else 0.0
    coloured_share = float(np.mean(lit_saturation >= MIN_SATURATION_THRESHOLD)) if lit_saturation.size else 0.0
    grey = coloured_share < GREY_MAX_COLOURED_SHARE
    glass = f"{100 * glass_share:.1f} % of it is bright glass"

    def decide(illumination: str, evidence: str, value: float, limit: float) -> IlluminationCheck:
        return IlluminationCheck(
            illumination=illumination,
            grey=grey,
            median_value=median_value,
            glass_share=glass_share,
            dark_share=dark_share,
            median_lit_saturation=median_lit_saturation,
            coloured_share=coloured_share,
            evidence=evidence,
            value=value,
            limit=limit,
        )

    if glass_share >= MIN_GLASS_SHARE:
        return decide("brightfield", glass, glass_share, MIN_GLASS_SHARE)
    no_glass = f"{glass}, where a brightfield slide on glass has at least {100 * MIN_GLASS_SHARE:g} %"
    if median_value < FLUORESCENCE_MAX_MEDIAN_VALUE:
        evidence = (
            f"the median brightness of its thumbnail is {median_value:.0f} of 255, below "
            f"{FLUORESCENCE_MAX_MEDIAN_VALUE}, and {no_glass}"
        )
        return decide("fluorescence", evidence, median_value, FLUORESCENCE_MAX_MEDIAN_VALUE)
    if median_lit_saturation >= EMISSION_MIN_SATURATION:
        evidence = (
            f"the median saturation of its pixels brighter than {DARK_MAX_VALUE} is {median_lit_saturation:.0f} of "
            f"255, as pure a colour as emitted light (at least {EMISSION_MIN_SATURATION}), and {no_glass}"
        )
        return decide("fluorescence", evidence, median_lit_saturation, EMISSION_MIN_SATURATION)
    if grey and dark_share >= FLUORESCENCE_MIN_DARK_SHARE:
        evidence = (
            f"it is grey and {100 * dark_share:.0f} % of it is a dark background below {DARK_MAX_VALUE}, at least "
            f"{100 * FLUORESCENCE_MIN_DARK_SHARE:g} %, and {no_glass}"
        )
        return decide("fluorescence", evidence, dark_share, FLUORESCENCE_MIN_DARK_SHARE)
    evidence = (
        f"{glass}, its median brightness is {median_value:.0f} and the median saturation of its pixels brighter "
        f"than {DARK_MAX_VALUE} is {median_lit_saturation:.0f}, below the {EMISSION_MIN_SATURATION} of emitted light"
    )
    return decide("brightfield", evidence, median_lit_saturation, EMISSION_MIN_SATURATION)


def _read_mask_thumbnail(slide: Slide, mask_mpp: float) -> tuple[np.ndarray, float]:
    """Read the thumbnail for a mask of about ``mask_mpp`` µm/px and return it with its downsample."""
    info = slide.info
    longer_side = max(info.level0_width, info.level0_height)
    downsample = max(1.0, min(mask_mpp / info.mpp, longer_side / MIN_MASK_SIDE))
    thumbnail = slide.thumbnail(max(1, round(longer_side / downsample)))
    return thumbnail, info.level0_width / thumbnail.shape[1]


def brightfield_foreground(thumbnail: np.ndarray, *, grey: bool | None = None) -> np.ndarray:
    """Return the pixels of an RGB brightfield thumbnail that are not glass.

    Those are the pixels that are saturated and not near white, and those darker than
    :data:`~shared.slides.quality.DARK_MAX_VALUE` (ink, dirt), which :func:`find_artefacts` removes
    where they cover a sizeable area. A grey thumbnail has no saturation, so its foreground is the
    pixels whose optical density is well above that of its glass (see :func:`density_foreground`).
    ``grey`` is decided from the thumbnail when not given (see :data:`GREY_MAX_COLOURED_SHARE`).
    """
    if grey is None:
        grey = classify_illumination(thumbnail).grey
    if grey:
        return density_foreground(thumbnail)
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1], hsv[..., 2]
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # OpenCV's Otsu level is the last one of the lower class, so tissue starts one level above it.
    threshold = int(np.clip(otsu + 1, MIN_SATURATION_THRESHOLD, MAX_SATURATION_THRESHOLD))
    return ((saturation >= threshold) & (value <= MAX_BRIGHTNESS)) | (value < DARK_MAX_VALUE)


def density_foreground(thumbnail: np.ndarray) -> np.ndarray:
    """Return the pixels of a grey brightfield thumbnail that absorb clearly more light than its glass.

    The glass's optical density is the :data:`GREY_GLASS_PERCENTILE`-th percentile, and a pixel is
    foreground when its density exceeds that by an Otsu threshold held between
    :data:`MIN_DENSITY_CONTRAST` and :data:`MAX_DENSITY_CONTRAST`. Pixels darker than
    :data:`~shared.slides.quality.DARK_MAX_VALUE` are always foreground, as on a colour slide.
    """
    grey = thumbnail.astype(np.float32).mean(axis=2)
    density = -np.log10((grey + 1.0) / 256.0)  # 0 for white, about 2.4 for black
    glass_density = float(np.percentile(density, 100.0 - GREY_GLASS_PERCENTILE))
    # Otsu on densities in steps of 0.01, which is finer than the contrast bounds.
    levels = np.clip(np.round(density * 100.0), 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contrast = float(np.clip((otsu + 1) / 100.0 - glass_density, MIN_DENSITY_CONTRAST, MAX_DENSITY_CONTRAST))
    return (density >= glass_density + contrast) | (thumbnail.max(axis=2) < DARK_MAX_VALUE)


def fluorescence_foreground(thumbnail: np.ndarray, pixel_um: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Return the tissue pixels of a fluorescence thumbnail, and its background level and threshold (0-255).

    The brightest channel is smoothed over :data:`FLUORESCENCE_SMOOTHING_UM`. A pixel is tissue when
    that signal is above an Otsu threshold on log brightness and at least
    :data:`FLUORESCENCE_MIN_CONTRAST` grey levels above the background, the
    :data:`FLUORESCENCE_BACKGROUND_PERCENTILE`-th percentile of the signal. A log scale keeps the few
    saturated nuclei from pulling the threshold up, so faint tissue autofluorescence (a few grey levels
    above the background) still counts as tissue. The contrast floor leaves a blank slide without
    tissue, where Otsu alone would split its noise in two.
    """
    signal = thumbnail.max(axis=2).astype(np.float32)
    signal = cv2.GaussianBlur(signal, (0, 0), FLUORESCENCE_SMOOTHING_UM / pixel_um)
    log_scale = 255.0 / np.log(256.0)
    log_signal = np.log1p(signal) * log_scale
    otsu, _ = cv2.threshold(log_signal.astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    background = float(np.percentile(signal, FLUORESCENCE_BACKGROUND_PERCENTILE))
    threshold = max(float(np.expm1(otsu / log_scale)), background + FLUORESCENCE_MIN_CONTRAST)
    return signal > threshold, (background, threshold)


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
