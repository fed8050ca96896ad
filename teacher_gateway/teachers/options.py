"""Checks of the options that the local teacher backends share, and the settings that errors name.

Every builder of a local teacher (UNI2-h, timm, ONNX) validates its keyword options here, so an invalid
value is reported the same way by every backend: the option, the value found, what was expected and
the setting that sets it.
"""

from __future__ import annotations

import logging
import re

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

# The gateway setting (environment variable and command-line option) behind each builder option.
SETTING_NAMES: dict[str, str] = {
    "weights": "UNITE_GATEWAY_WEIGHTS / --weights",
    "model_name": "UNITE_GATEWAY_MODEL_NAME / --model-name",
    "model_kwargs": "UNITE_GATEWAY_MODEL_KWARGS / --model-kwargs",
    "device": "UNITE_GATEWAY_DEVICE / --device",
    "batch_size": "UNITE_GATEWAY_BATCH_SIZE / --batch-size",
    "precision": "UNITE_GATEWAY_PRECISION / --precision",
    "input_name": "UNITE_GATEWAY_INPUT_NAME / --input-name",
    "output_name": "UNITE_GATEWAY_OUTPUT_NAME / --output-name",
    "input_size": "UNITE_GATEWAY_INPUT_SIZE / --input-size",
    "resize_size": "UNITE_GATEWAY_RESIZE_SIZE / --resize-size",
    "interpolation": "UNITE_GATEWAY_INTERPOLATION / --interpolation",
    "mean": "UNITE_GATEWAY_MEAN / --mean",
    "std": "UNITE_GATEWAY_STD / --std",
    "licence": "UNITE_GATEWAY_LICENCE / --licence",
}

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("bf16", "fp32")
DEFAULT_BATCH_SIZE = 32
# Recorded as the licence of a timm or ONNX teacher whose configuration states none, so exported
# shards and model cards say plainly that nobody checked.
UNSTATED_LICENCE = "not stated: set the teacher's licence (UNITE_GATEWAY_LICENCE / --licence)"

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")


def setting(option: str) -> str:
    """Return the setting behind a builder option, as error messages name it."""
    return SETTING_NAMES.get(option, option)


def check_device(device: str, *, teacher: str) -> str:
    """Return ``device`` lower-cased if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else raise ConfigError."""
    normalised = device.strip().lower() if isinstance(device, str) else device
    if normalised in ("auto", "cpu") or (isinstance(normalised, str) and _CUDA_DEVICE.fullmatch(normalised)):
        return normalised
    raise ConfigError(
        f"teacher {teacher}: device is {device!r}, expected one of {', '.join(DEVICE_CHOICES)}. "
        f"Set {setting('device')} to one of them.",
        value=device,
        limit=list(DEVICE_CHOICES),
    )


def check_batch_size(batch_size: int, *, teacher: str) -> int:
    """Return ``batch_size`` if it is a positive integer, else raise ConfigError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"teacher {teacher}: batch size is {batch_size!r}, expected a positive number of tiles per forward pass. "
            f"Set {setting('batch_size')} to, for example, {DEFAULT_BATCH_SIZE}.",
            value=batch_size,
            limit=1,
        )
    return batch_size


def check_precision(precision: str, *, teacher: str) -> str:
    """Return ``precision`` if it is ``bf16`` or ``fp32``, else raise ConfigError."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"teacher {teacher}: precision is {precision!r}, expected one of {', '.join(PRECISIONS)}. "
            f"Set {setting('precision')} to bf16 (autocast, the default) or fp32.",
            value=precision,
            limit=list(PRECISIONS),
        )
    return precision


def resolve_licence(licence: str | None, *, teacher: str) -> str:
    """Return the configured licence, or :data:`UNSTATED_LICENCE` with a warning when none is configured."""
    if licence is not None and licence.strip():
        return licence.strip()
    logger.warning(
        "teacher %s has no licence configured, so shards and model cards will record %r. Set %s.",
        teacher,
        UNSTATED_LICENCE,
        setting("licence"),
    )
    return UNSTATED_LICENCE
