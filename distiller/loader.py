"""Sampling and loading that make a run reproducible: a seeded order per epoch, split across ranks, resumable mid-epoch.

:class:`EpochSampler` derives each epoch's order and each tile's augmentation seed from ``(seed, epoch)``
alone, so they do not depend on the loader workers or on earlier epochs. It splits the order across the
ranks of a distributed run itself, which is why the Trainer runs with ``use_distributed_sampler=False``.
:class:`ResumableLoader` records how many batches of the epoch training has consumed. Lightning stores
that record in its checkpoint, and a resumed run starts at the next unseen batch with the same
augmentations, so it takes the same next step as a run that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.errors import ConfigError

_MAX_SEED = 2**63 - 1


class EpochSampler(Sampler):
    """Keys of one rank's share of a dataset of ``size`` items, in an order fixed by ``seed`` and the epoch.

    With ``shuffle``, an epoch's keys are ``(item, augmentation_seed)`` pairs: a permutation of the items
    and one seed per position, both drawn from ``numpy.random.default_rng([seed, epoch])``. Without
    ``shuffle``, the keys are the items in order, with no augmentation. Rank ``r`` of ``world_size``
    takes positions ``r, r + world_size, ...`` of the first ``(size // world_size) * world_size``, so
    every rank gets the same number of keys. The rest, fewer than ``world_size`` items, is left out of
    that epoch.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"EpochSampler: rank {rank} of world size {world_size}, expected 0 <= rank < world_size.",
                value=[rank, world_size],
            )
        if size < world_size:
            raise ConfigError(
                f"EpochSampler: {size} items cannot give each of {world_size} ranks one. Add tiles or use fewer devices.",
                value=size,
                limit=world_size,
            )
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # Keys of the current epoch consumed before a resume. Iterating the epoch resets it to 0.
        self.start = 0

    def __len__(self) -> int:
        return self.size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next. Lightning calls this at the start of every epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = 0

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next iteration yield ``epoch``'s keys from position ``start`` of this rank's share."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        generator = np.random.default_rng([self.seed, self.epoch])
        order = generator.permutation(self.size) if self.shuffle else np.arange(self.size)
        augmentation_seeds = generator.integers(0, _MAX_SEED, size=self.size)
        positions = np.arange(self.rank, len(self) * self.world_size, self.world_size)
        start, self.start = self.start, 0
        for position in positions[start:]:
            if self.shuffle:
                yield int(order[position]), int(augmentation_seeds[position])
            else:
                yield int(order[position])


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose ``state_dict`` records the epoch and the batches consumed.

    Lightning saves ``state_dict()`` in its checkpoint and calls ``load_state_dict`` on resume. Lightning
    2.6 fetches batches of a loader with a length one at a time, without reading ahead, so the count of
    batches this loader has yielded is the count training has consumed. Batches are always full
    (``drop_last``), so ``batches * batch_size`` keys of the epoch are done.
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._epoch = 0
        self._batches = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochSampler = self.sampler
        self._epoch = sampler.epoch
        self._batches = sampler.start // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Return the epoch being iterated and the number of its batches yielded so far."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches that ``state`` records: later in the same epoch, or at the next one."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.resume_at(epoch, batches * self.batch_size)


def loader_options(num_workers: int) -> dict[str, Any]:
    """Return the DataLoader options shared by the training and validation loaders."""
    options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        # Workers live across epochs, so each opens its HDF5 files once per run rather than once per epoch.
        options["persistent_workers"] = True
    return options
