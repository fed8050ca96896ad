"""The UNI2-h teacher, from a weights file the user supplies (the weights are gated and never downloaded).

The file holds the state dict of timm's UNI2-h architecture (:func:`shared.models.uni2.build_uni2h`),
as safetensors or as a torch ``.bin``/``.pth`` file such as the one on the MahmoodLab/UNI2-h model page.
The embedding is the final-norm CLS token, 1536-d. The preprocessing is fixed (224 px tiles, ImageNet
mean and std), so the identity is the model's name and the file's hash.
"""

from __future__ import annotations

from pathlib import Path

from shared.models.uni2 import UNI2H_EMBED_DIM, UNI2H_INPUT_SIZE, UNI2H_MEAN, UNI2H_STD, build_uni2h
from teacher_gateway.teachers.options import DEFAULT_BATCH_SIZE, check_batch_size, check_precision
from teacher_gateway.teachers.preprocessing import TilePreprocessing
from teacher_gateway.teachers.torch_teacher import TorchTeacher, resolve_torch_device
from teacher_gateway.teachers.weights import build_on_meta, find_weights, load_weights

UNI2H_NAME = "uni2-h"
UNI2H_LICENCE = "CC-BY-NC-ND-4.0 (UNI2-h, MahmoodLab; gated, non-commercial)"


def build_uni2h_teacher(
    *,
    weights: str | Path | None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = "bf16",
) -> TorchTeacher:
    """Load UNI2-h from ``weights`` and return it as a teacher with identity ``uni2-h@sha256:<16 hex>``.

    Raises :class:`ConfigError` naming the weights setting when the file is not set or missing, and
    :class:`ModelError` naming the keys when the file is not a UNI2-h state dict.
    """
    # Options are checked before the file is hashed and loaded, which takes seconds for UNI2-h.
    check_batch_size(batch_size, teacher=UNI2H_NAME)
    check_precision(precision, teacher=UNI2H_NAME)
    torch_device = resolve_torch_device(device, teacher=UNI2H_NAME)
    weights_file = find_weights(weights, teacher=UNI2H_NAME)
    identity = f"{UNI2H_NAME}@sha256:{weights_file.short_hash}"

    model = build_on_meta(build_uni2h)
    load_weights(model, weights_file, teacher=identity)
    preprocessing = TilePreprocessing.create(
        teacher=identity, input_size=UNI2H_INPUT_SIZE, mean=UNI2H_MEAN, std=UNI2H_STD
    )
    return TorchTeacher(
        model,
        name=UNI2H_NAME,
        identity=identity,
        dim=UNI2H_EMBED_DIM,
        licence=UNI2H_LICENCE,
        preprocessing=preprocessing,
        device=str(torch_device),
        batch_size=batch_size,
        precision=precision,
        details={"backend": "uni2-h", "weights": weights_file.path.name, "weights_sha256": weights_file.sha256},
    )
