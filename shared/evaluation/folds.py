"""Train/validation/test folds for benchmarks: read from a Patho-Bench split TSV, or made stratified and grouped by case.

A split TSV has one row per sample and the columns ``case_id``, ``slide_id``, a label column and
``fold_0`` ... ``fold_K``, whose cells are ``train``, ``val`` or ``test``. For a tile-level task each
tile is a sample: its id goes in ``slide_id`` and the case (or any group whose tiles must stay together)
in ``case_id``. Every fold keeps each case on one side, because tiles or slides of one patient on both
sides of a split inflate every metric.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from shared.errors import ConfigError

SPLIT_VALUES = ("train", "val", "test")
ID_COLUMNS = ("case_id", "slide_id")
_FOLD_COLUMN = re.compile(r"fold_(\d+)")


@dataclass(frozen=True)
class Fold:
    """Row indices of the train, validation and test samples of one fold; ``val`` may be empty."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class SplitTable:
    """The samples of a split TSV, in file order, with their labels and folds."""

    path: Path
    label_column: str
    case_ids: np.ndarray
    slide_ids: np.ndarray
    labels: np.ndarray
    folds: list[Fold]


def read_split_tsv(path: Path, label_column: str | None = None) -> SplitTable:
    """Read and validate a Patho-Bench split TSV.

    ``label_column`` defaults to the one column that is neither an id nor a fold. Every error is a
    :class:`ConfigError` that names the file, the column and the value. It is raised for a missing
    column, a fold column out of sequence, an empty id or label, or a repeated slide id. It is also
    raised for a cell other than train/val/test, a fold without train or test samples, and a case on
    two sides of a fold.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"split file {path} not found. Pass a TSV with columns case_id, slide_id, a label and fold_0 ...", value=str(path))
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter="\t")
        columns = list(reader.fieldnames or [])
        rows = list(reader)

    fold_columns = _fold_columns(path, columns)
    label_column = _label_column(path, columns, fold_columns, label_column)
    for column in (*ID_COLUMNS, label_column):
        if column not in columns:
            raise ConfigError(
                f"split file {path}: column {column!r} is missing (columns: {columns}). Add it to the header row.",
                value=column,
            )
    if not rows:
        raise ConfigError(f"split file {path} has a header but no samples. Add one row per sample.", value=0)

    for line, row in enumerate(rows, start=2):
        if None in row or any(value is None for value in row.values()):
            raise ConfigError(
                f"split file {path}, line {line}: the row has a different number of tab-separated cells than the "
                f"header, which has {len(columns)}. Fix the row so each column has one cell.",
                value=line,
            )
        for column in (*ID_COLUMNS, label_column):
            if not row[column].strip():
                raise ConfigError(f"split file {path}, line {line}: column {column!r} is empty. Fill it or remove the row.", value=line)

    case_ids = np.array([row["case_id"].strip() for row in rows], dtype=object)
    slide_ids = np.array([row["slide_id"].strip() for row in rows], dtype=object)
    labels = np.array([row[label_column].strip() for row in rows], dtype=object)
    _check_unique_slides(path, slide_ids)

    folds = []
    for column in fold_columns:
        cells = np.array([row[column].strip() for row in rows], dtype=object)
        unknown = sorted(set(cells) - set(SPLIT_VALUES))
        if unknown:
            line = 2 + int(np.flatnonzero(cells == unknown[0])[0])
            raise ConfigError(
                f"split file {path}, column {column!r}, line {line}: value {unknown[0]!r} is not one of {list(SPLIT_VALUES)}.",
                value=unknown[0],
                limit=list(SPLIT_VALUES),
            )
        fold = Fold(*(np.flatnonzero(cells == value) for value in SPLIT_VALUES))
        for side, indices in (("train", fold.train), ("test", fold.test)):
            if len(indices) == 0:
                raise ConfigError(f"split file {path}, column {column!r}: no sample is marked {side!r}. Every fold needs train and test samples.", value=column)
        check_grouped(fold, case_ids, source=f"split file {path}, column {column!r}")
        folds.append(fold)

    return SplitTable(path=path, label_column=label_column, case_ids=case_ids, slide_ids=slide_ids, labels=labels, folds=folds)


def write_split_tsv(
    path: Path,
    *,
    case_ids: Sequence[str],
    slide_ids: Sequence[str],
    labels: Sequence,
    folds: Sequence[Fold],
    label_column: str = "label",
) -> Path:
    """Write samples and folds as a Patho-Bench split TSV, so that folds made here can be reused and published.

    Every sample must be in exactly one side of each fold. Raises :class:`ConfigError` otherwise.
    """
    path = Path(path)
    count = len(slide_ids)
    if not len(case_ids) == len(labels) == count:
        raise ConfigError(
            f"split file {path}: {len(case_ids)} case ids, {count} slide ids and {len(labels)} labels, expected one of each per sample.",
            value=[len(case_ids), count, len(labels)],
        )
    columns = {}
    for number, fold in enumerate(folds):
        cells = np.full(count, "", dtype=object)
        for value, indices in zip(SPLIT_VALUES, (fold.train, fold.val, fold.test)):
            if (cells[indices] != "").any():
                raise ConfigError(f"split file {path}: fold {number} puts a sample on two sides. Pass disjoint train, val and test indices.", value=number)
            cells[indices] = value
        if (cells == "").any():
            raise ConfigError(
                f"split file {path}: fold {number} leaves {int((cells == '').sum())} samples on no side. Assign every sample to train, val or test.",
                value=number,
            )
        columns[f"fold_{number}"] = cells

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow([*ID_COLUMNS, label_column, *columns])
        for row in range(count):
            writer.writerow([case_ids[row], slide_ids[row], labels[row], *(cells[row] for cells in columns.values())])
    return path


def make_folds(
    labels: Sequence,
    groups: Sequence,
    *,
    n_folds: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
) -> list[Fold]:
    """Make stratified folds in which every group (a case) is on one side, with scikit-learn's StratifiedGroupKFold.

    With ``n_folds`` of 2 or more, the test sets of the folds partition the samples. With ``n_folds=1``
    a single split puts about ``test_size`` of the samples in the test set: the first fold of a
    StratifiedGroupKFold with round(1 / test_size) folds. Stratification is approximate when groups
    mix labels or are few. Validation sets are empty, because the linear probe and retrieval protocols
    use no validation samples. Raises :class:`ConfigError` when there are fewer groups than folds.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ConfigError(
            f"make_folds: labels have shape {labels.shape} and groups {groups.shape}, expected one label and one group per sample.",
            value=[labels.shape, groups.shape],
        )
    if n_folds < 1:
        raise ConfigError(f"make_folds: n_folds is {n_folds}, expected at least 1.", value=n_folds, limit=1)
    if n_folds == 1 and not 0.0 < test_size < 1.0:
        raise ConfigError(f"make_folds: test_size is {test_size}, expected a fraction in (0, 1), such as 0.2.", value=test_size)

    splits = n_folds if n_folds > 1 else max(2, round(1.0 / test_size))
    group_count = len(np.unique(groups))
    if group_count < splits:
        raise ConfigError(
            f"make_folds: {group_count} groups (cases) cannot fill {splits} folds, because each group stays on one side. "
            "Use fewer folds, a larger test_size, or more cases.",
            value=group_count,
            limit=splits,
        )

    splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    empty = np.zeros(0, dtype=np.int64)
    folds = [Fold(train=np.sort(train), val=empty, test=np.sort(test)) for train, test in splitter.split(np.zeros(len(labels)), labels, groups)]
    folds = folds[:n_folds]
    for fold in folds:
        check_grouped(fold, groups, source="make_folds")
    return folds


def check_grouped(fold: Fold, groups: Sequence, *, source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` and the group when a group has samples on two sides of ``fold``."""
    groups = np.asarray(groups, dtype=object)
    sides = dict(zip(SPLIT_VALUES, (fold.train, fold.val, fold.test)))
    for first, second in (("train", "test"), ("train", "val"), ("val", "test")):
        both = sorted(set(groups[sides[first]]) & set(groups[sides[second]]), key=str)
        if both:
            raise ConfigError(
                f"{source}: case_id {both[0]!r} is on both the {first} and {second} sides ({len(both)} cases are). "
                "Put every sample of a case on one side.",
                value=str(both[0]),
            )


def _fold_columns(path: Path, columns: list[str]) -> list[str]:
    numbers = sorted(int(match.group(1)) for column in columns if (match := _FOLD_COLUMN.fullmatch(column)))
    if not numbers:
        raise ConfigError(f"split file {path}: column 'fold_0' is missing (columns: {columns}). Add fold columns fold_0 ... fold_K.", value="fold_0")
    expected = list(range(len(numbers)))
    if numbers != expected:
        gap = next(want for number, want in zip(numbers, expected) if number != want)
        raise ConfigError(
            f"split file {path}: column 'fold_{gap}' is missing; fold columns must be fold_0 ... fold_K without gaps "
            f"(found {[f'fold_{number}' for number in numbers]}).",
            value=f"fold_{gap}",
        )
    return [f"fold_{number}" for number in numbers]


def _label_column(path: Path, columns: list[str], fold_columns: list[str], label_column: str | None) -> str:
    if label_column is not None:
        return label_column
    candidates = [column for column in columns if column not in ID_COLUMNS and column not in fold_columns]
    if len(candidates) != 1:
        raise ConfigError(
            f"split file {path}: cannot tell the label column among {candidates}, expected exactly one column besides "
            "case_id, slide_id and the folds. Name the label column.",
            value=candidates,
        )
    return candidates[0]


def _check_unique_slides(path: Path, slide_ids: np.ndarray) -> None:
    values, counts = np.unique(slide_ids.astype(str), return_counts=True)
    if (counts > 1).any():
        repeated = str(values[counts > 1][0])
        raise ConfigError(
            f"split file {path}, column 'slide_id': value {repeated!r} appears on {int(counts[counts > 1][0])} rows, "
            "expected one row per sample.",
            value=repeated,
        )
