"""A torch Dataset over training shards: model-ready tiles paired with their teacher embeddings."""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from distiller.augment import Augmentation
from shared.errors import CacheError, ConfigError
from shared.imaging import MODEL_INPUT_SIZE, to_model_input
from shared.shards import ShardInfo


class ShardDataset(Dataset):
    """Tiles and teacher embeddings of the chosen rows of a list of shards.

    ``indices`` are global row numbers over the shards concatenated in list order, as returned by
    ``distiller.split.split_by_slide``. Each item is ``(image, target)``: the tile through
    ``shared.imaging.to_model_input`` as a (3, 224, 224) float32 tensor, and the (D,) float32 teacher
    embedding. HDF5 files are opened on first access in each process and never shared across a fork,
    because an h5py handle inherited by a DataLoader worker is not safe to use.

    ``dataset[item]`` returns the tile as stored. ``dataset[(item, seed)]``, the key that
    :class:`distiller.loader.EpochSampler` yields, applies ``augmentation`` to the tile with a generator
    seeded by ``seed``. Only the student's view is augmented: the target stays the teacher's embedding of
    the original tile.
    """

    def __init__(self, shards: list[ShardInfo], indices: np.ndarray, *, augmentation: Augmentation | None = None) -> None:
        if not shards:
            raise ConfigError("ShardDataset needs at least one shard; list them with shared.shards.list_shards.")
        for info in shards:
            if info.tile_size != MODEL_INPUT_SIZE:
                raise CacheError(
                    f"shard {info.path}: tiles are {info.tile_size} px, expected {MODEL_INPUT_SIZE} px prepared tiles. "
                    "Re-export the shards from the cache, which stores prepared tiles.",
                    value=info.tile_size,
                    limit=MODEL_INPUT_SIZE,
                )
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [info.length for info in self.shards])
        indices = np.asarray(indices, dtype=np.int64)
        total = int(self.offsets[-1])
        if indices.size and (indices.min() < 0 or indices.max() >= total):
            raise ConfigError(
                f"ShardDataset: row indices span [{indices.min()}, {indices.max()}], expected values in [0, {total}) "
                f"for {len(self.shards)} shards of {total} tiles.",
                value=[int(indices.min()), int(indices.max())],
                limit=total,
            )
        self.indices = indices
        self.augmentation = augmentation
        self._files: dict[int, h5py.File] = {}
        self._owner_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        item, seed = key if isinstance(key, tuple) else (key, None)
        row = int(self.indices[item])
        shard = int(np.searchsorted(self.offsets, row, side="right")) - 1
        local = row - int(self.offsets[shard])
        file = self._file(shard)
        tile = file["tiles"][local]
        embedding = file["embeddings"][local]
        if self.augmentation is not None and seed is not None:
            tile = self.augmentation(tile, np.random.default_rng(seed))
        image = to_model_input(tile[np.newaxis])[0]
        return torch.from_numpy(image), torch.from_numpy(np.asarray(embedding, dtype=np.float32))

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes receive the dataset without open handles and open their own.
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _file(self, shard: int) -> h5py.File:
        if os.getpid() != self._owner_pid:
            # Forked without pickling: the inherited handles belong to the parent and must not be used.
            self._files = {}
            self._owner_pid = os.getpid()
        file = self._files.get(shard)
        if file is None:
            path = self.shards[shard].path
            try:
                file = h5py.File(path, "r")
            except OSError as error:
                raise CacheError(f"shard {path}: cannot be opened ({error}). Re-export the shards from the cache.") from error
            self._files[shard] = file
        return file
