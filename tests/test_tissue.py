"""Tissue detection, artefacts, contours, overlays and tile sharpness, on real and synthetic slides."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_data import BRACS, BRACS_MPP_ESTIMATE, CMU1, NDPI, TCGA, TCGA_MPP_ESTIMATE
from synthetic_slides import GLASS, NUCLEUS, STROMA, write_tiff_slide

from shared.errors import ConfigError, SlideError
from shared.slides import grid_over_tissue, iter_tiles, open_slide, tile_slide
from shared.slides.contours import contours_geojson, tissue_contours, write_geojson
from shared.slides.overlay import ARTEFACT_COLOUR, GRID_COLOURS, render_overlay, save_overlay, save_thumbnail
from shared.slides.quality import BLUR_THRESHOLD, find_artefacts, sharpness
from shared.slides.tissue import MAX_FILLED_HOLE_UM2, TissueMask, brightfield_foreground, detect_tissue

SIDE = 1536  # level-0 pixels of a synthetic slide's side
MPP = 1.0  # µm per level-0 pixel of a synthetic slide, so level-0 pixels are µm


# Drawing helpers for synthetic slides. Coordinates are level-0 pixels.


def _glass() -> np.ndarray:
    image = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
    image[:] = GLASS
    return image


def _disc(center: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    return (xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2


def _paint_tissue(image: np.ndarray, region: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Paint ``region`` as pink stroma dotted with purple nuclei, with scanner-like noise everywhere."""
    rng = np.random.default_rng(seed)
    image = image.copy()
    image[region] = STROMA
    image[region & (rng.random(region.shape) < 0.08)] = NUCLEUS
    noise = rng.normal(0.0, 3.0, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _stroke(shape: tuple[int, int], start: tuple[int, int], end: tuple[int, int], width: int) -> np.ndarray:
    """Return the mask of a straight pen stroke ``width`` level-0 pixels wide."""
    canvas = np.zeros(shape, dtype=np.uint8)
    cv2.line(canvas, start, end, 1, thickness=width, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _draw_ink(image: np.ndarray, stroke: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Lay translucent ink over ``stroke``: it darkens whatever lies beneath, as marker ink does."""
    inked = image.astype(np.float64)
    transmittance = np.asarray(colour, dtype=np.float64) / 255.0
    inked[stroke] *= transmittance
    # Soften the stroke's edges over a few pixels, as in a scan.
    blurred = cv2.GaussianBlur(inked.astype(np.uint8), (0, 0), 2.0)
    edge = cv2.dilate(stroke.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    result = image.copy()
    result[edge] = blurred[edge]
    return result


def _fold(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Return ``image`` with ``region`` seen through two layers of tissue: twice the optical density."""
    folded = image.astype(np.float64) / 255.0
    folded[region] = folded[region] ** 2
    return (folded * 255.0).round().astype(np.uint8)


def _write(tmp_path: Path, image: np.ndarray, name: str = "slide.tif") -> Path:
    return write_tiff_slide(tmp_path / name, image, mpp=MPP, compression="zlib")


def _detect(path: Path, **options) -> TissueMask:
    with open_slide(path) as slide:
        return detect_tissue(slide, **options)


def _on_mask(tissue: TissueMask, region: np.ndarray) -> np.ndarray:
    """Resample a level-0 boolean ``region`` to the mask's grid: a mask pixel is in it when mostly covered."""
    height, width = tissue.mask.shape
    return cv2.resize(region.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0.5


def _shrink(region: np.ndarray, margin: int) -> np.ndarray:
    """Erode ``region`` by ``margin`` level-0 pixels, to test its core away from smoothed edges."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    return cv2.erode(region.astype(np.uint8), kernel).astype(bool)


def _grow(region: np.ndarray, margin: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    return cv2.dilate(region.astype(np.uint8), kernel).astype(bool)


def _covered(mask: np.ndarray, region: np.ndarray) -> float:
    """Return the share of ``region``'s pixels that ``mask`` contains."""
    return float(mask[region].mean())


# Real slides.


def test_cmu1_tissue_and_grid(cmu1_tiled) -> None:
    info, grid, tissue = cmu1_tiled.info, cmu1_tiled.grid, cmu1_tiled.tissue
    columns = (info.level0_width - grid.patch_size_level0) // grid.patch_size_level0 + 1
    rows = (info.level0_height - grid.patch_size_level0) // grid.patch_size_level0 + 1

    # About 40 % of this crop is tissue, and the rest is glass.
    assert 0.2 < tissue.mask.mean() < 0.7
    assert tissue.fraction(0, 0, 224) < 0.05
    assert tissue.illumination == "brightfield"
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


def test_cmu1_mask_keeps_its_thumbnail(cmu1_tiled) -> None:
    tissue = cmu1_tiled.tissue

    assert tissue.thumbnail.shape == (*tissue.mask.shape, 3)
    assert tissue.thumbnail.dtype == np.uint8
    assert tissue.artefacts.shape == tissue.mask.shape
    assert tissue.downsample == pytest.approx(cmu1_tiled.info.level0_width / tissue.mask.shape[1])
    # The mask was computed on this thumbnail: glass is bright and unsaturated, tissue is not.
    assert tissue.thumbnail[~tissue.mask].mean() > 220
    assert tissue.thumbnail[tissue.mask].mean() < 200


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


def test_tcga_large_tear_stays_a_hole(slides_dir: Path) -> None:
    with open_slide(slides_dir / TCGA, mpp=TCGA_MPP_ESTIMATE) as slide:
        tissue = detect_tissue(slide)
    # The triangular tear right of the centre is glass enclosed by tissue, larger than the holes
    # that are filled. Its centre is at about level-0 (2830, 1930).
    column, row = round(2830 / tissue.downsample), round(1930 / tissue.downsample)

    assert not tissue.mask[row, column]
    assert tissue.mask[row, column - 60 : column - 40].all()


@pytest.mark.parametrize(
    ("name", "mpp"),
    [(CMU1, None), (TCGA, TCGA_MPP_ESTIMATE), (BRACS, BRACS_MPP_ESTIMATE)],
    ids=["cmu1", "tcga", "bracs"],
)
def test_real_he_slides_are_brightfield_with_few_artefacts(slides_dir: Path, name: str, mpp: float | None) -> None:
    with open_slide(slides_dir / name, mpp=mpp) as slide:
        tissue = detect_tissue(slide)

    assert tissue.illumination == "brightfield"
    assert tissue.mask.any()
    # None of these slides has pen marks. The TCGA section's rolled, dark edges count as folds.
    assert tissue.artefacts.mean() < 0.01


def test_bracs_crop_is_all_tissue(slides_dir: Path) -> None:
    with open_slide(slides_dir / BRACS, mpp=BRACS_MPP_ESTIMATE) as slide:
        tissue = detect_tissue(slide)

    # The crop is 160 x 185 µm of breast tissue with no glass, far below the default minimum area.
    # The minimum is capped at a share of the slide's area, so the crop keeps its tissue.
    assert tissue.mask.mean() > 0.95


def test_dapi_refused_as_not_brightfield(slides_dir: Path) -> None:
    path = slides_dir / NDPI
    with open_slide(path) as slide, pytest.raises(SlideError) as raised:
        detect_tissue(slide)

    message = str(raised.value)
    assert raised.value.reason == "not_brightfield"
    assert str(path) in message
    assert "fluorescence" in message
    assert "allow_fluorescence=True" in message
    assert "--allow-fluorescence" in message
    assert raised.value.value < raised.value.limit


def test_dapi_opt_in_skips_background(slides_dir: Path) -> None:
    with open_slide(slides_dir / NDPI) as slide:
        info = slide.info
        tissue = detect_tissue(slide, allow_fluorescence=True)
    grid = grid_over_tissue(info, tissue)

    # Background, measured independently of the detector: the brightest channel, averaged over
    # about 20 µm, at most 5 grey levels (the background is 2-4, tissue autofluorescence above 8).
    pixel_um = info.mpp * tissue.downsample
    signal = cv2.GaussianBlur(tissue.thumbnail.max(axis=2).astype(np.float32), (0, 0), 20.0 / pixel_um)
    background = signal <= 5.0
    size = grid.patch_size_level0 / tissue.downsample
    background_shares = []
    for x, y in grid.coords / tissue.downsample:
        patch = background[round(y) : round(y + size), round(x) : round(x + size)]
        background_shares.append(patch.mean())

    assert tissue.illumination == "fluorescence"
    assert 0.5 < tissue.mask.mean() < 0.95
    assert 0.05 < background.mean() < 0.4
    assert _covered(tissue.mask, background) < 0.05
    assert len(grid) > 20
    assert max(background_shares) < 0.5
    assert not tissue.artefacts.any()


# Synthetic slides.


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    path = _write(tmp_path, _paint_tissue(_glass(), np.zeros((SIDE, SIDE), dtype=bool)), "blank.tif")

    with pytest.raises(SlideError) as raised:
        tile_slide(path)

    message = str(raised.value)
    assert raised.value.reason == "no_tissue"
    assert "no tissue found" in message
    assert str(path) in message
    assert "--min-area-um2" in message


PEN_COLOURS = {"blue": (40, 70, 190), "green": (50, 150, 80), "black": (35, 35, 40)}


@pytest.mark.parametrize("colour", PEN_COLOURS.values(), ids=PEN_COLOURS.keys())
def test_pen_stroke_is_removed(tmp_path: Path, colour: tuple[int, int, int]) -> None:
    tissue_region = _disc((560, 760), 380) | _disc((1100, 700), 300)
    stroke = _stroke((SIDE, SIDE), (80, 200), (1450, 1350), width=90)
    image = _draw_ink(_paint_tissue(_glass(), tissue_region), stroke, colour)
    path = _write(tmp_path, image)

    tissue = _detect(path)
    kept = _detect(path, remove_artefacts=False)

    stroke_core = _on_mask(tissue, _shrink(stroke, 20))
    tissue_away = _on_mask(tissue, _shrink(tissue_region, 30) & ~_grow(stroke, 60))
    assert _covered(tissue.mask, stroke_core) < 0.02
    assert _covered(tissue.artefacts, stroke_core) > 0.9
    assert _covered(tissue.mask, tissue_away) > 0.97
    # Without artefact removal, the ink counts as foreground, so the removal above is what cut it.
    assert _covered(kept.mask, stroke_core) > 0.9
    assert not kept.artefacts.any()


@pytest.mark.parametrize(("colour", "kind"), [("blue", "pen"), ("green", "pen"), ("black", "dark")])
def test_ink_found_as_its_kind(tmp_path: Path, colour: str, kind: str) -> None:
    tissue_region = _disc((560, 760), 380)
    stroke = _stroke((SIDE, SIDE), (1100, 100), (1100, 1400), width=120)
    image = _draw_ink(_paint_tissue(_glass(), tissue_region), stroke, PEN_COLOURS[colour])
    with open_slide(_write(tmp_path, image)) as slide:
        thumbnail = detect_tissue(slide, remove_artefacts=False).thumbnail
    pixel_um = MPP * SIDE / thumbnail.shape[1]

    found = find_artefacts(
        thumbnail, brightfield_foreground(thumbnail), pixel_um=pixel_um, min_area_px=20_000 / pixel_um**2
    )

    height, width = thumbnail.shape[:2]
    stroke_core = cv2.resize(_shrink(stroke, 20).astype(np.float32), (width, height)) > 0.5
    tissue_core = cv2.resize(_shrink(tissue_region, 20).astype(np.float32), (width, height)) > 0.5
    shares = {name: _covered(getattr(found, name), stroke_core) for name in ("pen", "dark", "fold")}
    assert shares[kind] > 0.95, shares
    assert all(share < 0.05 for name, share in shares.items() if name != kind), shares
    assert not found.combined()[tissue_core].any()


def test_pen_ring_around_tissue_is_not_filled(tmp_path: Path) -> None:
    # A pathologist's ring around a small piece of tissue. The glass between them (42,700 µm²) is
    # smaller than the holes that are filled, so it would count as tissue if the ring stayed.
    tissue_region = _disc((768, 768), 150)
    ring = _disc((768, 768), 250) & ~_disc((768, 768), 190)
    image = _draw_ink(_paint_tissue(_glass(), tissue_region), ring, PEN_COLOURS["blue"])
    path = _write(tmp_path, image)

    tissue = _detect(path)
    kept = _detect(path, remove_artefacts=False)

    glass_gap = _on_mask(tissue, _shrink(_disc((768, 768), 190) & ~tissue_region, 10))
    assert _covered(tissue.mask, glass_gap) < 0.02
    assert _covered(tissue.mask, _on_mask(tissue, _shrink(tissue_region, 20))) > 0.97
    assert _covered(kept.mask, glass_gap) > 0.97


def test_fold_band_is_removed(tmp_path: Path) -> None:
    tissue_region = _disc((768, 768), 600)
    rows = np.arange(SIDE)[:, None]
    band = tissue_region & (np.abs(rows - 768) < 90)  # a horizontal band 180 µm wide
    image = _fold(_paint_tissue(_glass(), tissue_region), band)

    tissue = _detect(_write(tmp_path, image))
    kept = _detect(_write(tmp_path, image), remove_artefacts=False)

    band_core = _on_mask(tissue, _shrink(band, 30))
    tissue_away = _on_mask(tissue, _shrink(tissue_region, 30) & ~_grow(band, 80))
    assert _covered(tissue.mask, band_core) < 0.1
    assert _covered(tissue.artefacts, band_core) > 0.8
    assert _covered(tissue.mask, tissue_away) > 0.97
    assert _covered(kept.mask, band_core) > 0.97


def test_holes_filled_by_choice(tmp_path: Path) -> None:
    small_hole = _disc((560, 768), 60)  # 11,300 µm², below MAX_FILLED_HOLE_UM2
    large_hole = _disc((1000, 768), 200)  # 125,700 µm², above it
    assert small_hole.sum() * MPP**2 < MAX_FILLED_HOLE_UM2 < large_hole.sum() * MPP**2
    tissue_region = _disc((768, 768), 560) & ~small_hole & ~large_hole
    path = _write(tmp_path, _paint_tissue(_glass(), tissue_region))

    filled = _detect(path)
    unfilled = _detect(path, fill_holes=False)

    small_core = _on_mask(filled, _shrink(small_hole, 10))
    large_core = _on_mask(filled, _shrink(large_hole, 10))
    assert _covered(filled.mask, small_core) > 0.97
    assert _covered(filled.mask, large_core) < 0.02
    assert _covered(unfilled.mask, small_core) < 0.02
    assert _covered(unfilled.mask, large_core) < 0.02


def test_small_fragments_dropped(tmp_path: Path) -> None:
    main = _disc((600, 700), 400)
    fragments = _disc((1300, 200), 50) | _disc((1300, 1300), 50)  # 7,900 µm² each
    path = _write(tmp_path, _paint_tissue(_glass(), main | fragments))

    default = _detect(path)
    smaller_minimum = _detect(path, min_area_um2=5_000.0)

    fragment_cores = _on_mask(default, _shrink(fragments, 10))
    assert _covered(default.mask, fragment_cores) == 0.0
    assert _covered(default.mask, _on_mask(default, _shrink(main, 20))) > 0.97
    assert _covered(smaller_minimum.mask, fragment_cores) > 0.97


def test_synthetic_fluorescence_refused_then_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    section = _disc((700, 800), 500)
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    image[..., 2] = rng.integers(1, 5, size=(SIDE, SIDE))  # dark background, 1-4 grey levels
    image[..., 2][section] = rng.integers(9, 16, size=int(section.sum()))  # faint autofluorescence
    nuclei = section & (rng.random((SIDE, SIDE)) < 0.03)
    image[..., 2][nuclei] = 220
    path = _write(tmp_path, image)

    with pytest.raises(SlideError) as raised:
        _detect(path)
    tissue = _detect(path, allow_fluorescence=True)

    assert raised.value.reason == "not_brightfield"
    assert tissue.illumination == "fluorescence"
    assert _covered(tissue.mask, _on_mask(tissue, _shrink(section, 20))) > 0.97
    assert _covered(tissue.mask, _on_mask(tissue, ~_grow(section, 40))) < 0.01


def _fluorescence(region: np.ndarray, *, level: int, channels: tuple[int, ...] = (2,), seed: int = 0) -> np.ndarray:
    """Draw a fluorescence scan: noise at 1-4 grey levels, ``region`` at ``level`` in ``channels``, nuclei at 220."""
    rng = np.random.default_rng(seed)
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    nuclei = region & (rng.random(region.shape) < 0.01)
    for channel in channels:
        signal = rng.integers(1, 5, size=region.shape).astype(np.float64)
        signal[region] = level + rng.normal(0.0, 3.0, size=int(region.sum()))
        signal[nuclei] = 220
        image[..., channel] = np.clip(signal, 0, 255).astype(np.uint8)
    return image


def _write_grey(tmp_path: Path, grey: np.ndarray, name: str) -> Path:
    """Write a single-channel (min-is-black) tiled TIFF at MPP µm/px, as a grey scanner or converter would."""
    path = tmp_path / name
    pixels_per_cm = 10_000.0 / MPP
    tifffile.imwrite(
        path, grey, photometric="minisblack", tile=(256, 256), compression="zlib",
        resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER", metadata=None,
    )
    return path


def test_dark_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    path = _write(tmp_path, _fluorescence(np.zeros((SIDE, SIDE), dtype=bool), level=0), "dark_blank.tif")

    with pytest.raises(SlideError) as refused:
        _detect(path)
    for remove_artefacts in (True, False):
        with pytest.raises(SlideError) as raised:
            tile_slide(path, allow_fluorescence=True, remove_artefacts=remove_artefacts)

        message = str(raised.value)
        assert raised.value.reason == "no_tissue"
        assert str(path) in message
        assert "fluorescence" in message
        assert "background" in message
    assert refused.value.reason == "not_brightfield"


# Fluorescence slides whose tissue covers 70 % of the field, so that the median pixel is tissue.
LARGE_FLUORESCENCE = {
    "dapi": {"level": 120, "channels": (2,)},
    "two_channels": {"level": 85, "channels": (1, 2)},
    "grey": {"level": 120, "channels": (0, 1, 2)},
}


@pytest.mark.parametrize("options", LARGE_FLUORESCENCE.values(), ids=LARGE_FLUORESCENCE.keys())
def test_fluorescence_mostly_tissue_recognised(tmp_path: Path, options: dict) -> None:
    columns = np.arange(SIDE)[None, :]
    section = np.broadcast_to(columns >= 460, (SIDE, SIDE)) & ~_disc((1100, 1536), 200)  # dark left 30 %
    path = _write(tmp_path, _fluorescence(section, **options))

    for remove_artefacts in (True, False):
        with pytest.raises(SlideError) as raised:
            _detect(path, remove_artefacts=remove_artefacts)
        assert raised.value.reason == "not_brightfield"
        assert "fluorescence" in str(raised.value)

    for remove_artefacts in (True, False):
        tiled = tile_slide(path, allow_fluorescence=True, remove_artefacts=remove_artefacts)
        tissue, grid = tiled.tissue, tiled.grid
        truth = TissueMask(mask=_on_mask(tissue, section), downsample=tissue.downsample)

        assert tissue.illumination == "fluorescence"
        assert _covered(tissue.mask, _on_mask(tissue, _shrink(section, 20))) > 0.97
        assert _covered(tissue.mask, _on_mask(tissue, ~_grow(section, 40))) < 0.01
        assert len(grid) > 0
        # Smoothing spreads the bright tissue's light about 20 µm into the background, so a patch at
        # the edge may hold less real tissue than the 25 % minimum, but none lies on background alone.
        assert truth.fractions(grid.coords, grid.patch_size_level0).min() > 0.05


def test_black_filled_brightfield_stays_brightfield(tmp_path: Path) -> None:
    # A scanner that fills the area outside its scan with black: 55 % of the slide is black, so the
    # median pixel is dark, but the bright glass shows that light passes through the slide.
    scanned = _disc((768, 768), 580)
    section = _disc((768, 768), 300)
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    image[scanned] = _paint_tissue(_glass(), section)[scanned]
    assert np.median(image.max(axis=2)) < 60

    tissue = _detect(_write(tmp_path, image))

    assert tissue.illumination == "brightfield"
    assert _covered(tissue.mask, _on_mask(tissue, _shrink(section, 20))) > 0.97
    assert _covered(tissue.mask, _on_mask(tissue, ~_grow(section, 40))) < 0.01


def _grey_section() -> tuple[np.ndarray, np.ndarray]:
    """Return a grey slide with a dark-grey ellipse (120) on grey glass (240), and the ellipse."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    section = ((yy - 768) / 500) ** 2 + ((xx - 768) / 620) ** 2 < 1
    rng = np.random.default_rng(2)
    grey = np.where(section, 120.0, 240.0) + rng.normal(0.0, 3.0, size=section.shape)
    return np.clip(grey, 0, 255).astype(np.uint8), section


@pytest.mark.parametrize("layout", ["single_channel", "equal_rgb"])
def test_grey_brightfield_found_by_density(tmp_path: Path, caplog, layout: str) -> None:
    grey, section = _grey_section()
    if layout == "single_channel":
        path = _write_grey(tmp_path, grey, "grey.tif")
    else:
        path = _write(tmp_path, np.repeat(grey[..., None], 3, axis=2), "grey_rgb.tif")

    with caplog.at_level(logging.INFO, logger="shared.slides.tissue"):
        tissue = _detect(path)

    assert tissue.illumination == "brightfield"
    assert _covered(tissue.mask, _on_mask(tissue, _shrink(section, 20))) > 0.97
    assert _covered(tissue.mask, _on_mask(tissue, ~_grow(section, 40))) < 0.01
    assert "grey" in caplog.text
    assert "optical density" in caplog.text


def test_grey_cmu1_matches_colour_mask(tmp_path: Path, cmu1_tiled) -> None:
    with open_slide(cmu1_tiled.info.path) as slide:
        info = slide.info
        rgb = slide.thumbnail(max(info.level0_width, info.level0_height))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    path = tmp_path / "cmu1_grey.tif"
    pixels_per_cm = 10_000.0 / info.mpp
    tifffile.imwrite(
        path, grey, photometric="minisblack", tile=(256, 256), compression="zlib",
        resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER", metadata=None,
    )

    with open_slide(path) as slide:
        tissue = detect_tissue(slide)
    colour = cmu1_tiled.tissue.mask

    assert tissue.mask.shape == colour.shape
    intersection = (tissue.mask & colour).sum()
    union = (tissue.mask | colour).sum()
    assert intersection / union > 0.85


def test_zero_min_tissue_needs_some_tissue(tmp_path: Path) -> None:
    section = _disc((768, 768), 300)
    path = _write(tmp_path, _paint_tissue(_glass(), section))
    with open_slide(path) as slide:
        info = slide.info
        tissue = detect_tissue(slide)

    grid = grid_over_tissue(info, tissue, min_tissue_fraction=0.0, edge="pad")
    # A mask that is tissue everywhere keeps every grid position, to count those without tissue.
    everywhere = TissueMask(mask=np.ones_like(tissue.mask), downsample=tissue.downsample)
    every_patch = grid_over_tissue(info, everywhere, min_tissue_fraction=0.0, edge="pad")

    fractions = tissue.fractions(grid.coords, grid.patch_size_level0)
    touching = tissue.fractions(every_patch.coords, every_patch.patch_size_level0) > 0
    assert fractions.min() > 0.0
    assert len(grid) == touching.sum()
    assert len(grid) < len(every_patch)


def test_invalid_options_raise(tmp_path: Path) -> None:
    path = _write(tmp_path, _paint_tissue(_glass(), _disc((768, 768), 300)))

    with open_slide(path) as slide:
        with pytest.raises(ConfigError, match="mask_mpp=0"):
            detect_tissue(slide, mask_mpp=0)
        with pytest.raises(ConfigError, match="min_area_um2=-1"):
            detect_tissue(slide, min_area_um2=-1)


def test_tissue_mask_checks_shapes() -> None:
    mask = np.zeros((10, 20), dtype=bool)

    with pytest.raises(ConfigError, match="thumbnail"):
        TissueMask(mask=mask, downsample=4.0, thumbnail=np.zeros((10, 21, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="artefacts"):
        TissueMask(mask=mask, downsample=4.0, artefacts=np.zeros((11, 20), dtype=bool))
    with pytest.raises(ConfigError, match="illumination"):
        TissueMask(mask=mask, downsample=4.0, illumination="darkfield")
    assert not TissueMask(mask=mask, downsample=4.0).artefacts.any()


# Contours.


def _ring_area(ring: np.ndarray | list) -> float:
    """Return the signed shoelace area of a ring: positive when counter-clockwise in (x, y) numbers."""
    points = np.asarray(ring, dtype=np.float64)
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _mask_with_hole_and_island() -> np.ndarray:
    yy, xx = np.mgrid[0:200, 0:300]
    outer = (xx - 120) ** 2 + (yy - 100) ** 2 <= 80**2
    hole = (xx - 120) ** 2 + (yy - 100) ** 2 <= 40**2
    island = (xx - 120) ** 2 + (yy - 100) ** 2 <= 15**2
    separate = (xx >= 240) & (xx < 280) & (yy >= 20) & (yy < 60)
    return (outer & ~hole) | island | separate


def test_contours_are_level0_polygons_with_holes() -> None:
    downsample = 4.0
    tissue = TissueMask(mask=_mask_with_hole_and_island(), downsample=downsample)

    polygons = sorted(tissue_contours(tissue), key=lambda rings: -abs(_ring_area(rings[0])))

    assert len(polygons) == 3  # the ring of tissue, the square, and the island inside the hole
    ring_of_tissue, square, island = polygons
    assert len(ring_of_tissue) == 2
    assert len(square) == 1
    assert len(island) == 1
    # The square covers mask columns 240-279 and rows 20-59: level-0 x 960-1120, y 80-240. The
    # contour runs through the centres of its boundary pixels, half a mask pixel inside.
    x_min, y_min = square[0].min(axis=0)
    x_max, y_max = square[0].max(axis=0)
    assert (x_min, y_min) == (240.5 * downsample, 20.5 * downsample)
    assert (x_max, y_max) == (279.5 * downsample, 59.5 * downsample)
    exterior_area = abs(_ring_area(ring_of_tissue[0]))
    hole_area = abs(_ring_area(ring_of_tissue[1]))
    assert exterior_area == pytest.approx(np.pi * (80 * downsample) ** 2, rel=0.03)
    assert hole_area == pytest.approx(np.pi * (40 * downsample) ** 2, rel=0.1)


def test_contours_geojson_is_valid_for_qupath() -> None:
    tissue = TissueMask(mask=_mask_with_hole_and_island(), downsample=4.0)

    collection = json.loads(json.dumps(contours_geojson(tissue, name="slide-1")))

    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == 3
    names = set()
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        names.add(feature["properties"]["name"])
        for index, ring in enumerate(feature["geometry"]["coordinates"]):
            assert len(ring) >= 4
            assert ring[0] == ring[-1]
            if index == 0:
                assert _ring_area(ring[:-1]) > 0  # exterior counter-clockwise
            else:
                assert _ring_area(ring[:-1]) < 0  # hole clockwise
    assert names == {"slide-1 tissue 1", "slide-1 tissue 2", "slide-1 tissue 3"}


def test_empty_mask_has_no_contours() -> None:
    tissue = TissueMask(mask=np.zeros((50, 50), dtype=bool), downsample=2.0)

    assert tissue_contours(tissue) == []
    assert contours_geojson(tissue, name="empty") == {"type": "FeatureCollection", "features": []}


def test_write_geojson_replaces_file_atomically(tmp_path: Path) -> None:
    tissue = TissueMask(mask=_mask_with_hole_and_island(), downsample=4.0)
    path = tmp_path / "contours" / "slide-1.geojson"
    path.parent.mkdir()
    path.write_text("old contents")

    written = write_geojson(path, tissue, name="slide-1")

    assert written == path
    assert json.loads(path.read_text()) == json.loads(json.dumps(contours_geojson(tissue, name="slide-1")))
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide-1.geojson"]


def test_write_geojson_failure_leaves_no_file(tmp_path: Path) -> None:
    tissue = TissueMask(mask=_mask_with_hole_and_island(), downsample=4.0)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")

    with pytest.raises(OSError):
        write_geojson(blocker / "slide-1.geojson", tissue, name="slide-1")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_cmu1_contours_lie_on_the_slide(cmu1_tiled) -> None:
    info, tissue = cmu1_tiled.info, cmu1_tiled.tissue

    polygons = tissue_contours(tissue)
    points = np.concatenate([ring for rings in polygons for ring in rings])
    area = sum(abs(_ring_area(rings[0])) - sum(abs(_ring_area(hole)) for hole in rings[1:]) for rings in polygons)

    assert len(polygons) >= 1
    assert (points >= 0).all()
    assert (points[:, 0] <= info.level0_width).all()
    assert (points[:, 1] <= info.level0_height).all()
    # The polygons enclose the mask's area, less about half a mask pixel along each boundary.
    assert area == pytest.approx(tissue.mask.sum() * tissue.downsample**2, rel=0.1)


# Overlays.


def test_overlay_draws_grid_tissue_and_artefacts(tmp_path: Path) -> None:
    tissue_region = _disc((560, 760), 380)
    stroke = _stroke((SIDE, SIDE), (1100, 100), (1100, 1400), width=120)
    image = _draw_ink(_paint_tissue(_glass(), tissue_region), stroke, PEN_COLOURS["blue"])
    tiled = tile_slide(_write(tmp_path, image), target_mpp=2.0, patch_size=64)
    tissue, grid = tiled.tissue, tiled.grid

    overlay = np.asarray(render_overlay(tissue, grid))

    assert overlay.shape == tissue.thumbnail.shape
    x, y = (grid.coords[len(grid) // 2] / tissue.downsample).round().astype(int)
    assert tuple(overlay[y, x + 3]) == GRID_COLOURS["brightfield"]
    # Inside the stroke, the overlay is the thumbnail tinted towards red.
    row, column = 768 // round(tissue.downsample), 1100 // round(tissue.downsample)
    assert tissue.artefacts[row, column]
    assert overlay[row, column, 0] > tissue.thumbnail[row, column, 0] + 0.1 * ARTEFACT_COLOUR[0]
    # Glass far from everything is left as it was.
    assert (overlay[5, 5] == tissue.thumbnail[5, 5]).all()


def test_save_thumbnail_and_overlay(tmp_path: Path, cmu1_tiled) -> None:
    tissue, grid = cmu1_tiled.tissue, cmu1_tiled.grid

    thumbnail_path = save_thumbnail(tmp_path / "thumbnails" / "cmu1.jpg", tissue)
    overlay_path = save_overlay(tmp_path / "visualization" / "cmu1.jpg", tissue, grid)

    height, width = tissue.mask.shape
    for path in (thumbnail_path, overlay_path):
        with Image.open(path) as written:
            assert written.format == "JPEG"
            assert written.size == (width, height)
        assert sorted(p.name for p in path.parent.iterdir()) == ["cmu1.jpg"]
    with Image.open(thumbnail_path) as thumbnail, Image.open(overlay_path) as overlay:
        thumbnail_error = np.abs(np.asarray(thumbnail, dtype=np.int16) - tissue.thumbnail.astype(np.int16))
        overlay_change = np.abs(np.asarray(overlay, dtype=np.int16) - tissue.thumbnail.astype(np.int16))
    assert thumbnail_error.mean() < 5  # only JPEG's loss
    assert overlay_change.mean() > 2 * thumbnail_error.mean()


# Tile sharpness.


def test_sharpness_separates_blurred_tiles(cmu1_tiled) -> None:
    with open_slide(cmu1_tiled.info.path) as slide:
        tiles = np.concatenate([batch for _, batch in iter_tiles(slide, cmu1_tiled.grid)])
    blurred = np.stack([cv2.GaussianBlur(tile, (0, 0), 2.0) for tile in tiles])

    sharp_scores = sharpness(tiles)
    blurred_scores = sharpness(blurred)

    assert sharp_scores.shape == (len(tiles),)
    assert (sharp_scores >= BLUR_THRESHOLD).all()
    assert (blurred_scores < sharp_scores).all()
    assert np.mean(blurred_scores < BLUR_THRESHOLD) > 0.9


def test_sharpness_of_flat_tile_is_zero() -> None:
    tiles = np.full((2, 32, 32, 3), 200, dtype=np.uint8)
    tiles[1, :, 16:] = 20  # one vertical edge

    scores = sharpness(tiles)

    assert scores[0] == 0.0
    assert scores[1] > 0.0


def test_sharpness_rejects_wrong_shape() -> None:
    with pytest.raises(ConfigError, match=r"\(N, H, W, 3\) uint8"):
        sharpness(np.zeros((32, 32, 3), dtype=np.uint8))
