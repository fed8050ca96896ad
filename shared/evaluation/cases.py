"""Case-level tasks: the slides of one case (a patient) share its label and become one sample.

A labels table with a ``case_id`` column lists slides, each with its case and label, as Patho-Bench
split files do. :func:`cases_from_slides` turns it into one row per case, with the case's label and
its side of each fold. :func:`pool_model_cases` writes each case's embedding, the mean of its slides'
embeddings (late fusion in :mod:`shared.pooling`). Every slide then weighs the same, whatever its
tile count. numpy and h5py only, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import ConfigError
from shared.evaluation.bench_inputs import BenchLabels
from shared.evaluation.folds import SPLIT_VALUES, Fold
from shared.pooling import pool_case_files


@dataclass(frozen=True)
class CaseTable:
    """A slide table grouped by case.

    ``labels`` has one row per case, in the order of each case's first slide, with the case ids as
    sample ids and the case-level folds when the slide table had folds. ``slides`` maps each case id
    to its slide ids in table order, and ``case_of_slide`` gives, for each slide row of the table, the
    row of its case in ``labels``. ``expand_fold(case_fold, case_of_slide)`` turns a fold of cases into
    one of slides.
    """

    labels: BenchLabels
    slides: dict[str, list[str]]
    case_of_slide: np.ndarray


def cases_from_slides(slide_labels: BenchLabels) -> CaseTable:
    """Group the slides of ``slide_labels`` by case and return one labelled row per case.

    Raises :class:`ConfigError` naming the case, its slides' labels and the fix when the slides of a
    case have different labels, and when a case id cannot name a feature file. A slide table's folds
    keep every case on one side (``read_split_tsv`` checks this), so a case takes its slides' side.
    """
    slide_ids = [str(slide_id) for slide_id in slide_labels.sample_ids]
    case_ids = [str(case_id) for case_id in slide_labels.case_ids]
    row_of_case: dict[str, int] = {}
    for case_id in case_ids:
        row_of_case.setdefault(case_id, len(row_of_case))
    case_of_slide = np.array([row_of_case[case_id] for case_id in case_ids], dtype=np.int64)

    slides: dict[str, list[str]] = {case_id: [] for case_id in row_of_case}
    labels_of_case: dict[str, dict[str, str]] = {case_id: {} for case_id in row_of_case}
    for slide_id, case_id, label in zip(slide_ids, case_ids, slide_labels.labels.tolist()):
        slides[case_id].append(slide_id)
        labels_of_case[case_id][slide_id] = label

    for case_id, by_slide in labels_of_case.items():
        _check_case_id(case_id, slide_labels.source)
        distinct = sorted(set(map(str, by_slide.values())))
        if len(distinct) > 1:
            raise ConfigError(
                f"labels file {slide_labels.source}: the slides of case {case_id!r} have different labels in column "
                f"{slide_labels.label_column!r} ({', '.join(f'{slide} {label!r}' for slide, label in by_slide.items())}), but a "
                "case-level task needs one label per case. Give every slide of the case the same label, give slides with other "
                "labels their own case_id, or pass --level tile.",
                value=distinct,
            )

    first_slide = [case_ids.index(case_id) for case_id in row_of_case]
    folds = None
    if slide_labels.folds is not None:
        folds = [_case_fold(fold, case_of_slide) for fold in slide_labels.folds]
    labels = BenchLabels(
        source=slide_labels.source,
        label_column=slide_labels.label_column,
        sample_ids=np.array(list(row_of_case), dtype=object),
        case_ids=np.array(list(row_of_case), dtype=object),
        labels=slide_labels.labels[first_slide],
        folds=folds,
    )
    return CaseTable(labels=labels, slides=slides, case_of_slide=case_of_slide)


def pool_model_cases(slide_folders: Mapping[str, Path], cases_root: Path, table: CaseTable, *, method: str = "mean") -> dict[str, Path]:
    """Write ``CASES_ROOT/MODEL/CASE.h5``, the mean of the case's slide embeddings, for every model, and return the model folders.

    ``slide_folders`` maps a model name to its folder of pooled slide files ``SLIDE.h5``, pooled with
    ``method``. Pooling is cheap, so every case file is written again on every run.
    """
    folders = {}
    for model, slide_folder in slide_folders.items():
        folder = Path(cases_root) / model
        for case_id, slide_ids in table.slides.items():
            paths = {slide_id: Path(slide_folder) / f"{slide_id}.h5" for slide_id in slide_ids}
            pool_case_files(paths, folder / f"{case_id}.h5", case_id=case_id, method=method, fusion="late")
        folders[model] = folder
    return folders


def _case_fold(fold: Fold, case_of_slide: np.ndarray) -> Fold:
    """Return the fold of case rows from a fold of slide rows whose cases are each on one side."""
    return Fold(*(np.unique(case_of_slide[np.asarray(getattr(fold, side), dtype=np.int64)]) for side in SPLIT_VALUES))


def _check_case_id(case_id: str, source: Path) -> None:
    if "/" in case_id or "\\" in case_id or case_id in (".", ".."):
        raise ConfigError(
            f"labels file {source}: case_id {case_id!r} cannot name a feature file, because each case is written to CASE_ID.h5. "
            "Use case ids without / or \\.",
            value=case_id,
        )
