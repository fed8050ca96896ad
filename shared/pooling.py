"""Pooling of patch features into slide features, and of slides into case features.

A slide feature is one vector computed from the (N, D) patch features of a slide:

- ``mean``: the mean over patches, shape (D,);
- ``max``: the elementwise maximum over patches, shape (D,);
- ``mean+max``: the mean followed by the maximum, shape (2 D,).

A case (a patient, or a specimen) can have several slides. Two fusion modes combine them:

- ``early``: the patches of every slide of the case are pooled together, so a slide with more
  patches weighs more;
- ``late``: each slide is pooled on its own, then the case feature is the mean of the slide features,
  so every slide weighs the same.

Both read and write feature files in TRIDENT's layout (:mod:`shared.features`). A pooled file has
``features`` of shape (1, D) and keeps the ``coords`` of the patches it pooled. Its attributes are those
of the input plus ``pooling``, ``fusion``, ``encoder`` and ``patch_count``. A case file also has
``case_id`` and ``slide_ids`` (a JSON list, in the order the slides were pooled), and keeps only the
input attributes on which all its slides agree, because the size and resolution of each slide differ.
numpy only, no torch.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from shared.errors import ConfigError
from shared.features import FeatureFile, read_features, write_features

logger = logging.getLogger(__name__)

POOLING_METHODS = ("mean", "max", "mean+max")
FUSION_MODES = ("early", "late")
# Value of the ``fusion`` attribute of a slide feature file, which combines no slides.
SLIDE_FUSION = "none"


def pool_patch_features(features: np.ndarray, method: str = "mean") -> np.ndarray:
    """Pool (N, D) patch features into one float32 vector: (D,) for mean or max, (2 D,) for mean+max.

    The mean is accumulated in float64, so pooling many float32 patches loses no precision. Raises
    :class:`ConfigError` for an unknown method or for no patches.
    """
    _check_method(method)
    features = np.asarray(features)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
        raise ConfigError(
            f"patch features have shape {features.shape} and dtype {features.dtype}, expected (N, D) numbers.",
            value=list(features.shape),
        )
    if features.shape[0] == 0:
        raise ConfigError(
            "no patch features to pool: the slide has 0 patches. Tile it again with a lower tissue threshold, "
            "or leave the slide out.",
            value=0,
        )

    mean = features.mean(axis=0, dtype=np.float64)
    maximum = features.max(axis=0).astype(np.float64)
    pooled = {"mean": mean, "max": maximum, "mean+max": np.concatenate([mean, maximum])}[method]
    return pooled.astype(np.float32)


def pool_slide(feature_file: FeatureFile, *, method: str = "mean", encoder: str | None = None, source: str = "slide") -> FeatureFile:
    """Pool a slide's patch features into a (1, D) slide feature, keeping its coords and attributes.

    ``encoder`` replaces a missing ``encoder`` attribute (TRIDENT's own files have none). ``source``
    names the slide in error messages. Raises :class:`ConfigError` when the file is already pooled,
    has no patches, or has no encoder identity.
    """
    if feature_file.attrs.get("pooled"):
        raise ConfigError(
            f"{source} already contains pooled features of shape {feature_file.features.shape} "
            f"(pooling={feature_file.attrs.get('pooling')!r}), expected patch features. Pool the patch feature file instead.",
            value=str(source),
        )
    pooled = pool_patch_features(feature_file.features, method).reshape(1, -1)
    attrs = {
        **feature_file.attrs,
        "encoder": _encoder_of(feature_file, encoder, source),
        "pooling": method,
        "fusion": SLIDE_FUSION,
        "patch_count": int(feature_file.features.shape[0]),
        "pooled": True,
    }
    return FeatureFile(coords=feature_file.coords, features=pooled, attrs=attrs)


def pool_case(
    slides: Mapping[str, FeatureFile],
    *,
    case_id: str,
    method: str = "mean",
    fusion: str = "late",
    encoder: str | None = None,
) -> FeatureFile:
    """Pool the feature files of one case's slides, keyed by slide id, into a (1, D) case feature.

    Early fusion pools every patch of every slide together and needs patch feature files. Late fusion
    averages the slide features, and pools each patch feature file with ``method`` first. An input that
    is already a slide feature is used as it is, provided its ``pooling`` attribute matches ``method``.
    Slides are pooled in sorted slide-id order. All slides must share one encoder and one feature
    dimension. Raises :class:`ConfigError` otherwise.
    """
    _check_method(method)
    if fusion not in FUSION_MODES:
        raise ConfigError(f"fusion is {fusion!r}, expected one of {list(FUSION_MODES)}.", value=fusion, limit=list(FUSION_MODES))
    if not slides:
        raise ConfigError(f"case {case_id!r} has no slides to pool. Map at least one slide to it.", value=case_id)

    slide_ids = sorted(slides)
    encoders = {slide_id: _encoder_of(slides[slide_id], encoder, f"slide {slide_id!r} of case {case_id!r}") for slide_id in slide_ids}
    if len(set(encoders.values())) > 1:
        raise ConfigError(
            f"case {case_id!r}: its slides were embedded by different encoders ({encoders}), so their features "
            "cannot be pooled together. Embed every slide with the same encoder.",
            value=sorted(set(encoders.values())),
        )

    if fusion == "early":
        pooled, patch_counts = _fuse_early(slides, slide_ids, case_id, method)
    else:
        pooled, patch_counts = _fuse_late(slides, slide_ids, case_id, method)

    attrs = _common_attrs([slides[slide_id].attrs for slide_id in slide_ids])
    attrs.update(
        {
            "name": case_id,
            "case_id": case_id,
            "slide_ids": json.dumps(slide_ids),
            "encoder": encoders[slide_ids[0]],
            "pooling": method,
            "fusion": fusion,
            "patch_count": int(sum(patch_counts)),
            "pooled": True,
        }
    )
    coords = np.concatenate([slides[slide_id].coords for slide_id in slide_ids], axis=0)
    return FeatureFile(coords=coords, features=pooled.reshape(1, -1), attrs=attrs)


def pool_slide_file(path: Path, out_path: Path, *, method: str = "mean", encoder: str | None = None) -> Path:
    """Read a patch feature file, pool it with :func:`pool_slide` and write the slide feature file to ``out_path``."""
    pooled = pool_slide(read_features(path), method=method, encoder=encoder, source=f"feature file {path}")
    return write_features(out_path, coords=pooled.coords, features=pooled.features, attrs=pooled.attrs, pooled=True)


def pool_case_files(
    paths: Mapping[str, Path],
    out_path: Path,
    *,
    case_id: str,
    method: str = "mean",
    fusion: str = "late",
    encoder: str | None = None,
) -> Path:
    """Read the feature files of a case's slides (slide id -> path), pool them with :func:`pool_case` and write the case file."""
    slides = {slide_id: read_features(path) for slide_id, path in paths.items()}
    pooled = pool_case(slides, case_id=case_id, method=method, fusion=fusion, encoder=encoder)
    return write_features(out_path, coords=pooled.coords, features=pooled.features, attrs=pooled.attrs, pooled=True)


def read_case_map(path: Path) -> dict[str, list[str]]:
    """Read a CSV with columns ``slide_id`` and ``case_id`` and return the sorted slide ids of each case.

    Other columns are ignored. Raises :class:`ConfigError` naming the file, the row and the value for a
    missing column, an empty cell, or a slide mapped to two cases.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"case CSV {path} not found. Pass a CSV with columns slide_id and case_id.", value=str(path))
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        missing = [column for column in ("slide_id", "case_id") if column not in columns]
        if missing:
            raise ConfigError(
                f"case CSV {path} has no column {' or '.join(missing)} (columns: {columns}). Add a header row with "
                "slide_id and case_id.",
                value=columns,
            )
        case_of_slide: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            slide_id = (row["slide_id"] or "").strip()
            case_id = (row["case_id"] or "").strip()
            for column, value in (("slide_id", slide_id), ("case_id", case_id)):
                if not value:
                    raise ConfigError(f"case CSV {path}, line {line}: column {column} is empty. Fill it or remove the row.", value=line)
            if case_of_slide.get(slide_id, case_id) != case_id:
                raise ConfigError(
                    f"case CSV {path}, line {line}: slide_id {slide_id!r} is mapped to case {case_id!r} and earlier "
                    f"to case {case_of_slide[slide_id]!r}. A slide belongs to one case, so fix one of the rows.",
                    value=slide_id,
                )
            case_of_slide[slide_id] = case_id

    cases: dict[str, list[str]] = {}
    for slide_id, case_id in case_of_slide.items():
        cases.setdefault(case_id, []).append(slide_id)
    return {case_id: sorted(slide_ids) for case_id, slide_ids in sorted(cases.items())}


def _fuse_early(slides: Mapping[str, FeatureFile], slide_ids: Sequence[str], case_id: str, method: str) -> tuple[np.ndarray, list[int]]:
    for slide_id in slide_ids:
        if slides[slide_id].attrs.get("pooled"):
            raise ConfigError(
                f"case {case_id!r}: slide {slide_id!r} contains pooled slide features, but early fusion pools the "
                "patches of all slides together. Pass its patch feature file, or use late fusion.",
                value=slide_id,
            )
    _check_dimensions({slide_id: slides[slide_id].features.shape[1] for slide_id in slide_ids}, case_id)
    patches = np.concatenate([slides[slide_id].features for slide_id in slide_ids], axis=0)
    return pool_patch_features(patches, method), [len(slides[slide_id].features) for slide_id in slide_ids]


def _fuse_late(slides: Mapping[str, FeatureFile], slide_ids: Sequence[str], case_id: str, method: str) -> tuple[np.ndarray, list[int]]:
    slide_features = {}
    patch_counts = []
    for slide_id in slide_ids:
        slide = slides[slide_id]
        if slide.attrs.get("pooled"):
            if slide.attrs.get("pooling") != method:
                raise ConfigError(
                    f"case {case_id!r}: slide {slide_id!r} was pooled with pooling={slide.attrs.get('pooling')!r}, but "
                    f"this case is pooled with {method!r}. Pass its patch feature file, or pool every slide the same way.",
                    value=slide.attrs.get("pooling"),
                    limit=method,
                )
            slide_features[slide_id] = slide.features[0].astype(np.float64)
            patch_counts.append(int(slide.attrs.get("patch_count", len(slide.coords))))
        else:
            slide_features[slide_id] = pool_patch_features(slide.features, method).astype(np.float64)
            patch_counts.append(len(slide.features))
    _check_dimensions({slide_id: len(feature) for slide_id, feature in slide_features.items()}, case_id)
    pooled = np.mean([slide_features[slide_id] for slide_id in slide_ids], axis=0)
    return pooled.astype(np.float32), patch_counts


def _check_dimensions(dimensions: Mapping[str, int], case_id: str) -> None:
    if len(set(dimensions.values())) > 1:
        raise ConfigError(
            f"case {case_id!r}: its slides have features of different dimensions ({dict(dimensions)}), so they cannot "
            "be pooled together. Embed every slide with the same encoder and pool them the same way.",
            value=dict(dimensions),
        )


def _encoder_of(feature_file: FeatureFile, encoder: str | None, source: str) -> str:
    """Return the file's ``encoder`` attribute, or ``encoder`` when the file has none."""
    found = feature_file.attrs.get("encoder")
    if isinstance(found, str) and found.strip():
        return found
    if encoder is not None and encoder.strip():
        return encoder
    raise ConfigError(
        f"{source} has no encoder attribute, so the pooled file could not say which model made its features. "
        "Pass the encoder identity (unite pool --encoder), for example the model name and the sha256 of its weights.",
        value=str(source),
    )


def _common_attrs(attrs_list: Sequence[Mapping]) -> dict:
    """Return the attributes present with one value in every mapping of ``attrs_list``."""
    first, *others = attrs_list
    return {key: value for key, value in first.items() if all(key in other and other[key] == value for other in others)}


def _check_method(method: str) -> None:
    if method not in POOLING_METHODS:
        raise ConfigError(f"pooling is {method!r}, expected one of {list(POOLING_METHODS)}.", value=method, limit=list(POOLING_METHODS))
