"""Colour-histogram features of the labelled LC25000 lung tiles, a known feature set for benchmark tests."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BINS_PER_CHANNEL = 16
CASE_GROUPS_PER_CLASS = 20


@dataclass(frozen=True)
class LungTiles:
    """Tile ids, labels, made-up case ids and (N, 48) colour histograms, in labels.csv order."""

    tile_ids: np.ndarray
    labels: np.ndarray
    case_ids: np.ndarray
    features: np.ndarray


def colour_histogram(path: Path) -> np.ndarray:
    """Return the 16-bin histogram of each RGB channel, concatenated and divided by the pixel count."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    channels = [np.histogram(pixels[:, channel], bins=BINS_PER_CHANNEL, range=(0, 256))[0] for channel in range(3)]
    return np.concatenate(channels).astype(np.float64) / len(pixels)


def load_lung_tiles(folder: Path) -> LungTiles:
    """Read labels.csv and compute each tile's histogram.

    Every LC25000 tile here is its own image, so the tests make cases: the tiles of one class are put
    in 20 groups by their sha256, and a case never mixes classes.
    """
    with (folder / "labels.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    tile_ids = np.array([Path(row["path"]).stem for row in rows], dtype=object)
    labels = np.array([row["label"] for row in rows], dtype=object)
    case_ids = np.array([f"{row['label']}-case{int(row['sha256'], 16) % CASE_GROUPS_PER_CLASS:02d}" for row in rows], dtype=object)
    features = np.stack([colour_histogram(folder / row["path"]) for row in rows])
    return LungTiles(tile_ids=tile_ids, labels=labels, case_ids=case_ids, features=features)
