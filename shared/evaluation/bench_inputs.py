"""Inputs of ``unite bench``: labels, folds and the feature sets of several models for the same samples.

A labels CSV has a ``slide_id`` or ``case_id`` column (or both) and a label column. A Patho-Bench split
TSV (``case_id``, ``slide_id``, a label, ``fold_0`` ...) gives the folds too. Each model's features are a
folder of TRIDENT-layout HDF5 files named after the samples:

- slide or case level: ``ID.h5`` with one pooled row, as ``unite pool`` writes it;
- tile level: ``SLIDE_ID.h5`` with one row per patch. Every tile is a sample that takes its slide's
  label and its slide's side of each fold, so the tiles of a case are never split. Every model must
  have the same ``coords`` in the same order, so that row ``i`` is the same tile for all of them.

Every error names the model, the file and the fix. numpy and h5py only, no torch.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import ConfigError
from shared.evaluation.folds import Fold, read_split_tsv
from shared.features import FeatureFile, read_features

logger = logging.getLogger(__name__)

LEVELS = ("slide", "tile")
# Keys of a --model-info JSON file, and the feature file attributes read when the JSON gives none.
MODEL_INFO_KEYS = ("parameters", "embedding_dim", "throughput_tiles_per_s", "throughput_note")
_NAME = re.compile(r"[A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class BenchLabels:
    """The labelled samples of a task in file order, with the folds when a split file gave them.

    ``has_case_ids`` is False when the file had no ``case_id`` column, so that each sample is its own case.
    """

    source: Path
    label_column: str
    sample_ids: np.ndarray
    case_ids: np.ndarray
    labels: np.ndarray
    folds: list[Fold] | None
    has_case_ids: bool = True


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a model that its features cannot show, each None when not given.

    ``throughput_tiles_per_s`` is a measured rate, which means little without ``throughput_note``
    (device, precision, batch size). ``source`` is the JSON file or "feature file attributes".
    """

    parameters: int | None = None
    throughput_tiles_per_s: float | None = None
    throughput_note: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class FeatureSet:
    """One model's (N, D) features of the task's samples, row ``i`` for sample ``i``."""

    name: str
    features: np.ndarray
    info: ModelInfo = ModelInfo()
    source: str = "in memory"
    encoder: str | None = None


@dataclass(frozen=True)
class BenchTask:
    """Feature sets, labels, case ids and sample ids with one entry per row, and folds when a split file gave them."""

    level: str
    feature_sets: list[FeatureSet]
    labels: np.ndarray
    case_ids: np.ndarray
    sample_ids: np.ndarray
    folds: list[Fold] | None


def read_labels_csv(path: Path, label_column: str | None = None) -> BenchLabels:
    """Read a labels CSV with a ``slide_id`` or ``case_id`` column and a label column.

    The sample id is ``slide_id`` when that column exists, else ``case_id``. A slide without a
    ``case_id`` is its own case. ``label_column`` defaults to ``label``, or to the one column that is
    not an id. Raises :class:`ConfigError` naming the file and line for a missing column, an empty cell
    or a repeated sample id.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} not found. Pass a CSV with a slide_id or case_id column and a label column.", value=str(path))
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = list(reader.fieldnames or [])
        rows = list(reader)

    id_columns = [column for column in ("slide_id", "case_id") if column in columns]
    if not id_columns:
        raise ConfigError(f"labels file {path} has no slide_id or case_id column (columns: {columns}). Add one to the header row.", value=columns)
    label_column = _labels_column(path, columns, label_column)
    if not rows:
        raise ConfigError(f"labels file {path} has a header but no samples. Add one row per sample.", value=0)

    for line, row in enumerate(rows, start=2):
        for column in (*id_columns, label_column):
            if not (row.get(column) or "").strip():
                raise ConfigError(f"labels file {path}, line {line}: column {column!r} is empty. Fill it or remove the row.", value=line)

    sample_column = id_columns[0]
    if "case_id" not in columns:
        logger.warning(
            "labels file %s has no case_id column, so each slide is its own case and the slides of one patient may fall on "
            "both sides of a fold. Add a case_id column if any patient has several slides.",
            path,
        )
    sample_ids = np.array([row[sample_column].strip() for row in rows], dtype=object)
    case_column = "case_id" if "case_id" in columns else sample_column
    case_ids = np.array([row[case_column].strip() for row in rows], dtype=object)
    labels = np.array([row[label_column].strip() for row in rows], dtype=object)

    values, counts = np.unique(sample_ids.astype(str), return_counts=True)
    if (counts > 1).any():
        repeated = str(values[counts > 1][0])
        raise ConfigError(
            f"labels file {path}, column {sample_column!r}: value {repeated!r} appears on {int(counts[counts > 1][0])} rows, "
            "expected one row per sample. Remove the repeated rows.",
            value=repeated,
        )
    return BenchLabels(
        source=path,
        label_column=label_column,
        sample_ids=sample_ids,
        case_ids=case_ids,
        labels=labels,
        folds=None,
        has_case_ids="case_id" in columns,
    )


def read_split_labels(path: Path, label_column: str | None = None) -> BenchLabels:
    """Read a Patho-Bench split TSV as the samples, labels and folds of a task, with ``slide_id`` as the sample id."""
    split = read_split_tsv(path, label_column)
    return BenchLabels(
        source=split.path,
        label_column=split.label_column,
        sample_ids=split.slide_ids,
        case_ids=split.case_ids,
        labels=split.labels,
        folds=split.folds,
    )


def read_model_info(path: Path, name: str) -> tuple[ModelInfo, int | None]:
    """Read a ``--model-info`` JSON object with any of the keys in :data:`MODEL_INFO_KEYS`.

    Returns the model information and the declared ``embedding_dim`` (None when absent), which the
    caller checks against the features. Raises :class:`ConfigError` for an unknown key or a value of the wrong type, so that a typo is not
    silently reported as a missing value.
    """
    path = Path(path)
    option = f"--model-info {name}={path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{option}: file not found. Pass a JSON file with keys among {list(MODEL_INFO_KEYS)}.", value=str(path)) from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{option}: invalid JSON ({error}). Write one object, for example {{\"parameters\": 18092160}}.", value=str(path)) from error
    if not isinstance(data, dict):
        raise ConfigError(f"{option}: expected a JSON object, found {type(data).__name__}.", value=type(data).__name__)
    unknown = sorted(set(data) - set(MODEL_INFO_KEYS))
    if unknown:
        raise ConfigError(f"{option}: unknown keys {unknown}, expected keys among {list(MODEL_INFO_KEYS)}.", value=unknown, limit=list(MODEL_INFO_KEYS))

    checks = {
        "parameters": (int, "an integer"),
        "embedding_dim": (int, "an integer"),
        "throughput_tiles_per_s": ((int, float), "a number"),
        "throughput_note": (str, "a string"),
    }
    for key, (expected_type, description) in checks.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, expected_type)):
            raise ConfigError(f"{option}: {key} is {value!r}, expected {description}.", value=value)
    return ModelInfo(
        parameters=data.get("parameters"),
        throughput_tiles_per_s=None if data.get("throughput_tiles_per_s") is None else float(data["throughput_tiles_per_s"]),
        throughput_note=data.get("throughput_note"),
        source=str(path),
    ), data.get("embedding_dim")


def load_bench_task(
    folders: Mapping[str, Path],
    bench_labels: BenchLabels,
    *,
    level: str = "slide",
    model_info: Mapping[str, Path] | None = None,
) -> BenchTask:
    """Read every model's features of the labelled samples and return them in the same row order.

    ``folders`` maps a model name to its feature folder. ``model_info`` maps a model name to a JSON file
    read with :func:`read_model_info`. Values it lacks are taken from the ``parameters``,
    ``throughput_tiles_per_s`` and ``throughput_note`` attributes of the model's feature files.
    Raises :class:`ConfigError` when a labelled sample has no file in any folder, when one model lacks a
    file the others have, and when a file's shape or encoder differs from the rest of its folder.
    """
    if level not in LEVELS:
        raise ConfigError(f"level is {level!r}, expected one of {list(LEVELS)}.", value=level, limit=list(LEVELS))
    model_info = dict(model_info or {})
    unknown = sorted(set(model_info) - set(folders))
    if unknown:
        raise ConfigError(
            f"--model-info names {unknown}, which no --features option names ({list(folders)}). Use the names given to --features.", value=unknown
        )
    for name, folder in folders.items():
        if not Path(folder).is_dir():
            raise ConfigError(f"--features {name}={folder}: folder not found. Pass a folder of TRIDENT-layout ID.h5 feature files.", value=str(folder))

    _check_samples_exist(folders, bench_labels)
    files = {name: [read_features(Path(folder) / f"{sample_id}.h5") for sample_id in bench_labels.sample_ids] for name, folder in folders.items()}
    for name, folder in folders.items():
        extra = sorted({path.stem for path in Path(folder).glob("*.h5")} - set(bench_labels.sample_ids))
        if extra:
            logger.warning("--features %s: %d feature files have no label in %s and are left out (first: %s)", name, len(extra), bench_labels.source, extra[:5])

    if level == "slide":
        feature_rows = {name: _stack_pooled(name, Path(folders[name]), bench_labels.sample_ids, model_files) for name, model_files in files.items()}
        row_labels, row_cases, row_ids, folds = bench_labels.labels, bench_labels.case_ids, bench_labels.sample_ids, bench_labels.folds
    else:
        feature_rows, slide_of_row = _stack_tiles(folders, bench_labels.sample_ids, files)
        row_labels = bench_labels.labels[slide_of_row]
        row_cases = bench_labels.case_ids[slide_of_row]
        reference_files = files[next(iter(folders))]
        row_ids = np.array(
            [f"{sample_id}:{x},{y}" for sample_id, file in zip(bench_labels.sample_ids, reference_files) for x, y in file.coords.tolist()], dtype=object
        )
        folds = None if bench_labels.folds is None else [expand_fold(fold, slide_of_row) for fold in bench_labels.folds]

    feature_sets = []
    for name, folder in folders.items():
        info = _model_info(name, files[name], model_info.get(name), feature_rows[name].shape[1])
        encoders = sorted({str(file.attrs["encoder"]) for file in files[name] if file.attrs.get("encoder")})
        if len(encoders) > 1:
            raise ConfigError(
                f"--features {name}={folder}: the files come from {len(encoders)} encoders ({encoders}). Keep the features of one encoder in each folder.",
                value=encoders,
            )
        feature_sets.append(FeatureSet(name=name, features=feature_rows[name], info=info, source=str(folder), encoder=encoders[0] if encoders else None))
    return BenchTask(level=level, feature_sets=feature_sets, labels=row_labels, case_ids=row_cases, sample_ids=row_ids, folds=folds)


def expand_fold(fold: Fold, slide_of_row: np.ndarray) -> Fold:
    """Return the fold of tile rows whose slides (indices into the slide-level fold) are on each side."""
    return Fold(*(np.flatnonzero(np.isin(slide_of_row, side)) for side in (fold.train, fold.val, fold.test)))


def parse_named_paths(values: Sequence[str], option: str) -> dict[str, Path]:
    """Parse ``NAME=PATH`` option values into an ordered mapping, rejecting an empty or repeated name."""
    named: dict[str, Path] = {}
    for value in values:
        name, separator, path = value.partition("=")
        name = name.strip()
        if not separator or not name or not path:
            raise ConfigError(f"{option} {value!r} is invalid, expected NAME=PATH, for example {option} student=features/student.", value=value)
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{option}: name {name!r} is invalid, expected letters, digits and . _ + - only, because it heads a column of the report.",
                value=name,
            )
        if name in named:
            raise ConfigError(f"{option}: name {name!r} is given twice. Give each model a different name.", value=name)
        named[name] = Path(path)
    return named


def _labels_column(path: Path, columns: list[str], label_column: str | None) -> str:
    if label_column is not None:
        if label_column not in columns:
            raise ConfigError(f"labels file {path}: label column {label_column!r} is missing (columns: {columns}). Pass one of them.", value=label_column)
        return label_column
    if "label" in columns:
        return "label"
    candidates = [column for column in columns if column not in ("slide_id", "case_id")]
    if len(candidates) != 1:
        raise ConfigError(
            f"labels file {path}: cannot tell the label column among {candidates}. Name a column 'label', or pass --label-column.",
            value=candidates,
        )
    return candidates[0]


def _check_samples_exist(folders: Mapping[str, Path], bench_labels: BenchLabels) -> None:
    """Raise for labelled samples that no model has, then for samples that only some models have."""
    present = {name: {path.stem for path in Path(folder).glob("*.h5")} for name, folder in folders.items()}
    unknown = [sample for sample in bench_labels.sample_ids if not any(sample in ids for ids in present.values())]
    if unknown:
        raise ConfigError(
            f"labels file {bench_labels.source} lists {len(unknown)} samples that have no feature file in any --features folder "
            f"(first: {unknown[:5]}, looked for {Path(next(iter(folders.values()))) / (unknown[0] + '.h5')}). "
            "Remove their rows from the labels file, or embed and pool those samples with every model.",
            value=unknown[:5],
        )
    for name, folder in folders.items():
        missing = [sample for sample in bench_labels.sample_ids if sample not in present[name]]
        if missing:
            others = [other for other in folders if other != name and missing[0] in present[other]]
            raise ConfigError(
                f"--features {name}={folder}: {len(missing)} labelled samples have no feature file "
                f"(first: {Path(folder) / (missing[0] + '.h5')}), but model {others[0]!r} has them. Every model needs features of "
                f"the same samples: embed and pool them with {name!r}, or remove their rows from {bench_labels.source}.",
                value=missing[:5],
            )


def _stack_pooled(name: str, folder: Path, sample_ids: np.ndarray, files: list[FeatureFile]) -> np.ndarray:
    for sample_id, file in zip(sample_ids, files):
        path = folder / f"{sample_id}.h5"
        if file.features.shape[0] != 1:
            raise ConfigError(
                f"--features {name}: {path} has {file.features.shape[0]} feature rows, expected one pooled row for --level slide. "
                "Pool it with unite pool first, or pass --level tile for a tile-level task.",
                value=file.features.shape[0],
            )
        _check_dimension(name, path, file, files[0], folder / f"{sample_ids[0]}.h5")
    return np.concatenate([file.features for file in files], axis=0)


def _stack_tiles(folders: Mapping[str, Path], sample_ids: np.ndarray, files: Mapping[str, list[FeatureFile]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stack every model's patch rows slide by slide, checking that all models embedded the same coords."""
    names = list(folders)
    reference = names[0]
    for name in names:
        folder = Path(folders[name])
        for position, (sample_id, file) in enumerate(zip(sample_ids, files[name])):
            path = folder / f"{sample_id}.h5"
            if file.attrs.get("pooled"):
                raise ConfigError(
                    f"--features {name}: {path} contains pooled features, expected one row per patch for --level tile. "
                    "Pass the folder of patch feature files, or use --level slide.",
                    value=str(path),
                )
            _check_dimension(name, path, file, files[name][0], folder / f"{sample_ids[0]}.h5")
            expected = files[reference][position].coords
            if name != reference and not np.array_equal(file.coords, expected):
                raise ConfigError(
                    f"--features {name}: {path} has {len(file.coords)} patches whose coords differ from those of model {reference!r} "
                    f"({len(expected)} patches in {Path(folders[reference]) / (sample_id + '.h5')}), so the rows are not the same tiles. "
                    "Embed the same patch files, in the same order, with every model.",
                    value=str(path),
                )
    slide_of_row = np.concatenate([np.full(len(file.features), slide, dtype=np.int64) for slide, file in enumerate(files[reference])])
    return {name: np.concatenate([file.features for file in files[name]], axis=0) for name in names}, slide_of_row


def _check_dimension(name: str, path: Path, file: FeatureFile, first: FeatureFile, first_path: Path) -> None:
    if file.features.shape[1] != first.features.shape[1]:
        raise ConfigError(
            f"--features {name}: {path} has features of dimension {file.features.shape[1]}, but {first_path} has "
            f"{first.features.shape[1]}. A folder must hold the features of one encoder and one pooling: embed and pool "
            "that sample again, or remove the stray file.",
            value=file.features.shape[1],
            limit=first.features.shape[1],
        )


def _model_info(name: str, files: list[FeatureFile], info_path: Path | None, dimension: int) -> ModelInfo:
    """Combine a --model-info JSON file with the attributes of the model's feature files; the JSON file wins."""
    from_attrs = {}
    for key in ("parameters", "throughput_tiles_per_s", "throughput_note"):
        values = sorted({file.attrs[key] for file in files if key in file.attrs}, key=str)
        if len(values) > 1:
            raise ConfigError(
                f"--features {name}: the files give {len(values)} different values of attribute {key!r} ({values[:3]}). "
                "Fix the attributes, or pass --model-info.",
                value=values[:3],
            )
        if values:
            from_attrs[key] = values[0]
    if info_path is None:
        return ModelInfo(
            parameters=None if from_attrs.get("parameters") is None else int(from_attrs["parameters"]),
            throughput_tiles_per_s=None if from_attrs.get("throughput_tiles_per_s") is None else float(from_attrs["throughput_tiles_per_s"]),
            throughput_note=from_attrs.get("throughput_note"),
            source="feature file attributes" if from_attrs else None,
        )

    info, declared_dimension = read_model_info(info_path, name)
    if declared_dimension is not None and declared_dimension != dimension:
        raise ConfigError(
            f"--model-info {name}={info_path}: embedding_dim is {declared_dimension}, but the features of {name!r} have dimension {dimension}. "
            "Check that the JSON file describes this model.",
            value=declared_dimension,
            limit=dimension,
        )
    return ModelInfo(
        parameters=info.parameters if info.parameters is not None else from_attrs.get("parameters"),
        throughput_tiles_per_s=info.throughput_tiles_per_s if info.throughput_tiles_per_s is not None else from_attrs.get("throughput_tiles_per_s"),
        throughput_note=info.throughput_note if info.throughput_note is not None else from_attrs.get("throughput_note"),
        source=info.source,
    )
