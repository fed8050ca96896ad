"""Slide-level steps shared by ``unite tile``, ``unite teach`` and ``unite demo``.

``unite teach`` takes slides from the same sources as ``unite tile`` and lays the same patch grid, or
reads the grid from the patch files of a ``unite tile`` output folder, so a slide is not tiled twice.
A slide that cannot be used is recorded as failed, and the run goes on with the others. An error of
the gateway (unreachable, missing API key, budget used up) stops the run, because it would fail every
slide after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from shared.cache import EmbeddingCache
from shared.errors import ConfigError, SlideError, UniteError
from shared.protocol import GATEWAY_SERVICE
from shared.slides.grid import PatchGrid
from shared.slides.reader import Slide, open_slide
from shared.slides.resolution import MppTable
from shared.slides.sources import SlideSource
from shared.slides.tile_job import OUTPUT_FOLDERS, TileOptions, slide_jobs
from shared.slides.tiling import iter_tiles, tile_slide, write_patch_file
from teacher_gateway.client import GatewayClient
from teacher_gateway.export import export_shards

logger = logging.getLogger(__name__)

# Attributes that a patch file of `unite tile` stores on its coords and that rebuild the patch grid.
PATCH_FILE_ATTRS = ("patch_size", "patch_size_level0", "target_mpp", "target_magnification", "overlap", "level0_width", "level0_height")


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """Return ``count`` with ``noun`` in the singular for 1 and in the plural (``noun + "s"`` by default) otherwise."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"


def tile_to_patch_files(
    slides: list[Path], out_dir: Path, *, mpp: float | None, patch_size: int, target_mpp: float
) -> list[Path]:
    """Tile each slide and write its TRIDENT-layout patch file to ``out_dir/patches/NAME_patches.h5``."""
    paths = []
    for slide in slides:
        tiled = tile_slide(slide, mpp=mpp, patch_size=patch_size, target_mpp=target_mpp)
        paths.append(write_patch_file(Path(out_dir) / "patches" / f"{tiled.info.name}_patches.h5", tiled))
    return paths


class PatchFileError(UniteError):
    """A patch file given with ``--patches`` is missing, unreadable, or was written for another slide."""

    code = "invalid_patch_file"
    status_code = 422


@dataclass(frozen=True)
class SlideFailure:
    """A slide that ``unite teach`` could not use: its output name, path, reason code and message."""

    name: str
    path: str
    reason: str
    message: str

    @classmethod
    def from_error(cls, source: SlideSource, error: UniteError) -> SlideFailure:
        return cls(source.name, str(source.path), getattr(error, "reason", error.code), error.message)


@dataclass(frozen=True)
class SlidePatches:
    """The patch grid of one slide, with the resolution override to open it with.

    ``patch_file`` is the ``unite tile`` patch file the grid was read from, or None when it was laid here,
    and ``level0_size`` the (width, height) in pixels of the slide that file was written for.
    """

    source: SlideSource
    mpp: float | None
    grid: PatchGrid
    patch_file: Path | None = None
    level0_size: tuple[int, int] | None = None


def teach_sources(
    slides: Iterable[SlideSource | str | Path], options: TileOptions, *, mpp: float | None = None, mpp_table: MppTable | None = None
) -> list[SlideSource]:
    """Return each slide with the resolution override that applies to it, in the order given.

    The override is the slide's ``mpp`` from its CSV list, else its row in ``mpp_table``, else ``mpp``,
    else none, as ``unite tile`` chooses it.
    """
    sources = [slide if isinstance(slide, SlideSource) else SlideSource(Path(slide)) for slide in slides]
    return [job.payload for job in slide_jobs(sources, options, mpp=mpp, mpp_table=mpp_table)]


def patch_file_folder(patches_dir: Path) -> Path:
    """Return the folder of the patch files: ``patches_dir/patches`` for a ``unite tile`` output folder, else ``patches_dir``."""
    patches_dir = Path(patches_dir)
    nested = patches_dir / OUTPUT_FOLDERS["patches"]
    return nested if nested.is_dir() else patches_dir


def slide_patches(source: SlideSource, options: TileOptions, patches_dir: Path | None = None) -> SlidePatches:
    """Return the patch grid of one slide: read from ``patches_dir`` when given, else laid with ``options``.

    Raises :class:`SlideError` for a slide that cannot be tiled, and :class:`PatchFileError` for a patch
    file that is missing, unreadable, or was written for a slide of other dimensions.
    """
    if patches_dir is None:
        tiled = tile_slide(
            source.path,
            mpp=source.mpp,
            patch_size=options.patch_size,
            target_mpp=options.target_mpp,
            target_magnification=options.target_magnification,
            overlap=options.overlap,
            min_tissue_fraction=options.min_tissue_fraction,
            edge=options.edge,
            min_area_um2=options.min_area_um2,
            fill_holes=options.fill_holes,
            remove_artefacts=options.remove_artefacts,
            allow_fluorescence=options.allow_fluorescence,
        )
        return SlidePatches(source, source.mpp, tiled.grid)

    path = patch_file_folder(patches_dir) / f"{source.name}_patches.h5"
    grid, attrs = read_patch_grid(path, source)
    # The resolution the slide was tiled at lets a slide without one in its metadata open here too.
    mpp = source.mpp if source.mpp is not None else attrs.get("mpp")
    level0_size = (int(attrs["level0_width"]), int(attrs["level0_height"]))
    return SlidePatches(source, mpp, grid, patch_file=path, level0_size=level0_size)


def read_patch_grid(path: Path, source: SlideSource) -> tuple[PatchGrid, dict[str, Any]]:
    """Read the patch grid of ``source`` from the patch file ``path`` written by ``unite tile``; return it and the attributes."""
    if not path.is_file():
        raise PatchFileError(
            f"slide {source.path}: patch file {path} not found, so `unite tile` wrote none for this slide into that "
            "folder (it failed there, or was tiled into another folder). Run `unite tile` on the slide with --out "
            "set to the --patches folder, or leave out --patches to tile the slides here.",
            value=str(path),
        )
    try:
        with h5py.File(path, "r") as file:
            dataset = file.get("coords")
            if not isinstance(dataset, h5py.Dataset):
                raise PatchFileError(
                    f"patch file {path} has no coords dataset (found: {sorted(file.keys())}). Tile the slide again "
                    "with `unite tile`.",
                    value=str(path),
                )
            coords = np.asarray(dataset[()], dtype=np.int64)
            attrs = {key: _attribute_value(value) for key, value in {**file.attrs, **dataset.attrs}.items()}
    except OSError as error:
        raise PatchFileError(
            f"patch file {path} cannot be read as HDF5 ({error}). It may be truncated; tile the slide again with `unite tile`.",
            value=str(path),
        ) from error

    missing = [name for name in PATCH_FILE_ATTRS if name not in attrs]
    if missing or coords.ndim != 2 or coords.shape[1] != 2:
        raise PatchFileError(
            f"patch file {path} has coords of shape {coords.shape} and lacks the attributes {missing}; expected (N, 2) "
            f"coords with the attributes {list(PATCH_FILE_ATTRS)}, as `unite tile` writes them. Tile the slide again "
            "with `unite tile`.",
            value=str(path),
        )
    grid = PatchGrid(
        coords=coords,
        patch_size=int(attrs["patch_size"]),
        patch_size_level0=int(attrs["patch_size_level0"]),
        target_mpp=float(attrs["target_mpp"]),
        target_magnification=int(attrs["target_magnification"]),
        overlap=int(attrs["overlap"]),
        edge=str(attrs.get("edge", "drop")),
    )
    return grid, attrs


def check_patch_file_matches(patches: SlidePatches, slide: Slide) -> None:
    """Raise :class:`PatchFileError` when the grid was read from a patch file written for a slide of other level-0 dimensions."""
    if patches.patch_file is None or patches.level0_size is None:
        return
    expected = patches.level0_size
    found = (slide.info.level0_width, slide.info.level0_height)
    if expected != found:
        raise PatchFileError(
            f"patch file {patches.patch_file} was written for a slide of {expected[0]}x{expected[1]} px at level 0, but "
            f"slide {patches.source.path} is {found[0]}x{found[1]} px, so the file belongs to another slide with the "
            "same name. Pass the --patches folder that `unite tile` wrote for these slides.",
            value=list(found),
            limit=list(expected),
        )


def _attribute_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def iter_slide_tiles(patches: SlidePatches, batch_size: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Open the slide and yield ``(slide_id, coords, tiles)`` batches over its patch grid."""
    with open_slide(patches.source.path, mpp=patches.mpp) as slide:
        check_patch_file_matches(patches, slide)
        for coords, tiles in iter_tiles(slide, patches.grid, batch_size=batch_size):
            yield slide.info.slide_id, coords, tiles


def format_failures(failures: list[SlideFailure]) -> list[str]:
    """Return the console lines that list the failed slides, by reason and then one line each."""
    if not failures:
        return []
    reasons: dict[str, int] = {}
    for failure in failures:
        reasons[failure.reason] = reasons.get(failure.reason, 0) + 1
    lines = ["failed by reason: " + ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))]
    lines.extend(f"  {failure.name} ({failure.reason}): {failure.message}" for failure in failures)
    return lines


@dataclass
class TeachResult:
    """Summary of a ``teach_slides`` run: slides used and failed, tiles sent, tiles the teacher embedded, shards written."""

    slides: list[SlidePatches] = field(default_factory=list)
    failed: list[SlideFailure] = field(default_factory=list)
    tiles: int = 0
    cache_hits: int = 0
    teacher_tiles: int = 0
    shards: list[Path] = field(default_factory=list)
    teacher: str = ""
    seconds: float = 0.0

    @property
    def exit_status(self) -> int:
        """0 when every slide was taught, 1 when any failed."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """Describe the run for the console: one line of counts, then the failed slides."""
        if self.slides:
            shards = f"{plural(len(self.shards), 'training shard')} written"
        else:
            shards = "no training shard written, because no slide was taught"
        lines = [
            f"{plural(len(self.slides) + len(self.failed), 'slide')}: {len(self.slides)} taught, {len(self.failed)} failed; "
            f"{plural(self.tiles, 'tile')} sent to the gateway: {self.cache_hits} from its cache, "
            f"{self.teacher_tiles} embedded by {self.teacher}; {shards} in {self.seconds:.1f} s"
        ]
        lines.extend(format_failures(self.failed))
        return "\n".join(lines)


def check_is_gateway(client: GatewayClient) -> None:
    """Raise :class:`ConfigError` unless ``GET /v1/models`` at ``client.base_url`` names the teacher-gateway service.

    The student server speaks the same embeddings protocol, so without this check ``unite teach`` would
    send every tile to it and fail only at the export, because the student fills no cache.
    """
    service = client.service()
    if service == GATEWAY_SERVICE:
        return
    found = f"names the service {service!r}" if service is not None else "names no service"
    raise ConfigError(
        f"--gateway {client.base_url} is not a UNITE teacher gateway: its GET /v1/models response {found}, "
        f"expected {GATEWAY_SERVICE!r}. Point --gateway at the URL of `unite serve-gateway` "
        "(by default http://127.0.0.1:8100), not at the student server.",
        limit=GATEWAY_SERVICE,
        value=service,
    )


def teach_slides(
    slides: Iterable[SlideSource | str | Path],
    *,
    gateway_url: str,
    cache_dir: Path,
    shard_dir: Path,
    options: TileOptions | None = None,
    mpp: float | None = None,
    mpp_table: MppTable | None = None,
    patches_dir: Path | None = None,
    batch_size: int = 64,
) -> TeachResult:
    """Send every tissue tile of ``slides`` through the gateway's HTTP API, then export training shards.

    Each slide is tiled with ``options`` (default :class:`TileOptions`), or its grid is read from the
    ``unite tile`` patch file in ``patches_dir``. ``mpp`` and ``mpp_table`` override resolutions as in
    :func:`teach_sources`. A slide that cannot be tiled or read is recorded in ``failed`` and the run
    goes on. Tiles travel with their pseudonymous slide id, level-0 coordinates and resolution, never
    the file name, so the cache and the shards can be split by slide. The shards are exported from the
    gateway's cache folder, which this process opens read-mostly beside the running gateway.

    Raises :class:`ConfigError` before any slide is tiled when ``gateway_url`` is not a teacher gateway,
    and :class:`TeacherError` when the gateway fails a request, which stops the run.
    """
    started = time.perf_counter()
    options = options if options is not None else TileOptions()
    sources = teach_sources(slides, options, mpp=mpp, mpp_table=mpp_table)
    result = TeachResult()
    with GatewayClient(gateway_url) as client:
        check_is_gateway(client)
        model = client.model_info()
        result.teacher = model["identity"]

        for source in sources:
            try:
                patches = slide_patches(source, options, patches_dir)
                with tqdm(total=len(patches.grid), desc=f"teacher {source.name}", unit="tile") as bar:
                    for slide_id, coords, tiles in iter_slide_tiles(patches, batch_size):
                        usage = client.embed_with_usage(
                            list(tiles), slide_id=slide_id, coords=coords.tolist(), mpp=patches.grid.target_mpp
                        )[1]
                        result.tiles += len(tiles)
                        result.cache_hits += int(usage.get("cache_hits", 0))
                        bar.update(len(tiles))
            except (SlideError, PatchFileError) as error:
                logger.error("unite teach: slide %s failed: %s", source.path, error.message)
                result.failed.append(SlideFailure.from_error(source, error))
                continue
            result.slides.append(patches)
    result.teacher_tiles = result.tiles - result.cache_hits

    if result.slides:
        with EmbeddingCache(cache_dir) as cache:
            result.shards = export_shards(cache, model["identity"], model["licence"], shard_dir)
    result.seconds = time.perf_counter() - started
    logger.info("%s", result.summary())
    return result
