"""The gateway's core, free of HTTP: tiles in, teacher embeddings out, from the cache first.

For each request the service decodes and prepares every tile and looks all keys up in the cache. It sends
only the misses to the teacher, each distinct tile once however often it occurs in the request. Then it
checks the teacher's output, stores it, and returns the embeddings in request order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.cache import CacheEntry, EmbeddingCache
from shared.errors import TeacherError
from shared.imaging import decode_base64_image, encode_png, prepare_tile
from shared.protocol import EmbeddingInput
from teacher_gateway.teachers.base import Teacher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileInput:
    """A decoded RGB tile and where it came from; provenance is stored with its cache row."""

    tile: np.ndarray
    slide_id: str | None = None
    coords: tuple[int, int] | None = None
    mpp: float | None = None


class EmbeddingService:
    """The embedding pipeline of one teacher over one cache; safe to call from several threads."""

    def __init__(self, teacher: Teacher, cache: EmbeddingCache) -> None:
        self.teacher = teacher
        self.cache = cache
        self._teacher_lock = threading.Lock()

    def embed(self, inputs: Sequence[EmbeddingInput]) -> tuple[np.ndarray, dict[str, int]]:
        """Decode the protocol inputs and embed them; see :meth:`embed_tiles`.

        Raises :class:`ImageError` naming the index of the first input that cannot be decoded or prepared.
        """
        tiles = []
        for index, item in enumerate(inputs):
            name = f"input[{index}].image"
            # Prepared at once, so a request of large images never keeps more than one of them in memory.
            tile = prepare_tile(decode_base64_image(item.image, name=name), name=name)
            tiles.append(TileInput(tile=tile, slide_id=item.slide_id, coords=item.coords, mpp=item.mpp))
        return self.embed_tiles(tiles)

    def embed_tiles(self, inputs: Sequence[TileInput]) -> tuple[np.ndarray, dict[str, int]]:
        """Return the (N, dim) float32 teacher embeddings of ``inputs`` in order, and the usage counts.

        Usage contains ``tiles`` (received), ``cache_hits`` (tiles found in the cache), ``model_calls``
        (calls to the teacher, 0 or 1) and ``tiles_sent_to_teacher`` (distinct missing tiles).
        Raises :class:`TeacherError` when the teacher's output has the wrong shape or non-finite values;
        nothing is cached then.
        """
        identity = self.teacher.identity
        prepared = [prepare_tile(item.tile, name=f"input[{index}]") for index, item in enumerate(inputs)]
        keys = [EmbeddingCache.tile_key(tile, identity) for tile in prepared]
        found = self.cache.get_many(keys)

        # The first input with each missing key is the one sent to the teacher and stored.
        first_index_of_miss: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key not in found and key not in first_index_of_miss:
                first_index_of_miss[key] = index
        cache_hits = sum(1 for key in keys if key in found)

        model_calls = 0
        if first_index_of_miss:
            miss_indices = list(first_index_of_miss.values())
            embeddings = self._call_teacher(np.stack([prepared[index] for index in miss_indices]), len(inputs), cache_hits)
            model_calls = 1
            entries = [
                CacheEntry(
                    key=keys[index],
                    teacher=identity,
                    embedding=embedding,
                    tile_png=encode_png(prepared[index]),
                    slide_id=inputs[index].slide_id,
                    coords=inputs[index].coords,
                    mpp=inputs[index].mpp,
                )
                for index, embedding in zip(miss_indices, embeddings)
            ]
            self.cache.put_many(entries)
            # Read back what the cache contains: when another request stored the same tile first, its
            # embedding wins, so every client gets the same embedding for a tile.
            found.update(self.cache.get_many(list(first_index_of_miss)))

        if keys:
            result = np.stack([found[key] for key in keys])
        else:
            result = np.zeros((0, self.teacher.dim), dtype=np.float32)
        usage = {
            "tiles": len(inputs),
            "cache_hits": cache_hits,
            "model_calls": model_calls,
            "tiles_sent_to_teacher": len(first_index_of_miss),
        }
        return result, usage

    def _call_teacher(self, tiles: np.ndarray, request_tiles: int, cache_hits: int) -> np.ndarray:
        """Embed ``tiles`` with the teacher and check its output: (N, dim), finite, returned as float32."""
        identity = self.teacher.identity
        started = time.perf_counter()
        # One teacher call at a time, because the Teacher protocol does not require backends to be
        # thread-safe and FastAPI runs requests in a thread pool.
        with self._teacher_lock:
            output = self.teacher.embed(tiles)
        elapsed = time.perf_counter() - started
        logger.info(
            "teacher %s embedded %d tiles in %.3f s (request of %d tiles, %d cache hits)",
            identity,
            len(tiles),
            elapsed,
            request_tiles,
            cache_hits,
        )

        output = np.asarray(output)
        expected_shape = (len(tiles), self.teacher.dim)
        if output.shape != expected_shape:
            raise TeacherError(
                f"teacher {identity} returned embeddings of shape {output.shape} for {len(tiles)} tiles, "
                f"expected {expected_shape}. Check the teacher backend and its declared dim.",
                limit=list(expected_shape),
                value=list(output.shape),
            )
        if not np.issubdtype(output.dtype, np.floating):
            raise TeacherError(
                f"teacher {identity} returned embeddings of dtype {output.dtype}, expected a floating-point type such as float32. "
                "Check the teacher backend.",
                value=str(output.dtype),
            )
        finite = np.isfinite(output)
        if not finite.all():
            bad_rows = int((~finite).any(axis=1).sum())
            raise TeacherError(
                f"teacher {identity} returned NaN or infinite values in {bad_rows} of {len(tiles)} embeddings; "
                "nothing was cached. Check the teacher backend (weights, input preprocessing, precision).",
                value=bad_rows,
            )
        return output.astype(np.float32)
