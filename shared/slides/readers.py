"""The three slide readers, tried in order, and RGB region reads that behave alike for all of them.

1. **openslide** reads the vendor formats (Aperio, Hamamatsu, Leica, MIRAX, Philips, ...) and tiled TIFF.
2. **tiffslide** reads TIFFs that openslide rejects: stripped TIFFs, and OME-TIFFs whose pyramid
   tifffile wrote as SubIFDs, which openslide ignores.
3. **Pillow** (through ``openslide.ImageSlide``) reads plain images: PNG, JPEG and the like.

Before any reader runs, a TIFF-based file is checked for directories, tag values or image data past the
end of the file, as in a truncated copy (reason ``damaged``). It is also checked for tiles or strips too
large to decode within bounded memory (reason ``invalid_slide``). A file that no reader recognises raises
:class:`SlideError` with reason ``unreadable``, and its message lists each reader's rejection. A file
that a reader recognises but cannot decode raises reason ``damaged``. Every handle implements
openslide's API (``read_region``, ``level_count``, ``level_downsamples``, ``properties``,
``associated_images``, ``close``); :func:`read_rgb` hides the differences in what ``read_region``
returns and converts every colour layout to RGB.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
TRUNCATED_HINT = (
    "Copy the file again from its source and check that the copy has the same size in bytes. If the source "
    "is damaged too, export or scan the slide again."
)
CONVERT_HINT = (
    "Convert it to a tiled pyramidal TIFF, for example with "
    "`vips tiffsave SLIDE OUT.tif --tile --pyramid --compression jpeg`."
)

# The largest tile or strip a file may declare, in pixels. Every reader decodes a whole tile or strip to
# read any pixel of it, so this bounds the memory of one read whatever size the header declares: 2**27 px
# is 384 MiB as 8-bit RGB. The real slides in the test data use tiles of 240 and 256 px a side.
MAX_CHUNK_PIXELS = 1 << 27

# Channel counts and sample types that tiffslide handles return and read_rgb converts to RGB.
TIFFSLIDE_CHANNELS = (1, 3, 4)
TIFFSLIDE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))

# Photometric interpretations that read_rgb converts to RGB, with the channel counts each allows.
# MINISBLACK with 3 or 4 channels is read as RGB or RGBA, as tifffile writes some RGB images so.
# YCBCR is allowed only with JPEG compression, whose decoder returns RGB.
TIFFSLIDE_PHOTOMETRICS = {
    tifffile.PHOTOMETRIC.MINISWHITE: (1,),
    tifffile.PHOTOMETRIC.MINISBLACK: (1, 3, 4),
    tifffile.PHOTOMETRIC.RGB: (3, 4),
    tifffile.PHOTOMETRIC.PALETTE: (1,),
    tifffile.PHOTOMETRIC.SEPARATED: (4,),
    tifffile.PHOTOMETRIC.YCBCR: (3,),
}
# Pillow modes that read_rgb does not convert, because their range of values is not defined.
PILLOW_UNSUPPORTED_MODES = {"I": "32-bit signed integers", "F": "32-bit floating point"}

JPEG_COMPRESSIONS = (tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.OJPEG)
INKSET_CMYK = 1  # the TIFF InkSet tag's value for cyan, magenta, yellow and black inks, and its default

# Byte sizes of the TIFF field types (TIFF 6.0 and BigTIFF), to find where a tag's values end.
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
# Tags a reader needs to decode the image, by code. Other tags' values are not checked, because a reader
# ignores a broken private tag.
TIFF_CHECKED_TAGS = {
    258: "BitsPerSample",
    270: "ImageDescription",
    273: "StripOffsets",
    279: "StripByteCounts",
    282: "XResolution",
    283: "YResolution",
    320: "ColorMap",
    324: "TileOffsets",
    325: "TileByteCounts",
    330: "SubIFDs",
    347: "JPEGTables",
}
SUBIFDS_TAG = 330
IFD_OFFSET_TYPES = (4, 13, 16, 18)  # LONG, IFD, LONG8, IFD8
MAX_TIFF_DIRECTORIES = 1 << 16  # stop walking a chain this long, which only a corrupt file has


class _Rejected(Exception):
    """A reader does not recognise the file, so the next reader is tried."""


class _Damage(Exception):
    """A reader recognises the file but fails to read it."""


def open_handle(path: Path) -> tuple[SlideHandle, str]:
    """Open ``path`` with the first reader that recognises it and return the handle and the reader's name.

    Raises :class:`SlideError` with reason ``unreadable`` when no reader recognises the file, and
    ``damaged`` when one recognises it but fails to read it.
    """
    _check_tiff_file(path)

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
    except ZeroDivisionError as error:
        handle.close()
        raise _Rejected(
            f"its resolution tags divide by zero ({error}); rewrite XResolution and YResolution, for example "
            "with `tiffset -s 282 <pixels per unit> SLIDE`, or convert the file"
        ) from error
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
    unsupported = _unsupported_colour(series.keyframe, channels)
    if unsupported:
        handle.close()
        raise _Rejected(unsupported)
    return handle


def _unsupported_colour(page: tifffile.TiffPage, channels: int) -> str:
    """Return why read_rgb cannot convert the page's colours to RGB, or an empty string when it can."""
    photometric = page.photometric
    allowed = TIFFSLIDE_PHOTOMETRICS.get(photometric, ())
    name = getattr(photometric, "name", str(photometric))
    expected = (
        "expected MINISBLACK or MINISWHITE grey, RGB, PALETTE, CMYK (SEPARATED) or JPEG-compressed YCBCR, "
        "so convert the slide to RGB"
    )
    if channels not in allowed:
        return f"photometric {name} with {channels} channels; {expected}"
    if photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression not in JPEG_COMPRESSIONS:
        return f"photometric YCBCR with compression {page.compression.name}; {expected}"
    if photometric == tifffile.PHOTOMETRIC.SEPARATED and page.tags.valueof(332, INKSET_CMYK) != INKSET_CMYK:
        return f"photometric SEPARATED with inks other than CMYK (InkSet {page.tags.valueof(332)}); {expected}"
    if photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is None:
        return f"photometric PALETTE without a ColorMap tag; {expected}"
    return ""


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

    if image.mode in PILLOW_UNSUPPORTED_MODES:
        mode, image_format = image.mode, image.format
        image.close()
        raise _Rejected(
            f"{image_format} image of mode {mode} ({PILLOW_UNSUPPORTED_MODES[mode]}); expected grey, RGB, RGBA, "
            "palette or CMYK in 8 or 16 bits, so convert the image to 8-bit RGB"
        )

    # Decode now: Pillow opens lazily, so a truncated image would otherwise fail at the first read.
    try:
        with image:
            if image.mode.startswith("I;16"):
                decoded = _grey16_to_rgb(image)
            else:
                mode = "RGBA" if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info else "RGB"
                decoded = image.convert(mode)
    except (OSError, ValueError) as error:
        raise _Damage(f"decoding the {image.format} image failed: {error}") from error
    return openslide.ImageSlide(decoded)


def _grey16_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16-bit grey image to 8-bit RGB. Pillow's own conversion clips every value above 255 to white."""
    grey8 = _to_8_bits(np.asarray(image))
    return Image.fromarray(np.repeat(grey8[..., np.newaxis], 3, axis=-1), mode="RGB")


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


def _check_tiff_file(path: Path) -> None:
    """Raise :class:`SlideError` for a TIFF that is truncated or corrupt, or whose tiles are too large to decode.

    Reason ``damaged`` when a directory, a needed tag's values or the image data reach past the end of
    the file, and ``invalid_slide`` when a tile or strip has more than :data:`MAX_CHUNK_PIXELS` pixels.
    Only the directories are read, so the check is cheap. Files that are not TIFF (MIRAX, DICOM, PNG, ...)
    are skipped.
    """
    size = path.stat().st_size
    problem = _find_tiff_truncation(path, size)
    if problem is None:
        problem = _find_data_past_end(path, size)
    if problem is not None:
        raise SlideError(
            f"slide {path} is truncated or corrupt: {problem}. {TRUNCATED_HINT}",
            reason="damaged",
            value=str(path),
        )


@dataclass(frozen=True)
class _TiffLayout:
    """Layout of a TIFF variant's directory fields: their struct formats and byte counts."""

    byteorder: str  # "<" or ">"
    first_offset_at: int  # position of the first directory's offset in the header
    offset_format: str  # a directory offset: the first one and each "next directory" field
    count_format: str  # the number of entries at the start of a directory
    entry_size: int
    value_count_format: str  # an entry's number of values
    value_field_format: str  # an entry's values, or their offset when they do not fit


def _tiff_layout(header: bytes, suffix: str) -> _TiffLayout | None:
    """Return the layout of a classic TIFF, BigTIFF or NDPI header, or None for any other file."""
    if header[:4] in (b"II*\0", b"MM\0*"):
        byteorder = "<" if header[:2] == b"II" else ">"
        # Hamamatsu NDPI is a little-endian classic TIFF whose directory offsets have 8 bytes, which is how
        # tifffile reads it, recognising it by the .ndpi extension as this does.
        ndpi = byteorder == "<" and suffix.lower() == ".ndpi"
        return _TiffLayout(byteorder, 4, "Q" if ndpi else "I", "H", 12, "I", "I")
    if header[:4] in (b"II+\0", b"MM\0+"):
        byteorder = "<" if header[:2] == b"II" else ">"
        return _TiffLayout(byteorder, 8, "Q", "Q", 20, "Q", "Q")
    return None


def _find_tiff_truncation(path: Path, size: int) -> str | None:
    """Return where a TIFF's directory chain or SubIFDs reach past the end of the file, else None.

    A truncated copy loses the directories after the cut, and readers then either reject the file or
    open only the pyramid levels before it. Every directory that the file points to is therefore
    visited, and one that does not fit in the file is reported.
    """
    with path.open("rb") as file:
        layout = _tiff_layout(file.read(16), path.suffix)
        if layout is None:
            return None
        offset_size = struct.calcsize(layout.offset_format)
        if layout.first_offset_at + offset_size > size:
            return f"the {size}-byte file ends inside the TIFF header"
        file.seek(layout.first_offset_at)
        (first,) = struct.unpack(layout.byteorder + layout.offset_format, file.read(offset_size))

        pending = [first]
        visited: set[int] = set()
        while pending and len(visited) < MAX_TIFF_DIRECTORIES:
            offset = pending.pop()
            if offset == 0 or offset in visited:
                continue  # the end of a chain, or a loop, which tifffile and openslide stop at too
            visited.add(offset)
            problem = _check_directory(file, layout, offset, size, pending)
            if problem is not None:
                return problem
    return None


def _check_directory(file: BinaryIO, layout: _TiffLayout, offset: int, size: int, pending: list[int]) -> str | None:
    """Check that the directory at ``offset`` and its needed tag values lie inside the file.

    Appends the offsets of the next directory and of any SubIFDs to ``pending``.
    """
    order = layout.byteorder
    count_size = struct.calcsize(layout.count_format)
    offset_size = struct.calcsize(layout.offset_format)
    if offset + count_size > size:
        return f"a TIFF directory starts at byte {offset}, past the end of the {size}-byte file"
    file.seek(offset)
    (count,) = struct.unpack(order + layout.count_format, file.read(count_size))
    end = offset + count_size + count * layout.entry_size + offset_size
    if end > size:
        return (
            f"the TIFF directory at byte {offset} has {count} entries and ends at byte {end}, past the end of "
            f"the {size}-byte file"
        )
    entries = file.read(count * layout.entry_size)
    (next_offset,) = struct.unpack(order + layout.offset_format, file.read(offset_size))

    count_end = 4 + struct.calcsize(layout.value_count_format)
    field_size = struct.calcsize(layout.value_field_format)
    for start in range(0, len(entries), layout.entry_size):
        entry = entries[start : start + layout.entry_size]
        tag, field_type = struct.unpack(order + "HH", entry[:4])
        item_size = TIFF_TYPE_SIZES.get(field_type)
        if tag not in TIFF_CHECKED_TAGS or item_size is None:
            continue
        (value_count,) = struct.unpack(order + layout.value_count_format, entry[4:count_end])
        value_bytes = value_count * item_size
        field = entry[count_end:]
        if value_bytes <= field_size:
            values = field[:value_bytes]
        else:
            (values_at,) = struct.unpack(order + layout.value_field_format, field)
            if values_at + value_bytes > size:
                return (
                    f"the values of the {TIFF_CHECKED_TAGS[tag]} tag in the TIFF directory at byte {offset} end at "
                    f"byte {values_at + value_bytes}, past the end of the {size}-byte file"
                )
            values = b""
            if tag == SUBIFDS_TAG:
                file.seek(values_at)
                values = file.read(value_bytes)
        if tag == SUBIFDS_TAG and field_type in IFD_OFFSET_TYPES and value_count <= MAX_TIFF_DIRECTORIES:
            offset_format = "I" if item_size == 4 else "Q"
            pending.extend(struct.unpack(f"{order}{value_count}{offset_format}", values))
    pending.append(next_offset)
    return None


def _find_data_past_end(path: Path, size: int) -> str | None:
    """Return where a TIFF's image data reaches past the end of the file, else None.

    Raises :class:`SlideError` with reason ``invalid_slide`` for a tile or strip larger than
    :data:`MAX_CHUNK_PIXELS`.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            pages = {page.offset: page for page in tif.pages}
            for series in tif.series:
                for level in series.levels:
                    pages.update((page.offset, page) for page in level.pages if page is not None)
            for page in pages.values():
                _check_chunk_size(path, page.keyframe)
                ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
                if ends and max(ends) > size:
                    return (
                        f"the image data of TIFF directory {page.index} ends at byte {max(ends)}, past the end of "
                        f"the {size}-byte file"
                    )
    except tifffile.TiffFileError:
        return None
    except (OSError, ValueError, IndexError, struct.error) as error:
        return f"tifffile {tifffile.__version__} failed to read its TIFF directories ({error})"
    return None


def _check_chunk_size(path: Path, page: tifffile.TiffPage) -> None:
    if page.is_ndpi:
        # NOTE: an NDPI level is one JPEG that openslide decodes from its restart markers, not whole, so the
        # limit would reject real scans. tifffile splits it into rows of 8 or 16 px where the file lists them.
        return
    if page.is_tiled:
        kind, width, height = "tile", page.tilewidth, page.tilelength * max(1, page.tiledepth)
    else:
        kind, width, height = "strip", page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)
    if width * height > MAX_CHUNK_PIXELS:
        raise SlideError(
            f"slide {path} declares {kind}s of {width}x{height} px ({width * height / 1e6:.0f} Mpx) in its "
            f"{page.imagewidth}x{page.imagelength} px TIFF directory {page.index}. A reader decodes a whole {kind} "
            f"for any pixel of it, and more than {MAX_CHUNK_PIXELS / 1e6:.0f} Mpx at once could exhaust memory. "
            f"{CONVERT_HINT}",
            reason="too_large",
            value=[width, height],
            limit=MAX_CHUNK_PIXELS,
        )


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
    canvas[y0 - top : y1 - top, x0 - left : x1 - left] = _to_rgb8(np.asarray(array), level_keyframe(handle, level))
    return Image.fromarray(canvas, mode="RGB")


def reads_whole_rows(handle: SlideHandle, level: int) -> bool:
    """Return whether a read from ``level`` decodes rows as wide as the level: a TIFF level stored in strips."""
    return isinstance(handle, tiffslide.TiffSlide) and not level_keyframe(handle, level).is_tiled


def zero_denominator_resolution(path: Path) -> dict[str, str]:
    """Return the TIFF resolution tags of the first page that have a zero denominator, as "n/0" text.

    openslide leaves such a tag out of its properties, which would make a present but invalid
    resolution look absent. Returns an empty mapping for other files and tags.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            values = {name: tags.valueof(name) for name in ("XResolution", "YResolution")}
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, struct.error):
        return {}
    found = {}
    for name, value in values.items():
        if isinstance(value, tuple) and len(value) == 2 and value[1] == 0:
            found[f"tiff.{name}"] = f"{value[0]}/{value[1]}"
    return found


def level_keyframe(handle: tiffslide.TiffSlide, level: int) -> tifffile.TiffPage:
    """Return the TIFF page that describes a tiffslide level: its photometric, colormap and chunk layout."""
    series = handle.ts_tifffile.series[handle.properties["tiffslide.series-index"]]
    return series.levels[level].keyframe


def _to_rgb8(array: np.ndarray, page: tifffile.TiffPage) -> np.ndarray:
    """Convert an (H, W, C) array of 8 or 16 bits to (H, W, 3) uint8 RGB on white, by the page's photometric.

    Palette indices are looked up in the ColorMap, CMYK is converted as (255 - C)(255 - K) / 255 and so on,
    MINISWHITE grey is inverted, and a fourth channel of RGB is alpha.
    """
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        return _palette_to_rgb8(array[..., 0], page.colormap)

    if array.dtype == np.uint16:
        array = _to_8_bits(array)
    if page.photometric == tifffile.PHOTOMETRIC.SEPARATED:
        return _cmyk_to_rgb8(array)
    if array.shape[-1] == 1:
        if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            array = 255 - array
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return np.asarray(composite_on_white(array))
    return array


def _to_8_bits(array: np.ndarray) -> np.ndarray:
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _palette_to_rgb8(indices: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """Look up palette indices in a TIFF ColorMap of shape (3, 2**bits).

    The TIFF standard stores 16-bit colours, but some writers store 8-bit ones, recognised as tifffile
    does by no value above 255.
    """
    colours = np.asarray(colormap)
    if colours.max() > 255:
        colours = _to_8_bits(colours)
    colours = colours.astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(colours[:, indices], 0, -1))


def _cmyk_to_rgb8(cmyk: np.ndarray) -> np.ndarray:
    """Convert 8-bit CMYK ink amounts (255 is full ink) to RGB, as libtiff's RGBA interface does for openslide."""
    inks = cmyk.astype(np.uint32)
    white_left = 255 - inks[..., 3:4]
    rgb = ((255 - inks[..., :3]) * white_left + 127) // 255
    return rgb.astype(np.uint8)


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
