"""Open whole-slide images and read RGB regions in level-0 coordinates.

The file is opened by the first of openslide, tiffslide and Pillow that recognises it
(:mod:`shared.slides.readers`). The resolution (µm per pixel) comes from the user's override, else
from the metadata, the TIFF resolution tags or the objective power (:mod:`shared.slides.resolution`).
A slide without a plausible resolution raises :class:`SlideError` instead of being tiled at a
guessed scale. Associated images (label, macro) are listed by name but read only by
:meth:`Slide.read_associated`, because they can show patient identifiers.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from shared.errors import ConfigError, SlideError
from shared.slides.readers import (
    DAMAGED_HINT,
    SlideHandle,
    composite_on_white,
    open_handle,
    read_rgb,
)
from shared.slides.resolution import MAX_MPP, MIN_MPP, MPP_OVERRIDE_HINT, resolve_mpp

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_MPP",
    "MIN_MPP",
    "MPP_OVERRIDE_HINT",
    "Slide",
    "SlideInfo",
    "compute_slide_id",
    "magnification_for_mpp",
    "open_slide",
    "resolve_mpp",
]

# TRIDENT's objective-power buckets: a slide whose mpp is below the bound gets that magnification.
MAGNIFICATION_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))

# A pyramid level counts as "at or above the target resolution" when its downsample exceeds the
# requested one by at most this factor, so Aperio's 2.0005 downsample serves a request for 2.0.
LEVEL_DOWNSAMPLE_TOLERANCE = 1.005

# Thumbnails are assembled from blocks of this many output pixels a side, so memory stays bounded
# on slides whose coarsest pyramid level is still large.
THUMBNAIL_BLOCK = 1024

SLIDE_ID_CHUNK = 1 << 20  # bytes hashed from each end of the file


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of an opened slide. ``slide_id`` is pseudonymous, so it is safe to send to a remote teacher.

    ``reader`` is "openslide", "tiffslide" or "pillow". ``associated_names`` lists the associated images
    (label, macro, thumbnail) by name only: none is read until :meth:`Slide.read_associated` is called.
    """

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
    reader: str = "openslide"
    associated_names: tuple[str, ...] = ()


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
    """An open slide: a reader's handle and its :class:`SlideInfo`.

    Use it as a context manager or call :meth:`close`. Build it with :func:`open_slide`.
    """

    def __init__(self, handle: SlideHandle, info: SlideInfo) -> None:
        self._handle: SlideHandle | None = handle
        self.info = info

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else "open"
        return f"Slide(slide_id={self.info.slide_id!r}, mpp={self.info.mpp:.4f}, reader={self.info.reader}, {state})"

    def close(self) -> None:
        """Close the reader's handle. Later reads raise :class:`SlideError`."""
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
            rgb = read_rgb(handle, (int(x), int(y)), level, level_size)
        except SlideError as error:
            raise SlideError(
                f"slide {self.info.path}: {error}. {DAMAGED_HINT}", reason="damaged", value=error.value
            ) from error.__cause__

        if rgb.size != out_size:
            rgb = rgb.resize(out_size, Image.Resampling.LANCZOS)
        return rgb

    def read_associated(self, name: str) -> np.ndarray:
        """Read the associated image ``name`` (see ``info.associated_names``) as an (H, W, 3) uint8 RGB array.

        Label and macro images can show patient identifiers, so each read is logged.
        """
        if name not in self.info.associated_names:
            raise ConfigError(
                f"slide {self.info.path} has no associated image {name!r}; it has {list(self.info.associated_names)}. "
                "Pass one of those names.",
                value=name,
                limit=list(self.info.associated_names),
            )
        handle = self._require_open()
        try:
            image = handle.associated_images[name]
            rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        except (openslide.OpenSlideError, OSError, ValueError, KeyError) as error:
            raise SlideError(
                f"slide {self.info.path}: reading the associated image {name!r} failed: {error}. {DAMAGED_HINT}",
                reason="damaged",
                value=name,
            ) from error
        logger.info("slide %s: read the associated image %r on request", self.info.slide_id, name)
        return np.asarray(composite_on_white(rgba))

    def _require_open(self) -> SlideHandle:
        if self._handle is None:
            raise SlideError(
                f"slide {self.info.slide_id} is closed. Read regions inside the `with open_slide(...)` "
                "block, or open the slide again."
            )
        return self._handle


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide with the first reader that recognises it and resolve its resolution.

    ``mpp`` (µm per level-0 pixel) overrides the metadata, because it is the user's fix for a slide
    whose metadata is missing or wrong.

    Raises :class:`SlideError` when the file is missing (reason ``not_found``), no reader recognises
    it (``unreadable``), it is truncated or corrupt (``damaged``), or it has no plausible resolution
    and no override (``no_resolution``, ``implausible_resolution``). Raises :class:`ConfigError` for an
    implausible override.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(
            f"slide not found: {path}. Check the path and that the file is readable.",
            reason="not_found",
            value=str(path),
        )
    if not path.is_file():
        raise SlideError(
            f"slide {path} is not a file. Pass the path of the slide file itself.",
            reason="not_found",
            value=str(path),
        )

    handle, reader = open_handle(path)
    try:
        info = _build_info(path, handle, reader, mpp)
    except BaseException:
        handle.close()
        raise
    logger.debug(
        "opened slide %s with %s: %dx%d px, %d levels, %.4f µm/px from %s",
        info.slide_id, reader, info.level0_width, info.level0_height, info.level_count, info.mpp, info.mpp_source,
    )
    return Slide(handle, info)


def _build_info(path: Path, handle: SlideHandle, reader: str, mpp_override: float | None) -> SlideInfo:
    slide_id = compute_slide_id(path)
    properties = dict(handle.properties)
    mpp, mpp_source = resolve_mpp(properties, path=path, override=mpp_override, reader=reader)
    if mpp_source == "override":
        logger.info("slide %s: using the mpp override %.4f µm/px", slide_id, mpp)
    width, height = handle.dimensions
    vendor = properties.get(openslide.PROPERTY_NAME_VENDOR) or properties.get("tiffslide.vendor")
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
        vendor=str(vendor) if vendor else None,
        reader=reader,
        # Iterating the mapping lists names only; indexing it would read the image.
        associated_names=tuple(handle.associated_images),
    )
