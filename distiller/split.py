"""Train/validation split that never puts tiles of one slide, or of one tissue region, on both sides.

A random tile-level split leaks near-duplicate neighbours of a slide into validation and makes the
validation loss look better than it is. With two or more known slides, whole slides go to one side.
With one slide, or when no tile carries a slide id, the split falls back to spatial blocks: the level-0
plane is cut into square blocks of several patches, and whole blocks go to one side. Tiles with neither
a slide id nor coordinates can only be split at random, and the description states it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

# A block is BLOCK_PATCHES x BLOCK_PATCHES patches of the grid inferred from the coordinates, so
# adjacent, overlapping or touching tiles usually fall in the same block.
BLOCK_PATCHES = 4
UNKNOWN_SLIDE = ""


@dataclass(frozen=True)
class Split:
    """Tile indices of the training and validation sides and a sentence on how they were chosen."""

    train: np.ndarray
    val: np.ndarray
    description: str
    # "slide", "block" or "random": the unit kept whole on one side.
    unit: str


def split_by_slide(
    slide_ids: list[str],
    coords: np.ndarray,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Split tile indices into train and validation sides, keeping whole slides (or blocks) on one side.

    ``slide_ids`` has one pseudonymous id per tile ("" when unknown); ``coords`` is (N, 2) level-0
    top-left corners, (-1, -1) when unknown. Groups are shuffled with ``seed`` and assigned to
    validation until it contains about ``val_fraction`` of the tiles; both sides keep at least one group.
    With ``val_fraction`` 0 every tile trains and validation is empty.
    """
    coords = np.asarray(coords)
    count = len(slide_ids)
    if coords.shape != (count, 2):
        raise ConfigError(f"split: coords have shape {coords.shape}, expected ({count}, 2), one row per slide id.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"split: val_fraction is {val_fraction}, expected a value in [0, 1). Use 0 to train on every tile.",
            value=val_fraction,
            limit="[0, 1)",
        )
    if count == 0:
        raise ConfigError("split: no tiles to split. Export training shards with tiles first (unite teach).")

    all_indices = np.arange(count)
    if val_fraction == 0.0:
        return Split(all_indices, all_indices[:0], f"no validation: all {count} tiles train (val_fraction 0)", "slide")

    known_slides = sorted({slide for slide in slide_ids if slide != UNKNOWN_SLIDE})
    if len(known_slides) >= 2:
        return _split_by_slides(slide_ids, known_slides, val_fraction, seed)

    known_coords = np.all(coords >= 0, axis=1)
    if known_coords.sum() >= 2:
        return _split_by_blocks(slide_ids, coords, known_coords, val_fraction, seed)

    return _split_at_random(count, val_fraction, seed)


def _split_by_slides(slide_ids: list[str], known_slides: list[str], val_fraction: float, seed: int) -> Split:
    group_of_slide = {slide: number for number, slide in enumerate(known_slides)}
    unknown_group = len(known_slides)
    groups = np.array([group_of_slide.get(slide, unknown_group) for slide in slide_ids])
    val_groups = _choose_val_groups(groups, val_fraction, seed)
    train, val = _indices_of(groups, val_groups)

    val_slides = sorted(known_slides[group] for group in val_groups if group != unknown_group)
    description = (
        f"by slide: {len(known_slides) - len(val_slides)} slides ({len(train)} tiles) train, "
        f"{len(val_slides)} slides ({len(val)} tiles) validate"
    )
    unknown_count = int((groups == unknown_group).sum())
    if unknown_count:
        side = "validation" if unknown_group in val_groups else "training"
        description += f"; {unknown_count} tiles without a slide id kept together on the {side} side"
    return Split(train, val, description, "slide")


def _split_by_blocks(slide_ids: list[str], coords: np.ndarray, known: np.ndarray, val_fraction: float, seed: int) -> Split:
    patch_size = _grid_step(coords[known])
    block_size = patch_size * BLOCK_PATCHES
    block_x = np.where(known, coords[:, 0] // block_size, -1)
    block_y = np.where(known, coords[:, 1] // block_size, -1)
    # One group per occupied block of each slide id; tiles without coordinates form one group per slide id.
    keys = list(zip(slide_ids, block_x.tolist(), block_y.tolist()))
    group_of_key = {key: number for number, key in enumerate(dict.fromkeys(keys))}
    groups = np.array([group_of_key[key] for key in keys])
    if len(np.unique(groups)) < 2:
        return _split_at_random(len(slide_ids), val_fraction, seed, reason="all tiles fall in one spatial block")

    val_groups = _choose_val_groups(groups, val_fraction, seed)
    train, val = _indices_of(groups, val_groups)
    known_slides = {slide for slide in slide_ids if slide != UNKNOWN_SLIDE}
    if known_slides:
        reason = f"there is only one slide ({next(iter(known_slides))!r})"
    else:
        reason = "no tile has a slide id, so all tiles are treated as one slide"
    description = (
        f"by spatial blocks, because {reason}: level-0 plane cut into "
        f"{block_size} px blocks ({BLOCK_PATCHES} x {BLOCK_PATCHES} patches of {patch_size} px); "
        f"{len(np.unique(groups)) - len(val_groups)} blocks ({len(train)} tiles) train, "
        f"{len(val_groups)} blocks ({len(val)} tiles) validate. Neighbouring blocks of one slide are still "
        "correlated, so the validation loss is optimistic"
    )
    return Split(train, val, description, "block")


def _split_at_random(count: int, val_fraction: float, seed: int, *, reason: str = "no slide ids and no coordinates") -> Split:
    if count < 2:
        raise ConfigError(
            f"split: {count} tile cannot be split into training and validation. "
            "Add tiles, or set val_fraction to 0 to train without validation.",
            value=count,
            limit=2,
        )
    val_groups = _choose_val_groups(np.arange(count), val_fraction, seed)
    train, val = _indices_of(np.arange(count), val_groups)
    description = (
        f"at random by tile, because {reason}: {len(train)} tiles train, {len(val)} validate. "
        "Tiles of one slide may sit on both sides, so the validation loss is optimistic"
    )
    return Split(train, val, description, "random")


def _grid_step(coords: np.ndarray) -> int:
    """Estimate the patch size in level-0 pixels as the smallest non-zero gap between distinct x or y values."""
    gaps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        if len(values) >= 2:
            gaps.append(int(np.diff(values).min()))
    if not gaps:
        return 1  # All tiles share one corner; any block size keeps them together.
    return max(min(gaps), 1)


def _choose_val_groups(groups: np.ndarray, val_fraction: float, seed: int) -> set[int]:
    """Shuffle the groups and take them for validation until they contain about ``val_fraction`` of the tiles."""
    unique, sizes = np.unique(groups, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    target = val_fraction * len(groups)
    chosen: set[int] = set()
    val_count = 0
    for position in order:
        if len(chosen) == len(unique) - 1:
            break  # Training keeps at least one group.
        size = int(sizes[position])
        # Take a group while that brings validation closer to the target; always take at least one.
        if chosen and abs(val_count + size - target) >= abs(val_count - target):
            continue
        chosen.add(int(unique[position]))
        val_count += size
    return chosen


def _indices_of(groups: np.ndarray, val_groups: set[int]) -> tuple[np.ndarray, np.ndarray]:
    in_val = np.isin(groups, list(val_groups))
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)
