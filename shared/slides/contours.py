"""Tissue contours as polygons in level-0 pixel coordinates, and as GeoJSON that QuPath imports.

Contours are traced with OpenCV through the centres of the mask's boundary pixels and scaled by the
mask's downsample, so they are accurate to about one mask pixel (``tissue.downsample`` level-0
pixels). Coordinates follow QuPath's convention: x to the right and y down from the top-left corner
of the full-resolution image, in pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from shared.slides.tissue import TissueMask

TISSUE_CLASS = {"name": "Tissue", "color": [0, 190, 0]}  # QuPath's classification: name and RGB colour
COORDINATE_DECIMALS = 1  # in level-0 pixels, far finer than the contours' accuracy of one mask pixel


def tissue_contours(tissue: TissueMask) -> list[list[np.ndarray]]:
    """Return one polygon per tissue region: its exterior ring, then one ring per hole.

    Each ring is a (K, 2) float64 array of level-0 (x, y) points, K >= 3, not repeating the first
    point at the end. A region inside a hole of another region is a polygon of its own.
    """
    mask = np.ascontiguousarray(tissue.mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []

    # With RETR_CCOMP each row of the hierarchy is (next, previous, first child, parent): exteriors
    # have no parent, and the children of an exterior are its holes, linked through "next".
    links = hierarchy[0]
    polygons = []
    for index, (_, _, first_child, parent) in enumerate(links):
        if parent != -1 or len(contours[index]) < 3:
            continue
        rings = [_to_level0(contours[index], tissue.downsample)]
        child = first_child
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(_to_level0(contours[child], tissue.downsample))
            child = links[child][0]
        polygons.append(rings)
    return polygons


def contours_geojson(tissue: TissueMask, *, name: str) -> dict:
    """Return the tissue contours as a GeoJSON FeatureCollection with one Polygon feature per region.

    Each feature is a QuPath annotation classified as "Tissue" and named "``name`` tissue N".
    Exterior rings run counter-clockwise and holes clockwise in the (x, y) numbers, as RFC 7946
    recommends, and every ring is closed.
    """
    features = []
    for number, rings in enumerate(tissue_contours(tissue), start=1):
        coordinates = [_closed_ring(ring, counter_clockwise=(index == 0)) for index, ring in enumerate(rings)]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coordinates},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} tissue {number}",
                    "classification": dict(TISSUE_CLASS),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, tissue: TissueMask, *, name: str) -> Path:
    """Write :func:`contours_geojson` to ``path`` atomically and return the path.

    The file is written to ``path.partial`` and renamed over ``path``, so a reader never sees half a
    file. Raises OSError when the folder cannot be written, and leaves no partial file behind.
    """
    path = Path(path)
    text = json.dumps(contours_geojson(tissue, name=name))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _to_level0(contour: np.ndarray, downsample: float) -> np.ndarray:
    """Map an OpenCV contour of mask pixel indices to level-0 coordinates of those pixels' centres."""
    return (contour.reshape(-1, 2).astype(np.float64) + 0.5) * downsample


def _closed_ring(ring: np.ndarray, *, counter_clockwise: bool) -> list[list[float]]:
    x, y = ring[:, 0], ring[:, 1]
    signed_area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    if (signed_area > 0) != counter_clockwise:
        ring = ring[::-1]
    points = np.round(ring, COORDINATE_DECIMALS).tolist()
    return points + [points[0]]
