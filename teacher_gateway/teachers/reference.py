"""The built-in reference teacher: fixed colour and texture descriptors of H&E tiles, projected to 1536-d.

It needs no weights, no torch and no GPU, so the demo and the tests can run the whole pipeline anywhere.
It is always reported under its own identity, never as UNI2-h, and a student distilled from it learns
what these hand-made descriptors capture and nothing of UNI2-h.

Each tile goes through four fixed steps:

1. Colour deconvolution with the Ruifrok-Johnston H&E-DAB stain matrix turns RGB into haematoxylin,
   eosin and residual optical densities (OD, base-10 absorbance).
2. 725 descriptors in 21 groups (``DESCRIPTOR_GROUPS``): stain quantiles and histograms, a joint RGB
   histogram, gradient, Laplacian, local-binary-pattern and co-occurrence statistics on a four-level
   Gaussian pyramid of the stain densities, local variance, and nuclei proxies from
   strong-haematoxylin blobs.
3. Fixed round constants bring each group to a Euclidean norm of order 1, so no group dominates the
   distances between embeddings. They are set from each value's natural or typical range, not
   estimated from a data set, and give group norms of about 0.3 to 1.6 on the real H&E tiles tried.
4. A fixed Gaussian matrix drawn from ``numpy.random.default_rng(PROJECTION_SEED)`` maps the 725
   values to 1536.

Every tile is computed on its own by the same code path, so an embedding does not depend on the batch
it arrived in. On one core of a 2-core x86 virtual machine with numpy 2.4 and scipy 1.17, the teacher
embedded 100 to 130 real 224 px tiles per second while other jobs shared the machine
(tests/test_reference_teacher.py prints the rate it measures).
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

from shared.errors import ImageError

logger = logging.getLogger(__name__)

# Bump the version whenever a descriptor, a constant or the projection changes: the cache keys
# embeddings by the identity, and old entries must never mix with new ones.
REFERENCE_TEACHER_VERSION = 1
REFERENCE_TEACHER_IDENTITY = f"unite-reference-teacher/v{REFERENCE_TEACHER_VERSION}"
REFERENCE_TEACHER_LICENCE = "Apache-2.0 (built-in reference teacher)"
REFERENCE_TEACHER_DIM = 1536
TILE_SHAPE = (224, 224, 3)
PROJECTION_SEED = 20_240_601

# Optical-density vectors of haematoxylin, eosin and DAB in (R, G, B), from Ruifrok and Johnston,
# "Quantification of histochemical staining by color deconvolution", Anal Quant Cytol Histol 23:291-299
# (2001), the values of scikit-image's ``skimage.color.rgb_from_hed``. Rows are normalised to unit
# length below. DAB is absent from H&E, so its channel is the residual that the two stains do not explain.
RUIFROK_JOHNSTON_STAINS = np.array(
    [
        [0.65, 0.70, 0.29],  # haematoxylin
        [0.07, 0.99, 0.11],  # eosin
        [0.27, 0.57, 0.78],  # DAB, used as the residual channel
    ]
)
_STAINS = RUIFROK_JOHNSTON_STAINS / np.linalg.norm(RUIFROK_JOHNSTON_STAINS, axis=1, keepdims=True)
# OD = concentrations @ _STAINS, so concentrations = OD @ inverse. float32 keeps the per-pixel work cheap.
_STAIN_UNMIXING = np.linalg.inv(_STAINS).astype(np.float32)
# OD of each 8-bit intensity, -log10((I + 1) / 256): the +1 keeps black pixels finite (OD 2.41).
_OPTICAL_DENSITY = (-np.log10((np.arange(256) + 1.0) / 256.0)).astype(np.float32)

# Histogram ranges, in OD. H&E stain densities of tissue lie between 0 and about 1.5, and values
# outside a range fall into its first or last bin.
HAEMATOXYLIN_RANGE = (-0.2, 1.4)
EOSIN_RANGE = (-0.2, 1.0)
QUANTILES = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
PYRAMID_LEVELS = 4  # 224, 112, 56 and 28 px, so texture is measured at scales of about 1, 2, 4 and 8 px
GLCM_GREY_LEVELS = 8
NUCLEI_THRESHOLDS = (0.45, 0.75)  # haematoxylin OD after a 1 px blur that counts as a stained nucleus
LOCAL_WINDOW = 7  # px, side of the window of the local standard deviation
# Reference magnitudes of the log-scaled texture statistics, in OD per pixel: log(value / reference)
# is 0 at the reference and about +-1 within a factor e of it.
GRADIENT_REFERENCE = 0.05
LOCAL_STD_REFERENCE = 0.05
LAPLACIAN_BLOB_THRESHOLD = 0.05  # OD per px^2; a stronger negative Laplacian marks a dark-blob centre

# Name and length of each descriptor group, in the order of the descriptor vector.
DESCRIPTOR_GROUPS: dict[str, int] = {
    "stain_quantiles": 15,
    "stain_spread": 3,
    "haematoxylin_histogram": 16,
    "eosin_histogram": 12,
    "stain_joint_histogram": 64,
    "rgb_histogram": 512,
    "optical_density_fractions": 2,
    **{f"gradients_level{level}": 7 for level in range(PYRAMID_LEVELS)},
    **{f"lbp_level{level}": 10 for level in range(PYRAMID_LEVELS)},
    **{f"glcm_level{level}": 5 for level in range(PYRAMID_LEVELS)},
    "local_std_quantiles": 5,
    "nuclei": 8,
}
DESCRIPTOR_DIM = sum(DESCRIPTOR_GROUPS.values())

# 5-tap binomial kernel of variance 1 px^2, close to a Gaussian of sigma 1 px: the usual pyramid smoothing.
_BINOMIAL_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16.0
# Neighbours of the 8-point, radius-1 local binary pattern, in circular order.
_LBP_NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def _riu2_code(pattern: int) -> int:
    """Return the rotation-invariant uniform (riu2) class of an 8-bit pattern: its count of ones, or 9."""
    bits = [(pattern >> k) & 1 for k in range(8)]
    transitions = sum(bits[k] != bits[(k + 1) % 8] for k in range(8))
    return sum(bits) if transitions <= 2 else 9


_RIU2_CLASSES = np.array([_riu2_code(pattern) for pattern in range(256)], dtype=np.intp)


def _riu2_noise_probabilities() -> np.ndarray:
    """Return the riu2 class probabilities of i.i.d. continuous noise, the reference of the LBP group.

    Given the centre's value, each neighbour is at least as large independently with one probability p,
    and p is uniform on [0, 1] over centres, so one pattern with k ones has probability
    Beta(k + 1, 9 - k) = k! (8 - k)! / 9!.
    """
    probabilities = np.zeros(10)
    for pattern in range(256):
        ones = bin(pattern).count("1")
        pattern_probability = math.factorial(ones) * math.factorial(8 - ones) / math.factorial(9)
        probabilities[_RIU2_CLASSES[pattern]] += pattern_probability
    return probabilities


_LBP_NOISE_PROBABILITIES = _riu2_noise_probabilities()
_GLCM_ROWS, _GLCM_COLUMNS = np.indices((GLCM_GREY_LEVELS, GLCM_GREY_LEVELS))


class ReferenceTeacher:
    """A deterministic teacher without weights: hand-made H&E descriptors projected to 1536-d.

    The same tile gives a bit-identical embedding in every call and process on one machine and
    numpy/scipy build, whatever batch it arrives in.
    """

    name = "reference"
    identity = REFERENCE_TEACHER_IDENTITY
    dim = REFERENCE_TEACHER_DIM
    licence = REFERENCE_TEACHER_LICENCE
    # The entries of the fixed projection matrix, its only weights; none of them is trained.
    parameters = DESCRIPTOR_DIM * REFERENCE_TEACHER_DIM

    def __init__(self) -> None:
        self._projection = projection_matrix()
        logger.info(
            "reference teacher %s ready: %d descriptors projected to %d dimensions (seed %d)",
            self.identity,
            DESCRIPTOR_DIM,
            self.dim,
            PROJECTION_SEED,
        )

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Embed (N, 224, 224, 3) uint8 RGB tiles into (N, 1536) float32 vectors. N may be 0.

        Raises :class:`ImageError` when the batch is not a uint8 array of that shape.
        """
        validate_tiles(tiles)
        embeddings = np.empty((len(tiles), self.dim), dtype=np.float32)
        for index, tile in enumerate(tiles):
            # einsum without ``optimize`` runs numpy's own loop on one thread, which sums over the
            # descriptor in an order fixed by the array shapes. A BLAS product would depend on the
            # library's thread count, and on a busy 2-core machine its two threads made this step
            # about four times slower.
            embeddings[index] = np.einsum("k,kd->d", describe_tile(tile), self._projection)
        return embeddings


def validate_tiles(tiles: object) -> None:
    """Raise :class:`ImageError` unless ``tiles`` is an (N, 224, 224, 3) uint8 numpy array."""
    if not isinstance(tiles, np.ndarray):
        raise ImageError(
            f"reference teacher: tiles are a {type(tiles).__name__}, expected a numpy array of shape "
            "(N, 224, 224, 3) and dtype uint8. Stack the tiles with numpy.stack.",
            value=type(tiles).__name__,
        )
    if tiles.ndim != 4 or tiles.shape[1:] != TILE_SHAPE:
        raise ImageError(
            f"reference teacher: tile batch has shape {tiles.shape}, expected (N, 224, 224, 3). "
            "Prepare each tile with shared.imaging.prepare_tile (resize, then centre crop to 224 px).",
            value=list(tiles.shape),
            limit=[None, *TILE_SHAPE],
        )
    if tiles.dtype != np.uint8:
        raise ImageError(
            f"reference teacher: tile batch has dtype {tiles.dtype}, expected uint8 RGB in 0-255. "
            "Send the decoded 8-bit pixels, not normalised model input.",
            value=str(tiles.dtype),
            limit="uint8",
        )


@lru_cache(maxsize=1)
def projection_matrix() -> np.ndarray:
    """Return the fixed (DESCRIPTOR_DIM, 1536) float64 projection, read-only and shared by all instances.

    Entries are standard normal divided by the square root of the number of descriptor groups, so with
    every group of norm of order 1 the embedding's coordinates are of order 1.
    """
    # NOTE: NumPy promises the same standard_normal stream only for the same numpy build. If a new numpy
    # changes it, the pinned embedding values in tests/test_reference_teacher.py fail, and then
    # REFERENCE_TEACHER_VERSION must be bumped.
    generator = np.random.default_rng(PROJECTION_SEED)
    projection = generator.standard_normal((DESCRIPTOR_DIM, REFERENCE_TEACHER_DIM))
    projection /= math.sqrt(len(DESCRIPTOR_GROUPS))
    projection.setflags(write=False)
    return projection


def describe_tile(tile: np.ndarray) -> np.ndarray:
    """Compute the normalised (DESCRIPTOR_DIM,) float64 descriptor of one (224, 224, 3) uint8 tile.

    Groups follow the order of ``DESCRIPTOR_GROUPS``, and each is scaled to a norm of order 1.
    """
    haematoxylin, eosin, residual, density_sum = separate_stains(tile)
    groups = [
        _stain_quantiles(haematoxylin, eosin, residual),
        _stain_spread(haematoxylin, eosin, residual),
        *_stain_histograms(haematoxylin, eosin),
        _rgb_histogram(tile),
        _optical_density_fractions(density_sum),
    ]

    blurred_haematoxylin = _blur(haematoxylin)
    groups.extend(_pyramid_texture(blurred_haematoxylin, _blur(eosin)))
    groups.append(_local_std_quantiles(haematoxylin))
    groups.append(_nuclei_proxies(blurred_haematoxylin))
    return np.concatenate(groups)


def separate_stains(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the haematoxylin, eosin and residual OD images and the summed RGB OD, each (H, W) float32."""
    density = np.take(_OPTICAL_DENSITY, tile)
    red, green, blue = density[..., 0], density[..., 1], density[..., 2]
    unmixing = _STAIN_UNMIXING
    haematoxylin = red * unmixing[0, 0] + green * unmixing[1, 0] + blue * unmixing[2, 0]
    eosin = red * unmixing[0, 1] + green * unmixing[1, 1] + blue * unmixing[2, 1]
    residual = red * unmixing[0, 2] + green * unmixing[1, 2] + blue * unmixing[2, 2]
    return haematoxylin, eosin, residual, red + green + blue


# Colour descriptors


def _stain_quantiles(haematoxylin: np.ndarray, eosin: np.ndarray, residual: np.ndarray) -> np.ndarray:
    # Stain ODs of tissue lie in [0, 1], which is mapped to [-1, 1]. The residual is centred on 0,
    # because pure H&E leaves none.
    values = np.concatenate(
        [(_quantiles(haematoxylin) - 0.5) / 0.5, (_quantiles(eosin) - 0.5) / 0.5, _quantiles(residual) / 0.5]
    )
    return values / math.sqrt(values.size)


def _stain_spread(haematoxylin: np.ndarray, eosin: np.ndarray, residual: np.ndarray) -> np.ndarray:
    # Standard deviations of OD lie in [0, 0.5], mapped to [-1, 1].
    values = (np.array([haematoxylin.std(), eosin.std(), residual.std()], dtype=np.float64) - 0.25) / 0.25
    return values / math.sqrt(values.size)


def _stain_histograms(haematoxylin: np.ndarray, eosin: np.ndarray) -> list[np.ndarray]:
    haematoxylin_bins = _bin_index(haematoxylin, HAEMATOXYLIN_RANGE, 16)
    eosin_bins = _bin_index(eosin, EOSIN_RANGE, 12)
    joint_bins = (haematoxylin_bins // 2) * 8 + (eosin_bins * 8) // 12
    return [
        _hellinger_histogram(haematoxylin_bins, 16),
        _hellinger_histogram(eosin_bins, 12),
        _hellinger_histogram(joint_bins, 64),
    ]


def _rgb_histogram(tile: np.ndarray) -> np.ndarray:
    levels = tile >> 5  # 8 levels per channel
    codes = (levels[..., 0].astype(np.intp) << 6) | (levels[..., 1].astype(np.intp) << 3) | levels[..., 2]
    return _hellinger_histogram(codes, 512)


def _optical_density_fractions(density_sum: np.ndarray) -> np.ndarray:
    # Fractions of near-white background (summed OD < 0.25) and of dense stain (summed OD > 1).
    fractions = np.array([(density_sum < 0.25).mean(), (density_sum > 1.0).mean()])
    return _unit_interval_to_symmetric(np.sqrt(fractions)) / math.sqrt(fractions.size)


# Texture descriptors


def _pyramid_texture(haematoxylin: np.ndarray, eosin: np.ndarray) -> list[np.ndarray]:
    """Return the gradient, LBP and GLCM groups of every pyramid level, in ``DESCRIPTOR_GROUPS`` order."""
    gradients, patterns, cooccurrences = [], [], []
    for level in range(PYRAMID_LEVELS):
        gradients.append(_gradient_statistics(haematoxylin, eosin))
        patterns.append(_lbp_histogram(haematoxylin))
        cooccurrences.append(_glcm_statistics(haematoxylin))
        if level < PYRAMID_LEVELS - 1:
            haematoxylin = _blur_and_halve(haematoxylin)
            eosin = _blur_and_halve(eosin)
    return [*gradients, *patterns, *cooccurrences]


def _gradient_statistics(haematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Summarise edges and blobs of the smoothed stain images at one pyramid level (7 values)."""
    haematoxylin_gradient, laplacian = _gradient_and_laplacian(haematoxylin)
    eosin_gradient, _ = _gradient_and_laplacian(eosin)
    magnitudes = np.array(
        [
            haematoxylin_gradient.mean(),
            haematoxylin_gradient.std(),
            np.abs(laplacian).mean(),
            eosin_gradient.mean(),
            eosin_gradient.std(),
        ],
        dtype=np.float64,
    )
    blob_fractions = np.array(
        [(laplacian < -LAPLACIAN_BLOB_THRESHOLD).mean(), (laplacian > LAPLACIAN_BLOB_THRESHOLD).mean()]
    )
    values = np.concatenate(
        [_log_ratio(magnitudes, GRADIENT_REFERENCE), _unit_interval_to_symmetric(np.sqrt(blob_fractions))]
    )
    return values / math.sqrt(values.size)


def _gradient_and_laplacian(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return central-difference gradient magnitude and 5-point Laplacian on the interior pixels."""
    centre = image[1:-1, 1:-1]
    up, down, left, right = image[:-2, 1:-1], image[2:, 1:-1], image[1:-1, :-2], image[1:-1, 2:]
    gradient_y = down - up
    gradient_x = right - left
    gradient = np.sqrt(gradient_x * gradient_x + gradient_y * gradient_y) * 0.5
    laplacian = up + down + left + right - 4.0 * centre
    return gradient, laplacian


def _lbp_histogram(image: np.ndarray) -> np.ndarray:
    """Compute the riu2 local-binary-pattern histogram (8 neighbours, radius 1) as log ratios to i.i.d. noise."""
    height, width = image.shape
    centre = image[1 : height - 1, 1 : width - 1]
    patterns = np.zeros(centre.shape, dtype=np.uint8)
    for bit, (dy, dx) in enumerate(_LBP_NEIGHBOURS):
        neighbour = image[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx]
        patterns |= (neighbour >= centre).view(np.uint8) << bit
    classes = np.take(_RIU2_CLASSES, patterns)
    frequencies = np.bincount(classes.ravel(), minlength=10) / classes.size
    # On real tissue the natural log ratio stays within about +-4, so halving it keeps it near [-1, 1].
    # The floor of 1e-3 bounds the ratio of a class that never occurs.
    ratios = np.log((frequencies + 1e-3) / (_LBP_NOISE_PROBABILITIES + 1e-3)) / 2.0
    return ratios / math.sqrt(ratios.size)


def _glcm_statistics(image: np.ndarray) -> np.ndarray:
    """Compute Haralick contrast, homogeneity, energy, correlation and entropy of the co-occurrence matrix.

    The haematoxylin OD is quantised into 8 levels of 0.2 OD from -0.2, and pairs at distance 1 in the
    horizontal and vertical directions are counted symmetrically.
    """
    levels = _bin_index(image, (-0.2, -0.2 + 0.2 * GLCM_GREY_LEVELS), GLCM_GREY_LEVELS)
    size = GLCM_GREY_LEVELS * GLCM_GREY_LEVELS
    counts = np.bincount((levels[:, :-1] * GLCM_GREY_LEVELS + levels[:, 1:]).ravel(), minlength=size)
    counts += np.bincount((levels[:-1, :] * GLCM_GREY_LEVELS + levels[1:, :]).ravel(), minlength=size)
    matrix = counts.reshape(GLCM_GREY_LEVELS, GLCM_GREY_LEVELS).astype(np.float64)
    matrix = matrix + matrix.T
    matrix /= matrix.sum()

    difference = _GLCM_ROWS - _GLCM_COLUMNS
    contrast = (matrix * difference**2).sum()
    homogeneity = (matrix / (1.0 + np.abs(difference))).sum()
    energy = math.sqrt((matrix**2).sum())
    mean = (matrix * _GLCM_ROWS).sum()
    variance = (matrix * (_GLCM_ROWS - mean) ** 2).sum()
    # A flat image has zero variance, so its correlation is defined as 0 here rather than NaN.
    correlation = 0.0
    if variance > 1e-12:
        correlation = (matrix * (_GLCM_ROWS - mean) * (_GLCM_COLUMNS - mean)).sum() / variance
    nonzero = matrix[matrix > 0]
    entropy = -(nonzero * np.log(nonzero)).sum()

    # Natural ranges: contrast [0, 49] (log1p maps it to [0, ln 50]), homogeneity and energy [0, 1],
    # correlation [-1, 1], entropy [0, ln 64].
    values = np.array(
        [
            _unit_interval_to_symmetric(math.log1p(contrast) / math.log(50.0)),
            _unit_interval_to_symmetric(homogeneity),
            _unit_interval_to_symmetric(energy),
            correlation,
            _unit_interval_to_symmetric(entropy / math.log(size)),
        ]
    )
    return values / math.sqrt(values.size)


def _local_std_quantiles(haematoxylin: np.ndarray) -> np.ndarray:
    """Compute log-scaled quantiles of the haematoxylin standard deviation in 7 x 7 windows."""
    mean = ndimage.uniform_filter(haematoxylin, LOCAL_WINDOW)
    mean_of_squares = ndimage.uniform_filter(haematoxylin * haematoxylin, LOCAL_WINDOW)
    local_std = np.sqrt(np.maximum(mean_of_squares - mean * mean, 0.0))
    values = _log_ratio(_quantiles(local_std), LOCAL_STD_REFERENCE)
    return values / math.sqrt(values.size)


def _nuclei_proxies(blurred_haematoxylin: np.ndarray) -> np.ndarray:
    """Measure area fraction, count and sizes of strong-haematoxylin blobs at each of ``NUCLEI_THRESHOLDS``."""
    values = []
    log_max_count = math.log1p(blurred_haematoxylin.size)
    for threshold in NUCLEI_THRESHOLDS:
        mask = blurred_haematoxylin > threshold
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(1)
        values.extend(
            [
                _unit_interval_to_symmetric(math.sqrt(mask.mean())),
                _unit_interval_to_symmetric(math.log1p(count) / log_max_count),
                _unit_interval_to_symmetric(math.log1p(float(np.median(sizes))) / log_max_count),
                _unit_interval_to_symmetric(math.log1p(float(sizes.mean())) / log_max_count),
            ]
        )
    return np.array(values) / math.sqrt(len(values))


# Helpers


def _blur(image: np.ndarray) -> np.ndarray:
    return ndimage.correlate1d(ndimage.correlate1d(image, _BINOMIAL_KERNEL, axis=0), _BINOMIAL_KERNEL, axis=1)


def _blur_and_halve(image: np.ndarray) -> np.ndarray:
    """Blur with the binomial kernel and keep every second row and column (one Gaussian-pyramid step)."""
    rows = ndimage.correlate1d(image, _BINOMIAL_KERNEL, axis=0)[::2]
    return np.ascontiguousarray(ndimage.correlate1d(rows, _BINOMIAL_KERNEL, axis=1)[:, ::2])


def _quantiles(image: np.ndarray) -> np.ndarray:
    """Return ``QUANTILES`` of the image, taken on every second row and column (a quarter of the pixels)."""
    values = image[::2, ::2].ravel()
    ranks = np.round(QUANTILES * (values.size - 1)).astype(np.intp)
    return np.partition(values, ranks)[ranks].astype(np.float64)


def _bin_index(image: np.ndarray, value_range: tuple[float, float], bins: int) -> np.ndarray:
    low, high = value_range
    return np.clip(((image - low) * (bins / (high - low))).astype(np.intp), 0, bins - 1)


def _hellinger_histogram(bin_indices: np.ndarray, bins: int) -> np.ndarray:
    """Return the square root of the normalised histogram, a vector of Euclidean norm 1."""
    return np.sqrt(np.bincount(bin_indices.ravel(), minlength=bins) / bin_indices.size)


def _log_ratio(values: np.ndarray, reference: float) -> np.ndarray:
    # The 1e-3 floor keeps a flat image (all magnitudes 0) finite.
    return np.log((values + 1e-3) / reference)


def _unit_interval_to_symmetric(value: np.ndarray | float) -> np.ndarray | float:
    """Map [0, 1] linearly onto [-1, 1]."""
    return 2.0 * value - 1.0
