"""A teacher backed by a local torch model: batched forward passes under bfloat16 autocast on CPU or CUDA.

The weights stay in float32 and ``torch.autocast`` runs the matrix products and convolutions in
bfloat16. Adding their outputs to float32 tensors promotes the sum to float32, so a ViT's residual
stream, and the pre-norm layers that read it, stay in float32. On CUDA that is the usual way to run a
ViT in bf16. On a 2-core x86 CPU it also about doubled ViT-S throughput (29 against 15 tiles/s at
batch 32, torch 2.13, measured for shared/models/inference.py), so ``precision="bf16"`` is the default
on both devices. ``"fp32"`` turns autocast off, for CPUs without fast bfloat16 or for exact
comparisons. The returned embeddings are always float32. The precision is not part of the identity,
because both precisions compute the same model and their embeddings of a tile differ by rounding only
(cosine similarity above 0.99 for a timm ViT in the tests).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from shared.errors import ConfigError, TeacherError
from teacher_gateway.teachers.options import check_batch_size, check_device, check_precision, setting
from teacher_gateway.teachers.preprocessing import TilePreprocessing, check_tiles

logger = logging.getLogger(__name__)

# Device types on which torch.autocast supports bfloat16.
_BF16_AUTOCAST_DEVICES = ("cpu", "cuda")


def resolve_torch_device(device: str, *, teacher: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a torch device, CUDA for ``auto`` when one is present.

    Raises :class:`ConfigError` when CUDA is requested but torch sees no such GPU.
    """
    device = check_device(device, teacher=teacher)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = resolved.index or 0
        if index >= count:
            raise ConfigError(
                f"teacher {teacher}: device is {device!r}, but torch sees {count} CUDA GPUs "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Set {setting('device')} to cpu or auto, "
                "or install a CUDA build of torch on a machine with a GPU.",
                value=device,
                limit=count,
            )
    return resolved


class TorchTeacher:
    """A local torch model behind the Teacher protocol.

    ``model`` takes an (B, 3, S, S) float32 batch normalised by ``preprocessing`` and returns (B, dim)
    embeddings. It is moved to ``device`` and put in eval mode here. ``parameters`` is the model's
    parameter count, as ``GET /v1/models`` lists it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        identity: str,
        dim: int,
        licence: str,
        preprocessing: TilePreprocessing,
        device: str = "auto",
        batch_size: int = 32,
        precision: str = "bf16",
        details: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.identity = identity
        self.dim = dim
        self.licence = licence
        self.preprocessing = preprocessing
        self.batch_size = check_batch_size(batch_size, teacher=identity)
        self.precision = check_precision(precision, teacher=identity)
        self.device = resolve_torch_device(device, teacher=identity)
        self._autocast = self.precision == "bf16" and self.device.type in _BF16_AUTOCAST_DEVICES
        self._details = dict(details or {})

        model.requires_grad_(False)
        self.model: torch.nn.Module | None = model.to(self.device).eval()
        # Buffers (such as batch-norm statistics) are not counted.
        self.parameters: int | None = sum(parameter.numel() for parameter in model.parameters())
        logger.info(
            "teacher %s ready on %s: %d-d embeddings, batch size %d, precision %s, preprocessing %s",
            identity,
            self.device,
            dim,
            self.batch_size,
            self.precision,
            preprocessing.tag,
        )

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Embed (N, 224, 224, 3) uint8 RGB tiles into (N, dim) float32 vectors, ``batch_size`` tiles per forward pass.

        Raises :class:`ImageError` for a tile array of another shape or dtype, and :class:`TeacherError`
        when the model is closed, runs out of GPU memory or returns another shape.
        """
        check_tiles(tiles, teacher=self.identity)
        model = self.model
        if model is None:
            raise TeacherError(f"teacher {self.identity} is closed. Restart the gateway to embed tiles again.")

        embeddings = np.empty((len(tiles), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(tiles), self.batch_size):
                batch = tiles[start : start + self.batch_size]
                embeddings[start : start + len(batch)] = self._forward(model, batch)
        return embeddings

    def _forward(self, model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(self.preprocessing.to_model_input(batch)).to(self.device, non_blocking=True)
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                output = model(inputs)
        except torch.OutOfMemoryError as error:
            raise TeacherError(
                f"teacher {self.identity} ran out of memory on {self.device} with a batch of {len(batch)} tiles. "
                f"Lower {setting('batch_size')} (now {self.batch_size}).",
                value=self.batch_size,
            ) from error

        if output.ndim != 2 or tuple(output.shape) != (len(batch), self.dim):
            raise TeacherError(
                f"teacher {self.identity} returned shape {tuple(output.shape)} for a batch of {len(batch)} tiles, "
                f"expected ({len(batch)}, {self.dim}). The model must return one pooled embedding per tile.",
                value=list(output.shape),
                limit=[len(batch), self.dim],
            )
        return output.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """Return the teacher's settings for ``/v1/models``: backend details, device, batch size, precision, preprocessing."""
        return {
            **self._details,
            "device": str(self.device),
            "batch_size": self.batch_size,
            "precision": self.precision,
            "preprocessing": self.preprocessing.describe(),
        }

    def close(self) -> None:
        """Release the model and, on CUDA, its memory. Afterwards :meth:`embed` raises TeacherError."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("teacher %s closed", self.identity)
