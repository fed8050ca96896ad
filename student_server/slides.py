"""Embedding an uploaded slide: tile its tissue, embed every patch with the student, mean-pool the patches.

The slide reaches this module as a file in the server's upload folder under a random name. Errors from
the slide modules name that server path, so they are rewritten to name the slide's pseudonymous id
before they reach a client. The original file name never reaches this module.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import SlideError, UniteError
from shared.slides.reader import MAX_MPP, MIN_MPP, MPP_OVERRIDE_HINT, compute_slide_id, open_slide
from shared.slides.tiling import iter_tiles, tile_slide
from student_server.errors import TooManyPatchesError
from student_server.model import StudentModel

logger = logging.getLogger(__name__)

MPP_FORM_HINT = "the form field 'mpp' (µm per pixel)"


class SlideEmbedOptions(BaseModel):
    """Form fields of ``POST /v1/slides/embed`` besides the file."""

    model_config = ConfigDict(extra="forbid")

    mpp: float | None = Field(
        default=None,
        ge=MIN_MPP,
        le=MAX_MPP,
        description="Resolution of the slide in µm per level-0 pixel, overriding its metadata.",
    )
    include_patches: bool = Field(default=True, description="Return the embedding of every patch, not only the slide's.")


class SlideEmbedResponse(BaseModel):
    """Patch and slide embeddings of one uploaded slide, with ``coords`` and ``patch_embeddings`` in the same row order."""

    object: str = "slide.embedding"
    model: str = Field(description="Name of the student that embedded the slide.")
    checkpoint_sha256: str = Field(description="sha256 of the student's model.safetensors.")
    slide_id: str = Field(description="Pseudonymous id computed from the slide's bytes, never from its name.")
    num_patches: int
    embedding_dim: int
    mpp: float = Field(description="Level-0 resolution used, in µm per pixel.")
    mpp_source: str = Field(description="Where the resolution came from: 'override', 'metadata', 'tiff-resolution' or 'objective-power'.")
    level0_width: int
    level0_height: int
    target_mpp: float
    target_magnification: int
    patch_size: int = Field(description="Patch size in pixels at the target resolution.")
    patch_size_level0: int = Field(description="Patch size in level-0 pixels.")
    overlap: int
    coords: list[tuple[int, int]] = Field(description="Level-0 top-left corners (x, y) of the patches.")
    patch_embeddings: list[list[float]] | None = Field(description="(num_patches, embedding_dim), or null when include_patches is false.")
    slide_embedding: list[float] = Field(description="Mean of the patch embeddings.")
    upload_bytes: int
    timings: dict[str, float] = Field(description="Seconds spent receiving, tiling, embedding and in total.")


@dataclass
class SlideEmbedding:
    """Result of :func:`embed_slide_file`, before it becomes a response."""

    slide_id: str
    coords: np.ndarray
    patch_embeddings: np.ndarray
    slide_embedding: np.ndarray
    metadata: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def embed_slide_file(path: Path, student: StudentModel, *, mpp: float | None, max_patches: int) -> SlideEmbedding:
    """Tile the slide at ``path``, embed every tissue patch and mean-pool them into the slide embedding.

    Raises :class:`shared.errors.SlideError` (422) for a file that is not a readable slide, has no
    usable resolution or no tissue, and :class:`TooManyPatchesError` (413) for more than
    ``max_patches`` patches. Error messages name the slide by its id, never by ``path``.
    """
    try:
        return _embed_slide_file(path, student, mpp=mpp, max_patches=max_patches)
    except UniteError as error:
        raise _without_path(error, path) from error


def _embed_slide_file(path: Path, student: StudentModel, *, mpp: float | None, max_patches: int) -> SlideEmbedding:
    started = time.perf_counter()
    tiled = tile_slide(path, mpp=mpp)
    info, grid = tiled.info, tiled.grid
    if len(grid) > max_patches:
        raise TooManyPatchesError(
            f"slide {info.slide_id} has {len(grid)} tissue patches, more than the limit of {max_patches} per slide "
            "(setting UNITE_STUDENT_MAX_PATCHES_PER_SLIDE). Raise the limit on the server, or read the slide's "
            "patches yourself and send them to POST /v1/embeddings in batches.",
            limit=max_patches,
            value=len(grid),
        )
    tiled_at = time.perf_counter()

    coords_batches, embedding_batches = [], []
    with open_slide(path, mpp=mpp) as slide:
        for coords, tiles in iter_tiles(slide, grid, batch_size=student.settings.batch_size):
            coords_batches.append(coords)
            embedding_batches.append(student.embed(tiles))
    coords = np.concatenate(coords_batches, axis=0)
    patch_embeddings = np.concatenate(embedding_batches, axis=0)
    slide_embedding = patch_embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)
    embedded_at = time.perf_counter()

    metadata = {
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "level0_width": info.level0_width,
        "level0_height": info.level0_height,
        "target_mpp": grid.target_mpp,
        "target_magnification": grid.target_magnification,
        "patch_size": grid.patch_size,
        "patch_size_level0": grid.patch_size_level0,
        "overlap": grid.overlap,
    }
    timings = {"tiling_s": tiled_at - started, "embedding_s": embedded_at - tiled_at}
    return SlideEmbedding(info.slide_id, coords, patch_embeddings, slide_embedding, metadata, timings)


def _without_path(error: UniteError, path: Path) -> UniteError:
    """Return ``error`` with the upload's server path replaced by the slide's id, and the CLI hint by the form field."""
    try:
        name = f"uploaded slide {compute_slide_id(path)}"
    except OSError:
        name = "uploaded slide"
    replacements = [(str(path.resolve()), name), (str(path), name), (path.name, name), (MPP_OVERRIDE_HINT, MPP_FORM_HINT)]

    message = error.message
    value = error.value
    for old, new in replacements:
        message = message.replace(old, new)
        if isinstance(value, str):
            value = value.replace(old, new)
    message = message.replace(f"slide {name}", name)
    if isinstance(error, SlideError):
        return SlideError(message, reason=error.reason, limit=error.limit, value=value)
    return type(error)(message, limit=error.limit, value=value)
