"""The slides a job runs over, collected from files, folders, glob patterns and CSV lists.

A CSV list has a ``slide`` column (or ``wsi``, as TRIDENT names it) with one slide path per row and an
optional ``mpp`` column with that slide's resolution in µm/px, which overrides its metadata. Relative
paths in a CSV are taken relative to the CSV's folder.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from shared.errors import ConfigError
from shared.slides.resolution import parse_mpp_cell

logger = logging.getLogger(__name__)

# File name endings taken from a folder: the formats openslide 4.0 lists, TIFF and OME-TIFF, and plain
# images. DICOM (.dcm) is left out because a DICOM slide is a folder of .dcm files, one per pyramid
# level, that openslide opens as one slide from any of them, so pass one of them by name.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".png", ".jpg", ".jpeg",
)
SLIDE_COLUMNS = ("slide", "wsi")
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class SlideSource:
    """One slide to process: its path and, when the list gave one, its resolution in µm/px."""

    path: Path
    mpp: float | None = None

    @property
    def name(self) -> str:
        """Output name of the slide: the file name without its last extension, as in ``NAME_patches.h5``."""
        return self.path.stem


def collect_slides(
    sources: str | Path | Iterable[str | Path], *, recursive: bool = False, exclude: Iterable[str | Path] = ()
) -> list[SlideSource]:
    """Return the slides named by ``sources``, in the order given, each file once.

    Each source is a slide file, a folder (its files whose names end in :data:`SLIDE_EXTENSIONS`, and
    with ``recursive`` those of its subfolders), a glob pattern (every file it matches, ``**`` matching
    subfolders) or a ``.csv`` list of slides. A single string or path is one source. Folders and glob
    patterns never take files under the folders in ``exclude``, such as the outputs of an earlier run.

    A file listed twice, under any spelling or through a symbolic link, is one slide. It keeps the path
    of its first listing, which also gives its output name, and the first resolution given for it.
    Raises :class:`ConfigError` for an empty or missing source, for two slides with the same output
    name and when no slide is found.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [_source_text(source) for source in sources]
    excluded = [Path(folder).resolve() for folder in exclude]
    collected: dict[Path, SlideSource] = {}
    for source in sources:
        for slide in _expand(source, recursive=recursive, excluded=excluded):
            key = slide.path.resolve()
            earlier = collected.get(key)
            if earlier is None:
                collected[key] = slide
                continue
            if earlier.mpp is not None and slide.mpp is not None and earlier.mpp != slide.mpp:
                raise ConfigError(
                    f"slide {slide.path} is listed twice with different resolutions, {earlier.mpp} and {slide.mpp} "
                    f"µm/px (sources: {', '.join(sources)}). Keep one row for it.",
                    value=[earlier.mpp, slide.mpp],
                )
            if earlier.mpp is None and slide.mpp is not None:
                collected[key] = replace(earlier, mpp=slide.mpp)

    if not collected:
        raise ConfigError(
            f"no slide found in {', '.join(sources) or 'the empty list of sources'}. Pass slide files, folders "
            f"containing files ending in {', '.join(SLIDE_EXTENSIONS)} (add --recursive for subfolders), "
            "glob patterns or CSV lists with a 'slide' column.",
            value=sources,
        )
    slides = list(collected.values())
    _check_unique_names(slides)
    return slides


def _source_text(source: str | Path) -> str:
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"slide source {source!r} is a {type(source).__name__}; expected a path string or a pathlib.Path.",
            value=repr(source),
        )
    text = os.fspath(source)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"slide source {text!r} is empty. Pass a slide file, a folder, a glob pattern or a CSV list; write '.' "
            "for the current folder.",
            value=repr(text),
        )
    return text


def _expand(source: str, *, recursive: bool, excluded: list[Path]) -> list[SlideSource]:
    path = Path(source)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        files = sorted(file for file in path.glob(pattern) if file.is_file() and _has_slide_extension(file))
        files = _without_excluded(files, excluded, source)
        if not files:
            logger.warning("folder %s contains no file ending in %s", path, ", ".join(SLIDE_EXTENSIONS))
        return [SlideSource(file) for file in files]
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_slide_list(path)
    if path.is_file():
        return [SlideSource(path)]
    if GLOB_CHARACTERS & set(source):
        files = sorted(Path(match) for match in glob.glob(source, recursive=True) if Path(match).is_file())
        files = _without_excluded(files, excluded, source)
        if not files:
            logger.warning("glob pattern %s matches no file", source)
        return [SlideSource(file) for file in files]
    raise ConfigError(
        f"slide source {source} not found: it is not a file, a folder or a glob pattern. Check the path.",
        value=source,
    )


def read_slide_list(path: Path) -> list[SlideSource]:
    """Read a CSV list of slides: a ``slide`` or ``wsi`` column and an optional ``mpp`` column (µm/px).

    Raises :class:`ConfigError` naming the CSV and the row or line for a missing column, a quote left
    open, non-empty cells beyond the header's columns, an empty slide cell, or an ``mpp`` outside the
    plausible range (see :func:`~shared.slides.resolution.parse_mpp_cell`).
    """
    path = Path(path)
    reader = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            # strict: a quote left open runs to the end of the file, which would make one garbled row.
            reader = csv.DictReader(file, strict=True)
            rows = list(reader)
            columns = [(column or "").strip() for column in reader.fieldnames or []]
    except csv.Error as error:
        # line_num counts the lines read whole, so the malformed row starts on the next one.
        line = reader.line_num + 1 if reader is not None else 1
        raise ConfigError(
            f"slide list {path}, line {line}: the CSV is malformed ({error}), for example a quote that is opened "
            "and not closed. Fix that line.",
            value=str(path),
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"slide list {path} cannot be read as a UTF-8 CSV file ({error}). Pass a CSV file.", value=str(path)) from error

    slide_column = next((column for column in SLIDE_COLUMNS if column in columns), None)
    if slide_column is None:
        raise ConfigError(
            f"slide list {path} has no 'slide' or 'wsi' column (columns: {', '.join(columns) or 'none'}). "
            "Add a header row with a 'slide' column of slide paths and, optionally, an 'mpp' column.",
            value=columns,
        )

    slides = []
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        # DictReader puts cells beyond the header under the key None, as a list. Empty ones, as from a
        # trailing comma, are harmless. Others mean the columns are shifted, so the row is an error.
        extra = [cell for cell in row.get(None) or [] if cell.strip()]
        if extra:
            raise ConfigError(
                f"slide list {path}, row {row_number}: the row has the extra cells {extra} beyond the "
                f"{len(columns)} columns of the header ({', '.join(columns)}). Quote a path that contains a comma, "
                "or add a header for the extra column.",
                value=extra,
            )
        # Missing cells come as None and are skipped, so a missing mpp cell means "use the metadata".
        row = {key.strip(): value.strip() for key, value in row.items() if isinstance(key, str) and isinstance(value, str)}
        cell = row.get(slide_column, "")
        if not cell:
            raise ConfigError(
                f"slide list {path}, row {row_number}: the '{slide_column}' cell is empty. Give a slide path or "
                "delete the row.",
                value=row_number,
            )
        slide_path = Path(cell).expanduser()
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        slides.append(SlideSource(slide_path, parse_mpp_cell(row.get("mpp", ""), where=f"slide list {path}, row {row_number}")))
    if not slides:
        logger.warning("slide list %s has no rows", path)
    return slides


def _without_excluded(files: list[Path], excluded: list[Path], source: str) -> list[Path]:
    included = [file for file in files if not any(file.resolve().is_relative_to(folder) for folder in excluded)]
    if len(included) < len(files):
        logger.info("source %s: left out %d file(s) in the output folders", source, len(files) - len(included))
    return included


def _has_slide_extension(path: Path) -> bool:
    return path.name.lower().endswith(SLIDE_EXTENSIONS)


def _check_unique_names(slides: list[SlideSource]) -> None:
    first_by_name: dict[str, SlideSource] = {}
    for slide in slides:
        earlier = first_by_name.setdefault(slide.name, slide)
        if earlier is not slide:
            raise ConfigError(
                f"slides {earlier.path} and {slide.path} would both write outputs named {slide.name!r} "
                f"(for example patches/{slide.name}_patches.h5). Rename one, or tile them into different --out folders.",
                value=[str(earlier.path), str(slide.path)],
            )
