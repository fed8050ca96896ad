"""Tile decoding, the student server's conversion and resolution rules, and the preprocessing that training and inference share."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from shared.errors import ImageError
from shared.imaging import (
    MAX_ASPECT_RATIO,
    MIN_TILE_SIDE,
    PNG_SIGNATURE,
    ROWS_PER_CHUNK,
    TARGET_MPP,
    composite_on_white,
    convert_to_rgb,
    decode_base64_image,
    decode_image,
    decode_tile,
    encode_base64_png,
    encode_png,
    prepare_tile,
    prepare_tile_at_mpp,
    scale_16_to_8_bit,
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


# The student server's conversion rules (decode_tile with convert_modes=True)


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_composite_matches_pillow_for_every_pair():
    values = np.arange(256, dtype=np.uint8)
    colour, alpha = np.meshgrid(values, values, indexing="ij")
    rgba = np.stack([colour, colour, colour, alpha], axis=-1)
    white = Image.new("RGBA", (256, 256), (255, 255, 255, 255))

    expected = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba)).convert("RGB"))

    assert np.array_equal(composite_on_white(rgba), expected)


def test_scale_16_bit_full_range():
    samples = np.array([0, 128, 129, 257, 257 * 100, 65534, 65535], dtype=np.uint16)

    assert scale_16_to_8_bit(samples).tolist() == [0, 0, 1, 1, 100, 255, 255]


def test_rgb48_tiff_scaled_by_257():
    samples = np.random.default_rng(2).integers(0, 65536, size=(40, 48, 3), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, photometric="rgb")

    tile = decode_tile(buffer.getvalue(), convert_modes=True)

    assert np.array_equal(tile, np.round(samples / 257).astype(np.uint8))


@pytest.mark.parametrize("mode", ["LA", "CMYK", "YCbCr", "I;16B"])
def test_convertible_modes_give_rgb(mode):
    image = Image.new(mode, (48, 40))

    tile = convert_to_rgb(image, b"", name="file[0]")

    assert tile.shape == (40, 48, 3)
    assert tile.dtype == np.uint8


@pytest.mark.parametrize("mode", ["1", "F", "I", "HSV"])
def test_unconvertible_modes_rejected(mode):
    with pytest.raises(ImageError) as error:
        convert_to_rgb(Image.new(mode, (48, 40)), b"", name="file[2]")

    assert error.value.message.startswith(f"file[2]: image mode is {mode!r}")
    assert error.value.value == mode


def test_strict_decode_still_rejects_tiff_and_rgba():
    tiff = _encode(Image.new("RGB", (64, 64)), "TIFF")
    rgba = _png(Image.new("RGBA", (64, 64)))

    assert decode_tile(tiff, convert_modes=True).shape == (64, 64, 3)
    assert decode_tile(rgba, convert_modes=True).shape == (64, 64, 3)
    with pytest.raises(ImageError, match="expected PNG or JPEG"):
        decode_image(tiff)
    with pytest.raises(ImageError, match="image mode is 'RGBA'"):
        decode_image(rgba)


@pytest.mark.parametrize("convert_modes", [False, True])
def test_huge_declared_size_names_limit(convert_modes):
    data = _png_declaring(50_000, 50_000)

    with pytest.raises(ImageError) as error:
        decode_tile(data, name="file[0]", max_pixels=4096 * 4096, convert_modes=convert_modes)

    assert "more than the limit of 16777216" in error.value.message
    assert error.value.limit == 4096 * 4096
    assert error.value.value == 2_500_000_000


def test_mpp_quarter_is_bicubic_downscale():
    tile = np.random.default_rng(3).integers(0, 256, size=(448, 448, 3), dtype=np.uint8)

    prepared = prepare_tile_at_mpp(tile, 0.25)

    assert np.array_equal(prepared, np.asarray(Image.fromarray(tile).resize((224, 224), Image.BICUBIC)))


def test_mpp_half_keeps_centre():
    tile = np.random.default_rng(4).integers(0, 256, size=(448, 600, 3), dtype=np.uint8)

    prepared = prepare_tile_at_mpp(tile, TARGET_MPP)

    assert np.abs(prepared.astype(int) - tile[112:336, 188:412]).max() <= 1


def test_mpp_small_field_falls_back_to_prepare_tile():
    # 300 px at 0.25 µm/px span 75 µm, less than the 112 µm of the input at 0.5 µm/px.
    tile = np.random.default_rng(5).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)

    assert np.array_equal(prepare_tile_at_mpp(tile, 0.25), prepare_tile(tile))


def test_mpp_upscale_stays_small():
    tile = np.random.default_rng(6).integers(0, 256, size=(2048, 2048, 3), dtype=np.uint8)

    assert prepare_tile_at_mpp(tile, 0.05).shape == (224, 224, 3)


@pytest.mark.parametrize("mpp", [0.0, -1.0, float("nan"), float("inf")])
def test_mpp_invalid_rejected(mpp):
    with pytest.raises(ImageError, match="expected a positive resolution"):
        prepare_tile_at_mpp(np.zeros((224, 224, 3), dtype=np.uint8), mpp)


def test_mpp_larger_tile_cropped_then_downscaled():
    tile = np.random.default_rng(7).integers(0, 256, size=(600, 600, 3), dtype=np.uint8)

    prepared = prepare_tile_at_mpp(tile, 0.25)

    # Cropping first loses the pixels around the centre 448 px that the bicubic filter reads near the
    # edges, so only the interior is compared.
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(tile[76:524, 76:524])).resize((224, 224), Image.BICUBIC))
    assert prepared.shape == (224, 224, 3)
    assert np.abs(prepared[4:-4, 4:-4].astype(int) - expected[4:-4, 4:-4]).max() <= 1


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _zero_rgba64_png(side: int) -> bytes:
    """Return a PNG of ``side`` x ``side`` RGBA pixels at 16 bits per channel, all zero: a few KB that decode to many MB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side * 8)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """Return the JPEG ``data`` with the size in its SOF0 header replaced, so the scan is too short for it."""
    start = data.index(b"\xff\xc0")
    return data[: start + 5] + struct.pack(">HH", height, width) + data[start + 9 :]


def _photo_tile(size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.BICUBIC)


def test_scale_16_bit_every_value_across_chunks():
    rows = ROWS_PER_CHUNK + 1
    samples = np.arange(rows * 256, dtype=np.uint32).reshape(rows, 256) % 65536
    samples = samples.astype(np.uint16)

    expected = np.round(samples.astype(np.float64) / 257).astype(np.uint8)

    assert np.array_equal(scale_16_to_8_bit(samples), expected)


def test_composite_across_chunks_matches_formula():
    rgba = np.random.default_rng(12).integers(0, 256, size=(ROWS_PER_CHUNK + 3, 5, 4), dtype=np.uint8)
    colour = rgba[:, :, :3].astype(np.float64)
    alpha = rgba[:, :, 3:4].astype(np.float64)

    expected = np.round((colour * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)

    assert np.array_equal(composite_on_white(rgba), expected)


def test_16_bit_rgba_decode_peak_memory():
    side = 2048
    data = _zero_rgba64_png(side)
    decoded_16_bit_bytes = side * side * 4 * 2

    tracemalloc.start()
    try:
        tile = decode_tile(data, convert_modes=True, max_pixels=side * side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert tile.shape == (side, side, 3)
    assert (tile == 255).all()
    # The imagecodecs decode is 1x, the uint8 RGBA and RGB copies 0.9x. Scaling the whole array through
    # uint32 took at least 5x.
    assert peak < 3 * decoded_16_bit_bytes, f"peak {peak / 2**20:.0f} MiB for {len(data)} bytes of PNG"


def test_short_jpeg_scan_rejected():
    data = _encode(_photo_tile((224, 224)), "JPEG", quality=90)
    lying = _jpeg_declaring(data, 2048, 2048)

    for convert_modes in (False, True):
        with pytest.raises(ImageError, match="ends before the 2048 x 2048 pixels"):
            decode_tile(lying, convert_modes=convert_modes)


@pytest.mark.parametrize(
    "options",
    [{"quality": 90}, {"quality": 90, "progressive": True}, {"quality": 75, "subsampling": 0}, {"quality": 90, "optimize": True}],
    ids=["baseline", "progressive", "no-subsampling", "optimised"],
)
def test_complete_jpeg_still_accepted(options):
    data = _encode(_photo_tile(), "JPEG", **options)

    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    assert np.array_equal(decode_image(data), expected)
    assert np.array_equal(decode_tile(data, convert_modes=True), expected)


def test_mpo_with_second_frame_still_accepted():
    first, second = _photo_tile(), _photo_tile().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    data = _encode(first, "MPO", save_all=True, append_images=[second])

    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.array_equal(decode_image(data), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_to_tiles(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    for image_format in ("JPEG", "PNG"):
        data = _encode(_photo_tile(), image_format, exif=exif)

        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))

        assert np.array_equal(decode_tile(data, convert_modes=True), expected), image_format


def test_gateway_decode_keeps_stored_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_photo_tile(), "PNG", exif=exif)

    assert decode_image(data).shape == (64, 96, 3)
    assert decode_tile(data, convert_modes=True).shape == (96, 64, 3)


def test_missing_image_data_message_names_header():
    header = struct.pack(">IIBBBBB", 224, 224, 8, 2, 0, 0, 0)
    header_only_png = PNG_SIGNATURE + _png_chunk(b"IHDR", header)
    zero_size_png = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)) + _png_chunk(b"IEND", b"")
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.zeros((64, 64, 3), dtype=np.uint8), photometric="rgb")
    truncated_tiff = tiff.getvalue()[:12]
    cases = [(header_only_png, "PNG"), (zero_size_png, "PNG"), (truncated_tiff, "TIFF")]

    for data, image_format in cases:
        with pytest.raises(ImageError) as raised:
            decode_tile(data, convert_modes=True)
        message = str(raised.value)
        assert f"start with a {image_format} header, but the image data after it is missing or invalid" in message
        assert "no PNG" not in message


def test_not_an_image_message_unchanged():
    with pytest.raises(ImageError, match="they start with no PNG, JPEG or TIFF header"):
        decode_tile(b"GIF89a not really", convert_modes=True)
