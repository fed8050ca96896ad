"""Tile images: decoding uploads, encoding for the protocol, and the one preprocessing every model input gets.

Training and inference both call :func:`prepare_tile` and :func:`to_model_input`, so a tile reaches the
student the same way in the distiller and in the server. No torch here: the model side wraps the
float array with ``torch.from_numpy``.

Two decoders share the header checks. :func:`decode_image` is the teacher gateway's strict one (PNG or
JPEG, 8-bit RGB only), because the gateway caches exactly the pixels the teacher embedded.
``decode_tile(..., convert_modes=True)`` is the student server's: it also takes TIFF and converts other
pixel modes by :func:`convert_to_rgb`'s rules. :func:`prepare_tile_at_mpp` brings a tile of known
resolution to 0.5 µm/px before it is embedded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re

import imagecodecs
import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import ImageError

MODEL_INPUT_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_TILE_PIXELS = 4096 * 4096
# prepare_tile scales the shorter side to 224 px, so a 1 x 10,000 px strip would grow to 224 x 2,240,000 px
# (1.5 GB of RGB). Tiles are square or close to it, and this bound keeps the resized image under 224 x 896 px.
MAX_ASPECT_RATIO = 4.0
# A shorter side under 32 px is upscaled more than 7x to reach 224 px, so the model would embed
# interpolation rather than tissue.
MIN_TILE_SIDE = 32
# Pillow opens a JPEG that carries a multi-picture (MPF) segment, as some cameras write, as format "MPO".
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO"})
ACCEPTED_FORMAT_NAMES = ("PNG", "JPEG")
# The student server also takes TIFF tiles, as some scanners and viewers export them.
TILE_FORMATS = ACCEPTED_FORMATS | {"TIFF"}
TILE_FORMAT_NAMES = ("PNG", "JPEG", "TIFF")
# Pillow modes that convert_to_rgb turns into 8-bit RGB. Every other mode is rejected.
CONVERTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N", "CMYK", "YCbCr")
_MODE_DETAILS = {"1": " (1 bit per pixel)", "F": " (32-bit float)", "I": " (32-bit integer)"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Leading bytes of each accepted format, to tell a file whose image data is missing or invalid from one that is
# not an image at all.
FORMAT_SIGNATURES = {
    "PNG": (PNG_SIGNATURE,),
    "JPEG": (b"\xff\xd8\xff",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}
# Rows converted per step of scale_16_to_8_bit and composite_on_white, so their uint32 intermediates stay
# at a few MB rather than 4 bytes per sample of the whole tile.
ROWS_PER_CHUNK = 256
EXIF_ORIENTATION = 0x0112
# Bytes inserted after each JPEG scan by _check_jpeg_scans_complete. No 0xFF, so they cannot form a marker.
JPEG_PROBE_BYTES = bytes(range(0x10, 0x90)) * 4
TIFF_BITS_PER_SAMPLE = 258
# Resolution of the student's training tiles, in µm per pixel (20x).
TARGET_MPP = 0.5


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_TILE_PIXELS) -> np.ndarray:
    """Decode the PNG or JPEG bytes of a tile into an (H, W, 3) uint8 RGB array, converting nothing.

    This is the teacher gateway's strict decode. Raises :class:`ImageError` for bytes that are not a PNG
    or JPEG image (naming the format found), for images of more than ``max_pixels`` pixels or whose size
    :func:`check_tile_size` rejects (both checked from the header, before decoding, so a small compressed
    file cannot expand into gigabytes), and for images that are not 8-bit RGB, naming the mode found,
    since a silent conversion of RGBA or greyscale would change the pixels the teacher embeds.
    """
    return decode_tile(data, name=name, max_pixels=max_pixels, convert_modes=False)


def decode_tile(data: bytes, *, name: str = "image", max_pixels: int = MAX_TILE_PIXELS, convert_modes: bool) -> np.ndarray:
    """Decode the bytes of a tile into an (H, W, 3) uint8 RGB array.

    With ``convert_modes`` false this is :func:`decode_image`. With it true (the student server), TIFF is
    accepted beside PNG and JPEG, and other pixel modes are converted by :func:`convert_to_rgb`'s rules.
    Either way the format and the pixel count are checked from the header before any pixel is decoded.
    """
    formats = TILE_FORMATS if convert_modes else ACCEPTED_FORMATS
    format_names = TILE_FORMAT_NAMES if convert_modes else ACCEPTED_FORMAT_NAMES
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in formats:
                raise ImageError(
                    f"{name}: image format is {image.format!r}, expected {_or_list(format_names)}. "
                    "Save the tile as PNG (lossless) or JPEG before sending it.",
                    limit=list(format_names),
                    value=image.format,
                )
            width, height = image.size
            _check_pixel_count(width * height, name=name, max_pixels=max_pixels, detail=f"{width} x {height} = ")
            check_tile_size(width, height, name=name)
            if image.format in ("JPEG", "MPO"):
                image.load()
                _check_jpeg_scans_complete(image, data, name=name)
            if convert_modes:
                pixels = convert_to_rgb(image, data, name=name)
                return apply_exif_orientation(pixels, _exif_orientation(image))
            image.load()
            mode = image.mode
            if mode != "RGB":
                raise ImageError(
                    f"{name}: image mode is {mode!r}, expected 8-bit 'RGB'. "
                    "Convert the tile to RGB (for example PIL's image.convert('RGB')) before sending it.",
                    value=mode,
                    limit="RGB",
                )
            return np.asarray(image, dtype=np.uint8).copy()
    except UnidentifiedImageError as error:
        # Pillow's message names the BytesIO object, which means nothing to a client, so it is left out.
        found = _format_of_signature(data, format_names)
        if found is not None:
            raise ImageError(
                f"{name}: cannot decode {len(data)} bytes as an image: they start with a {found} header, but the image "
                f"data after it is missing or invalid. Send the complete {found} file of the tile."
            ) from error
        raise ImageError(
            f"{name}: cannot decode {len(data)} bytes as an image: they start with no {_or_list(format_names)} header. "
            f"Send the {_or_list(format_names)} bytes of the tile."
        ) from error
    except Image.DecompressionBombError as error:
        # Pillow raises this from Image.open, before the header check above, for more than twice
        # Image.MAX_IMAGE_PIXELS pixels (about 179 million in Pillow 13). Its message has the count.
        found = re.search(r"\((\d+) pixels\)", str(error))
        _check_pixel_count(int(found.group(1)) if found else None, name=name, max_pixels=max_pixels, detail="")
        raise ImageError(f"{name}: cannot decode {len(data)} bytes as an image ({error}).") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            f"{name}: cannot decode {len(data)} bytes as an image ({error}). Send a complete {_or_list(format_names)} file."
        ) from error


def _check_pixel_count(pixels: int | None, *, name: str, max_pixels: int, detail: str) -> None:
    if pixels is not None and pixels <= max_pixels:
        return
    found = f"{detail}{pixels} pixels" if pixels is not None else "more pixels than Pillow opens"
    raise ImageError(
        f"{name}: image is {found}, more than the limit of {max_pixels}. "
        "Send tiles, not whole slides: cut the image into tiles of 224 to 1024 px.",
        limit=max_pixels,
        value=pixels,
    )


def _or_list(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _format_of_signature(data: bytes, format_names: tuple[str, ...]) -> str | None:
    for format_name in format_names:
        if data.startswith(FORMAT_SIGNATURES[format_name]):
            return format_name
    return None


def _check_jpeg_scans_complete(image: Image.Image, data: bytes, *, name: str) -> None:
    """Raise :class:`ImageError` when a scan of the JPEG ``data`` ends before the pixels its header declares.

    libjpeg fills the rest of a short scan with zero coefficients (flat grey) and only warns, and Pillow
    (13) drops that warning. So the file is decoded again with :data:`JPEG_PROBE_BYTES` inserted after the
    entropy-coded data of each scan. libjpeg skips bytes after a complete scan, so a complete image decodes
    to the same pixels, while a short scan decodes the inserted bytes as image data and the pixels differ.
    ``image`` must be the loaded decode of ``data``.
    """
    scan_ends = _jpeg_scan_ends(data)
    if not scan_ends:
        return
    pieces = []
    previous = 0
    for end in scan_ends:
        pieces += [data[previous:end], JPEG_PROBE_BYTES]
        previous = end
    pieces.append(data[previous:])

    width, height = image.size
    short_scan = ImageError(
        f"{name}: the JPEG data ends before the {width} x {height} pixels that its header declares, so part of the "
        "image would be filled with grey. Send the complete JPEG file of the tile.",
        value=[width, height],
    )
    try:
        with Image.open(io.BytesIO(b"".join(pieces)), formats=["JPEG"]) as probe:
            probe.load()
            if probe.size != image.size or probe.mode != image.mode:
                raise short_scan
            for top in range(0, height, ROWS_PER_CHUNK):
                box = (0, top, width, min(height, top + ROWS_PER_CHUNK))
                if probe.crop(box).tobytes() != image.crop(box).tobytes():
                    raise short_scan
    except (OSError, SyntaxError, ValueError) as error:
        raise short_scan from error


def _jpeg_scan_ends(data: bytes) -> list[int]:
    """Return the offset after the entropy-coded data of each scan of the first image in the JPEG ``data``.

    The list is empty for arithmetic-coded JPEG, whose decoder reads zero bytes past the end of a scan, and
    for data whose markers cannot be followed, which Pillow's own decode judges.
    """
    ends: list[int] = []
    position = 2
    while position + 1 < len(data):
        if data[position] != 0xFF:
            return []
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
        elif marker == 0xD9:
            break
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:
            position += 2
        elif marker in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return []
        elif position + 4 > len(data):
            return []
        else:
            segment_end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
            position = _entropy_coded_end(data, segment_end) if marker == 0xDA else segment_end
            if marker == 0xDA:
                ends.append(position)
    return ends


def _entropy_coded_end(data: bytes, start: int) -> int:
    """Return the offset of the marker that ends the entropy-coded data starting at ``start``, or ``len(data)``.

    Inside that data, 0xFF is followed by 0x00 (a stuffed byte), a restart marker 0xD0 to 0xD7, or another
    0xFF (fill bytes before a marker). Any other byte after 0xFF is a marker that ends the scan.
    """
    position = start
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following == 0xFF:
            position += 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:
            position += 2
        else:
            return position


def _exif_orientation(image: Image.Image) -> int:
    # Pillow (13) loads the whole PNG to look for an eXIf chunk after the image data, which would decode a
    # 16-bit PNG a second time. A loaded PNG has every eXIf chunk in image.info.
    # NOTE: so a 16-bit colour PNG whose eXIf chunk follows its image data keeps its stored orientation.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if isinstance(orientation, int) else 1


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (H, W, C) pixels stored with EXIF ``orientation`` (1 to 8) upright, as ``PIL.ImageOps.exif_transpose`` does.

    Orientation 1 and values outside 1 to 8 leave the pixels as they are.
    """
    transforms = {
        2: lambda array: array[:, ::-1],
        3: lambda array: array[::-1, ::-1],
        4: lambda array: array[::-1],
        5: lambda array: array.transpose(1, 0, 2),
        6: lambda array: np.rot90(array, k=-1),
        7: lambda array: array.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda array: np.rot90(array, k=1),
    }
    transform = transforms.get(orientation)
    return pixels if transform is None else np.ascontiguousarray(transform(pixels))


def convert_to_rgb(image: Image.Image, data: bytes, *, name: str = "image") -> np.ndarray:
    """Convert an opened tile of any supported mode to (H, W, 3) uint8 RGB, by the student server's rules.

    - RGB is kept as it is. L, P without transparency, CMYK and YCbCr are converted by Pillow.
    - RGBA, LA, PA and any 8-bit image with a transparent colour (PNG ``tRNS``, such as a palette with
      a transparent entry) are composited on white: ``round((c * a + 255 * (255 - a)) / 255)``, the slide
      background that scanners show.
    - 16 bits per sample (I;16, I;16B, I;16L, I;16N, and RGB or RGBA PNG and TIFF with 16 bits per
      channel) are mapped to 8 bits by ``round(v / 257)``, so 0 stays 0 and 65535 becomes 255. The full
      range is mapped rather than the image's own maximum, so a tile's brightness does not depend on its
      brightest pixel. A transparent colour of a 16-bit greyscale image is ignored.
    - 1-bit and 32-bit (I, F) images, and any other mode, are rejected with :class:`ImageError` naming
      the mode, because they have no defined mapping to stain colours.

    ``data`` are the encoded bytes, decoded again with imagecodecs for 16-bit colour images, because
    Pillow (13) keeps only the high byte of each 16-bit colour sample.
    """
    mode = image.mode
    if mode not in CONVERTED_MODES:
        raise ImageError(
            f"{name}: image mode is {mode!r}{_MODE_DETAILS.get(mode, '')}, which the student server does not convert. "
            f"Expected one of {', '.join(CONVERTED_MODES)}. Save the tile as 8-bit RGB before sending it.",
            limit=list(CONVERTED_MODES),
            value=mode,
        )
    width, height = image.size

    if mode in ("RGB", "RGBA") and _bits_per_sample(image, data) == 16:
        samples = _decode_16_bit_colour(data, image.format, name=name)
        if samples.shape[:2] != (height, width) or samples.shape[2] not in (3, 4):
            raise ImageError(
                f"{name}: the 16-bit pixels have shape {samples.shape}, expected ({height}, {width}, 3 or 4). "
                "Save the tile as 8-bit RGB before sending it.",
                value=list(samples.shape),
            )
        pixels = scale_16_to_8_bit(samples)
        # Freed before compositing: 128 MiB for a 4096 x 4096 RGBA tile.
        del samples
        return composite_on_white(pixels) if pixels.shape[2] == 4 else pixels

    image.load()
    if mode.startswith("I;16"):
        grey = scale_16_to_8_bit(np.asarray(image))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an (H, W, 4) uint8 RGBA array on an opaque white background and return (H, W, 3) uint8.

    Each channel becomes ``round((c * a + 255 * (255 - a)) / 255)``. The division never ends in exactly
    one half, so integer rounding is exact and equals Pillow's ``Image.alpha_composite`` on white.
    """
    rgb = np.empty((*rgba.shape[:2], 3), dtype=np.uint8)
    for top in range(0, rgba.shape[0], ROWS_PER_CHUNK):
        rows = rgba[top : top + ROWS_PER_CHUNK]
        colour = rows[:, :, :3].astype(np.uint32)
        alpha = rows[:, :, 3:4].astype(np.uint32)
        rgb[top : top + ROWS_PER_CHUNK] = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb


def scale_16_to_8_bit(samples: np.ndarray) -> np.ndarray:
    """Map 16-bit samples to 8 bits by ``round(v / 257)``: 0 to 0, 65535 to 255, and 257 * k to k.

    The rows are converted :data:`ROWS_PER_CHUNK` at a time, so the only full-size allocation is the uint8
    result. ``(v + 128) // 257`` equals ``round(v / 257)`` because 257 is odd, so no quotient ends in one half.
    """
    scaled = np.empty(samples.shape, dtype=np.uint8)
    for top in range(0, samples.shape[0], ROWS_PER_CHUNK):
        rows = samples[top : top + ROWS_PER_CHUNK].astype(np.uint32)
        rows += 128
        rows //= 257
        scaled[top : top + ROWS_PER_CHUNK] = rows
    return scaled


def _bits_per_sample(image: Image.Image, data: bytes) -> int:
    if image.format == "PNG" and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
        return data[24]
    if image.format == "TIFF":
        bits = image.tag_v2.get(TIFF_BITS_PER_SAMPLE, (8,))
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


def _decode_16_bit_colour(data: bytes, image_format: str | None, *, name: str) -> np.ndarray:
    try:
        if image_format == "PNG":
            return imagecodecs.png_decode(data)
        return imagecodecs.tiff_decode(data)
    except (imagecodecs.PngError, imagecodecs.TiffError) as error:
        raise ImageError(
            f"{name}: cannot decode the 16-bit {image_format} pixels ({error}). Send a complete file, or save it as 8-bit RGB."
        ) from error


def check_tile_size(width: int, height: int, *, name: str = "tile") -> None:
    """Raise :class:`ImageError` for a tile that :func:`prepare_tile` should not resize.

    A tile is rejected when its longer side is more than :data:`MAX_ASPECT_RATIO` times its shorter side,
    because the resized copy would be huge, or when its shorter side is under :data:`MIN_TILE_SIDE` px.
    Both services call this before any resize: :func:`decode_image` from the image header, and
    :func:`prepare_tile` from the array.
    """
    shorter, longer = min(width, height), max(width, height)
    if shorter < 1:
        raise ImageError(
            f"{name} is {width} x {height} px, which has no pixels. Send a tile of 224 x 224 px.",
            limit=MIN_TILE_SIDE,
            value=shorter,
        )
    ratio = longer / shorter
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{name} is {width} x {height} px with aspect ratio {round(ratio, 2):g}, the maximum is {MAX_ASPECT_RATIO:g}. "
            "Send square tiles, such as 224 x 224 px at 0.5 µm/px.",
            limit=MAX_ASPECT_RATIO,
            value=round(ratio, 3),
        )
    if shorter < MIN_TILE_SIDE:
        raise ImageError(
            f"{name} is {width} x {height} px, so its shorter side of {shorter} px is under the minimum of "
            f"{MIN_TILE_SIDE} px. Send tiles of 224 x 224 px at 0.5 µm/px rather than thumbnails.",
            limit=MIN_TILE_SIDE,
            value=shorter,
        )


def decode_base64_image(text: str, *, name: str = "image") -> np.ndarray:
    """Decode a base64 string of PNG or JPEG bytes into an RGB array, as :func:`decode_image` does."""
    return decode_image(decode_base64(text, name=name), name=name)


def decode_base64(text: str, *, name: str = "image") -> bytes:
    """Decode the base64 text of an image into its bytes, or raise :class:`ImageError` naming ``name`` when invalid."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"{name}: invalid base64 ({error}). Encode the image bytes with standard base64.") from error


def encode_png(tile: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as lossless PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(tile), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_base64_png(tile: np.ndarray) -> str:
    """Encode an (H, W, 3) uint8 array as base64 PNG text for the embeddings protocol."""
    return base64.b64encode(encode_png(tile)).decode("ascii")


def prepare_tile(tile: np.ndarray, size: int = MODEL_INPUT_SIZE, *, name: str = "tile") -> np.ndarray:
    """Bring an RGB tile to the model's input: resize the shorter side to ``size`` (bicubic), then centre crop.

    This is the resize-then-centre-crop of UNI2-h's own transform. A tile already at ``size`` x ``size``
    is returned unchanged, so its bytes, and the cache key built from them, stay stable. Raises
    :class:`ImageError`, naming the tile ``name``, for an array that is not (H, W, 3) uint8 and for a size
    that :func:`check_tile_size` rejects.
    """
    _check_rgb_array(tile, name=name)
    height, width = tile.shape[:2]
    if (height, width) == (size, size):
        return tile
    check_tile_size(width, height, name=name)
    scale = size / min(height, width)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(tile).resize((new_width, new_height), Image.BICUBIC))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def prepare_tile_at_mpp(
    tile: np.ndarray, mpp: float, *, target_mpp: float = TARGET_MPP, size: int = MODEL_INPUT_SIZE, name: str = "tile"
) -> np.ndarray:
    """Bring an RGB tile of known resolution ``mpp`` (µm/px) to the model input at ``target_mpp``.

    The tile is resized by ``mpp / target_mpp`` so that it is at ``target_mpp``, and its centre
    ``size`` x ``size`` px are kept, which is the field of view (112 µm at 0.5 µm/px) the student was
    trained on. Both steps are one bicubic resample of the centre region of ``size * target_mpp / mpp``
    source pixels, so a huge upscale never materialises the whole resized tile. A 448 px tile at
    0.25 µm/px becomes exactly its bicubic 224 px downscale, and a 448 px tile at 0.5 µm/px its centre
    224 px crop. A tile whose shorter side covers less than ``size * target_mpp`` µm cannot fill the
    input at ``target_mpp``, so it goes through :func:`prepare_tile`, which stretches the shorter side
    to ``size`` px. Raises :class:`ImageError` as :func:`prepare_tile` does, and for an mpp that is not
    a positive finite number.
    """
    _check_rgb_array(tile, name=name)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ImageError(
            f"{name}: mpp is {mpp}, expected a positive resolution in µm per pixel, such as 0.5 for 20x.",
            value=str(mpp),
        )
    height, width = tile.shape[:2]
    check_tile_size(width, height, name=name)

    source_side = size * target_mpp / mpp
    if source_side > min(height, width):
        return prepare_tile(tile, size, name=name)
    left, top = (width - source_side) / 2, (height - source_side) / 2
    box = (left, top, left + source_side, top + source_side)
    resized = Image.fromarray(tile).resize((size, size), Image.BICUBIC, box=box)
    return np.ascontiguousarray(np.asarray(resized))


def _check_rgb_array(tile: np.ndarray, *, name: str) -> None:
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ImageError(
            f"{name} has shape {tile.shape} and dtype {tile.dtype}, expected (H, W, 3) uint8 RGB.",
            value=list(tile.shape),
        )


def to_model_input(tiles: np.ndarray) -> np.ndarray:
    """Normalise a batch of (N, H, W, 3) uint8 tiles to (N, 3, H, W) float32 with ImageNet mean and std."""
    if tiles.ndim != 4 or tiles.shape[3] != 3:
        raise ImageError(f"tile batch has shape {tiles.shape}, expected (N, H, W, 3).", value=list(tiles.shape))
    scaled = tiles.astype(np.float32) / 255.0
    normalised = (scaled - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))
