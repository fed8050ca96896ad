"""Slides to tiles: open a slide, detect its tissue, lay a patch grid and read RGB tiles. No torch."""

from shared.slides.contours import contours_geojson, tissue_contours, write_geojson
from shared.slides.grid import PatchGrid, grid_over_tissue, resolve_target_mpp
from shared.slides.overlay import render_overlay, save_overlay, save_thumbnail
from shared.slides.quality import sharpness
from shared.slides.reader import Slide, SlideInfo, magnification_for_mpp, open_slide
from shared.slides.resolution import MppTable, resolve_mpp
from shared.slides.sources import SlideSource, collect_slides
from shared.slides.tiling import TiledSlide, iter_tiles, tile_slide, write_patch_file
from shared.slides.tissue import TissueMask, detect_tissue

__all__ = [
    "MppTable",
    "PatchGrid",
    "Slide",
    "SlideInfo",
    "SlideSource",
    "TiledSlide",
    "TissueMask",
    "collect_slides",
    "contours_geojson",
    "detect_tissue",
    "grid_over_tissue",
    "iter_tiles",
    "magnification_for_mpp",
    "open_slide",
    "render_overlay",
    "resolve_mpp",
    "resolve_target_mpp",
    "save_overlay",
    "save_thumbnail",
    "sharpness",
    "tile_slide",
    "tissue_contours",
    "write_geojson",
    "write_patch_file",
]
