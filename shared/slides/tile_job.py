"""The per-slide tiling job: one slide in, a patch file, contours, a thumbnail and an overlay out.

For a slide named NAME (its file name without the extension) the job writes, under the output folder:

- ``patches/NAME_patches.h5``: the TRIDENT patch file (level-0 ``coords`` and their attributes),
- ``contours_geojson/NAME.geojson``: the tissue contours in level-0 pixels, readable by QuPath,
- ``thumbnails/NAME.jpg``: the thumbnail the tissue was detected on,
- ``visualization/NAME.jpg``: that thumbnail with the tissue outline and every patch drawn on it.

:func:`shared.jobs.run_jobs` runs it over many slides with resumable state records and locks.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.jobs import Job, JobResult
from shared.slides.contours import write_geojson
from shared.slides.grid import grid_over_tissue, resolve_target_mpp, validate_grid_options
from shared.slides.overlay import save_overlay, save_thumbnail
from shared.slides.reader import open_slide
from shared.slides.resolution import MppTable
from shared.slides.sources import SlideSource
from shared.slides.tiling import TiledSlide, drop_blurry_patches, require_patches, write_patch_file
from shared.slides.tissue import detect_tissue

logger = logging.getLogger(__name__)


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
        if not self.min_area_um2 >= 0:
            raise ConfigError(
                f"min_area_um2={self.min_area_um2} must be zero or a positive area in µm² (--min-area-um2).",
                value=self.min_area_um2,
            )
        if self.read_workers <= 0:
            raise ConfigError(
                f"read_workers={self.read_workers} must be a positive number of threads (--read-workers).",
                value=self.read_workers,
            )

    def output_config(self) -> dict[str, Any]:
        """Return the options that shape the outputs, as recorded in each slide's state."""
        config = asdict(self)
        del config["read_workers"]
        return config


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """Return the path of each output of the slide named ``name``, by kind."""
    out_dir = Path(out_dir)
    return {
        "patches": out_dir / "patches" / f"{name}_patches.h5",
        "contours": out_dir / "contours_geojson" / f"{name}.geojson",
        "thumbnail": out_dir / "thumbnails" / f"{name}.jpg",
        "visualization": out_dir / "visualization" / f"{name}.jpg",
    }


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
    :class:`SlideError` for a slide that cannot be tiled.
    """
    source: SlideSource = job.payload
    paths = output_paths(out_dir, job.name)

    with open_slide(source.path, mpp=source.mpp) as slide:
        info = slide.info
        tissue = detect_tissue(
            slide,
            min_area_um2=options.min_area_um2,
            fill_holes=options.fill_holes,
            remove_artefacts=options.remove_artefacts,
            allow_fluorescence=options.allow_fluorescence,
        )
        save_thumbnail(paths["thumbnail"], tissue)
        write_geojson(paths["contours"], tissue, name=job.name)

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

    save_overlay(paths["visualization"], tissue, grid)
    require_patches(info, grid, options.min_tissue_fraction)
    write_patch_file(paths["patches"], TiledSlide(info=info, grid=grid, tissue=tissue, blurry_dropped=blurry_dropped))
    logger.info(
        "%s: %d patches of %d px at %.3f µm/px (%d px at level 0) on a %.4f µm/px slide (%s)",
        job.name, len(grid), grid.patch_size, grid.target_mpp, grid.patch_size_level0, info.mpp, info.mpp_source,
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
