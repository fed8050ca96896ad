"""The per-slide tiling job: one slide in, a patch file, contours, a thumbnail and an overlay out.

For a slide named NAME (its file name without the extension) the job writes, under the output folder:

- ``patches/NAME_patches.h5``: the TRIDENT patch file (level-0 ``coords`` and their attributes),
- ``contours_geojson/NAME.geojson``: the tissue contours in level-0 pixels, readable by QuPath,
- ``thumbnails/NAME.jpg``: the thumbnail the tissue was detected on,
- ``visualization/NAME.jpg``: that thumbnail with the tissue outline and every patch drawn on it.

:func:`shared.jobs.run_jobs` runs it over many slides with resumable state records and locks. An
output that cannot be written fails the slide with :class:`~shared.jobs.WriteError` (reason
``write_failed``), which names the file and the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import CacheError
from shared.jobs import Job, JobResult, WriteError, format_count
from shared.slides.contours import write_geojson
from shared.slides.grid import grid_over_tissue, resolve_target_mpp, validate_grid_options
from shared.slides.overlay import save_overlay, save_thumbnail
from shared.slides.reader import log_mpp_override, open_slide
from shared.slides.resolution import MppTable
from shared.slides.sources import SlideSource
from shared.slides.tiling import (
    TiledSlide,
    drop_blurry_patches,
    require_patches,
    validate_min_area_um2,
    validate_read_workers,
    write_patch_file,
)
from shared.slides.tissue import detect_tissue

logger = logging.getLogger(__name__)

# The folders under the output folder that hold one file per slide, by output kind.
OUTPUT_FOLDERS = {"patches": "patches", "contours": "contours_geojson", "thumbnail": "thumbnails", "visualization": "visualization"}

_Written = TypeVar("_Written")


@dataclass(frozen=True)
class TileOptions:
    """Options of the tiling job; see :func:`~shared.slides.grid.grid_over_tissue` and
    :func:`~shared.slides.tissue.detect_tissue` for their meaning.

    ``read_workers`` is the number of threads that read tiles for ``drop_blurry``. It is the only
    option that does not change the outputs.
    """

    patch_size: int = 224
    target_mpp: float | None = None
    target_magnification: float | None = None
    overlap: int = 0
    min_tissue_fraction: float = 0.25
    edge: str = "drop"
    min_area_um2: float = 20_000.0
    fill_holes: bool = True
    remove_artefacts: bool = True
    allow_fluorescence: bool = False
    drop_blurry: bool = False
    read_workers: int = 1

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an invalid option, so a run fails before its first slide."""
        resolve_target_mpp(self.target_mpp, self.target_magnification)
        validate_grid_options(
            patch_size=self.patch_size, overlap=self.overlap, min_tissue_fraction=self.min_tissue_fraction, edge=self.edge
        )
        validate_min_area_um2(self.min_area_um2)
        validate_read_workers(self.read_workers)

    def output_config(self) -> dict[str, Any]:
        """Return the options that shape the outputs, as recorded in each slide's state.

        The target is recorded as the resolution it resolves to, so ``--target-mag 20``,
        ``--target-mpp 0.5`` and the default are the same options.
        """
        config = asdict(self)
        del config["read_workers"]
        del config["target_magnification"]
        config["target_mpp"] = resolve_target_mpp(self.target_mpp, self.target_magnification)
        return config


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """Return the path of each output of the slide named ``name``, by kind."""
    out_dir = Path(out_dir)
    return {
        "patches": out_dir / OUTPUT_FOLDERS["patches"] / f"{name}_patches.h5",
        "contours": out_dir / OUTPUT_FOLDERS["contours"] / f"{name}.geojson",
        "thumbnail": out_dir / OUTPUT_FOLDERS["thumbnail"] / f"{name}.jpg",
        "visualization": out_dir / OUTPUT_FOLDERS["visualization"] / f"{name}.jpg",
    }


def output_folders(out_dir: Path) -> list[Path]:
    """Return every folder that a tiling run writes under ``out_dir``: the output folders, ``state`` and ``locks``."""
    out_dir = Path(out_dir)
    return [out_dir / folder for folder in (*OUTPUT_FOLDERS.values(), "state", "locks")]


def slide_jobs(
    slides: list[SlideSource], options: TileOptions, *, mpp: float | None = None, mpp_table: MppTable | None = None
) -> list[Job]:
    """Return one job per slide, each with the resolution override that applies to it.

    The override is the slide's ``mpp`` from its CSV list, else its row in ``mpp_table``, else ``mpp``,
    else none (the slide's metadata is used). It is part of the job's recorded options.
    """
    jobs = []
    for slide in slides:
        override = slide.mpp
        if override is None and mpp_table is not None:
            override = mpp_table.lookup(slide.path)
        if override is None:
            override = mpp
        jobs.append(
            Job(
                name=slide.name,
                source=str(slide.path),
                payload=SlideSource(slide.path, override),
                config={**options.output_config(), "mpp_override": override},
            )
        )
    return jobs


def tile_slide_job(job: Job, out_dir: Path, *, options: TileOptions) -> JobResult:
    """Tile one slide and write its outputs (see the module docstring); the task given to :func:`run_jobs`.

    The thumbnail and contours are written as soon as the tissue is found, and the overlay before the
    check for patches, so a slide that fails with ``no_patches`` still shows why. Raises
    :class:`SlideError` for a slide that cannot be tiled, and :class:`WriteError` for an output that
    cannot be written.
    """
    source: SlideSource = job.payload
    paths = output_paths(out_dir, job.name)

    with open_slide(source.path, mpp=source.mpp) as slide:
        info = slide.info
        log_mpp_override(info)
        tissue = detect_tissue(
            slide,
            min_area_um2=options.min_area_um2,
            fill_holes=options.fill_holes,
            remove_artefacts=options.remove_artefacts,
            allow_fluorescence=options.allow_fluorescence,
        )
        _write_output(job.name, paths["thumbnail"], lambda path: save_thumbnail(path, tissue))
        _write_output(job.name, paths["contours"], lambda path: write_geojson(path, tissue, name=job.name))

        grid = grid_over_tissue(
            info,
            tissue,
            patch_size=options.patch_size,
            target_mpp=options.target_mpp,
            target_magnification=options.target_magnification,
            overlap=options.overlap,
            min_tissue_fraction=options.min_tissue_fraction,
            edge=options.edge,
        )
        blurry_dropped = 0
        if options.drop_blurry and len(grid) > 0:
            grid, blurry_dropped = drop_blurry_patches(slide, grid, workers=options.read_workers)

    _write_output(job.name, paths["visualization"], lambda path: save_overlay(path, tissue, grid))
    require_patches(info, grid, options.min_tissue_fraction)
    tiled = TiledSlide(info=info, grid=grid, tissue=tissue, blurry_dropped=blurry_dropped)
    _write_output(job.name, paths["patches"], lambda path: write_patch_file(path, tiled))
    logger.info(
        "%s: %s of %d px at %.3f µm/px (%d px at level 0) on a %.4f µm/px slide (%s)",
        job.name, format_count(len(grid), "patch", "patches"), grid.patch_size, grid.target_mpp, grid.patch_size_level0, info.mpp, info.mpp_source,
    )

    details = {
        "slide_id": info.slide_id,
        "reader": info.reader,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "level0_width": info.level0_width,
        "level0_height": info.level0_height,
        "illumination": tissue.illumination,
        "tissue_fraction": round(float(tissue.mask.mean()), 4),
        "patches": len(grid),
        "patch_size_level0": grid.patch_size_level0,
        "target_mpp": grid.target_mpp,
        "target_magnification": grid.target_magnification,
        "blurry_dropped": blurry_dropped,
    }
    return JobResult(outputs=paths, details=details)


def _write_output(name: str, path: Path, write: Callable[[Path], _Written]) -> _Written:
    """Call ``write(path)`` and turn its OSError into a :class:`WriteError` naming the slide, the file and the cause.

    The patch file writer reports an OSError as a :class:`CacheError` chained to it, which is turned
    into a WriteError too. Its other CacheErrors (invalid coordinates) are bugs and stay as they are.
    """
    try:
        return write(path)
    except OSError as error:
        raise WriteError.from_os_error(path, error, subject=f"slide {name}") from error
    except CacheError as error:
        if isinstance(error.__cause__, OSError):
            raise WriteError.from_os_error(path, error.__cause__, subject=f"slide {name}") from error
        raise
