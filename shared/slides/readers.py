"""The three slide readers, tried in order, and RGB region reads that behave alike for all of them.

1. **openslide** reads the vendor formats (Aperio, Hamamatsu, Leica, MIRAX, Philips, ...) and tiled TIFF.
2. **tiffslide** reads TIFFs that openslide rejects: stripped TIFFs, and OME-TIFFs whose pyramid
   tifffile wrote as SubIFDs, which openslide ignores.
3. **Pillow** (through ``openslide.ImageSlide``) reads plain images: PNG, JPEG and the like.

A file that no reader recognises raises :class:`SlideError` with reason ``unreadable``, and its message
lists each reader's rejection. A file that a reader recognises but cannot read (truncated, corrupt)
raises reason ``damaged``. Every handle implements openslide's API (``read_region``, ``level_count``,
``level_downsamples``, ``properties``, ``associated_images``, ``close``); :func:`read_rgb` hides the
differences in what ``read_region`` returns.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import PIL
import tifffile
import tiffslide
from PIL import Image

from shared.errors import SlideError

logger = logging.getLogger(__name__)

SlideHandle = openslide.OpenSlide | tiffslide.TiffSlide | openslide.ImageSlide

READERS = ("openslide", "tiffslide", "pillow")
READER_VERSIONS = {
    "openslide": f"openslide {openslide.__library_version__}",
    "tiffslide": f"tiffslide {tiffslide.__version__}",
    "pillow": f"Pillow {PIL.__version__}",
}

FORMATS_HINT = (
    "Aperio (.svs), DICOM (.dcm), Hamamatsu (.ndpi, .vms, .vmu), Leica (.scn), MIRAX (.mrxs), Philips (.tiff), "
    "Sakura (.svslide), Ventana (.bif), Zeiss (.czi), ARGOS (.avs), Huron, Trestle and tiled TIFF (.tif) through "
    "openslide, "
    "stripped TIFF and OME-TIFF through tiffslide, and PNG, JPEG and other plain images through Pillow"
)
DAMAGED_HINT = "The file may be truncated or damaged, so check that it opens in another viewer or copy it again."

# Channel counts and sample types that tiffslide handles return and read_rgb converts to RGB.
TIFFSLIDE_CHANNELS = (1, 3, 4)
TIFFSLIDE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


class _Rejected(Exception):
    """A reader does not recognise the file, so the next reader is tried."""


class _Damage(Exception):
    """A reader recognises the file but fails to read it."""


def open_handle(path: Path) -> tuple[SlideHandle, str]:
    """Open ``path`` with the first reader that recognises it and return the handle and the reader's name.

    Raises :class:`SlideError` with reason ``unreadable`` when no reader recognises the file, and
    ``damaged`` when one recognises it but fails to read it.
    """
    rejections: list[str] = []
    damage: list[str] = []
    handle: SlideHandle | None = None
    reader = ""
    for reader, opener in (("openslide", _open_openslide), ("tiffslide", _open_tiffslide), ("pillow", _open_pillow)):
        try:
            handle = opener(path)
            break
        except _Rejected as rejection:
            rejections.append(f"{READER_VERSIONS[reader]} rejected it ({rejection})")
        except _Damage as error:
            damage.append(f"{READER_VERSIONS[reader]}: {error}")
    if handle is None:
        raise _unopened_error(path, rejections, damage)

    try:
        if reader == "openslide":
            handle, reader = _prefer_tiffslide_for_ome(path, handle)
        _check_tiff_offsets(path)
        _probe_read(handle)
    except _Damage as error:
        handle.close()
        failures = "; ".join([*damage, f"{READER_VERSIONS[reader]}: {error}"])
        raise SlideError(
            f"slide {path}: {reader} recognised the file but failed to read it ({failures}). {DAMAGED_HINT}",
            reason="damaged",
            value=str(path),
        ) from error.__cause__
    except BaseException:
        handle.close()
        raise

    if damage:
        logger.info("opened a slide with %s after another reader failed: %s", reader, "; ".join(damage))
    return handle, reader


def _unopened_error(path: Path, rejections: list[str], damage: list[str]) -> SlideError:
    if damage:
        return SlideError(
            f"slide {path}: a reader recognised the file but failed to read it ({'; '.join(damage)}), and the "
            f"other readers rejected it ({'; '.join(rejections) or 'none left'}). {DAMAGED_HINT}",
            reason="damaged",
            value=str(path),
        )
    return SlideError(
        f"slide {path} is not in a format any reader recognises: {'; '.join(rejections)}. Expected one of "
        f"{FORMATS_HINT}. Convert the file to a pyramidal TIFF or pass a supported file.",
        reason="unreadable",
        value=str(path),
    )


def _open_openslide(path: Path) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as error:
        raise _Rejected(str(error)) from error
    except (openslide.OpenSlideError, OSError) as error:
        raise _Damage(str(error)) from error


def _open_tiffslide(path: Path) -> tiffslide.TiffSlide:
    try:
        handle = tiffslide.TiffSlide(path)
    except tifffile.TiffFileError as error:
        raise _Rejected(str(error)) from error
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise _Damage(str(error)) from error

    try:
        axes = handle.properties["tiffslide.series-axes"]
        series = handle.ts_tifffile.series[handle.properties["tiffslide.series-index"]]
    except (NotImplementedError, OSError, ValueError, KeyError, IndexError) as error:
        handle.close()
        raise _Rejected(str(error)) from error

    channels = 1
    if "S" in axes:
        channels = series.shape[axes.index("S")]
    elif "C" in axes:
        channels = series.shape[axes.index("C")]
    if channels not in TIFFSLIDE_CHANNELS or series.dtype not in TIFFSLIDE_DTYPES:
        handle.close()
        raise _Rejected(
            f"{channels} channels of {series.dtype} with axes {axes}; expected grey, RGB or RGBA "
            "in 8 or 16 bits, as brightfield scans are"
        )
    return handle


def _open_pillow(path: Path) -> openslide.ImageSlide:
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise _Rejected(f"{error}. Convert the image to a pyramidal TIFF") from error
    except (OSError, ValueError) as error:  # UnidentifiedImageError is an OSError
        raise _Rejected(str(error)) from error

    if image.format == "TIFF":
        image.close()
        raise _Rejected("a TIFF is read by openslide or tiffslide, because Pillow would read its first page only")

    # Decode now: Pillow opens lazily, so a truncated image would otherwise fail at the first read.
    try:
        with image:
            mode = "RGBA" if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info else "RGB"
            decoded = image.convert(mode)
    except (OSError, ValueError) as error:
        raise _Damage(f"decoding the {image.format} image failed: {error}") from error
    return openslide.ImageSlide(decoded)


def _prefer_tiffslide_for_ome(path: Path, handle: openslide.OpenSlide) -> tuple[SlideHandle, str]:
    """Return tiffslide's handle for an OME-TIFF whose pyramid openslide does not see, else openslide's."""
    description = handle.properties.get("tiff.ImageDescription", "")
    if handle.properties.get(openslide.PROPERTY_NAME_VENDOR) != "generic-tiff" or "<OME" not in description:
        return handle, "openslide"
    try:
        alternative = _open_tiffslide(path)
    except (_Rejected, _Damage) as error:
        logger.debug("tiffslide cannot read the OME-TIFF, so openslide reads it: %s", error)
        return handle, "openslide"

    if alternative.level_count > handle.level_count:
        logger.debug(
            "OME-TIFF: tiffslide sees %d pyramid levels and openslide %d, so tiffslide reads it",
            alternative.level_count, handle.level_count,
        )
        handle.close()
        return alternative, "tiffslide"
    alternative.close()
    return handle, "openslide"


def _check_tiff_offsets(path: Path) -> None:
    """Raise :class:`_Damage` when a TIFF's image data reaches past the end of the file, as in a truncated copy.

    Only the offsets in the TIFF directories are read, so the check is cheap. Files that are not TIFF
    (MIRAX, DICOM, PNG, ...) are skipped.
    """
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            pages = {page.offset: page for page in tif.pages}
            for series in tif.series:
                for level in series.levels:
                    pages.update((page.offset, page) for page in level.pages if page is not None)
            for page in pages.values():
                ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
                if ends and max(ends) > size:
                    raise _Damage(
                        f"the image data of TIFF directory {page.index} ends at byte {max(ends)}, past the end of "
                        f"the {size}-byte file"
                    )
    except tifffile.TiffFileError:
        return
    except (OSError, ValueError, IndexError) as error:
        raise _Damage(f"tifffile failed to read the TIFF directories: {error}") from error


def _probe_read(handle: SlideHandle) -> None:
    """Read one pixel from the smallest level, so that a file whose tiles cannot be decoded fails at open."""
    level = handle.level_count - 1
    try:
        read_rgb(handle, (0, 0), level, (1, 1))
    except SlideError as error:
        raise _Damage(str(error.__cause__ or error)) from error.__cause__


def read_rgb(handle: SlideHandle, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
    """Read ``size`` (width, height) pixels of ``level`` at the level-0 ``location`` as an RGB image.

    Pixels outside the image are white for every reader. Transparent pixels are composited on white.
    Raises :class:`SlideError` with reason ``damaged`` when the reader fails.
    """
    try:
        if isinstance(handle, tiffslide.TiffSlide):
            return _read_tiffslide(handle, location, level, size)
        region = handle.read_region(location, level, size)
    except openslide.OpenSlideError as error:
        raise _read_error(location, level, size, error) from error
    except (OSError, ValueError, RuntimeError) as error:
        raise _read_error(location, level, size, error) from error
    return composite_on_white(np.asarray(region, dtype=np.uint8))


def _read_error(location: tuple[int, int], level: int, size: tuple[int, int], error: BaseException) -> SlideError:
    return SlideError(
        f"reading {size[0]}x{size[1]} px at level {level} from level-0 {location} failed: {error}",
        reason="damaged",
        value=list(location),
    )


def _read_tiffslide(
    handle: tiffslide.TiffSlide, location: tuple[int, int], level: int, size: tuple[int, int]
) -> Image.Image:
    """Read a region through tiffslide, which pads outside the image with black: white is pasted there instead."""
    width, height = size
    level_width, level_height = handle.level_dimensions[level]
    downsample = handle.level_downsamples[level]
    left, top = math.floor(location[0] / downsample), math.floor(location[1] / downsample)

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, level_width), min(top + height, level_height)
    if x0 >= x1 or y0 >= y1:
        return Image.fromarray(canvas, mode="RGB")

    # tiffslide maps a level-0 location to int(location / downsample), so rounding up lands exactly on (x0, y0).
    location_in_level0 = (math.ceil(x0 * downsample), math.ceil(y0 * downsample))
    array: Any = handle.read_region(location_in_level0, level, (x1 - x0, y1 - y0), as_array=True, padding=False)
    canvas[y0 - top : y1 - top, x0 - left : x1 - left] = _to_rgb8(np.asarray(array))
    return Image.fromarray(canvas, mode="RGB")


def _to_rgb8(array: np.ndarray) -> np.ndarray:
    """Convert an (H, W, C) grey, RGB or RGBA array of 8 or 16 bits to (H, W, 3) uint8 RGB on white."""
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return np.asarray(composite_on_white(array))
    return array


def composite_on_white(rgba: np.ndarray) -> Image.Image:
    """Composite an RGBA array on white and return it as RGB.

    openslide-python returns straight (not premultiplied) alpha, and alpha 0 marks pixels outside
    the scanned area.
    """
    if rgba.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(rgba), mode="RGB")
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = alpha.astype(np.uint16)
    composited = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(composited.astype(np.uint8), mode="RGB")
