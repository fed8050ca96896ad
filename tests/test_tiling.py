"""Patch grids and tile reading: real slides, and synthetic slides for edges, magnifications and readers."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image
from slide_data import BRACS, BRACS_MPP_ESTIMATE, CMU1, NDPI
from synthetic_slides import NUCLEUS, STROMA, he_like, write_tiff_slide

from shared.errors import ConfigError, SlideError
from shared.slides import (
    TissueMask,
    grid_over_tissue,
    iter_tiles,
    open_slide,
    tile_slide,
    write_patch_file,
)
from shared.slides.grid import resolve_target_mpp


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
    assert raised.value.reason == "no_patches"
    assert "--min-tissue" in str(raised.value)


def test_grid_from_other_slide_raises(slides_dir: Path) -> None:
    ndpi_grid = tile_slide(slides_dir / NDPI, allow_fluorescence=True).grid

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
        ({"edge": "wrap"}, "edge='wrap'"),
        ({"target_magnification": -20}, "target_magnification=-20"),
    ],
    ids=["overlap-equals-size", "negative-overlap", "zero-size", "zero-mpp", "fraction-above-1", "unknown-edge",
         "negative-magnification"],
)
def test_grid_rejects_invalid_options(cmu1_tiled, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid_over_tissue(cmu1_tiled.info, cmu1_tiled.tissue, **options)


# Grid options and parallel reading on synthetic slides written with tifffile.


def _tissue_everywhere(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """Return an RGB image that is pink stroma with purple nuclei up to every edge, so every patch is tissue."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = STROMA
    image[rng.random((height, width)) < 0.08] = NUCLEUS
    return image


def _full_mask(info, downsample: float = 4.0) -> TissueMask:
    shape = (int(np.ceil(info.level0_height / downsample)), int(np.ceil(info.level0_width / downsample)))
    return TissueMask(mask=np.ones(shape, dtype=bool), downsample=downsample)


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 1001 x 777 px uncompressed tiled TIFF at 0.5 µm/px that is tissue everywhere, and its pixels."""
    image = _tissue_everywhere(777, 1001)
    path = write_tiff_slide(tmp_path_factory.mktemp("odd") / "odd.tif", image, mpp=0.5, compression=None)
    return path, image


def test_drop_edge_keeps_inside_patches(odd_slide) -> None:
    with open_slide(odd_slide[0]) as slide:
        grid = grid_over_tissue(slide.info, _full_mask(slide.info), edge="drop")

    # 224 px patches at the scan's own 0.5 µm/px: 4 columns (896 > 1001 - 224) and 3 rows (672 > 777 - 224).
    assert grid.edge == "drop"
    assert grid.patch_size_level0 == 224
    assert len(grid) == 12
    assert int(grid.coords[:, 0].max()) + 224 <= 1001
    assert int(grid.coords[:, 1].max()) + 224 <= 777


def test_pad_edge_keeps_overhanging_patches(odd_slide) -> None:
    with open_slide(odd_slide[0]) as slide:
        grid = grid_over_tissue(slide.info, _full_mask(slide.info), edge="pad", min_tissue_fraction=0.2)

    xs = sorted(set(grid.coords[:, 0].tolist()))
    ys = sorted(set(grid.coords[:, 1].tolist()))
    assert grid.edge == "pad"
    assert xs == [0, 224, 448, 672, 896]
    assert ys == [0, 224, 448, 672]
    assert len(grid) == 20


def test_pad_fraction_counts_padding(odd_slide) -> None:
    # The corner patch at (896, 672) has 105 x 105 of its 224 x 224 px inside the slide: 22 % tissue.
    with open_slide(odd_slide[0]) as slide:
        grid = grid_over_tissue(slide.info, _full_mask(slide.info), edge="pad", min_tissue_fraction=0.25)

    corners = {tuple(corner) for corner in grid.coords.tolist()}
    assert (896, 672) not in corners
    assert (896, 448) in corners  # 105 x 224 px inside: 47 %
    assert (672, 672) in corners
    assert len(grid) == 19


def test_padded_tiles_are_white_outside(odd_slide) -> None:
    path, image = odd_slide
    with open_slide(path) as slide:
        grid = grid_over_tissue(slide.info, _full_mask(slide.info), edge="pad", min_tissue_fraction=0.0)
        tiles = np.concatenate([tiles for _, tiles in iter_tiles(slide, grid, batch_size=7)])

    corner = [tuple(c) for c in grid.coords.tolist()].index((896, 672))
    tile = tiles[corner]
    assert (tile[:105, :105] == image[672:777, 896:1001]).all()
    assert (tile[:, 105:] == 255).all()
    assert (tile[105:, :] == 255).all()


def test_shifted_padded_grid_rejected(odd_slide) -> None:
    with open_slide(odd_slide[0]) as slide:
        padded = grid_over_tissue(slide.info, _full_mask(slide.info), edge="pad", min_tissue_fraction=0.0)
    shifted = replace(padded, coords=padded.coords + np.array([[1001, 0]], dtype=np.int64))

    with open_slide(odd_slide[0]) as slide, pytest.raises(SlideError, match="patch grid reaches"):
        next(iter_tiles(slide, shifted))


@pytest.mark.parametrize(
    ("magnification", "target_mpp", "patch_size_level0"),
    [(40, 0.25, 112), (20, 0.5, 224), (10, 1.0, 448), (5, 2.0, 896)],
    ids=["40x", "20x", "10x", "5x"],
)
def test_target_magnification_sets_mpp(odd_slide, magnification, target_mpp, patch_size_level0) -> None:
    with open_slide(odd_slide[0]) as slide:
        tissue = _full_mask(slide.info)
        by_magnification = grid_over_tissue(slide.info, tissue, target_magnification=magnification, edge="pad")
        by_mpp = grid_over_tissue(slide.info, tissue, target_mpp=target_mpp, edge="pad")

    assert by_magnification.target_mpp == pytest.approx(target_mpp)
    assert by_magnification.target_magnification == magnification
    assert by_magnification.patch_size_level0 == patch_size_level0
    assert (by_magnification.coords == by_mpp.coords).all()


def test_resolve_target_mpp_default_and_errors() -> None:
    assert resolve_target_mpp() == 0.5
    assert resolve_target_mpp(target_mpp=0.25) == 0.25
    assert resolve_target_mpp(target_magnification=40) == 0.25
    with pytest.raises(ConfigError, match="--target-mpp or --target-mag"):
        resolve_target_mpp(target_mpp=0.5, target_magnification=20)
    with pytest.raises(ConfigError, match="target_magnification=0"):
        resolve_target_mpp(target_magnification=0)
    with pytest.raises(ConfigError, match="target_mpp=nan"):
        resolve_target_mpp(target_mpp=float("nan"))


def test_tiny_slide_needs_pad(tmp_path: Path) -> None:
    path = write_tiff_slide(tmp_path / "tiny.tif", _tissue_everywhere(30, 40), mpp=0.5, tile=None, compression=None)

    with open_slide(path) as slide:
        drop = grid_over_tissue(slide.info, _full_mask(slide.info, 1.0), edge="drop")
        pad = grid_over_tissue(slide.info, _full_mask(slide.info, 1.0), edge="pad", min_tissue_fraction=0.0)
        (coords, tiles), = list(iter_tiles(slide, pad))

    assert len(drop) == 0
    assert coords.tolist() == [[0, 0]]
    assert tiles.shape == (1, 224, 224, 3)
    assert (tiles[0, 30:] == 255).all()
    assert (tiles[0, :, 40:] == 255).all()
    assert tiles[0, :30, :40].mean() < 220


def test_no_patches_reason_and_fix(tmp_path: Path) -> None:
    path = write_tiff_slide(tmp_path / "small.tif", he_like(400, 400), mpp=0.5)

    with pytest.raises(SlideError) as raised:
        tile_slide(path, patch_size=448)

    assert raised.value.reason == "no_patches"
    assert str(path) in raised.value.message
    assert "--min-tissue" in raised.value.message
    assert "--edge pad" in raised.value.message


@pytest.mark.parametrize("workers", [2, 4])
def test_parallel_reads_match_serial(cmu1_tiled, workers: int) -> None:
    with open_slide(cmu1_tiled.info.path) as slide:
        serial = list(iter_tiles(slide, cmu1_tiled.grid, batch_size=10))
        parallel = list(iter_tiles(slide, cmu1_tiled.grid, batch_size=10, workers=workers))

    assert len(parallel) == len(serial)
    for (serial_coords, serial_tiles), (parallel_coords, parallel_tiles) in zip(serial, parallel):
        assert (parallel_coords == serial_coords).all()
        assert (parallel_tiles == serial_tiles).all()


@pytest.mark.parametrize("kind", ["stripped-tiff", "png"])
def test_parallel_reads_other_readers(tmp_path: Path, kind: str) -> None:
    image = he_like(900, 1100, seed=3)
    if kind == "png":
        path = tmp_path / "slide.png"
        Image.fromarray(image).save(path)
    else:
        path = write_tiff_slide(tmp_path / "slide.tif", image, mpp=0.5, tile=None, compression=None)
    with open_slide(path, mpp=0.5) as slide:
        grid = grid_over_tissue(slide.info, _full_mask(slide.info), edge="pad", min_tissue_fraction=0.0)
        serial = np.concatenate([tiles for _, tiles in iter_tiles(slide, grid, batch_size=3)])
        parallel = np.concatenate([tiles for _, tiles in iter_tiles(slide, grid, batch_size=3, workers=3)])

    assert len(grid) == 25  # 5 x 5 patches start inside 1100 x 900 px
    assert (parallel == serial).all()
    assert (serial[0] == image[:224, :224]).all()


def test_parallel_reader_stops_its_threads(cmu1_tiled) -> None:
    with open_slide(cmu1_tiled.info.path) as slide:
        batches = iter_tiles(slide, cmu1_tiled.grid, batch_size=4, workers=3)
        first_coords, _ = next(batches)
        batches.close()

    readers = [thread for thread in threading.enumerate() if thread.name.startswith("tile-reader")]
    assert first_coords.tolist() == cmu1_tiled.grid.coords[:4].tolist()
    assert readers == []


def test_parallel_read_error_reaches_caller(cmu1_tiled) -> None:
    slide = open_slide(cmu1_tiled.info.path)
    batches = iter_tiles(slide, cmu1_tiled.grid, batch_size=4, workers=2)
    slide.close()

    with pytest.raises(SlideError, match="closed"):
        next(batches)


def test_iter_tiles_rejects_zero_workers(cmu1_tiled) -> None:
    with open_slide(cmu1_tiled.info.path) as slide, pytest.raises(ConfigError, match="workers=0"):
        next(iter_tiles(slide, cmu1_tiled.grid, workers=0))


def test_tile_slide_passes_grid_options(slides_dir: Path, tmp_path: Path) -> None:
    tiled = tile_slide(slides_dir / CMU1, target_magnification=10, edge="pad", overlap=24)
    path = write_patch_file(tmp_path / "CMU-1_patches.h5", tiled)

    with h5py.File(path, "r") as file:
        attrs = dict(file["coords"].attrs)

    # CMU-1 is 0.499 µm/px, so a 224 px patch at 1 µm/px covers round(224 * 1.0 / 0.499) level-0 px.
    assert tiled.grid.patch_size_level0 == 449
    assert attrs["patch_size_level0"] == 449
    assert attrs["target_magnification"] == 10
    assert attrs["target_mpp"] == pytest.approx(1.0)
    assert attrs["overlap"] == 24
    assert attrs["edge"] == "pad"
    assert (tiled.grid.coords % 401 == 0).all()  # the step is round((224 - 24) * 1.0 / 0.499) px


def test_drop_blurry_removes_blurred_half(tmp_path: Path) -> None:
    sharp = _tissue_everywhere(672, 1344, seed=5)
    image = sharp.copy()
    image[:, 672:] = cv2.GaussianBlur(sharp[:, 672:], (0, 0), 3.0)
    path = write_tiff_slide(tmp_path / "half-blurred.tif", image, mpp=0.5, compression=None)

    kept = tile_slide(path, min_tissue_fraction=0.0, drop_blurry=True, workers=2)
    everything = tile_slide(path, min_tissue_fraction=0.0)

    assert len(everything.grid) == 18
    assert kept.blurry_dropped == 9
    assert len(kept.grid) == 9
    assert (kept.grid.coords[:, 0] < 672).all()


def test_drop_blurry_all_blurred_fails(tmp_path: Path) -> None:
    image = cv2.GaussianBlur(_tissue_everywhere(448, 448, seed=6), (0, 0), 3.0)
    path = write_tiff_slide(tmp_path / "blurred.tif", image, mpp=0.5, compression=None)

    with pytest.raises(SlideError) as raised:
        tile_slide(path, min_tissue_fraction=0.0, drop_blurry=True)

    assert raised.value.reason == "no_patches"
    assert "--drop-blurry" in raised.value.message


def test_one_patch_log_is_singular(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiff_slide(tmp_path / "one.tif", _tissue_everywhere(300, 300, seed=7), mpp=0.5, compression=None)

    with caplog.at_level("INFO", logger="shared.slides.tiling"):
        tiled = tile_slide(path, min_tissue_fraction=0.0)

    assert len(tiled.grid) == 1
    assert "1 patch of 224 px" in caplog.text
    assert "1 patches" not in caplog.text


def test_one_blurred_patch_message_is_singular(tmp_path: Path) -> None:
    image = cv2.GaussianBlur(_tissue_everywhere(300, 300, seed=8), (0, 0), 3.0)
    path = write_tiff_slide(tmp_path / "blurred-one.tif", image, mpp=0.5, compression=None)

    with pytest.raises(SlideError) as raised:
        tile_slide(path, min_tissue_fraction=0.0, drop_blurry=True)

    assert raised.value.reason == "no_patches"
    assert "(1 patch checked)" in raised.value.message


def test_no_patches_advice_skips_current_options(tmp_path: Path) -> None:
    path = write_tiff_slide(tmp_path / "small.tif", he_like(400, 400), mpp=0.5)

    # A padded 2048 px patch is mostly outside the 400 px slide, so its tissue fraction is below 0.25.
    with pytest.raises(SlideError) as padded:
        tile_slide(path, patch_size=2048, edge="pad")
    # With edge="drop" no 448 px patch fits inside, whatever the minimum tissue fraction.
    with pytest.raises(SlideError) as no_minimum:
        tile_slide(path, patch_size=448, min_tissue_fraction=0.0)

    assert padded.value.reason == no_minimum.value.reason == "no_patches"
    assert "--edge pad" not in padded.value.message
    assert "--min-tissue" in padded.value.message
    assert "--edge pad" in no_minimum.value.message
    assert "--min-tissue" not in no_minimum.value.message


def test_slide_errors_name_path(odd_slide) -> None:
    path = odd_slide[0]
    with open_slide(path) as slide:
        info, tissue = slide.info, _full_mask(slide.info)
        padded = grid_over_tissue(info, tissue, edge="pad", min_tissue_fraction=0.0)
        shifted = replace(padded, coords=padded.coords + np.array([[1001, 0]], dtype=np.int64))

        # A 2 px patch with 1 px overlap at 0.05 µm/px steps 0.1 level-0 px on this 0.5 µm/px slide.
        with pytest.raises(ConfigError) as step_too_small:
            grid_over_tissue(info, tissue, patch_size=2, overlap=1, target_mpp=0.05)
        with pytest.raises(SlideError) as grid_elsewhere:
            next(iter_tiles(slide, shifted))

    assert f"slide {path}:" in step_too_small.value.message
    assert info.slide_id not in step_too_small.value.message
    assert f"slide {path}:" in grid_elsewhere.value.message
    assert info.slide_id not in grid_elsewhere.value.message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mpp": "0.5"}, "mpp='0.5' must be a number"),
        ({"mpp": True}, "mpp=True must be a number"),
        ({"target_mpp": "0.5"}, "target_mpp='0.5' must be a resolution"),
        ({"target_mpp": True}, "target_mpp=True must be a resolution"),
        ({"target_magnification": 1e-6}, "target_magnification=1e-06 must be an objective power from 0.5 to 200"),
        ({"patch_size": True}, "patch_size=True must be a whole number"),
        ({"patch_size": 224.7}, "patch_size=224.7 must be a whole number"),
        ({"patch_size": 4097}, "patch_size=4097 must be a whole number of pixels at the target resolution from 1 to 4096"),
        ({"overlap": 1.5}, "overlap=1.5 px must be a whole number"),
        ({"min_tissue_fraction": "0.5"}, "min_tissue_fraction='0.5' must be a number"),
        ({"min_area_um2": float("inf")}, "min_area_um2=inf must be an area"),
        ({"workers": 0}, "workers=0 must be a whole number of reader threads"),
    ],
    ids=["mpp-text", "mpp-bool", "target-text", "target-bool", "magnification-tiny", "size-bool", "size-float",
         "size-huge", "overlap-float", "fraction-text", "area-infinite", "workers-zero"],
)
def test_tile_slide_checks_options_first(tmp_path: Path, options: dict, message: str) -> None:
    # The slide does not exist, so a ConfigError shows that the options were checked before it was opened.
    with pytest.raises(ConfigError) as raised:
        tile_slide(tmp_path / "no-such-slide.svs", **options)

    assert message in raised.value.message
