"""Slide reading, tissue detection, patch grids and tiling on real slides through openslide."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from shared.errors import ConfigError, SlideError
from shared.slides import (
    grid_over_tissue,
    iter_tiles,
    magnification_for_mpp,
    open_slide,
    tile_slide,
    write_patch_file,
)
from shared.slides.reader import compute_slide_id, resolve_mpp

CMU1 = "CMU-1-Small-Region.svs"
NDPI = "test3-DAPI-2.ndpi"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
BRACS = "BRACS_1640_N_3_cropped.tiff"

# The TCGA section has no resolution in its metadata. Its nuclei are about 4-6 level-0 pixels across,
# and nuclei are about 7-10 µm, so the scan is roughly 1.5-2 µm/px (a 5x scan).
TCGA_MPP_ESTIMATE = 2.0
# The BRACS crop reports 1000 µm/px. Its nuclei are about 30 px across, so it is roughly a 40x scan.
BRACS_MPP_ESTIMATE = 0.25


@pytest.fixture(scope="module")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="module")
def cmu1_tiled(slides_dir: Path):
    return tile_slide(slides_dir / CMU1)


def test_cmu1_info_from_metadata(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide:
        info = slide.info

    assert info.mpp == pytest.approx(0.499, abs=1e-6)
    assert info.mpp_source == "metadata"
    assert info.level0_magnification == 20
    assert (info.level0_width, info.level0_height) == (2220, 2967)
    assert info.level_count == 1
    assert info.level_downsamples == (1.0,)
    assert info.vendor == "aperio"
    assert info.name == "CMU-1-Small-Region"
    assert info.path == slides_dir / CMU1


def test_slide_id_ignores_file_name(slides_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "patient-1234.svs"
    renamed.symlink_to(slides_dir / CMU1)

    with open_slide(slides_dir / CMU1) as original, open_slide(renamed) as linked:
        original_id, linked_id = original.info.slide_id, linked.info.slide_id

    assert len(original_id) == 16
    assert int(original_id, 16) >= 0
    assert linked_id == original_id
    assert "CMU" not in original_id
    assert compute_slide_id(slides_dir / TCGA) != original_id


def test_override_wins_over_metadata(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1, mpp=0.25) as slide:
        info = slide.info

    assert info.mpp == 0.25
    assert info.mpp_source == "override"
    assert info.level0_magnification == 40


def test_cmu1_tissue_and_grid(cmu1_tiled) -> None:
    info, grid, tissue = cmu1_tiled.info, cmu1_tiled.grid, cmu1_tiled.tissue
    columns = (info.level0_width - grid.patch_size_level0) // grid.patch_size_level0 + 1
    rows = (info.level0_height - grid.patch_size_level0) // grid.patch_size_level0 + 1

    # About 40 % of this crop is tissue, and the rest is glass.
    assert 0.2 < tissue.mask.mean() < 0.7
    assert tissue.fraction(0, 0, 224) < 0.05
    assert grid.patch_size == 224
    assert grid.patch_size_level0 == round(224 * 0.5 / 0.499) == 224
    assert grid.target_mpp == 0.5
    assert grid.target_magnification == 20
    assert grid.overlap == 0
    assert grid.coords.dtype == np.int64
    assert 0 < len(grid) < columns * rows
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + grid.patch_size_level0 <= info.level0_width).all()
    assert (grid.coords[:, 1] + grid.patch_size_level0 <= info.level0_height).all()
    assert (grid.coords % grid.patch_size_level0 == 0).all()


def test_grid_is_row_major(cmu1_tiled) -> None:
    coords = cmu1_tiled.grid.coords
    order = np.lexsort((coords[:, 0], coords[:, 1]))  # sort by y, then x

    assert (order == np.arange(len(coords))).all()


def test_grid_keeps_tissue_patches_only(cmu1_tiled) -> None:
    grid, tissue = cmu1_tiled.grid, cmu1_tiled.tissue
    fractions = tissue.fractions(grid.coords, grid.patch_size_level0)

    assert (fractions >= 0.25).all()
    for x, y in grid.coords[:5]:
        assert tissue.fraction(int(x), int(y), grid.patch_size_level0) >= 0.25


def test_cmu1_tiles_are_real_he(cmu1_tiled) -> None:
    grid = cmu1_tiled.grid
    batches = []
    with open_slide(cmu1_tiled.info.path) as slide:
        for coords, tiles in iter_tiles(slide, grid, batch_size=16):
            batches.append((coords, tiles))

    sizes = [len(coords) for coords, _ in batches]
    coords = np.concatenate([coords for coords, _ in batches])
    tiles = np.concatenate([tiles for _, tiles in batches])
    saturation = np.asarray(Image.fromarray(tiles.reshape(-1, 224, 3)).convert("HSV"))[..., 1]

    assert sizes[:-1] == [16] * (len(sizes) - 1)
    assert sum(sizes) == len(grid)
    assert (coords == grid.coords).all()
    assert coords.dtype == np.int64
    assert tiles.shape == (len(grid), 224, 224, 3)
    assert tiles.dtype == np.uint8
    # H&E is stained pink and purple: darker than glass, varied and clearly saturated.
    assert tiles.mean() < 215
    assert tiles.std() > 25
    assert saturation.mean() > 40


def test_glass_and_outside_read_white(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide:
        glass = slide.read_region_level0(0, 0, 224, 224)
        outside = slide.read_region_level0(slide.info.level0_width + 100, 0, 224, 112)

    assert glass.shape == (224, 224, 3)
    assert glass.mean() > 220
    assert outside.shape == (112, 112, 3)
    assert (outside == 255).all()


def test_thumbnail_keeps_aspect_ratio(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU1) as slide:
        thumbnail = slide.thumbnail(512)

    assert thumbnail.shape == (512, round(2220 * 512 / 2967), 3)
    assert thumbnail.dtype == np.uint8


def test_patch_file_has_trident_attrs(cmu1_tiled, tmp_path: Path) -> None:
    path = write_patch_file(tmp_path / "patches" / "CMU-1-Small-Region_patches.h5", cmu1_tiled)

    with h5py.File(path, "r") as file:
        coords = file["coords"][()]
        attrs = dict(file["coords"].attrs)

    assert coords.dtype == np.int64
    assert (coords == cmu1_tiled.grid.coords).all()
    assert attrs["patch_size"] == 224
    assert attrs["patch_size_level0"] == 224
    assert attrs["level0_magnification"] == 20
    assert attrs["target_magnification"] == 20
    assert attrs["overlap"] == 0
    assert attrs["name"] == "CMU-1-Small-Region"
    assert attrs["level0_width"] == 2220
    assert attrs["level0_height"] == 2967
    assert attrs["mpp"] == pytest.approx(0.499)
    assert sorted(path.parent.iterdir()) == [path]


def test_ndpi_40x_reads_from_level_1(slides_dir: Path) -> None:
    with open_slide(slides_dir / NDPI) as slide:
        info = slide.info
        tiled = tile_slide(slides_dir / NDPI)
        grid = tiled.grid
        x, y = (int(value) for value in grid.coords[len(grid) // 2])
        level = slide.best_level_for_downsample(grid.patch_size_level0 / grid.patch_size)
        tile = slide.read_region_level0(x, y, grid.patch_size_level0, grid.patch_size)

    with openslide.OpenSlide(str(slides_dir / NDPI)) as handle:
        from_level_1 = handle.read_region((x, y), 1, (246, 246)).convert("RGB")
        from_level_0 = handle.read_region((x, y), 0, (491, 491)).convert("RGB")
    expected = np.asarray(from_level_1.resize((224, 224), Image.Resampling.LANCZOS))
    from_full_resolution = np.asarray(from_level_0.resize((224, 224), Image.Resampling.LANCZOS))

    assert info.mpp == pytest.approx(0.22818, abs=1e-4)
    assert info.level0_magnification == 40
    assert info.level_count == 7
    assert grid.patch_size_level0 == round(224 * 0.5 / info.mpp) == 491
    assert len(grid) > 0
    assert level == 1
    assert tile.shape == (224, 224, 3)
    assert (tile == expected).all()
    assert not (tile == from_full_resolution).all()


def test_tcga_without_resolution_names_override(slides_dir: Path) -> None:
    with pytest.raises(SlideError) as raised:
        open_slide(slides_dir / TCGA)

    message = str(raised.value)
    assert TCGA in message
    assert "no resolution" in message
    assert "mpp=" in message
    assert "--mpp" in message


def test_tcga_with_override_finds_tissue(slides_dir: Path) -> None:
    tiled = tile_slide(slides_dir / TCGA, mpp=TCGA_MPP_ESTIMATE)
    info, grid, tissue = tiled.info, tiled.grid, tiled.tissue

    assert info.mpp_source == "override"
    assert info.level0_magnification == 5
    # The section covers about 60 % of the image, on white glass.
    assert 0.4 < tissue.mask.mean() < 0.85
    assert tissue.fraction(0, 0, 200) < 0.05
    assert grid.patch_size_level0 == round(224 * 0.5 / TCGA_MPP_ESTIMATE) == 56
    assert len(grid) > 1000


def test_bracs_absurd_resolution_rejected(slides_dir: Path) -> None:
    with pytest.raises(SlideError) as raised:
        open_slide(slides_dir / BRACS)

    message = str(raised.value)
    assert BRACS in message
    assert "1000" in message
    assert "mpp=" in message
    assert raised.value.value == 1000


def test_bracs_with_override_tiles(slides_dir: Path) -> None:
    tiled = tile_slide(slides_dir / BRACS, mpp=BRACS_MPP_ESTIMATE)
    with open_slide(slides_dir / BRACS, mpp=BRACS_MPP_ESTIMATE) as slide:
        level = slide.best_level_for_downsample(tiled.grid.patch_size_level0 / 224)
        (coords, tiles), = list(iter_tiles(slide, tiled.grid))

    assert tiled.info.mpp_source == "override"
    assert tiled.tissue.mask.mean() > 0.9
    assert tiled.grid.patch_size_level0 == 448
    assert coords.tolist() == [[0, 0]]
    # Level 1's downsample is 2.0013, within the tolerance of the requested 2.0.
    assert level == 1
    assert tiles.shape == (1, 224, 224, 3)
    assert tiles.mean() < 215


def test_no_patch_fits_raises(slides_dir: Path) -> None:
    # 448 px at 0.5 µm/px is 896 level-0 px, more than the 650 x 743 px crop.
    with pytest.raises(SlideError) as raised:
        tile_slide(slides_dir / BRACS, mpp=BRACS_MPP_ESTIMATE, patch_size=448)

    assert BRACS in str(raised.value)
    assert "min_tissue_fraction" in str(raised.value)


def test_missing_slide_raises(tmp_path: Path) -> None:
    missing = tmp_path / "absent.svs"

    with pytest.raises(SlideError) as raised:
        open_slide(missing)

    assert str(raised.value).startswith(f"slide not found: {missing}")


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("random.svs", np.random.default_rng(0).bytes(4096)),
        ("notes.tif", b"this is a text file, not a slide\n"),
    ],
    ids=["random-bytes", "text-file"],
)
def test_non_slide_file_raises(tmp_path: Path, file_name: str, content: bytes) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)

    with pytest.raises(SlideError) as raised:
        open_slide(path)

    message = str(raised.value)
    assert str(path) in message
    assert "not a slide openslide can read" in message
    assert "Aperio (.svs" in message
    assert isinstance(raised.value.__cause__, openslide.OpenSlideError)


def test_directory_is_not_a_slide(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="is not a file"):
        open_slide(tmp_path)


@pytest.mark.parametrize("mpp", [0.0, -0.5, 1000.0, float("nan")])
def test_implausible_override_raises(slides_dir: Path, mpp: float) -> None:
    with pytest.raises(ConfigError, match="mpp override"):
        open_slide(slides_dir / CMU1, mpp=mpp)


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    glass = np.full((1024, 1024, 3), 245, dtype=np.uint8)
    tifffile.imwrite(
        path, glass, tile=(256, 256), photometric="rgb", resolution=(20_000, 20_000), resolutionunit="CENTIMETER"
    )

    with pytest.raises(SlideError) as raised:
        tile_slide(path)

    assert "no tissue found" in str(raised.value)
    assert str(path) in str(raised.value)


def test_closed_slide_raises(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / CMU1)
    slide.close()

    with pytest.raises(SlideError, match="is closed"):
        slide.read_region_level0(0, 0, 224, 224)


def test_grid_from_other_slide_raises(slides_dir: Path) -> None:
    ndpi_grid = tile_slide(slides_dir / NDPI).grid

    with open_slide(slides_dir / CMU1) as slide, pytest.raises(SlideError, match="patch grid reaches"):
        next(iter_tiles(slide, ndpi_grid))


def test_grid_overlap_halves_stride(cmu1_tiled) -> None:
    grid = grid_over_tissue(cmu1_tiled.info, cmu1_tiled.tissue, overlap=112)

    assert grid.overlap == 112
    assert (grid.coords % 112 == 0).all()
    assert (grid.coords % 224 != 0).any()
    assert len(grid) > 2 * len(cmu1_tiled.grid)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"overlap": 224}, "overlap=224"),
        ({"overlap": -1}, "overlap=-1"),
        ({"patch_size": 0}, "patch_size=0"),
        ({"target_mpp": 0.0}, "target_mpp=0.0"),
        ({"min_tissue_fraction": 1.5}, "min_tissue_fraction=1.5"),
    ],
    ids=["overlap-equals-size", "negative-overlap", "zero-size", "zero-mpp", "fraction-above-1"],
)
def test_grid_rejects_invalid_options(cmu1_tiled, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid_over_tissue(cmu1_tiled.info, cmu1_tiled.tissue, **options)


@pytest.mark.parametrize(
    ("mpp", "magnification"),
    [(0.12, 80), (0.17, 60), (0.228, 40), (0.25, 40), (0.499, 20), (0.5, 20), (1.0, 10), (2.0, 5), (4.0, 2)],
)
def test_magnification_buckets(mpp: float, magnification: int) -> None:
    assert magnification_for_mpp(mpp) == magnification


@pytest.mark.parametrize(
    ("unit", "resolution", "expected"),
    [("centimeter", "20000", 0.5), ("inch", "101600", 0.25)],
)
def test_resolution_from_tiff_tags(unit: str, resolution: str, expected: float) -> None:
    properties = {"tiff.XResolution": resolution, "tiff.ResolutionUnit": unit}

    mpp, source = resolve_mpp(properties, path=Path("scan.tif"))

    assert mpp == pytest.approx(expected)
    assert source == "tiff-resolution"
