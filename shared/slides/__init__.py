"""Slides to tiles: open a slide, detect its tissue, lay a patch grid and read RGB tiles. No torch."""

from shared.slides.grid import PatchGrid, grid_over_tissue
from shared.slides.reader import Slide, SlideInfo, magnification_for_mpp, open_slide
from shared.slides.tiling import TiledSlide, iter_tiles, tile_slide, write_patch_file
from shared.slides.tissue import TissueMask, detect_tissue

__all__ = [
    "PatchGrid",
    "Slide",
    "SlideInfo",
    "TiledSlide",
    "TissueMask",
    "detect_tissue",
    "grid_over_tissue",
    "iter_tiles",
    "magnification_for_mpp",
    "open_slide",
    "tile_slide",
    "write_patch_file",
]
