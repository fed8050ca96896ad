"""The interface every teacher backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Teacher(Protocol):
    """A teacher model seen as a black box: prepared tiles in, embeddings out.

    ``identity`` names the model and its exact weights (or endpoint and declared model name, or the
    reference teacher's name and version); the cache keys embeddings by it, so two models never mix.
    ``licence`` travels into every shard and every exported student's model card.

    A teacher may also have ``parameters``, its parameter count, or None when unknown (a remote API).
    ``GET /v1/models`` lists it, and lists null for a teacher without the attribute.
    """

    identity: str
    dim: int
    licence: str

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Embed (N, 224, 224, 3) uint8 RGB tiles into (N, dim) float32 vectors."""
        ...
