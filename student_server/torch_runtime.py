"""The student run by torch from the export's model.safetensors: the server's default ``torch`` runtime.

:mod:`student_server.model` imports this module only for the torch runtime, so a server with
``UNITE_STUDENT_RUNTIME=onnx`` runs without torch, timm or safetensors.torch installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.checkpoint import CHECKPOINT_WEIGHTS, LoadedStudent, load_mimic_projector, load_student
from shared.models.inference import embed_tiles

WEIGHTS_FILE = CHECKPOINT_WEIGHTS


def load_torch_export(folder: Path, *, device: str) -> tuple[LoadedStudent, torch.nn.Linear | None]:
    """Load the exported student and its mimic projector (None where the export has none) onto ``device``."""
    student = load_student(folder, device=device)
    projector = load_mimic_projector(folder, device=device)
    return student, projector


def embed_torch(student: LoadedStudent, tiles: np.ndarray, *, device: str) -> np.ndarray:
    """Embed one batch of (N, H, W, 3) uint8 tiles as (N, D) float32, under bfloat16 autocast."""
    return embed_tiles(student.model, tiles, batch_size=max(len(tiles), 1), device=device)


def project_torch(projector: torch.nn.Linear, embeddings: np.ndarray, *, device: str) -> np.ndarray:
    """Map student embeddings to the teacher's space with the mimic projector, in float32."""
    # In float32: the projector is one small matrix product, and the output is compared with the teacher's.
    with torch.inference_mode():
        projected = projector(torch.from_numpy(embeddings).to(device))
    return projected.float().cpu().numpy()
