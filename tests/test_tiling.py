"""Patch grids and tile reading on real slides."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from slide_data import BRACS, BRACS_MPP_ESTIMATE, CMU1, NDPI

from shared.errors import ConfigError, SlideError
from shared.slides import (
    grid_over_tissue,
    iter_tiles,
    open_slide,
    tile_slide,
    write_patch_file,
)


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
