"""Augmentations of the student's view of a tile, limited by default to those the teacher is invariant to.

The teacher embedded the original tile, so each augmentation of the student's input teaches the student
an invariance: the student learns to map the transformed tile to the untransformed tile's embedding.
That is right only where the teacher itself gives (nearly) the same embedding for both.
``benchmarks/teacher_invariance.py`` measures the teacher's cosine between a tile and each transform of
it. :data:`DEFAULT_AUGMENTATIONS` contains only the candidates that passed its threshold with the
reference teacher (docs/benchmarks.md). Measure your own teacher before adding others.

Every transform takes and returns an (H, W, 3) uint8 RGB tile, before normalisation, and draws its
randomness only from the ``numpy.random.Generator`` it is given. The dataset seeds that generator per
tile and epoch, so a run's augmentations do not depend on the number of loader workers, and a resumed run
repeats them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

# Optical-density vectors of haematoxylin, eosin and DAB in (R, G, B) from Ruifrok and Johnston,
# "Quantification of histochemical staining by color deconvolution", Anal Quant Cytol Histol 23:291-299
# (2001). scikit-image's ``skimage.color.rgb_from_hed`` contains the same values. Rows are normalised below.
HED_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAINS = HED_STAINS / np.linalg.norm(HED_STAINS, axis=1, keepdims=True)
_UNMIXING = np.linalg.inv(_STAINS)

# Stain jitter strength of Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3
# as a reference to train distilled stain-invariant convolutional networks", IEEE TMI 37:2126-2136 (2018):
# each stain's density is scaled by a factor in [1 - s, 1 + s] and shifted by an amount in [-s, s].
HED_JITTER_STRENGTH = 0.05
# Largest relative change of brightness, contrast and saturation of the colour jitter.
COLOUR_JITTER_STRENGTH = 0.1

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def hflip(tile: np.ndarray) -> np.ndarray:
    """Mirror a tile left to right."""
    return tile[:, ::-1]


def vflip(tile: np.ndarray) -> np.ndarray:
    """Mirror a tile top to bottom."""
    return tile[::-1]


def rot90(tile: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Rotate a tile counter-clockwise by ``quarter_turns`` x 90 degrees."""
    return np.rot90(tile, quarter_turns, axes=(0, 1))


def hed_jitter(tile: np.ndarray, generator: np.random.Generator, strength: float = HED_JITTER_STRENGTH) -> np.ndarray:
    """Perturb the haematoxylin, eosin and residual stain densities of a tile, as a staining protocol would.

    The tile is unmixed into stain densities ``c = OD @ inv(S)`` with ``OD = -log10((I + 1) / 256)``, each
    stain ``k`` becomes ``c_k * a_k + b_k`` with ``a_k`` uniform in [1 - strength, 1 + strength] and ``b_k``
    uniform in [-strength, strength], and the result is mixed back to RGB.
    """
    scale = generator.uniform(1.0 - strength, 1.0 + strength, size=3)
    shift = generator.uniform(-strength, strength, size=3)
    optical_density = -np.log10((tile.astype(np.float64) + 1.0) / 256.0)
    densities = optical_density @ _UNMIXING
    jittered = (densities * scale + shift) @ _STAINS
    rgb = 256.0 * np.power(10.0, -jittered) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def colour_jitter(tile: np.ndarray, generator: np.random.Generator, strength: float = COLOUR_JITTER_STRENGTH) -> np.ndarray:
    """Scale a tile's brightness, contrast and saturation, each by a factor uniform in [1 - strength, 1 + strength].

    Brightness multiplies every channel, contrast moves each pixel away from or towards the tile's mean
    grey level, and saturation moves each pixel away from or towards its own grey level (ITU-R 601 luma).
    """
    brightness, contrast, saturation = generator.uniform(1.0 - strength, 1.0 + strength, size=3)
    rgb = tile.astype(np.float64) * brightness
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    rgb = (rgb - grey.mean()) * contrast + grey.mean()
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    rgb = (rgb - grey[..., None]) * saturation + grey[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _random_hflip(tile: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    return hflip(tile) if generator.random() < 0.5 else tile


def _random_vflip(tile: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    return vflip(tile) if generator.random() < 0.5 else tile


def _random_rot90(tile: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    return rot90(tile, int(generator.integers(4)))


# The candidate augmentations by name, each applied with its own randomness: flips with probability 0.5,
# a rotation by 0, 90, 180 or 270 degrees chosen uniformly, and the jitters on every tile.
AUGMENTATIONS: dict[str, Transform] = {
    "hflip": _random_hflip,
    "vflip": _random_vflip,
    "rot90": _random_rot90,
    "hed_jitter": hed_jitter,
    "colour_jitter": colour_jitter,
}

# The candidates whose teacher cosine passed the threshold of benchmarks/teacher_invariance.py with the
# reference teacher on 300 real lung tiles (docs/benchmarks.md, "Teacher invariance to augmentations").
DEFAULT_AUGMENTATIONS: tuple[str, ...] = ("hflip", "vflip", "rot90")


@dataclass(frozen=True)
class Augmentation:
    """A sequence of named candidate augmentations, applied in order to each tile of the student's view."""

    names: tuple[str, ...]

    def __call__(self, tile: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        for name in self.names:
            tile = AUGMENTATIONS[name](tile, generator)
        return np.ascontiguousarray(tile)


def build_augmentation(names: Sequence[str]) -> Augmentation | None:
    """Check ``names`` against :data:`AUGMENTATIONS` and return their composition, or None for no names.

    Raises :class:`ConfigError` for an unknown or repeated name.
    """
    names = tuple(names)
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(
            f"augmentations {unknown} are unknown, expected names from {list(AUGMENTATIONS)}. "
            "Pass --augment with names from that list, or --augment none.",
            value=unknown,
            limit=list(AUGMENTATIONS),
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"augmentations {repeated} are listed more than once in {list(names)}. List each once.", value=list(names))
    return Augmentation(names) if names else None
