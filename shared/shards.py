"""Training shards: the tiles and teacher embeddings the distiller reads, in HDF5 files written whole.

HDF5 allows one writer, and a writer killed midway can leave a file unreadable, so each shard is
written under a temporary name and renamed into place only when complete: a shard that exists is
whole. The gateway writes shards from its cache; the distiller reads them. Neither imports the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from shared.errors import CacheError

SHARD_FORMAT = "unite-training-shard"
SHARD_FORMAT_VERSION = 1
SHARD_GLOB = "shard-*.h5"


@dataclass(frozen=True)
class ShardInfo:
    """Attributes of one shard file, as stored in it."""

    path: Path
    length: int
    teacher: str
    teacher_licence: str
    embedding_dim: int
    tile_size: int


def shard_name(index: int) -> str:
    """Return the file name of shard number ``index``."""
    return f"shard-{index:05d}.h5"


def write_shard(
    path: Path,
    *,
    tiles: np.ndarray,
    embeddings: np.ndarray,
    teacher: str,
    teacher_licence: str,
    slide_ids: list[str] | None = None,
    coords: np.ndarray | None = None,
    mpp: np.ndarray | None = None,
    keys: list[str] | None = None,
) -> Path:
    """Write one shard to ``path`` atomically; unknown provenance is stored as "", (-1, -1) and NaN."""
    count = len(tiles)
    if tiles.ndim != 4 or tiles.shape[1] != tiles.shape[2] or tiles.shape[3] != 3 or tiles.dtype != np.uint8:
        raise CacheError(f"shard {path}: tiles have shape {tiles.shape} and dtype {tiles.dtype}, expected (N, S, S, 3) uint8.")
    if embeddings.shape[0] != count or embeddings.ndim != 2:
        raise CacheError(f"shard {path}: {embeddings.shape} embeddings for {count} tiles, expected ({count}, D).")

    slide_ids = slide_ids if slide_ids is not None else [""] * count
    coords = coords if coords is not None else np.full((count, 2), -1, dtype=np.int64)
    mpp = mpp if mpp is not None else np.full(count, np.nan, dtype=np.float32)
    keys = keys if keys is not None else [""] * count
    for name, values in (("slide_ids", slide_ids), ("coords", coords), ("mpp", mpp), ("keys", keys)):
        if len(values) != count:
            raise CacheError(f"shard {path}: {len(values)} {name} for {count} tiles, expected one per tile.")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    text = h5py.string_dtype("utf-8")
    with h5py.File(partial, "w") as file:
        tile_size = tiles.shape[1]
        file.create_dataset("tiles", data=tiles, chunks=(1, tile_size, tile_size, 3))
        file.create_dataset("embeddings", data=embeddings.astype(np.float32))
        file.create_dataset("slide_ids", data=np.array(slide_ids, dtype=object), dtype=text)
        file.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        file.create_dataset("mpp", data=np.asarray(mpp, dtype=np.float32))
        file.create_dataset("keys", data=np.array(keys, dtype=object), dtype=text)
        file.attrs.update(
            {
                "format": SHARD_FORMAT,
                "format_version": SHARD_FORMAT_VERSION,
                "teacher": teacher,
                "teacher_licence": teacher_licence,
                "embedding_dim": int(embeddings.shape[1]),
                "tile_size": int(tile_size),
            }
        )
    os.replace(partial, path)
    return path


def read_shard_info(path: Path) -> ShardInfo:
    """Read a shard's attributes, checking that it is a UNITE training shard of a known version."""
    try:
        with h5py.File(path, "r") as file:
            attrs = dict(file.attrs)
            length = int(file["embeddings"].shape[0])
    except (OSError, KeyError) as error:
        raise CacheError(f"shard {path}: cannot be read as a training shard ({error}). Re-export the shards from the cache.") from error
    if attrs.get("format") != SHARD_FORMAT or int(attrs.get("format_version", -1)) != SHARD_FORMAT_VERSION:
        raise CacheError(
            f"shard {path}: format {attrs.get('format')!r} version {attrs.get('format_version')!r}, "
            f"expected {SHARD_FORMAT!r} version {SHARD_FORMAT_VERSION}. Re-export the shards with this version."
        )
    return ShardInfo(
        path=Path(path),
        length=length,
        teacher=str(attrs["teacher"]),
        teacher_licence=str(attrs["teacher_licence"]),
        embedding_dim=int(attrs["embedding_dim"]),
        tile_size=int(attrs["tile_size"]),
    )


def list_shards(folder: Path) -> list[ShardInfo]:
    """List the complete shards in ``folder`` in name order, checking they share one teacher and dimension."""
    paths = sorted(Path(folder).glob(SHARD_GLOB))
    if not paths:
        raise CacheError(f"no training shards ({SHARD_GLOB}) in {folder}. Fill the cache and export shards first (unite teach).")
    infos = [read_shard_info(path) for path in paths]
    teachers = {(info.teacher, info.embedding_dim) for info in infos}
    if len(teachers) > 1:
        raise CacheError(
            f"training shards in {folder} come from {len(teachers)} teachers {sorted(teachers)}, expected one. "
            "Keep each teacher's shards in their own folder."
        )
    return infos


def read_metadata(info: ShardInfo) -> tuple[list[str], np.ndarray]:
    """Read a shard's slide ids and coordinates (small), without its tiles."""
    with h5py.File(info.path, "r") as file:
        slide_ids = [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in file["slide_ids"][:]]
        coords = file["coords"][:]
    return slide_ids, coords
