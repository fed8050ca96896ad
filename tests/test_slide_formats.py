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
from synthetic_slides import GLASS, STROMA, he_like, overwrite_tags, write_declared_size_tiff, write_tiff_slide

from shared.errors import SlideError
from shared.slides import open_slide
from shared.slides import reader as slide_reader
from shared.slides.readers import MAX_CHUNK_PIXELS

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
    assert message.startswith(f"slide {truncated} is truncated or corrupt: ")
    assert "past the end of the" in message
    assert "Copy the file again from its source" in message


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


def test_cut_before_first_directory_is_truncated(tmp_path: Path, odd_image: np.ndarray) -> None:
    whole = write_tiff_slide(tmp_path / "whole.tif", odd_image, levels=2)
    with tifffile.TiffFile(whole) as tif:
        first_directory = tif.pages[0].offset
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:8])

    with pytest.raises(SlideError) as raised:
        open_slide(cut, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "damaged"
    assert message.startswith(f"slide {cut} is truncated or corrupt: ")
    assert f"a TIFF directory starts at byte {first_directory}, past the end of the 8-byte file" in message
    assert "Copy the file again from its source" in message


@pytest.mark.parametrize(
    ("cut_into", "problem"),
    [(0, "a TIFF directory starts at byte {offset}, past the end"), (6, "the TIFF directory at byte {offset} has")],
    ids=["at-directory", "inside-directory"],
)
def test_pyramid_cut_before_last_level_is_truncated(
    tmp_path: Path, odd_image: np.ndarray, cut_into: int, problem: str
) -> None:
    whole = write_tiff_slide(tmp_path / "whole.tif", odd_image, levels=3, compression="zlib")
    with tifffile.TiffFile(whole) as tif:
        last_directory = tif.pages[2].offset
        last_data_start = min(tif.pages[2].dataoffsets)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: last_directory + cut_into])
    # The levels before the cut are intact, so a reader would open the slide with its last level missing.
    assert last_data_start > last_directory

    with pytest.raises(SlideError) as raised:
        open_slide(cut, mpp=0.5)

    assert raised.value.reason == "damaged"
    assert f"is truncated or corrupt: {problem.format(offset=last_directory)}" in str(raised.value)


def test_cut_before_last_subifd_is_truncated(tmp_path: Path, odd_image: np.ndarray) -> None:
    whole = tmp_path / "whole.tif"
    with tifffile.TiffWriter(whole) as writer:
        writer.write(odd_image, tile=(256, 256), photometric="rgb", subifds=2, metadata=None)
        writer.write(odd_image[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1, metadata=None)
        writer.write(odd_image[::4, ::4], tile=(256, 256), photometric="rgb", subfiletype=1, metadata=None)
    with tifffile.TiffFile(whole) as tif:
        last_subifd = max(tif.pages[0].subifds)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:last_subifd])

    with pytest.raises(SlideError) as raised:
        open_slide(cut, mpp=0.5)

    assert raised.value.reason == "damaged"
    assert f"is truncated or corrupt: a TIFF directory starts at byte {last_subifd}, past the end" in str(raised.value)


def test_ome_description_past_end_is_truncated(tmp_path: Path, odd_image: np.ndarray) -> None:
    whole = write_tiff_slide(tmp_path / "whole.ome.tif", odd_image, levels=3, ome=True, compression="zlib")
    with tifffile.TiffFile(whole) as tif:
        description_at = tif.pages[0].tags["ImageDescription"].valueoffset
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(whole.read_bytes()[:description_at])

    with pytest.raises(SlideError) as raised:
        open_slide(cut, mpp=0.5)

    assert raised.value.reason == "damaged"
    assert "the values of the ImageDescription tag in the TIFF directory at byte 8 end at byte" in str(raised.value)


@pytest.mark.parametrize(("name", "fraction"), [("tcga", 0.9), ("bracs", 0.75), ("cmu1", 0.5)])
def test_truncated_real_slide_is_damaged(slides_dir: Path, tmp_path: Path, name: str, fraction: float) -> None:
    from slide_data import BRACS, CMU1, TCGA

    source = slides_dir / {"tcga": TCGA, "bracs": BRACS, "cmu1": CMU1}[name]
    data = source.read_bytes()
    cut = tmp_path / source.name
    cut.write_bytes(data[: int(len(data) * fraction)])

    with pytest.raises(SlideError) as raised:
        open_slide(cut, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "damaged"
    assert message.startswith(f"slide {cut} is truncated or corrupt: ")
    assert "Copy the file again" in message


def test_real_slides_pass_structure_check(slides_dir: Path) -> None:
    for path in sorted(slides_dir.iterdir()):
        with open_slide(path, mpp=0.5) as slide:
            assert slide.info.level_count >= 1


def test_data_offset_past_end_blames_no_reader(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = write_tiff_slide(tmp_path / "flipped.tif", odd_image, levels=2)
    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        offsets = list(tif.pages[0].dataoffsets)
    overwrite_tags(path, {"TileOffsets": [offsets[0] + 4 * size, *offsets[1:]]})

    with pytest.raises(SlideError) as raised:
        open_slide(path, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "damaged"
    assert message.startswith(f"slide {path} is truncated or corrupt: the image data of TIFF directory 0 ends at byte")
    assert "openslide" not in message
    assert "recognised the file" not in message


def test_huge_declared_size_rejected_not_allocated(tmp_path: Path) -> None:
    path = write_declared_size_tiff(tmp_path / "huge.tif", 80_000, 80_000)

    with open_slide(path) as slide:
        info = slide.info
        region = slide.read_region_level0(40_000, 40_000, 224, 224)
        with pytest.raises(SlideError) as raised:
            slide.thumbnail(512)

    message = str(raised.value)
    assert path.stat().st_size < 100_000
    assert (info.level0_width, info.level0_height) == (80_000, 80_000)
    assert region.shape == (224, 224, 3)
    assert raised.value.reason == "too_large"
    assert message.startswith(f"slide {path} declares 80000x80000 px at level 0 in 1 pyramid level(s)")
    assert "which would decode 6.4 Gpx, more than the limit of 4.3 Gpx" in message
    assert "--pyramid" in message
    assert raised.value.value == [80_000, 80_000]


def test_thumbnail_reads_bounded_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_declared_size_tiff(tmp_path / "large.tif", 8192, 8192)
    read_sizes: list[tuple[int, int]] = []
    read_rgb = slide_reader.read_rgb

    def bounded_read(handle, location, level, size):
        read_sizes.append(size)
        if size[0] * size[1] > slide_reader.THUMBNAIL_READ_PIXELS:
            raise AssertionError(f"a thumbnail read of {size} px is larger than THUMBNAIL_READ_PIXELS")
        return read_rgb(handle, location, level, size)

    monkeypatch.setattr(slide_reader, "read_rgb", bounded_read)
    with open_slide(path) as slide:
        thumbnail = slide.thumbnail(512)

    # Each 1024 px tile is pink on its left half, so the thumbnail repeats a 64 px pattern.
    assert thumbnail.shape == (512, 512, 3)
    assert len(read_sizes) == 4
    assert max(width * height for width, height in read_sizes) <= slide_reader.THUMBNAIL_READ_PIXELS
    assert np.abs(thumbnail[:, 8:24].astype(int) - STROMA).max() <= 2
    assert np.abs(thumbnail[:, 40:56].astype(int) - GLASS).max() <= 2
    assert np.abs(thumbnail[:, 264:280].astype(int) - STROMA).max() <= 2


def test_stripped_thumbnail_reads_full_width_bands(
    tmp_path: Path, odd_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiff_slide(tmp_path / "stripped.tif", odd_image, tile=None, compression="zlib")
    with open_slide(path, mpp=0.5) as slide:
        reference = slide.thumbnail(250)

    read_sizes: list[tuple[int, int]] = []
    read_rgb = slide_reader.read_rgb

    def recording_read(handle, location, level, size):
        read_sizes.append(size)
        return read_rgb(handle, location, level, size)

    monkeypatch.setattr(slide_reader, "read_rgb", recording_read)
    monkeypatch.setattr(slide_reader, "THUMBNAIL_READ_PIXELS", ODD_WIDTH * 100)
    with open_slide(path, mpp=0.5) as slide:
        banded = slide.thumbnail(250)

    assert banded.shape == reference.shape
    assert len(read_sizes) > 1
    assert {width for width, _ in read_sizes} == {ODD_WIDTH}
    assert max(width * height for width, height in read_sizes) <= ODD_WIDTH * 100 * 1.01
    assert np.abs(banded.astype(int) - reference.astype(int)).mean() < 1.0


def test_thumbnail_canvas_limit(tmp_path: Path, odd_image: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiff_slide(tmp_path / "slide.tif", odd_image)
    monkeypatch.setattr(slide_reader, "MAX_THUMBNAIL_PIXELS", 10_000)

    with open_slide(path) as slide, pytest.raises(SlideError) as raised:
        slide.thumbnail(512)

    message = str(raised.value)
    assert raised.value.reason == "too_large"
    assert message.startswith(f"slide {path} declares {ODD_WIDTH}x{ODD_HEIGHT} px at level 0")
    assert "the requested thumbnail would be 512x397 px (203264 px), more than the limit of 10000 px" in message
    assert raised.value.limit == 10_000


def test_oversized_strip_rejected_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "one_strip.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 240, dtype=np.uint8), photometric="rgb", metadata=None)
    side = 12_000  # one strip of 144 Mpx, above MAX_CHUNK_PIXELS
    overwrite_tags(path, {"ImageWidth": (side, "I"), "ImageLength": (side, "I"), "RowsPerStrip": (side, "I")})

    with pytest.raises(SlideError) as raised:
        open_slide(path, mpp=0.5)

    message = str(raised.value)
    assert side * side > MAX_CHUNK_PIXELS
    assert raised.value.reason == "too_large"
    assert message.startswith(f"slide {path} declares strips of 12000x12000 px (144 Mpx)")
    assert "--tile --pyramid" in message


def test_stripped_cmyk_converted_to_rgb(tmp_path: Path, odd_image: np.ndarray) -> None:
    path = tmp_path / "cmyk.tif"
    cmyk = np.dstack([255 - odd_image, np.zeros(odd_image.shape[:2], dtype=np.uint8)])
    cmyk[:100, :100, 3] = 255  # full black ink
    tifffile.imwrite(path, cmyk, photometric="separated", rowsperstrip=64)

    with open_slide(path, mpp=0.5) as slide:
        region = slide.read_region_level0(0, 0, 300, 300)
        reader = slide.info.reader

    assert reader == "tiffslide"
    assert (region[:100, :100] == 0).all()
    assert (region[100:300, 100:300] == odd_image[100:300, 100:300]).all()


def test_stripped_palette_converted_to_rgb(tmp_path: Path) -> None:
    indices = np.random.default_rng(4).integers(0, 4, size=(60, 80), dtype=np.uint8)
    colours = np.array([GLASS, STROMA, (110, 60, 150), (0, 0, 0)], dtype=np.uint16)
    colormap = np.zeros((3, 256), dtype=np.uint16)
    colormap[:, :4] = colours.T * 257
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap, rowsperstrip=16)

    with open_slide(path, mpp=0.5) as slide:
        region = slide.read_region_level0(0, 0, 60, 60)
        reader = slide.info.reader

    assert reader == "tiffslide"
    assert (region == colours[indices[:, :60]]).all()


def test_stripped_min_is_white_inverted(tmp_path: Path) -> None:
    grey = np.random.default_rng(5).integers(0, 256, size=(50, 70), dtype=np.uint8)
    path = tmp_path / "miniswhite.tif"
    tifffile.imwrite(path, 255 - grey, photometric="miniswhite", rowsperstrip=16)

    with open_slide(path, mpp=0.5) as slide:
        region = slide.read_region_level0(0, 0, 50, 50)

    assert (region == grey[:, :50, np.newaxis]).all()


def test_sixteen_bit_grey_png(tmp_path: Path) -> None:
    grey = np.random.default_rng(6).integers(0, 256, size=(50, 70), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey * 257).save(path)

    with open_slide(path, mpp=0.5) as slide:
        region = slide.read_region_level0(0, 0, 50, 50)
        reader = slide.info.reader

    assert reader == "pillow"
    assert (region == grey[:, :50, np.newaxis]).all()


def test_unsupported_photometric_names_it(tmp_path: Path) -> None:
    path = tmp_path / "lab.tif"
    tifffile.imwrite(path, np.zeros((40, 40, 3), dtype=np.uint8), photometric="cielab", rowsperstrip=16)

    with pytest.raises(SlideError) as raised:
        open_slide(path, mpp=0.5)

    message = str(raised.value)
    assert raised.value.reason == "unreadable"
    assert "rejected it (photometric CIELAB with 3 channels; expected MINISBLACK or MINISWHITE grey, RGB" in message
    assert "convert the slide to RGB" in message


@pytest.mark.parametrize(
    ("mpp_text", "stated"),
    [
        ("0", "a resolution of 0 µm/px in openslide.mpp-x"),
        ("-0.5", "a resolution of -0.5 µm/px in openslide.mpp-x"),
        ("nan", "a resolution of nan µm/px in aperio.MPP"),
        ("inf", "a resolution of inf µm/px in openslide.mpp-x"),
        ("abc", "'abc' in aperio.MPP, which is not a number"),
    ],
)
def test_aperio_unusable_mpp_is_implausible(
    tmp_path: Path, odd_image: np.ndarray, mpp_text: str, stated: str
) -> None:
    # The resolution tags and the objective power would give 0.5 µm/px, but the MPP found first decides.
    description = f"{APERIO_HEADER}|AppMag = 20|MPP = {mpp_text}"
    path = write_tiff_slide(tmp_path / "scan.svs", odd_image, mpp=0.5, description=description)

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    message = str(raised.value)
    assert raised.value.reason == "implausible_resolution"
    assert message.startswith(f"slide {path} reports {stated}")
    assert "--mpp-csv" in message


@pytest.mark.parametrize("power", ["0", "-20"])
def test_aperio_unusable_objective_power(tmp_path: Path, odd_image: np.ndarray, power: str) -> None:
    path = write_tiff_slide(tmp_path / "scan.svs", odd_image, mpp=None, description=f"{APERIO_HEADER}|AppMag = {power}")

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    assert raised.value.reason == "implausible_resolution"
    assert f"in openslide.objective-power (objective power {power}x)" in str(raised.value)


@pytest.mark.parametrize(
    ("rational", "stated"),
    [((0, 1), "inf µm/px in tiff.XResolution (0 pixels per centimeter)"),
     ((1, 0), "0 µm/px in tiff.XResolution (1/0 pixels per centimeter)"),
     ((0, 0), "nan µm/px in tiff.XResolution (0/0 pixels per centimeter)")],
    ids=["zero", "one-over-zero", "zero-over-zero"],
)
def test_tiff_resolution_zero_is_implausible(
    tmp_path: Path, odd_image: np.ndarray, rational: tuple[int, int], stated: str
) -> None:
    path = write_tiff_slide(tmp_path / "slide.tif", odd_image, mpp=0.5)
    overwrite_tags(path, {"XResolution": rational, "YResolution": rational})

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    assert raised.value.reason == "implausible_resolution"
    assert f"reports a resolution of {stated}" in str(raised.value)


@pytest.mark.parametrize("size", ["0", "-1", "NaN"])
def test_ome_unusable_physical_size(tmp_path: Path, odd_image: np.ndarray, size: str) -> None:
    path = write_tiff_slide(tmp_path / "scan.ome.tif", odd_image, mpp=0.25, ome=True, resolution_tags=False)
    with tifffile.TiffFile(path) as tif:
        description = tif.pages[0].description
    tifffile.tiffcomment(path, description.replace('PhysicalSizeX="0.25"', f'PhysicalSizeX="{size}"').encode())

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    assert raised.value.reason == "implausible_resolution"
    assert f"in OME-XML PhysicalSizeX ({size} µm)" in str(raised.value)


def test_non_square_tiff_pixels_warn(
    tmp_path: Path, odd_image: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_tiff_slide(tmp_path / "slide.tif", odd_image, mpp=0.5)
    overwrite_tags(path, {"YResolution": (5000, 1)})

    with caplog.at_level(logging.WARNING, logger="shared.slides.resolution"), open_slide(path) as slide:
        info = slide.info

    assert info.mpp == pytest.approx(0.5)
    assert info.mpp_source == "tiff-resolution"
    warnings = [message for message in caplog.messages if "non-square pixels" in message]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"slide {path} has non-square pixels: 0.5000 µm/px in x (tiff.XResolution) and 2.0000 µm/px in y "
        "(tiff.YResolution)"
    )


@pytest.mark.parametrize(
    "writer_options", [{"bigtiff": True}, {"byteorder": ">"}, {"bigtiff": True, "byteorder": ">"}],
    ids=["bigtiff", "big-endian", "big-endian-bigtiff"],
)
def test_tiff_variants_checked_for_truncation(tmp_path: Path, odd_image: np.ndarray, writer_options: dict) -> None:
    whole = tmp_path / "whole.tif"
    with tifffile.TiffWriter(whole, **writer_options) as writer:
        for index, step in enumerate((1, 2, 4)):
            level = np.ascontiguousarray(odd_image[::step, ::step])
            subfiletype = 0 if index == 0 else 1
            writer.write(
                level, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None, subfiletype=subfiletype
            )
    with tifffile.TiffFile(whole) as tif:
        last_directory = tif.pages[2].offset
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:last_directory])

    with open_slide(whole, mpp=0.5) as slide:
        levels = slide.info.level_count
    with pytest.raises(SlideError) as raised:
        open_slide(cut, mpp=0.5)

    assert levels == 3
    assert raised.value.reason == "damaged"
    assert f"a TIFF directory starts at byte {last_directory}, past the end" in str(raised.value)
