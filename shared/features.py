"""Per-slide feature files in TRIDENT's HDF5 layout, so our features feed tools that read TRIDENT output.

A feature file contains ``coords`` (N, 2) int64 level-0 top-left corners and ``features`` (N, D) float32
in the same row order. TRIDENT stores the patching attributes on the ``coords`` dataset (see
``trident/IO.py`` and ``trident/wsi_objects/WSI.py`` in mahmoodlab/TRIDENT). Here the same attributes
are written on ``coords``, on ``features`` and on the file root, so readers that look at any one of
them find them. Pooled slide or case features have ``features`` of shape (1, D), while ``coords``
keeps the corners of the patches that were pooled.

Files are written to a ``.partial`` name and renamed into place, so a killed writer never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from shared.errors import CacheError, ConfigError

if TYPE_CHECKING:
    from shared.slides.grid import PatchGrid
    from shared.slides.reader import SlideInfo

logger = logging.getLogger(__name__)

ATTR_TYPES = (str, int, float, bool, np.integer, np.floating, np.bool_)


@dataclass(frozen=True, eq=False)
class FeatureFile:
    """The contents of a feature file: ``coords`` (N, 2) int64, ``features`` (N, D) float32 and the attributes."""

    coords: np.ndarray
    features: np.ndarray
    attrs: dict


def patch_attrs(info: SlideInfo, grid: PatchGrid) -> dict[str, Any]:
    """Return TRIDENT's patching attributes for a slide and its grid, plus the slide's ``mpp`` in µm/px.

    ``patch_size_level0`` is the size the grid derived from the slide's resolution. TRIDENT computes
    it as ``patch_size * level0_magnification // target_magnification`` instead. The two differ when
    the resolution is not exactly that of its magnification bucket: 491 against 448 px for a
    0.228 µm/px scan. Readers should use the stored value.
    """
    return {
        "patch_size": int(grid.patch_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "level0_magnification": int(info.level0_magnification),
        "target_magnification": int(grid.target_magnification),
        "overlap": int(grid.overlap),
        "name": info.name,
        "level0_width": int(info.level0_width),
        "level0_height": int(info.level0_height),
        "mpp": float(info.mpp),
    }


def trident_attrs(info: SlideInfo, grid: PatchGrid, *, encoder: str) -> dict[str, Any]:
    """Return the attributes of a feature file: :func:`patch_attrs` plus the ``encoder`` identity string."""
    if not isinstance(encoder, str) or not encoder.strip():
        raise ConfigError(
            f"encoder={encoder!r} must be a non-empty identity string, for example the model name and the "
            "sha256 of its weights file.",
            value=repr(encoder),
        )
    return {**patch_attrs(info, grid), "encoder": encoder}


def write_features(
    path: Path, *, coords: np.ndarray, features: np.ndarray, attrs: dict, pooled: bool = False
) -> Path:
    """Write a feature file atomically and return its path.

    ``coords`` and ``features`` must have the same number of rows, unless ``pooled`` is true: then
    ``features`` is one (1, D) vector pooled from the patches at ``coords``. Raises
    :class:`CacheError` for invalid arrays or attribute values and when the file cannot be written.
    """
    path = Path(path)
    coords = _check_coords(np.asarray(coords), path)
    features = _check_features(np.asarray(features), path)
    if pooled and features.shape[0] != 1:
        raise CacheError(
            f"feature file {path}: pooled features have shape {features.shape}, expected (1, D). "
            "Pass a single pooled vector, or pooled=False for per-patch features.",
            value=list(features.shape),
        )
    if not pooled and features.shape[0] != coords.shape[0]:
        raise CacheError(
            f"feature file {path}: features have {features.shape[0]} rows but coords have {coords.shape[0]}. "
            "Each patch needs one feature row in the same order. Pass matching arrays, or pooled=True for a "
            "single pooled vector.",
            value=[features.shape[0], coords.shape[0]],
        )
    attrs = _check_attrs(attrs, path)
    if pooled:
        attrs["pooled"] = True

    _write_h5_atomically(path, {"coords": coords, "features": features}, attrs, file_kind="feature file")
    logger.debug("wrote feature file with %d rows of %d features", features.shape[0], features.shape[1])
    return path


def write_patch_coords(path: Path, *, coords: np.ndarray, attrs: dict) -> Path:
    """Write a TRIDENT patches file atomically: dataset ``coords`` (N, 2) int64 carrying ``attrs``.

    As in TRIDENT, the attributes are on the ``coords`` dataset. They are also written on the file root.
    """
    path = Path(path)
    coords = _check_coords(np.asarray(coords), path)
    attrs = _check_attrs(attrs, path)
    _write_h5_atomically(path, {"coords": coords}, attrs, file_kind="patch file")
    logger.debug("wrote patch file with %d coords", coords.shape[0])
    return path


def read_features(path: Path) -> FeatureFile:
    """Read a feature file written by :func:`write_features` or by TRIDENT.

    Each attribute is taken from the file root if it is there, else from ``coords``, else from ``features``.
    A 1-D ``features`` dataset (TRIDENT's slide features) is returned as (1, D).
    Raises :class:`CacheError` when the file is missing, is not HDF5, or lacks a valid dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(
            f"feature file not found: {path}. Check the path, or write the file first.", value=str(path)
        )
    try:
        with h5py.File(path, "r") as file:
            missing = [name for name in ("coords", "features") if not isinstance(file.get(name), h5py.Dataset)]
            if missing:
                raise CacheError(
                    f"feature file {path} has no {' or '.join(missing)} dataset (found: {sorted(file.keys())}). "
                    "It is not a TRIDENT-layout feature file, so write it again with write_features.",
                    value=sorted(file.keys()),
                )
            coords = file["coords"][()]
            features = file["features"][()]
            attrs: dict[str, Any] = {}
            for source in (file["features"].attrs, file["coords"].attrs, file.attrs):
                attrs.update({key: _python_value(value) for key, value in source.items()})
    except OSError as error:
        raise CacheError(
            f"feature file {path} cannot be read as HDF5 ({error}). It may be truncated or not a feature file, "
            "so write it again.",
            value=str(path),
        ) from error

    if features.ndim == 1:
        features = features.reshape(1, -1)
        attrs.setdefault("pooled", True)
    coords = _check_coords(coords, path)
    features = _check_features(features, path)
    if not attrs.get("pooled") and coords.shape[0] != features.shape[0]:
        raise CacheError(
            f"feature file {path} has {features.shape[0]} feature rows but {coords.shape[0]} coords, "
            "so the file is inconsistent. Write it again.",
            value=[features.shape[0], coords.shape[0]],
        )
    return FeatureFile(coords=coords, features=features, attrs=attrs)


def _write_h5_atomically(path: Path, datasets: dict[str, np.ndarray], attrs: dict, *, file_kind: str) -> None:
    """Write ``datasets`` with ``attrs`` on each dataset and on the root to ``path.partial``, then rename it to ``path``."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(partial, "w") as file:
            file.attrs.update(attrs)
            for name, data in datasets.items():
                file.create_dataset(name, data=data).attrs.update(attrs)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CacheError(
            f"{file_kind} {path}: writing failed ({error}). Check that the folder is writable and the disk has space.",
            value=str(path),
        ) from error


def _check_coords(coords: np.ndarray, path: Path) -> np.ndarray:
    if coords.size == 0 and np.issubdtype(coords.dtype, np.number):
        return np.zeros((0, 2), dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
        raise CacheError(
            f"{path}: coords have shape {coords.shape} and dtype {coords.dtype}, expected (N, 2) integer "
            "level-0 (x, y) corners.",
            value=list(coords.shape),
        )
    return np.ascontiguousarray(coords, dtype=np.int64)


def _check_features(features: np.ndarray, path: Path) -> np.ndarray:
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
        raise CacheError(
            f"feature file {path}: features have shape {features.shape} and dtype {features.dtype}, expected "
            "(N, D) numbers.",
            value=list(features.shape),
        )
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise CacheError(
            f"feature file {path}: {len(bad_rows)} feature rows contain NaN or infinity (first row "
            f"{int(bad_rows[0])}). Check the encoder's output before writing.",
            value=int(bad_rows[0]),
        )
    return features


def _check_attrs(attrs: dict, path: Path) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, value in attrs.items():
        if not isinstance(key, str) or not isinstance(value, ATTR_TYPES):
            raise CacheError(
                f"feature file {path}: attribute {key!r} has a value of type {type(value).__name__}, expected "
                "str, int, float or bool.",
                value=repr(key),
            )
        checked[key] = value
    return checked


def _python_value(value: Any) -> Any:
    """Convert an h5py attribute value (numpy scalar or bytes) to the plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
