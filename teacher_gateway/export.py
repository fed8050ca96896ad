"""Training shards from the embedding cache: the tiles and embeddings of one teacher, in insertion order.

The new shards are written whole into a staging folder inside ``out_dir`` (``list_shards`` does not look
into subfolders), then renamed into place one by one, and only then are shards of an earlier, longer
export removed. A process killed while writing leaves the earlier export untouched. Rows are never
changed or deleted in the cache. So when the earlier export came from the same cache and teacher with the
same ``shard_size``, each of its full shards equals the new shard of the same name. The folder then
contains a prefix of the cache in insertion order even between two renames.

NOTE: with a different ``shard_size`` or teacher than the earlier export, a process killed during the
renames (milliseconds) can leave old and new shards side by side; export again to repair the folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shared.cache import CacheEntry, EmbeddingCache
from shared.errors import CacheError, ImageError
from shared.imaging import decode_image
from shared.shards import SHARD_GLOB, shard_name, write_shard

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".export-"
LOCK_NAME = ".export.lock"


def export_shards(
    cache: EmbeddingCache,
    teacher: str,
    teacher_licence: str,
    out_dir: Path,
    *,
    shard_size: int = 2048,
) -> list[Path]:
    """Write every cached embedding of ``teacher`` into training shards in ``out_dir`` and return their paths.

    Each shard contains ``shard_size`` tiles (the last one fewer). Shards are numbered from 0 and follow the
    cache's insertion order, so the same cache gives the same shards. Raises :class:`CacheError` when
    the cache has no embeddings of ``teacher``, or when a cached row cannot be decoded or written to HDF5,
    naming its key.
    """
    if shard_size < 1:
        raise CacheError(f"shard_size is {shard_size}, expected at least 1.", limit=1, value=shard_size)
    total = cache.count(teacher)
    if total == 0:
        present = sorted(cache.count_by_teacher())
        raise CacheError(
            f"embedding cache {cache.path} has no embeddings of teacher {teacher!r}; it contains {present}. "
            "Fill the cache with this teacher first (unite teach), or export one of the teachers it contains.",
            value=teacher,
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _export_lock(out_dir):
        _remove_leftovers(out_dir)
        staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            staged = []
            exported = 0
            entries_in_order = cache.iter_entries(teacher, batch=min(shard_size, 1024))
            for index, entries in enumerate(_batched(entries_in_order, shard_size)):
                path = _write_entries(staging / shard_name(index), entries, teacher, teacher_licence, cache.path)
                staged.append(path)
                exported += len(entries)
                logger.info("wrote shard %s with %d tiles", path.name, len(entries))

            final_paths = []
            for path in staged:
                final_path = out_dir / path.name
                os.replace(path, final_path)
                final_paths.append(final_path)
            _remove_stale_shards(out_dir, keep={path.name for path in final_paths})
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    logger.info("exported %d embeddings of teacher %s into %d shards in %s", exported, teacher, len(final_paths), out_dir)
    return final_paths


@contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` so that two exports never write into one folder at once."""
    with open(out_dir / LOCK_NAME, "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise CacheError(
                f"another export is writing shards into {out_dir}. Wait for it to finish, or export into another folder."
            ) from error
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _batched(entries: Iterator[CacheEntry], size: int) -> Iterator[list[CacheEntry]]:
    batch: list[CacheEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_entries(path: Path, entries: list[CacheEntry], teacher: str, teacher_licence: str, cache_path: Path) -> Path:
    """Decode the cached tiles of ``entries`` and write them with their embeddings as one shard."""
    tiles = []
    for entry in entries:
        _check_slide_id_storable(entry, cache_path)
        try:
            tile = decode_image(entry.tile_png, name=f"cached tile {entry.key}")
        except ImageError as error:
            raise CacheError(
                f"{error.message} The cache row is damaged; move the cache aside and fill a new one."
            ) from error
        if tiles and tile.shape != tiles[0].shape:
            raise CacheError(
                f"cached tile {entry.key} has shape {tile.shape}, but the shard's first tile has {tiles[0].shape}. "
                "Every cached tile should be prepared to one size; fill a new cache.",
                limit=list(tiles[0].shape),
                value=list(tile.shape),
            )
        tiles.append(tile)

    coords = np.array([entry.coords if entry.coords is not None else (-1, -1) for entry in entries], dtype=np.int64)
    mpp = np.array([entry.mpp if entry.mpp is not None else np.nan for entry in entries], dtype=np.float32)
    try:
        return write_shard(
            path,
            tiles=np.stack(tiles),
            embeddings=np.stack([entry.embedding for entry in entries]),
            teacher=teacher,
            teacher_licence=teacher_licence,
            slide_ids=[entry.slide_id or "" for entry in entries],
            coords=coords,
            mpp=mpp,
            keys=[entry.key for entry in entries],
        )
    except (ValueError, TypeError) as error:
        # h5py raises these for values that HDF5 cannot store. The value is not known, so the rows are named.
        raise CacheError(
            f"cannot write shard {path.name} of teacher {teacher!r} (licence {teacher_licence!r}) from the "
            f"{len(entries)} cache rows with keys {entries[0].key} to {entries[-1].key} of {cache_path} "
            f"({type(error).__name__}: {error}). HDF5 cannot store a value of these rows or the teacher or licence "
            "name. Fix that name, or delete the offending row with sqlite3, and export again."
        ) from error


def _check_slide_id_storable(entry: CacheEntry, cache_path: Path) -> None:
    """Raise :class:`CacheError` naming the row when its slide id contains NUL, which HDF5 strings cannot contain.

    The gateway rejects such ids, but a cache filled by an earlier version can still contain them.
    """
    if entry.slide_id is None or "\x00" not in entry.slide_id:
        return
    escaped_slide_id = entry.slide_id[:100].encode("unicode_escape").decode("ascii")
    raise CacheError(
        f"cache row {entry.key} has slide_id '{escaped_slide_id}', which contains a NUL character that an HDF5 shard "
        f"cannot store. Delete the row with sqlite3 {cache_path} \"DELETE FROM embeddings WHERE key = "
        f"'{entry.key}'\" and export again.",
        value=entry.key,
    )


def _remove_leftovers(out_dir: Path) -> None:
    """Remove staging folders and ``.partial`` files that a killed export left behind."""
    for path in out_dir.glob(f"{STAGING_PREFIX}*"):
        if path.is_dir():
            logger.info("removing %s left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)
    for path in out_dir.glob(f"{SHARD_GLOB}.partial"):
        logger.info("removing %s left by an interrupted export", path)
        path.unlink(missing_ok=True)


def _remove_stale_shards(out_dir: Path, *, keep: set[str]) -> None:
    for path in sorted(out_dir.glob(SHARD_GLOB)):
        if path.name not in keep:
            logger.info("removing stale shard %s of an earlier export", path)
            path.unlink()
