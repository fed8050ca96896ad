"""Embedding one whole slide: tile its tissue, embed every patch, pool the patches and write the results.

The same pipeline serves the student server's slide jobs (through the server's batching engine) and
``unite embed`` (through :class:`LocalEmbedder`, with no server). Tiles are read in ``read_workers``
threads one batch ahead, while the embedder computes the previous batch, because openslide and Pillow
release the GIL while they decode.

Outputs, all in ``out_dir`` and each written to a temporary name and renamed into place:

- ``features.h5``: TRIDENT layout, ``coords`` (N, 2) int64 level-0 corners and ``features`` (N, D)
  float32, with the patching attributes and ``encoder`` = ``"<model> sha256:<weights sha256>"``.
- ``slide.h5``: the pooled slide features, shape (1, D) for "mean" and "max", (1, 2D) for "mean+max"
  (the mean, then the max), with the same attributes plus ``pooling``.
- ``thumbnail.jpg`` and ``overlay.jpg``: the thumbnail, and the tissue and patch grid drawn over it.
- ``map.json``: the patches laid out by their embeddings, ``{"points": [{"x", "y", "px", "py",
  "cluster"}], "method": "pca", "clusters": k}``. ``x`` and ``y`` are the first two principal
  components, ``px`` and ``py`` the patch centre in level-0 pixels, ``cluster`` the k-means label with
  k = min(8, N).
- ``result.json``: the slide embedding, the pooling, the encoder and the slide's metadata. It is written
  last, so its presence means every other output is complete.

Nothing is written before every patch is embedded, so a slide stopped by ``should_stop`` or by an
error leaves no output file.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from shared.errors import ConfigError, ModelError, UniteError
from shared.features import trident_attrs, write_features
from shared.jobs import format_count
from shared.pooling import POOLING_METHODS, pool_patch_features
from shared.slides.grid import PatchGrid
from shared.slides.overlay import save_overlay, save_thumbnail
from shared.slides.reader import open_slide
from shared.slides.tiling import TiledSlide, iter_tiles, tile_slide, validate_read_workers
from student_server.errors import TooManyPatchesError

if TYPE_CHECKING:
    from shared.checkpoint import LoadedStudent

logger = logging.getLogger(__name__)

POOLINGS = POOLING_METHODS
OUTPUT_FILES = {
    "features": "features.h5",
    "slide_features": "slide.h5",
    "thumbnail": "thumbnail.jpg",
    "overlay": "overlay.jpg",
    "map": "map.json",
    "result": "result.json",
}
MAX_CLUSTERS = 8
# A hot-reloading embedder may switch checkpoints while a slide is embedded. The slide then starts
# again, so that all its rows come from one checkpoint, at most this many times.
MAX_CHECKPOINT_RESTARTS = 3

_Batch = TypeVar("_Batch")


class TileEmbedder(Protocol):
    """Anything that embeds (N, H, W, 3) uint8 RGB tiles and names the weights that did it."""

    def embed_tiles(self, tiles: np.ndarray) -> tuple[np.ndarray, str, str]:
        """Return (N, D) float32 embeddings, the model's name and the sha256 of its weights."""


class SlideInterrupted(UniteError):
    """A slide stopped between two batches because ``should_stop`` returned true. It wrote no output.

    It is a request to stop, not a fault of the slide, so a job runner marks the slide unfinished
    instead of failed. Catch it before :class:`UniteError`.
    """

    code = "interrupted"
    status_code = 503


@dataclass
class SlidePipelineOptions:
    """Options of one slide: resolution override (µm/px), pooling, tiles per batch, reader threads and patch limit.

    ``allow_fluorescence`` lets a fluorescence (dark-field) slide through, with signal above the dark
    background taken as tissue. Otherwise such a slide fails with reason ``not_brightfield``.
    """

    mpp: float | None = None
    pooling: str = "mean"
    batch_size: int = 32
    read_workers: int = 2
    max_patches: int = 100_000
    allow_fluorescence: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option, before the slide is opened."""
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"pooling={self.pooling!r} is invalid, expected one of {', '.join(POOLINGS)} (--pooling).",
                value=self.pooling,
                limit=list(POOLINGS),
            )
        for name in ("batch_size", "max_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(
                    f"{name}={value!r} must be a whole number of at least 1 (--{name.replace('_', '-')}).",
                    value=repr(value),
                    limit=1,
                )
        validate_read_workers(self.read_workers)
        if not isinstance(self.allow_fluorescence, bool):
            raise ConfigError(
                f"allow_fluorescence={self.allow_fluorescence!r} must be True or False (--allow-fluorescence).",
                value=repr(self.allow_fluorescence),
            )


@dataclass
class SlidePipelineResult:
    """Outputs of one slide: its id, patch count, embedding width, encoder identity, metadata, timings (seconds) and files.

    ``embedding_dim`` is the width D of a patch embedding. The pooled width is in ``metadata["pooled_dim"]``.
    """

    slide_id: str
    num_patches: int
    embedding_dim: int
    encoder: str
    metadata: dict[str, Any]
    timings: dict[str, float]
    outputs: dict[str, Path] = field(default_factory=dict)


class LocalEmbedder:
    """A :class:`TileEmbedder` over an exported student loaded in this process with torch, for embedding without a server."""

    def __init__(self, checkpoint_dir: Path, *, device: str = "cpu", batch_size: int = 32) -> None:
        # Imported here, so the student server's slide jobs run without torch under the onnx runtime.
        from shared.checkpoint import load_student

        self.student: LoadedStudent = load_student(Path(checkpoint_dir), device=device)
        self.device = device
        self.batch_size = batch_size

    def embed_tiles(self, tiles: np.ndarray) -> tuple[np.ndarray, str, str]:
        """Embed tiles with the loaded student, as :meth:`TileEmbedder.embed_tiles` describes."""
        from shared.models.inference import embed_tiles

        embeddings = embed_tiles(self.student.model, tiles, batch_size=self.batch_size, device=self.device)
        return embeddings, self.student.name, self.student.sha256


def run_slide_pipeline(
    path: Path,
    out_dir: Path,
    embedder: TileEmbedder,
    options: SlidePipelineOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SlidePipelineResult:
    """Tile the slide at ``path``, embed its patches with ``embedder`` and write the outputs into ``out_dir``.

    ``progress(done, total)`` is called with 0 once the grid is known and after each embedded batch.
    ``should_stop()`` is called before each batch. When it returns true the slide stops with
    :class:`SlideInterrupted` and writes nothing. Raises :class:`ConfigError` for invalid options,
    :class:`shared.errors.SlideError` for a slide that cannot be tiled, :class:`TooManyPatchesError`
    for more than ``options.max_patches`` patches, :class:`ModelError` when the embedder returns the
    wrong number of rows, and :class:`shared.errors.CacheError` when an output cannot be written.
    """
    options.validate()
    path, out_dir = Path(path), Path(out_dir)
    started = time.perf_counter()

    tiled = tile_slide(path, mpp=options.mpp, allow_fluorescence=options.allow_fluorescence)
    check_patch_count(tiled, options.max_patches)
    tiled_at = time.perf_counter()

    features, model, sha256 = _embed_slide(path, tiled.grid, embedder, options, progress, should_stop)
    embedded_at = time.perf_counter()

    encoder = f"{model} sha256:{sha256}"
    pooled = pool_features(features, options.pooling)
    metadata = slide_metadata(tiled, options.pooling, pooled.shape[1])
    timings = {"tiling_s": tiled_at - started, "embedding_s": embedded_at - tiled_at}
    outputs = write_outputs(out_dir, tiled, features, pooled, encoder=encoder, model=model, sha256=sha256, metadata=metadata, timings=timings)
    timings["writing_s"] = time.perf_counter() - embedded_at
    timings["total_s"] = time.perf_counter() - started

    logger.info(
        "embedded slide %s: %s, %d-d, %s pooling, encoder %s, %.1f s",
        tiled.info.slide_id, format_count(len(features), "patch", "patches"), features.shape[1], options.pooling, encoder, timings["total_s"],
    )
    return SlidePipelineResult(
        slide_id=tiled.info.slide_id,
        num_patches=len(features),
        embedding_dim=int(features.shape[1]),
        encoder=encoder,
        metadata=metadata,
        timings=timings,
        outputs=outputs,
    )


def pool_features(features: np.ndarray, pooling: str) -> np.ndarray:
    """Pool (N, D) patch features into one (1, D') float32 slide vector with :func:`shared.pooling.pool_patch_features`.

    "mean" and "max" give D' = D; "mean+max" concatenates the two, mean first, so D' = 2D. Raises
    :class:`ConfigError` for another pooling and for N = 0.
    """
    return pool_patch_features(features, pooling).reshape(1, -1)


def embedding_map(features: np.ndarray, coords: np.ndarray, patch_size_level0: int, *, seed: int = 0) -> dict[str, Any]:
    """Lay the patches out in 2-D by their embeddings and cluster them, as ``map.json`` in the module docstring describes.

    The two principal components are the top eigenvectors of the (D, D) scatter matrix of the centred
    features, which costs less than an SVD of the (N, D) features when N is much larger than D. Each
    component's sign is fixed so that its largest loading is positive, so the same features always
    give the same map. k-means runs once from a k-means++ start seeded with ``seed``.
    """
    count = len(features)
    centred = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
    _, eigenvectors = np.linalg.eigh(centred.T @ centred)
    components = eigenvectors[:, ::-1][:, :2].T
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    # Features of width 1 have one component, and the second coordinate stays 0.
    projected = np.zeros((count, 2))
    projected[:, : len(components)] = centred @ components.T

    clusters = min(MAX_CLUSTERS, count)
    with warnings.catch_warnings():
        # With fewer distinct patches than clusters, some clusters stay empty, but every label is still in range.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit_predict(features.astype(np.float32))

    centres = coords.astype(np.float64) + patch_size_level0 / 2
    points = [
        {"x": float(x), "y": float(y), "px": float(px), "py": float(py), "cluster": int(label)}
        for (x, y), (px, py), label in zip(projected, centres, labels, strict=True)
    ]
    return {"points": points, "method": "pca", "clusters": clusters}


def check_patch_count(tiled: TiledSlide, max_patches: int) -> None:
    """Raise :class:`TooManyPatchesError` when the tiled slide has more than ``max_patches`` tissue patches."""
    count = len(tiled.grid)
    if count > max_patches:
        raise TooManyPatchesError(
            f"slide {tiled.info.slide_id} has {count} tissue patches, more than the limit of {max_patches} per slide. "
            "Raise the limit (UNITE_STUDENT_MAX_PATCHES_PER_SLIDE on the student server, --max-patches for "
            "unite embed), or embed the slide's patches in parts through POST /v1/embeddings.",
            limit=max_patches,
            value=count,
        )


def _embed_slide(
    path: Path,
    grid: PatchGrid,
    embedder: TileEmbedder,
    options: SlidePipelineOptions,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[np.ndarray, str, str]:
    """Embed every patch of ``grid`` with one checkpoint, starting again when the embedder switches checkpoints."""
    for _ in range(MAX_CHECKPOINT_RESTARTS + 1):
        embedded = _embed_once(path, grid, embedder, options, progress, should_stop)
        if embedded is not None:
            return embedded
    raise ModelError(
        f"the student checkpoint changed {MAX_CHECKPOINT_RESTARTS + 1} times while one slide was embedded, so no "
        "embedding of the slide comes from a single checkpoint. Submit the slide again once checkpoints stop changing.",
        value=MAX_CHECKPOINT_RESTARTS + 1,
        limit=MAX_CHECKPOINT_RESTARTS,
    )


def _embed_once(
    path: Path,
    grid: PatchGrid,
    embedder: TileEmbedder,
    options: SlidePipelineOptions,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[np.ndarray, str, str] | None:
    """Embed every patch once and return the features, model name and sha256, or None when the checkpoint changed midway."""
    total = len(grid)
    parts: list[np.ndarray] = []
    identity: tuple[str, str] | None = None
    done = 0
    _raise_if_stopped(should_stop, done, total)
    if progress is not None:
        progress(0, total)

    with open_slide(path, mpp=options.mpp) as slide:
        batches = _read_batches(iter_tiles(slide, grid, batch_size=options.batch_size, workers=options.read_workers), options.read_workers)
        try:
            for _, tiles in batches:
                _raise_if_stopped(should_stop, done, total)
                embeddings, model, sha256 = embedder.embed_tiles(tiles)
                _check_embeddings(embeddings, len(tiles), parts)
                if identity is None:
                    identity = (model, sha256)
                elif sha256 != identity[1]:
                    logger.warning(
                        "the checkpoint changed from sha256 %s to %s after %d of %d patches, so the slide is embedded again",
                        identity[1], sha256, done, total,
                    )
                    return None
                parts.append(np.asarray(embeddings, dtype=np.float32))
                done += len(tiles)
                if progress is not None:
                    progress(done, total)
        finally:
            batches.close()
    return np.concatenate(parts, axis=0), identity[0], identity[1]


def _raise_if_stopped(should_stop: Callable[[], bool] | None, done: int, total: int) -> None:
    if should_stop is not None and should_stop():
        raise SlideInterrupted(
            f"the slide was stopped after {done} of {total} patches, before any output was written. Run it again to redo it.",
            value=done,
            limit=total,
        )


def _read_batches(batches: Iterator[_Batch], read_workers: int) -> Iterator[_Batch]:
    """Return ``batches`` read one batch ahead of the caller.

    ``iter_tiles`` already reads ahead with more than one worker. With one worker it reads in the
    caller's thread, so the next batch is read here in one extra thread instead.
    """
    if read_workers > 1:
        return batches
    return _read_ahead(batches)


def _read_ahead(batches: Iterator[_Batch]) -> Iterator[_Batch]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-reader")
    try:
        pending = executor.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = executor.submit(next, batches, None)
            yield batch
    finally:
        # The reading thread finishes its batch first, so the slide is not closed under it.
        executor.shutdown(wait=True, cancel_futures=True)
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _check_embeddings(embeddings: np.ndarray, count: int, earlier: list[np.ndarray]) -> None:
    shape = getattr(embeddings, "shape", None)
    width = earlier[0].shape[1] if earlier else None
    if shape is None or len(shape) != 2 or shape[0] != count or (width is not None and shape[1] != width):
        expected = f"({count}, {width if width is not None else 'D'})"
        raise ModelError(
            f"the embedder returned an array of shape {shape} for a batch of {count} tiles, expected {expected}. "
            "Check that the embedder returns one row per tile with the same width for every batch.",
            value=None if shape is None else list(shape),
        )


def slide_metadata(tiled: TiledSlide, pooling: str, pooled_dim: int) -> dict[str, Any]:
    """Return the slide's resolution, size, grid and tissue facts; never its path or file name."""
    info, grid = tiled.info, tiled.grid
    return {
        "mpp": float(info.mpp),
        "mpp_source": info.mpp_source,
        "reader": info.reader,
        "level0_width": int(info.level0_width),
        "level0_height": int(info.level0_height),
        "level0_magnification": int(info.level0_magnification),
        "target_mpp": float(grid.target_mpp),
        "target_magnification": int(grid.target_magnification),
        "patch_size": int(grid.patch_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "overlap": int(grid.overlap),
        "illumination": tiled.tissue.illumination,
        "tissue_fraction": round(float(tiled.tissue.mask.mean()), 4),
        "pooling": pooling,
        "pooled_dim": int(pooled_dim),
    }


def write_outputs(
    out_dir: Path,
    tiled: TiledSlide,
    features: np.ndarray,
    pooled: np.ndarray,
    *,
    encoder: str,
    model: str,
    sha256: str,
    metadata: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Path]:
    """Write every output into ``out_dir``, ``result.json`` last, and return their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in OUTPUT_FILES.items()}
    coords = tiled.grid.coords
    attrs = trident_attrs(tiled.info, tiled.grid, encoder=encoder)

    write_features(paths["features"], coords=coords, features=features, attrs=attrs)
    write_features(paths["slide_features"], coords=coords, features=pooled, attrs={**attrs, "pooling": metadata["pooling"]}, pooled=True)
    save_thumbnail(paths["thumbnail"], tiled.tissue)
    save_overlay(paths["overlay"], tiled.tissue, tiled.grid)
    _write_json(paths["map"], embedding_map(features, coords, tiled.grid.patch_size_level0))

    result = {
        "slide_id": tiled.info.slide_id,
        "num_patches": len(features),
        "embedding_dim": int(features.shape[1]),
        "pooling": metadata["pooling"],
        "slide_embedding": [float(value) for value in pooled[0]],
        "model": model,
        "checkpoint_sha256": sha256,
        "encoder": encoder,
        "metadata": metadata,
        "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
    }
    _write_json(paths["result"], result)
    return paths


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path.partial`` and rename it over ``path``."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(data, allow_nan=False), encoding="utf-8")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
