"""Synthetic slides written with tifffile, for the cases the real slides do not cover.

``he_like`` draws an image that looks like an H&E section to a tissue detector: white glass with
pink ellipses of stroma dotted with purple nuclei. ``write_tiff_slide`` stores any RGB image as a
TIFF: tiled or stripped, with or without a pyramid, with a resolution in the TIFF tags, an Aperio
description or OME-XML.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

GLASS = (242, 242, 240)
STROMA = (226, 160, 196)
NUCLEUS = (110, 60, 150)


def he_like(height: int, width: int, *, seed: int = 0, blobs: int = 3) -> np.ndarray:
    """Return an (height, width, 3) uint8 image of ``blobs`` pink tissue ellipses with nuclei on white glass."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = GLASS
    yy, xx = np.mgrid[0:height, 0:width]
    tissue = np.zeros((height, width), dtype=bool)
    for _ in range(blobs):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image[tissue] = STROMA
    nuclei = tissue & (rng.random((height, width)) < 0.08)
    image[nuclei] = NUCLEUS
    noise = rng.normal(0.0, 4.0, size=image.shape)
    return np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def write_tiff_slide(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float | None = 0.5,
    tile: int | None = 256,
    levels: int = 1,
    compression: str | None = "jpeg",
    description: str | None = None,
    ome: bool = False,
    resolution_tags: bool = True,
) -> Path:
    """Write ``image`` as a TIFF slide and return its path.

    ``tile=None`` writes strips instead of tiles. ``levels`` > 1 adds reduced levels, each half the
    size of the one before, as further pages (generic and Aperio layout) or SubIFDs (OME-TIFF).
    ``mpp`` goes into the TIFF resolution tags in pixels per centimeter unless ``resolution_tags`` is
    false. It also goes into OME-XML as PhysicalSizeX/Y when ``ome`` is true. ``None`` writes no resolution.
    ``description`` becomes the first page's ImageDescription, for instance an Aperio header.
    """
    path = Path(path)
    options: dict = {"photometric": "rgb", "compression": compression}
    if tile is not None:
        options["tile"] = (tile, tile)
    else:
        options["rowsperstrip"] = 64
    resolution = {}
    if mpp is not None and resolution_tags:
        pixels_per_cm = 10_000.0 / mpp
        resolution = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}

    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(np.ascontiguousarray(pyramid[-1][::2, ::2]))

    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as writer:
        first: dict = {**options, **resolution}
        if ome:
            metadata = {"axes": "YXS"}
            if mpp is not None:
                metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
            first.update(metadata=metadata, subifds=levels - 1)
        else:
            first.update(description=description, metadata=None)
        writer.write(pyramid[0], **first)
        for level in pyramid[1:]:
            writer.write(level, subfiletype=1, metadata=None, **options)
    return path


def overwrite_tags(path: Path, values: dict[str, object], *, page: int = 0) -> Path:
    """Overwrite tags of one page of a TIFF in place, for example ``{"XResolution": (0, 1)}``.

    A value may be ``(value, dtype)`` to change the tag's type, as an image size above 65535 needs.
    """
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[page].tags
        for name, value in values.items():
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
                tags[name].overwrite(value[0], dtype=value[1])
            else:
                tags[name].overwrite(value)
    return path


def write_declared_size_tiff(path: Path, width: int, height: int, *, tile: int = 1024, mpp: float = 0.5) -> Path:
    """Write a single-level tiled TIFF that declares ``width`` x ``height`` px but stores one tile.

    Every tile offset points at that one zlib tile (pink tissue on the left half, glass on the right),
    so the file takes a few tens of kilobytes whatever size it declares, and reads of any region succeed.
    """
    path = Path(path)
    image = np.empty((tile, tile, 3), dtype=np.uint8)
    image[:] = GLASS
    image[:, : tile // 2] = STROMA
    pixels_per_cm = 10_000.0 / mpp
    tifffile.imwrite(
        path, image, tile=(tile, tile), compression="zlib", photometric="rgb", metadata=None,
        resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER",
    )
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    tiles = -(-width // tile) * -(-height // tile)
    return overwrite_tags(
        path,
        {
            "ImageWidth": (width, "I"),
            "ImageLength": (height, "I"),
            "TileOffsets": ([offset] * tiles, "I"),
            "TileByteCounts": ([count] * tiles, "I"),
        },
    )
