"""Tile images: decoding uploads, encoding for the protocol, and the one preprocessing every model input gets.

Training and inference both call :func:`prepare_tile` and :func:`to_model_input`, so a tile reaches the
student the same way in the distiller and in the server. No torch here: the model side wraps the
float array with ``torch.from_numpy``.
"""

from __future__ import annotations

import base64
import binascii
import io

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


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_TILE_PIXELS) -> np.ndarray:
    """Decode the PNG or JPEG bytes of a tile into an (H, W, 3) uint8 RGB array.

    Raises :class:`ImageError` for bytes that are not a PNG or JPEG image (naming the format found), for
    images of more than ``max_pixels`` pixels or whose size :func:`check_tile_size` rejects (both checked
    from the header, before decoding, so a small compressed file cannot expand into gigabytes), and for
    images that are not 8-bit RGB, naming the mode found, since a silent conversion of RGBA or greyscale
    would change the pixels the teacher embeds.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ACCEPTED_FORMATS:
                raise ImageError(
                    f"{name}: image format is {image.format!r}, expected PNG or JPEG. "
                    "Save the tile as PNG (lossless) or JPEG before sending it.",
                    limit=["PNG", "JPEG"],
                    value=image.format,
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: image is {width} x {height} = {width * height} pixels, more than the limit of "
                    f"{max_pixels}. Send tiles, not whole slides: cut the image into tiles of 224 to 1024 px.",
                    limit=max_pixels,
                    value=width * height,
                )
            check_tile_size(width, height, name=name)
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
        raise ImageError(
            f"{name}: cannot decode {len(data)} bytes as an image: they start with no PNG or JPEG header. "
            "Send the PNG or JPEG bytes of the tile."
        ) from error
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            f"{name}: cannot decode {len(data)} bytes as an image ({error}). Send a complete PNG or JPEG file."
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
    """Decode a base64 string of PNG or JPEG bytes into an RGB array."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"{name}: invalid base64 ({error}). Encode the PNG or JPEG bytes with standard base64.") from error
    return decode_image(data, name=name)


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
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ImageError(
            f"{name} has shape {tile.shape} and dtype {tile.dtype}, expected (H, W, 3) uint8 RGB.",
            value=list(tile.shape),
        )
    height, width = tile.shape[:2]
    if (height, width) == (size, size):
        return tile
    check_tile_size(width, height, name=name)
    scale = size / min(height, width)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(tile).resize((new_width, new_height), Image.BICUBIC))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def to_model_input(tiles: np.ndarray) -> np.ndarray:
    """Normalise a batch of (N, H, W, 3) uint8 tiles to (N, 3, H, W) float32 with ImageNet mean and std."""
    if tiles.ndim != 4 or tiles.shape[3] != 3:
        raise ImageError(f"tile batch has shape {tiles.shape}, expected (N, H, W, 3).", value=list(tiles.shape))
    scaled = tiles.astype(np.float32) / 255.0
    normalised = (scaled - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))
