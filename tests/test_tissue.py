"""Tissue detection on real and synthetic slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_data import TCGA, TCGA_MPP_ESTIMATE

from shared.errors import SlideError
from shared.slides import (
    tile_slide,
)


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
