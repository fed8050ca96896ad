"""Tests of the student-view augmentations: their maths, their seeding, and the teacher's invariance to the defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distiller import _lung_tiles, _teacher_embeddings, _write_shards

from distiller.augment import (
    AUGMENTATIONS,
    DEFAULT_AUGMENTATIONS,
    HED_STAINS,
    Augmentation,
    build_augmentation,
    colour_jitter,
    hed_jitter,
    hflip,
    rot90,
    vflip,
)
from distiller.config import DistillConfig
from distiller.data import ShardDataset
from shared.errors import ConfigError
from shared.imaging import to_model_input
from shared.shards import list_shards


class FixedDraws:
    """A stand-in for numpy's Generator whose ``uniform`` returns given values in turn."""

    def __init__(self, *draws: np.ndarray) -> None:
        self.draws = list(draws)

    def uniform(self, low, high, size=None):
        return np.asarray(self.draws.pop(0), dtype=np.float64)


def _tile(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 230, size=(224, 224, 3), dtype=np.uint8)


def _stain_densities(tile: np.ndarray) -> np.ndarray:
    """Unmix an RGB tile into (H*W, 3) stain densities by least squares, independently of the module's inverse."""
    stains = HED_STAINS / np.linalg.norm(HED_STAINS, axis=1, keepdims=True)
    optical_density = -np.log10((tile.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    return np.linalg.lstsq(stains.T, optical_density.T, rcond=None)[0].T


def test_flips_and_rotations_permute_pixels():
    tile = _tile(1)

    assert np.array_equal(hflip(tile)[:, 0], tile[:, -1])
    assert np.array_equal(vflip(tile)[0], tile[-1])
    assert np.array_equal(rot90(tile, 1)[0, :, :], tile[:, -1, :])
    assert np.array_equal(rot90(tile, 4), tile)
    assert np.array_equal(hflip(hflip(tile)), tile)
    for transformed in (hflip(tile), vflip(tile), rot90(tile, 3)):
        assert transformed.shape == tile.shape
        assert np.array_equal(np.sort(transformed, axis=None), np.sort(tile, axis=None))


def test_hed_jitter_scales_one_stain():
    tile = _tile(2)
    scale_haematoxylin = np.array([1.2, 1.0, 1.0])

    jittered = hed_jitter(tile, FixedDraws(scale_haematoxylin, np.zeros(3)))

    before, after = _stain_densities(tile), _stain_densities(jittered)
    # Rounding to 8 bits moves densities by a few thousandths; dark pixels are where that matters least.
    dark = tile.reshape(-1, 3).max(axis=1) < 200
    ratio = np.median(after[dark, 0] / before[dark, 0])
    assert ratio == pytest.approx(1.2, abs=0.02), f"haematoxylin density scaled by {ratio}, expected 1.2"
    assert np.median(np.abs(after[dark, 1] - before[dark, 1])) < 0.01, "eosin density changed"


def test_hed_jitter_identity_at_zero_strength():
    tile = _tile(3)

    same = hed_jitter(tile, np.random.default_rng(0), strength=0.0)

    assert np.abs(same.astype(int) - tile.astype(int)).max() <= 1


def test_colour_jitter_brightness_only():
    tile = _tile(4)

    brighter = colour_jitter(tile, FixedDraws(np.array([1.1, 1.0, 1.0])))

    expected = np.clip(np.rint(tile.astype(np.float64) * 1.1), 0, 255)
    assert np.abs(brighter.astype(int) - expected.astype(int)).max() <= 1


def test_colour_jitter_zero_saturation_is_grey():
    tile = _tile(5)

    grey = colour_jitter(tile, FixedDraws(np.array([1.0, 1.0, 0.0])))

    assert np.abs(grey[..., 0].astype(int) - grey[..., 2].astype(int)).max() <= 1


def test_augmentation_is_seeded():
    augmentation = build_augmentation(list(AUGMENTATIONS))
    tile = _tile(6)

    first = augmentation(tile, np.random.default_rng(7))
    again = augmentation(tile, np.random.default_rng(7))
    other_seeds = [augmentation(tile, np.random.default_rng(seed)) for seed in range(8, 12)]

    assert np.array_equal(first, again)
    assert any(not np.array_equal(first, other) for other in other_seeds)
    assert first.dtype == np.uint8
    assert first.flags.c_contiguous


def test_rotation_draws_every_quarter_turn():
    tile = _tile(8)
    augmentation = Augmentation(("rot90",))
    turns = set()
    for seed in range(40):
        rotated = augmentation(tile, np.random.default_rng(seed))
        turns |= {turn for turn in range(4) if np.array_equal(rotated, rot90(tile, turn))}

    assert turns == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("names", "message"),
    [(["hflip", "blur"], r"augmentations \['blur'\] are unknown"), (["rot90", "rot90"], r"\['rot90'\] are listed more than once")],
    ids=["unknown", "repeated"],
)
def test_build_augmentation_rejects_invalid_names(names, message):
    with pytest.raises(ConfigError, match=message):
        build_augmentation(names)


def test_no_names_means_no_augmentation():
    assert build_augmentation([]) is None


def test_config_defaults_to_measured_augmentations(tmp_path):
    config = DistillConfig(shard_dir=tmp_path, out_dir=tmp_path)

    assert config.augmentations == list(DEFAULT_AUGMENTATIONS)
    with pytest.raises(ConfigError, match="unknown"):
        DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, augmentations=["sharpen"])


def test_augmentation_changes_student_view_only(shared_data, tmp_path):
    tiles = _lung_tiles(shared_data, 4)
    _write_shards(tmp_path, tiles, slides_per_shard=2, tiles_per_slide=2)
    embeddings = _teacher_embeddings(tiles)
    dataset = ShardDataset(list_shards(tmp_path), np.arange(4), augmentation=Augmentation(("hflip", "vflip", "rot90")))

    plain_image, plain_target = dataset[2]
    views = [dataset[(2, seed)] for seed in range(12)]
    dataset.close()

    assert torch.equal(plain_image, torch.from_numpy(to_model_input(tiles[2:3])[0]))
    assert all(torch.equal(target, torch.from_numpy(embeddings[2])) for _, target in views)
    assert any(not torch.equal(image, plain_image) for image, _ in views), "no seed changed the student's view"
    expected = Augmentation(("hflip", "vflip", "rot90"))(tiles[2], np.random.default_rng(5))
    assert torch.equal(views[5][0], torch.from_numpy(to_model_input(expected[np.newaxis])[0]))


def test_reference_teacher_invariant_to_defaults(shared_data):
    """The defaults keep the reference teacher's cosine within a tenth of the between-tile distance, as measured."""
    from teacher_gateway.teachers.reference import ReferenceTeacher

    tiles = _lung_tiles(shared_data, 12)
    teacher = ReferenceTeacher()
    original = teacher.embed(tiles)
    unit = original / np.linalg.norm(original, axis=1, keepdims=True)
    between = (unit @ unit.T)[np.triu_indices(len(unit), k=1)].mean()
    threshold = 1.0 - 0.1 * (1.0 - between)

    variants = {"hflip": [hflip], "vflip": [vflip], "rot90": [lambda tile, turns=turns: rot90(tile, turns) for turns in (1, 2, 3)]}
    for name in DEFAULT_AUGMENTATIONS:
        for transform in variants[name]:
            transformed = teacher.embed(np.stack([np.ascontiguousarray(transform(tile)) for tile in tiles]))
            cosines = (unit * transformed / np.linalg.norm(transformed, axis=1, keepdims=True)).sum(axis=1)
            assert cosines.mean() >= threshold, f"{name}: mean cosine {cosines.mean():.4f} below the threshold {threshold:.4f}"
