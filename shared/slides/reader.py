"""Open whole-slide images and read RGB regions in level-0 coordinates.

The file is opened by the first of openslide, tiffslide and Pillow that recognises it
(:mod:`shared.slides.readers`). The resolution (µm per pixel) comes from the user's override, else
from the metadata, the TIFF resolution tags or the objective power (:mod:`shared.slides.resolution`).
A slide without a plausible resolution raises :class:`SlideError` instead of being tiled at a
guessed scale. Associated images (label, macro) are listed by name but read only by
:meth:`Slide.read_associated`, because they can show patient identifiers.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from shared.errors import ConfigError, SlideError
from shared.slides.readers import (
    CONVERT_HINT,
    DAMAGED_HINT,
    SlideHandle,
    composite_on_white,
    open_handle,
    read_rgb,
    reads_whole_rows,
    zero_denominator_resolution,
)
from shared.slides.resolution import MAX_MPP, MIN_MPP, MPP_OVERRIDE_HINT, resolve_mpp

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_MPP",
    "MIN_MPP",
    "MPP_OVERRIDE_HINT",
    "Slide",
    "SlideInfo",
    "check_slide_file",
    "compute_slide_id",
    "log_mpp_override",
    "magnification_for_mpp",
    "open_slide",
    "resolve_mpp",
]

# TRIDENT's objective-power buckets: a slide whose mpp is below the bound gets that magnification.
MAGNIFICATION_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))

# A pyramid level counts as "at or above the target resolution" when its downsample exceeds the
# requested one by at most this factor, so Aperio's 2.0005 downsample serves a request for 2.0.
LEVEL_DOWNSAMPLE_TOLERANCE = 1.005

# Limits that keep the memory of Slide.thumbnail bounded whatever size a slide declares.
# The thumbnail itself: 2**26 px is 192 MiB as RGB. Tissue detection at 8 µm/px requests about
# 6250 x 3125 px on a 200000 x 100000 px slide at 0.25 µm/px.
MAX_THUMBNAIL_PIXELS = 1 << 26
# The pyramid level a thumbnail is made from, all of which is decoded: 2**32 px is 65536 x 65536 px.
MAX_THUMBNAIL_SOURCE_PIXELS = 1 << 32
# The level pixels of one read while a thumbnail is assembled: 2**24 px is 64 MiB as openslide's RGBA.
THUMBNAIL_READ_PIXELS = 1 << 24
# The output pixels of one block a side, at most.
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
        returned at level 0 without upscaling. The thumbnail is assembled from reads of at most
        :data:`THUMBNAIL_READ_PIXELS` level pixels each. Raises :class:`SlideError` with reason
        ``invalid_slide`` when the thumbnail would have more than :data:`MAX_THUMBNAIL_PIXELS` pixels or
        its pyramid level more than :data:`MAX_THUMBNAIL_SOURCE_PIXELS`.
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
        self._check_thumbnail_size(level, out_width, out_height)
        block_width, block_height = self._thumbnail_block(level, downsample, out_width)

        canvas = np.empty((out_height, out_width, 3), dtype=np.uint8)
        for top in range(0, out_height, block_height):
            for left in range(0, out_width, block_width):
                width_out = min(block_width, out_width - left)
                height_out = min(block_height, out_height - top)
                block = self._read_rect_level0(
                    round(left * downsample),
                    round(top * downsample),
                    width_out * downsample,
                    height_out * downsample,
                    level,
                    (width_out, height_out),
                )
                canvas[top : top + height_out, left : left + width_out] = np.asarray(block)
        return canvas

    def _check_thumbnail_size(self, level: int, out_width: int, out_height: int) -> None:
        """Raise :class:`SlideError` when a thumbnail would need more memory or decoding than the limits allow."""
        info = self.info
        level_width, level_height = (int(side) for side in self._require_open().level_dimensions[level])
        declared = f"slide {info.path} declares {info.level0_width}x{info.level0_height} px at level 0"
        if level_width * level_height > MAX_THUMBNAIL_SOURCE_PIXELS:
            raise SlideError(
                f"{declared} in {info.level_count} pyramid level(s). A {out_width}x{out_height} px thumbnail is made "
                f"from level {level} ({level_width}x{level_height} px), which would decode "
                f"{level_width * level_height / 1e9:.1f} Gpx, more than the limit of "
                f"{MAX_THUMBNAIL_SOURCE_PIXELS / 1e9:.1f} Gpx. {CONVERT_HINT}",
                reason="too_large",
                value=[info.level0_width, info.level0_height],
                limit=MAX_THUMBNAIL_SOURCE_PIXELS,
            )
        if out_width * out_height > MAX_THUMBNAIL_PIXELS:
            raise SlideError(
                f"{declared}, so the requested thumbnail would be {out_width}x{out_height} px "
                f"({out_width * out_height} px), more than the limit of {MAX_THUMBNAIL_PIXELS} px. "
                "Check that the slide's size and resolution are right, or request a smaller thumbnail "
                "(for tissue detection, a larger mask_mpp).",
                reason="too_large",
                value=[out_width, out_height],
                limit=MAX_THUMBNAIL_PIXELS,
            )

    def _thumbnail_block(self, level: int, downsample: float, out_width: int) -> tuple[int, int]:
        """Return the (width, height) in thumbnail pixels of the blocks a thumbnail is read in.

        Each block covers at most :data:`THUMBNAIL_READ_PIXELS` pixels of ``level``. A level stored in
        strips is read in bands as wide as the slide, because a read decodes whole strips, so narrower
        blocks would decode each strip once per block.
        """
        level_per_out = downsample / self.info.level_downsamples[level]  # level pixels per thumbnail pixel
        if reads_whole_rows(self._require_open(), level):
            rows = math.floor(THUMBNAIL_READ_PIXELS / (out_width * level_per_out * level_per_out))
            if rows >= 1:
                return out_width, rows
        side = math.floor(math.sqrt(THUMBNAIL_READ_PIXELS) / level_per_out)
        side = max(1, min(THUMBNAIL_BLOCK, side))
        return side, side

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

    Raises :class:`SlideError` when the file is missing or cannot be read (reason ``not_found``, see
    :func:`check_slide_file`), no reader recognises it (``unreadable``), it is truncated or corrupt
    (``damaged``), its tiles or strips are too large to decode in bounded memory (``invalid_slide``), or
    it has no plausible resolution and no override (``no_resolution``, ``implausible_resolution``).
    Raises :class:`ConfigError` for an implausible override.
    """
    path = Path(path)
    check_slide_file(path)

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


def log_mpp_override(info: SlideInfo) -> None:
    """Log at INFO level that the slide's resolution comes from the caller's override, if it does.

    The tiling steps call this once per slide. :func:`open_slide` does not log it, because a slide is
    opened more than once per run (to tile it, then to read its tiles).
    """
    if info.mpp_source == "override":
        logger.info("slide %s: using the mpp override %.4f µm/px", info.slide_id, info.mpp)


# Kinds of file that are not regular files, named as `ls -l` and stat(2) name them.
SPECIAL_FILE_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def check_slide_file(path: str | Path) -> None:
    """Raise :class:`SlideError` with reason ``not_found`` unless ``path`` is a regular file this process can read.

    The message names what the path is instead: missing, a dangling symbolic link, a loop of symbolic
    links, a folder, a named pipe or another special file, or a file without read permission. A named
    pipe is never opened, because opening it would wait for a writer.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        if path.is_symlink():
            raise _path_error(
                path, f"is a symbolic link to {os.readlink(path)}, which does not exist. Fix or remove the link, "
                "or pass the slide file itself"
            ) from error
        raise SlideError(
            f"slide not found: {path}. Check the path and that the file is readable.",
            reason="not_found",
            value=str(path),
        ) from error
    except OSError as error:
        reason = "permission_denied" if error.errno == errno.EACCES else "not_found"
        raise _path_error(path, _stat_problem(error), reason=reason) from error

    if stat.S_ISDIR(mode):
        raise _path_error(path, "is a folder, not a file. Pass the path of the slide file itself")
    for is_kind, kind in SPECIAL_FILE_KINDS:
        if is_kind(mode):
            raise _path_error(path, f"is a {kind}, not a regular file. Pass the path of the slide file itself")

    try:
        with path.open("rb"):
            pass
    except PermissionError as error:
        raise _path_error(
            path,
            "cannot be read: permission denied. Give the user that runs unite read permission on the file "
            "(see `ls -l`), or run unite as a user that has it",
            reason="permission_denied",
        ) from error
    except OSError as error:
        raise _path_error(path, f"cannot be opened ({error.strerror}). Check the file and the disk it is on") from error


def _stat_problem(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "is a loop of symbolic links that never reaches a file. Fix the links, or pass the slide file itself"
    if error.errno == errno.EACCES:
        return (
            "cannot be reached: permission denied on a folder of its path. Give the user that runs unite "
            "execute (search) permission on each folder of the path"
        )
    if error.errno == errno.ENAMETOOLONG:
        return "is a path too long for the file system. Pass a shorter path, for example through a symbolic link"
    return f"cannot be checked ({error.strerror}). Check the path"


def _path_error(path: Path, problem: str, *, reason: str = "not_found") -> SlideError:
    return SlideError(f"slide {path} {problem}.", reason=reason, value=str(path))


def _build_info(path: Path, handle: SlideHandle, reader: str, mpp_override: float | None) -> SlideInfo:
    slide_id = compute_slide_id(path)
    properties = dict(handle.properties)
    if reader != "pillow" and "tiff.XResolution" not in properties:
        # openslide drops a resolution tag of n/0, which must count as present but implausible.
        properties.update(zero_denominator_resolution(path))
    mpp, mpp_source = resolve_mpp(properties, path=path, override=mpp_override, reader=reader)
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
