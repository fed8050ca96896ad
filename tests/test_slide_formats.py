"""Each reader on synthetic files written with tifffile and Pillow: layouts, sizes, damage and non-images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from PIL import Image
from synthetic_slides import he_like, write_tiff_slide

from shared.errors import SlideError
from shared.slides import open_slide

ODD_HEIGHT, ODD_WIDTH = 777, 1001
APERIO_HEADER = "Aperio Image Library v12.0.15\r\n1001x777 [0,0 1001x777] (256x256) JPEG/RGB Q=70"


@pytest.fixture(scope="module")
def odd_image() -> np.ndarray:
    return he_like(ODD_HEIGHT, ODD_WIDTH, seed=3)


def write_plain_image(path: Path, image: np.ndarray, **options) -> Path:
    Image.fromarray(image).save(path, **options)
    return path


def test_tiled_tiff_through_openslide(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(tmp_path / "tiled.tif", odd_image, mpp=0.5)

    with open_slide(path) as slide:
        info = slide.info

    assert info.reader == "openslide"
    assert info.vendor == "generic-tiff"
    assert (info.level0_width, info.level0_height) == (ODD_WIDTH, ODD_HEIGHT)
    assert info.level_count == 1
    assert info.mpp == pytest.approx(0.5)
    assert info.mpp_source == "tiff-resolution"
    assert info.associated_names == ()


def test_pyramidal_tiff_levels(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(tmp_path / "pyramid.tif", odd_image, mpp=0.25, levels=3)

    with open_slide(path) as slide:
        info = slide.info
        level = slide.best_level_for_downsample(4.0)

    assert info.reader == "openslide"
    assert info.level_count == 3
    assert info.level_downsamples == pytest.approx((1.0, 2.0, 4.0), rel=0.01)
    assert info.level0_magnification == 40
    assert level == 2


@pytest.mark.parametrize("levels", [1, 3])
def test_stripped_tiff_through_tiffslide(tmp_path: Path, odd_image: np.ndarray, levels: int) -> None:
    path = write_tiff_slide(tmp_path / "stripped.tif", odd_image, tile=None, levels=levels, compression="zlib")

    with open_slide(path) as slide:
        info = slide.info
        region = slide.read_region_level0(0, 0, 300, 300)

    assert openslide.OpenSlide.detect_format(str(path)) is None
    assert info.reader == "tiffslide"
    assert info.level_count == levels
    assert info.mpp == pytest.approx(0.5)
    assert info.mpp_source == "tiff-resolution"
    assert (region == odd_image[:300, :300]).all()


def test_stripped_pyramid_reads_level_1(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(tmp_path / "stripped.tif", odd_image, tile=None, levels=2, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        level_1 = tif.series[0].levels[1].asarray()

    with open_slide(path) as slide:
        downsample = slide.info.level_downsamples[1]
        region = slide.read_region_level0(500, 200, 448, 224)

    left, top = int(500 // downsample), int(200 // downsample)
    assert downsample == pytest.approx(1.998, abs=1e-3)
    assert (left, top) == (250, 100)
    assert (region == level_1[top : top + 224, left : left + 224]).all()


def test_ome_tiff_subifd_pyramid_through_tiffslide(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(
        tmp_path / "scan.ome.tif", odd_image, mpp=0.25, levels=3, ome=True, resolution_tags=False
    )

    with openslide.OpenSlide(str(path)) as handle:
        openslide_levels = handle.level_count
    with open_slide(path) as slide:
        info = slide.info
        level = slide.best_level_for_downsample(4.0)
        region = slide.read_region_level0(0, 0, 400, 100)  # 100 x 100 px of level 2

    with tifffile.TiffFile(path) as tif:
        coarsest = tif.series[0].levels[2].asarray()

    assert openslide_levels == 1
    assert info.reader == "tiffslide"
    assert info.level_count == 3
    assert info.mpp == pytest.approx(0.25)
    assert info.mpp_source == "metadata"
    assert level == 2
    assert (region == coarsest[:100, :100]).all()


def test_aperio_description_through_openslide(tmp_path: Path, odd_image: np.ndarray) -> None:
    description = f"{APERIO_HEADER}|AppMag = 20|MPP = 0.4990"
    path = write_tiff_slide(tmp_path / "scan.svs", odd_image, mpp=None, levels=2, description=description)

    with open_slide(path) as slide:
        info = slide.info

    assert info.reader == "openslide"
    assert info.vendor == "aperio"
    assert info.mpp == pytest.approx(0.499)
    assert info.mpp_source == "metadata"
    assert info.level0_magnification == 20


def test_aperio_objective_power_only(
    tmp_path: Path, odd_image: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_tiff_slide(tmp_path / "scan.svs", odd_image, mpp=None, description=f"{APERIO_HEADER}|AppMag = 40")

    with caplog.at_level(logging.WARNING, logger="shared.slides.resolution"), open_slide(path) as slide:
        info = slide.info

    assert info.mpp == pytest.approx(0.25)
    assert info.mpp_source == "objective-power"
    assert info.level0_magnification == 40
    assert any(str(path) in message and "--mpp-csv" in message for message in caplog.messages)


@pytest.mark.parametrize(("suffix", "options"), [(".png", {}), (".jpg", {"quality": 95})], ids=["png", "jpeg"])
def test_plain_image_needs_override(tmp_path: Path, odd_image: np.ndarray, suffix: str, options: dict) -> None:
    path = write_plain_image(tmp_path / f"scan{suffix}", odd_image, dpi=(50800, 50800), **options)

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    message = str(raised.value)
    assert raised.value.reason == "no_resolution"
    assert f"slide {path}: it is a plain image, whose DPI says nothing about the scan" in message
    assert "--mpp-csv" in message


@pytest.mark.parametrize("suffix", [".png", ".jpg"], ids=["png", "jpeg"])
def test_plain_image_with_override(tmp_path: Path, odd_image: np.ndarray, suffix: str) -> None:
    path = write_plain_image(tmp_path / f"scan{suffix}", odd_image)
    with Image.open(path) as image:
        decoded = np.asarray(image.convert("RGB"))

    with open_slide(path, mpp=0.5) as slide:
        info = slide.info
        region = slide.read_region_level0(100, 200, 224, 224)

    assert info.reader == "pillow"
    assert info.mpp_source == "override"
    assert (info.level0_width, info.level0_height) == (ODD_WIDTH, ODD_HEIGHT)
    assert info.level_count == 1
    assert info.associated_names == ()
    assert (region == decoded[200:424, 100:324]).all()


def write_lossless(kind: str, directory: Path, image: np.ndarray) -> Path:
    """Write ``image`` losslessly so that reads can be compared pixel for pixel, through the reader ``kind``."""
    if kind == "openslide":
        return write_tiff_slide(directory / "tiled.tif", image, compression="zlib")
    if kind == "tiffslide":
        return write_tiff_slide(directory / "stripped.tif", image, tile=None, compression="zlib")
    return write_plain_image(directory / "plain.png", image)


@pytest.mark.parametrize("reader", ["openslide", "tiffslide", "pillow"])
def test_region_past_edge_is_white(tmp_path: Path, odd_image: np.ndarray, reader: str) -> None:
    path = write_lossless(reader, tmp_path, odd_image)

    with open_slide(path, mpp=0.5) as slide:
        corner = slide.read_region_level0(ODD_WIDTH - 100, ODD_HEIGHT - 60, 224, 224)
        before_origin = slide.read_region_level0(-24, -24, 224, 224)
        outside = slide.read_region_level0(ODD_WIDTH + 10, 0, 224, 224)
        used_reader = slide.info.reader

    assert used_reader == reader
    assert (corner[:60, :100] == odd_image[-60:, -100:]).all()
    assert (corner[60:] == 255).all()
    assert (corner[:, 100:] == 255).all()
    assert (before_origin[24:, 24:] == odd_image[:200, :200]).all()
    assert (before_origin[:24] == 255).all()
    assert (before_origin[:, :24] == 255).all()
    assert (outside == 255).all()


@pytest.mark.parametrize("reader", ["openslide", "tiffslide", "pillow"])
def test_tiny_slide(tmp_path: Path, reader: str) -> None:
    image = he_like(30, 40, seed=5)
    path = write_lossless(reader, tmp_path, image)

    with open_slide(path, mpp=0.5) as slide:
        info = slide.info
        thumbnail = slide.thumbnail(512)
        region = slide.read_region_level0(0, 0, 64, 64)

    assert info.reader == reader
    assert (info.level0_width, info.level0_height) == (40, 30)
    assert (thumbnail == image).all()
    assert (region[:30, :40] == image).all()
    assert (region[30:] == 255).all()
    assert (region[:, 40:] == 255).all()


def test_sixteen_bit_grey_tiff(tmp_path: Path) -> None:
    grey = np.random.default_rng(2).integers(0, 256, size=(50, 70), dtype=np.uint16)
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, grey * 257, photometric="minisblack", rowsperstrip=16)

    with open_slide(path, mpp=0.5) as slide:
        info = slide.info
        region = slide.read_region_level0(0, 0, 50, 50)

    assert info.reader == "tiffslide"
    assert (region == grey[:, :50, np.newaxis]).all()


def test_multiplex_ome_tiff_rejected(tmp_path: Path) -> None:
    path = tmp_path / "multiplex.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 40, 40), dtype=np.uint8), photometric="minisblack", metadata={"axes": "CYX"})

    with pytest.raises(SlideError) as raised:
        open_slide(path, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "unreadable"
    assert "rejected it (5 channels of uint8 with axes CYX; expected grey, RGB or RGBA" in message
    assert "Pillow would read its first page only" in message


TRUNCATED_CASES = {
    "tiled": {"levels": 1},
    "pyramidal": {"levels": 3},
    "stripped": {"tile": None},
    "ome": {"ome": True, "levels": 3},
    "aperio": {"levels": 3, "description": f"{APERIO_HEADER}|MPP = 0.25"},
}


@pytest.mark.parametrize("case", list(TRUNCATED_CASES))
def test_truncated_tiff_is_damaged(tmp_path: Path, odd_image: np.ndarray, case: str) -> None:
    whole = write_tiff_slide(tmp_path / "whole.tif", odd_image, **TRUNCATED_CASES[case])
    truncated = tmp_path / f"{case}.tif"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(SlideError) as raised:
        open_slide(truncated, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "damaged"
    assert message.startswith(f"slide {truncated}: ")
    assert "failed to read it" in message
    assert "may be truncated or damaged" in message


@pytest.mark.parametrize(("suffix", "decoder"), [(".png", "PNG"), (".jpg", "JPEG")], ids=["png", "jpeg"])
def test_truncated_plain_image_is_damaged(tmp_path: Path, odd_image: np.ndarray, suffix: str, decoder: str) -> None:
    whole = write_plain_image(tmp_path / f"whole{suffix}", odd_image)
    truncated = tmp_path / f"truncated{suffix}"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(SlideError) as raised:
        open_slide(truncated, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "damaged"
    assert f"decoding the {decoder} image failed: image file is truncated" in message
    assert f"openslide {openslide.__library_version__} rejected it" in message
    assert f"tiffslide {tiffslide.__version__} rejected it (not a TIFF file" in message


def test_corrupt_tiles_are_damaged(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(tmp_path / "corrupt.tif", odd_image, levels=2)
    with tifffile.TiffFile(path) as tif:
        spans = [(offset, count) for page in tif.pages for offset, count in zip(page.dataoffsets, page.databytecounts)]
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))

    with pytest.raises(SlideError) as raised:
        open_slide(path, mpp=0.5)

    assert raised.value.reason == "damaged"
    assert str(path) in str(raised.value)


def test_corrupt_strip_fails_at_read(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(tmp_path / "corrupt.tif", odd_image, tile=None, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        last_offset, last_count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    data = bytearray(path.read_bytes())
    data[last_offset : last_offset + last_count] = b"\x01" * last_count
    path.write_bytes(bytes(data))

    with open_slide(path, mpp=0.5) as slide:
        top = slide.read_region_level0(0, 0, 224, 224)
        with pytest.raises(SlideError) as raised:
            slide.read_region_level0(0, ODD_HEIGHT - 100, 224, 224)

    message = str(raised.value)
    assert (top == odd_image[:224, :224]).all()
    assert raised.value.reason == "damaged"
    assert message.startswith(f"slide {path}: reading 224x224 px at level 0 from level-0 (0, {ODD_HEIGHT - 100}) failed")
    assert "may be truncated or damaged" in message


def test_text_file_lists_each_reader(tmp_path: Path) -> None:
    path = tmp_path / "slide.svs"
    path.write_text("patient list, not a slide\n")

    with pytest.raises(SlideError) as raised:
        open_slide(path, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "unreadable"
    assert f"openslide {openslide.__library_version__} rejected it" in message
    assert f"tiffslide {tiffslide.__version__} rejected it" in message
    assert "Pillow" in message
    assert message.count("rejected it") == 3
