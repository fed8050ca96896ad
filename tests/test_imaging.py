"""Tile decoding and the one preprocessing that training and inference share."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.errors import ImageError
from shared.imaging import (
    MAX_ASPECT_RATIO,
    MIN_TILE_SIDE,
    decode_base64_image,
    decode_image,
    encode_base64_png,
    encode_png,
    prepare_tile,
    to_model_input,
)


def _png(image: Image.Image) -> bytes:
    return _encode(image, "PNG")


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def test_png_round_trip_is_exact():
    tile = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)

    assert np.array_equal(decode_image(encode_png(tile)), tile)
    assert np.array_equal(decode_base64_image(encode_base64_png(tile)), tile)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_non_rgb_image_names_mode(mode):
    image = Image.new(mode, (32, 32))

    with pytest.raises(ImageError) as error:
        decode_image(_png(image), name="input[3]")

    assert f"image mode is {mode!r}" in str(error.value)
    assert "input[3]" in str(error.value)


def test_bytes_not_an_image():
    with pytest.raises(ImageError, match="cannot decode 11 bytes"):
        decode_image(b"not a tile!")


def test_not_an_image_message_hides_object_repr():
    with pytest.raises(ImageError) as error:
        decode_image(b"not a tile!", name="input[2].image")

    assert error.value.message.startswith("input[2].image: cannot decode 11 bytes")
    assert "BytesIO" not in error.value.message
    assert " at 0x" not in error.value.message


@pytest.mark.parametrize("image_format", ["TIFF", "WEBP", "BMP", "GIF"])
def test_other_formats_rejected_naming_format(image_format):
    data = _encode(Image.new("RGB", (224, 224), (200, 120, 160)), image_format)

    with pytest.raises(ImageError) as error:
        decode_image(data, name="input[0].image")

    assert f"image format is {image_format!r}, expected PNG or JPEG" in error.value.message
    assert error.value.message.startswith("input[0].image: ")
    assert error.value.value == image_format
    assert error.value.limit == ["PNG", "JPEG"]


def test_jpeg_and_mpo_accepted():
    colour = (200, 120, 160)
    jpeg = _encode(Image.new("RGB", (64, 64), colour), "JPEG", quality=100)
    # Pillow writes MPO, a JPEG with a multi-picture segment, only for more than one frame.
    mpo = _encode(Image.new("RGB", (64, 64), colour), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"

    for data in (jpeg, mpo):
        tile = decode_image(data)
        assert tile.shape == (64, 64, 3)
        assert np.abs(tile.astype(int) - colour).max() <= 2


@pytest.mark.parametrize("size", [(10_000, 1), (1, 10_000), (900, 224), (129, 32)])
def test_strip_rejected_by_decode_and_prepare(size):
    width, height = size
    data = _png(Image.new("RGB", size))
    array = np.zeros((height, width, 3), dtype=np.uint8)

    with pytest.raises(ImageError) as decoded:
        decode_image(data, name="input[0].image")
    with pytest.raises(ImageError) as prepared:
        prepare_tile(array, name="input[0].image")

    assert decoded.value.message == prepared.value.message
    assert f"input[0].image is {width} x {height} px with aspect ratio" in decoded.value.message
    assert f"the maximum is {MAX_ASPECT_RATIO:g}" in decoded.value.message
    assert decoded.value.limit == MAX_ASPECT_RATIO
    assert decoded.value.value == round(max(size) / min(size), 3)


@pytest.mark.parametrize("size", [(1, 1), (31, 31), (40, 31)])
def test_tiny_tile_rejected_by_decode_and_prepare(size):
    width, height = size
    data = _png(Image.new("RGB", size))
    array = np.zeros((height, width, 3), dtype=np.uint8)

    with pytest.raises(ImageError) as decoded:
        decode_image(data, name="input[0].image")
    with pytest.raises(ImageError) as prepared:
        prepare_tile(array, name="input[0].image")

    assert decoded.value.message == prepared.value.message
    assert f"input[0].image is {width} x {height} px" in decoded.value.message
    assert f"minimum of {MIN_TILE_SIDE} px" in decoded.value.message
    assert decoded.value.limit == MIN_TILE_SIDE
    assert decoded.value.value == min(size)


@pytest.mark.parametrize("size", [(32, 32), (128, 32), (32, 128)])
def test_tile_size_limits_are_inclusive(size):
    width, height = size
    tile = decode_image(_png(Image.new("RGB", size)))

    assert tile.shape == (height, width, 3)
    assert prepare_tile(tile).shape == (224, 224, 3)


def test_invalid_base64():
    with pytest.raises(ImageError, match="invalid base64"):
        decode_base64_image("***")


def test_oversized_image_rejected_before_decoding():
    # A 5000 x 5000 black PNG compresses to a few kilobytes but would decode to 75 MB.
    data = _png(Image.new("RGB", (5000, 5000)))

    with pytest.raises(ImageError) as error:
        decode_image(data, max_pixels=4096 * 4096)

    assert error.value.limit == 4096 * 4096
    assert error.value.value == 25_000_000
    assert len(data) < 200_000


def test_prepare_tile_keeps_224_tile_unchanged():
    tile = np.random.default_rng(1).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)

    assert prepare_tile(tile) is tile


def test_prepare_tile_resizes_then_centre_crops():
    tile = np.zeros((300, 448, 3), dtype=np.uint8)
    tile[:, 224 - 20 : 224 + 20] = 255  # a white vertical band in the centre

    prepared = prepare_tile(tile)

    assert prepared.shape == (224, 224, 3)
    assert prepared[:, 112].min() > 200
    assert prepared[:, 0].max() < 30


def test_to_model_input_normalises_with_imagenet_statistics():
    tiles = np.full((2, 224, 224, 3), 255, dtype=np.uint8)

    batch = to_model_input(tiles)

    assert batch.shape == (2, 3, 224, 224)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6)
