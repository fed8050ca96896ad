"""Open whole-slide images with openslide and read RGB regions in level-0 coordinates.

The resolution (µm per pixel) comes from the user's override when one is given, else from
``openslide.mpp-x``, else from the TIFF resolution tags. A slide without a plausible resolution raises
:class:`SlideError` instead of being tiled at a guessed scale. Associated images (label, macro) are
never read, because they can show patient identifiers.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from shared.errors import ConfigError, SlideError

logger = logging.getLogger(__name__)

# Plausible resolutions of a brightfield scan. Outside this range the metadata is wrong, for example in
# a TIFF whose resolution tags state 10 pixels per centimeter (1000 µm/px).
MIN_MPP = 0.05
MAX_MPP = 20.0

# TRIDENT's objective-power buckets: a slide whose mpp is below the bound gets that magnification.
MAGNIFICATION_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))

# A pyramid level counts as "at or above the target resolution" when its downsample exceeds the
# requested one by at most this factor, so Aperio's 2.0005 downsample serves a request for 2.0.
LEVEL_DOWNSAMPLE_TOLERANCE = 1.005

# Thumbnails are assembled from blocks of this many output pixels a side, so memory stays bounded
# on slides whose coarsest pyramid level is still large.
THUMBNAIL_BLOCK = 1024

SLIDE_ID_CHUNK = 1 << 20  # bytes hashed from each end of the file
RESOLUTION_UNIT_TO_UM = {"centimeter": 10_000.0, "inch": 25_400.0}
OPENSLIDE_FORMATS = (
    "Aperio (.svs, .tif), DICOM (.dcm), Hamamatsu (.ndpi, .vms, .vmu), Leica (.scn), MIRAX (.mrxs), "
    "Philips (.tiff), Sakura (.svslide), Trestle (.tif), Ventana (.bif, .tif) and generic tiled TIFF (.tif)"
)  # the formats that openslide 4.0.0 lists in its README
MPP_OVERRIDE_HINT = "mpp=<µm per pixel> in Python or --mpp <µm per pixel> on the command line"


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of an opened slide. ``slide_id`` is pseudonymous, so it is safe to send to a remote teacher."""

    path: Path
    name: str
    slide_id: str
    mpp: float
    mpp_source: str
    level0_width: int
    level0_height: int
    level0_magnification: int
    level_count: int
    level_downsamples: tuple[float, ...]
    vendor: str | None


def magnification_for_mpp(mpp: float) -> int:
    """Return the objective power TRIDENT assigns to a resolution in µm/px (0.5 -> 20, 0.25 -> 40).

    TRIDENT itself rejects resolutions of 2.4 µm/px and coarser. Here they get ``round(10 / mpp)``,
    at least 1, which continues the usual rule that 10x is about 1 µm/px.
    """
    for upper_bound, magnification in MAGNIFICATION_BUCKETS:
        if mpp < upper_bound:
            return magnification
    return max(1, round(10.0 / mpp))


def compute_slide_id(path: Path) -> str:
    """Return a pseudonymous id: the first 16 hex digits of sha256 over the file size and its first and last MiB.

    The id depends on the file's bytes only, never on its name, so renaming a slide keeps its id and
    the id reveals nothing that a file name might.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    digest.update(f"{size}\0".encode("ascii"))
    with path.open("rb") as file:
        digest.update(file.read(SLIDE_ID_CHUNK))
        file.seek(max(0, size - SLIDE_ID_CHUNK))
        digest.update(file.read(SLIDE_ID_CHUNK))
    return digest.hexdigest()[:16]


class Slide:
    """An open slide: an ``openslide.OpenSlide`` handle and its :class:`SlideInfo`.

    Use it as a context manager or call :meth:`close`. Build it with :func:`open_slide`.
    """

    def __init__(self, handle: openslide.OpenSlide, info: SlideInfo) -> None:
        self._handle: openslide.OpenSlide | None = handle
        self.info = info

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else "open"
        return f"Slide(slide_id={self.info.slide_id!r}, mpp={self.info.mpp:.4f}, {state})"

    def close(self) -> None:
        """Close the openslide handle. Later reads raise :class:`SlideError`."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the pyramid level with the largest downsample that is at most ``downsample``.

        That level is the coarsest one still at or above the requested resolution, so the region is
        only ever shrunk afterwards. A level within 0.5 % above the request also counts. Requests
        finer than level 0 get level 0.
        """
        best_level = 0
        for level, level_downsample in enumerate(self.info.level_downsamples):
            if level_downsample <= downsample * LEVEL_DOWNSAMPLE_TOLERANCE:
                best_level = level
        return best_level

    def read_region_level0(self, x: int, y: int, size_level0: int, out_size: int) -> np.ndarray:
        """Read the level-0 square at (x, y) with side ``size_level0`` as an (out_size, out_size, 3) uint8 RGB array.

        The square is read from :meth:`best_level_for_downsample` of ``size_level0 / out_size`` and
        resized with Lanczos filtering. Pixels outside the scanned area are white.
        """
        if size_level0 <= 0 or out_size <= 0:
            raise ConfigError(
                f"slide {self.info.slide_id}: region size_level0={size_level0} and out_size={out_size} "
                "must both be positive pixel counts.",
                value=[size_level0, out_size],
            )
        level = self.best_level_for_downsample(size_level0 / out_size)
        image = self._read_rect_level0(x, y, size_level0, size_level0, level, (out_size, out_size))
        return np.asarray(image, dtype=np.uint8)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """Return the whole slide as an (H, W, 3) uint8 RGB array whose longer side is ``max_side`` pixels.

        The aspect ratio is kept, so the other side is rounded. A slide smaller than ``max_side`` is
        returned at level 0 without upscaling.
        """
        if max_side <= 0:
            raise ConfigError(
                f"slide {self.info.slide_id}: thumbnail max_side={max_side} must be a positive pixel count.",
                value=max_side,
            )
        width, height = self.info.level0_width, self.info.level0_height
        downsample = max(1.0, max(width, height) / max_side)
        out_width = max(1, round(width / downsample))
        out_height = max(1, round(height / downsample))
        level = self.best_level_for_downsample(downsample)

        canvas = np.empty((out_height, out_width, 3), dtype=np.uint8)
        for top in range(0, out_height, THUMBNAIL_BLOCK):
            for left in range(0, out_width, THUMBNAIL_BLOCK):
                block_width = min(THUMBNAIL_BLOCK, out_width - left)
                block_height = min(THUMBNAIL_BLOCK, out_height - top)
                block = self._read_rect_level0(
                    round(left * downsample),
                    round(top * downsample),
                    block_width * downsample,
                    block_height * downsample,
                    level,
                    (block_width, block_height),
                )
                canvas[top : top + block_height, left : left + block_width] = np.asarray(block)
        return canvas

    def _read_rect_level0(
        self, x: int, y: int, width_level0: float, height_level0: float, level: int, out_size: tuple[int, int]
    ) -> Image.Image:
        """Read a level-0 rectangle from ``level``, composite it on white and resize it to ``out_size``."""
        handle = self._require_open()
        level_downsample = self.info.level_downsamples[level]
        level_size = (
            max(1, round(width_level0 / level_downsample)),
            max(1, round(height_level0 / level_downsample)),
        )
        try:
            region = handle.read_region((int(x), int(y)), level, level_size)
        except openslide.OpenSlideError as error:
            raise SlideError(
                f"slide {self.info.path}: openslide failed to read {level_size[0]}x{level_size[1]} px at "
                f"level {level} from level-0 ({x}, {y}): {error}. The file may be truncated or damaged, "
                "so check that it opens in another viewer or copy it again.",
            ) from error

        rgb = _composite_on_white(region)
        if rgb.size != out_size:
            rgb = rgb.resize(out_size, Image.Resampling.LANCZOS)
        return rgb

    def _require_open(self) -> openslide.OpenSlide:
        if self._handle is None:
            raise SlideError(
                f"slide {self.info.slide_id} is closed. Read regions inside the `with open_slide(...)` "
                "block, or open the slide again."
            )
        return self._handle


def _composite_on_white(region: Image.Image) -> Image.Image:
    """Composite openslide's RGBA region on white and return it as RGB.

    openslide-python returns straight (not premultiplied) alpha, and alpha 0 marks pixels outside
    the scanned area.
    """
    rgba = np.asarray(region, dtype=np.uint8)
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = alpha.astype(np.uint16)
    composited = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(composited.astype(np.uint8), mode="RGB")


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide with openslide and resolve its resolution.

    ``mpp`` (µm per level-0 pixel) overrides the metadata, because it is the user's fix for a slide
    whose metadata is missing or wrong.

    Raises :class:`SlideError` when the file is missing, cannot be read by openslide, or has no
    plausible resolution and no override. Raises :class:`ConfigError` for an implausible override.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"slide not found: {path}. Check the path and that the file is readable.", value=str(path))
    if not path.is_file():
        raise SlideError(f"slide {path} is not a file. Pass the path of the slide file itself.", value=str(path))

    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as error:
        raise SlideError(
            f"slide {path} is not a slide openslide can read. openslide {openslide.__library_version__} "
            f"reads {OPENSLIDE_FORMATS}. Convert the file to a pyramidal TIFF or pass a supported slide.",
            value=str(path),
        ) from error
    except (openslide.OpenSlideError, OSError) as error:
        raise SlideError(
            f"slide {path}: openslide failed to open it ({error}). The file may be truncated or damaged, "
            "so check that it opens in another viewer or copy it again.",
            value=str(path),
        ) from error

    try:
        info = _build_info(path, handle, mpp)
    except BaseException:
        handle.close()
        raise
    logger.debug(
        "opened slide %s: %dx%d px, %d levels, %.4f µm/px from %s",
        info.slide_id, info.level0_width, info.level0_height, info.level_count, info.mpp, info.mpp_source,
    )
    return Slide(handle, info)


def _build_info(path: Path, handle: openslide.OpenSlide, mpp_override: float | None) -> SlideInfo:
    slide_id = compute_slide_id(path)
    mpp, mpp_source = resolve_mpp(dict(handle.properties), path=path, override=mpp_override)
    if mpp_source == "override":
        logger.info("slide %s: using the mpp override %.4f µm/px", slide_id, mpp)
    width, height = handle.dimensions
    return SlideInfo(
        path=path,
        name=path.stem,
        slide_id=slide_id,
        mpp=mpp,
        mpp_source=mpp_source,
        level0_width=int(width),
        level0_height=int(height),
        level0_magnification=magnification_for_mpp(mpp),
        level_count=int(handle.level_count),
        level_downsamples=tuple(float(downsample) for downsample in handle.level_downsamples),
        vendor=handle.properties.get(openslide.PROPERTY_NAME_VENDOR),
    )


def resolve_mpp(properties: dict[str, str], *, path: Path, override: float | None = None) -> tuple[float, str]:
    """Return the slide's resolution in µm/px and its source: ``"override"``, ``"metadata"`` or ``"tiff-resolution"``.

    ``properties`` are openslide's slide properties. ``path`` only names the slide in errors.
    """
    if override is not None:
        if not (math.isfinite(override) and MIN_MPP <= override <= MAX_MPP):
            raise ConfigError(
                f"slide {path}: the mpp override {override} µm/px is outside the plausible range "
                f"{MIN_MPP}-{MAX_MPP} µm/px. Pass the scan's resolution, for example 0.25 for 40x or 0.5 for 20x.",
                value=override,
                limit=[MIN_MPP, MAX_MPP],
            )
        return float(override), "override"

    found = _mpp_from_openslide(properties) or _mpp_from_tiff_resolution(properties)
    if found is None:
        raise SlideError(
            f"slide {path} has no resolution in its metadata (no openslide.mpp-x and no tiff.XResolution "
            f"with a centimeter or inch unit). Pass the scan's resolution with {MPP_OVERRIDE_HINT}, "
            "for example 0.25 for a 40x scan or 0.5 for 20x.",
            value=None,
        )

    value, key, source = found
    if not (MIN_MPP <= value <= MAX_MPP):
        raise SlideError(
            f"slide {path} reports a resolution of {value:g} µm/px in {key}, outside the plausible range "
            f"{MIN_MPP}-{MAX_MPP} µm/px, so its metadata is wrong. Pass the scan's true resolution with "
            f"{MPP_OVERRIDE_HINT}.",
            value=value,
            limit=[MIN_MPP, MAX_MPP],
        )
    return value, source


def _parse_positive_float(properties: dict[str, str], key: str) -> float | None:
    text = properties.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        logger.warning("ignoring slide property %s=%r: not a number", key, text)
        return None
    if not math.isfinite(value) or value <= 0:
        logger.warning("ignoring slide property %s=%r: not a positive number", key, text)
        return None
    return value


def _mpp_from_openslide(properties: dict[str, str]) -> tuple[float, str, str] | None:
    mpp_x = _parse_positive_float(properties, openslide.PROPERTY_NAME_MPP_X)
    if mpp_x is None:
        return None
    mpp_y = _parse_positive_float(properties, openslide.PROPERTY_NAME_MPP_Y)
    if mpp_y is not None and abs(mpp_y - mpp_x) > 0.05 * mpp_x:
        # NOTE: patches are square in level-0 pixels, so non-square pixels make them rectangles in µm.
        logger.warning("pixels are not square (mpp-x %.4f, mpp-y %.4f µm), so mpp-x is used", mpp_x, mpp_y)
    return mpp_x, openslide.PROPERTY_NAME_MPP_X, "metadata"


def _mpp_from_tiff_resolution(properties: dict[str, str]) -> tuple[float, str, str] | None:
    resolution = _parse_positive_float(properties, "tiff.XResolution")
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    if resolution is None or unit not in RESOLUTION_UNIT_TO_UM:
        return None
    return RESOLUTION_UNIT_TO_UM[unit] / resolution, "tiff.XResolution", "tiff-resolution"

