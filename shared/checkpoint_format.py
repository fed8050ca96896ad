"""The file names and config.json format of an exported student, readable without torch.

:mod:`shared.checkpoint` writes and loads exports with torch. The student server's onnx runtime reads the
same config.json and mimic projector record with numpy alone, so both read them through this module,
which imports neither torch nor safetensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ModelError

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_CARD = "README.md"
MIMIC_PROJECTOR_WEIGHTS = "mimic_projector.safetensors"
CHECKPOINT_FORMAT = "unite-student"
CHECKPOINT_FORMAT_VERSION = 1
# Resolution the student was trained at: 20x, the resolution UNI2-h expects.
CHECKPOINT_TARGET_MPP = 0.5
# The architecture that config.json records for a timm student.
TIMM_ARCHITECTURE = "timm"

# The ONNX export beside the torch weights (distiller.onnx_export writes it, the onnx runtime reads it): its
# file name, the metadata entry that marks it, and the names of its input and outputs.
ONNX_WEIGHTS = "model.onnx"
ONNX_FORMAT_KEY = "unite.format"
ONNX_FORMAT = "unite-student-onnx"
ONNX_INPUT = "pixels"
ONNX_EMBEDDING_OUTPUT = "embedding"
ONNX_TEACHER_OUTPUT = "teacher_embedding"

REQUIRED_CONFIG_KEYS = ("format", "format_version", "architecture", "architecture_kwargs", "embed_dim", "weights_sha256")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class MimicProjectorFile:
    """The mimic projector that config.json records: its file, found in the export folder with the recorded sha256."""

    path: Path
    in_features: int
    out_features: int
    sha256: str


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(path: Path, *, subject: str, fix: str) -> dict[str, Any]:
    """Read an export's config.json and check that it is a JSON object with the required keys, format and version.

    ``subject`` starts every error message (such as "student checkpoint"), and ``fix`` is the sentence that
    ends the messages about an unreadable or incomplete file. Raises :class:`ModelError`.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{subject} config {path} is not valid JSON ({error}). {fix}") from error
    except OSError as error:
        raise ModelError(f"{subject} config {path} cannot be read ({error}). {fix}", value=str(path)) from error
    if not isinstance(config, dict):
        raise ModelError(f"{subject} config {path} contains a {type(config).__name__}, expected a JSON object.")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ModelError(f"{subject} config {path} lacks the keys {missing}. {fix}", value=missing)
    if config["format"] != CHECKPOINT_FORMAT or config["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise ModelError(
            f"{subject} config {path}: format {config['format']!r} version {config['format_version']!r}, "
            f"expected {CHECKPOINT_FORMAT!r} version {CHECKPOINT_FORMAT_VERSION}. Export the student again with this version.",
            value=[config["format"], config["format_version"]],
            limit=[CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION],
        )
    return config


def mimic_projector_file(config: dict[str, Any], folder: Path, *, subject: str, fix: str) -> MimicProjectorFile | None:
    """Return the mimic projector that ``config`` records in ``folder``, or None when it records none.

    Checks that the record names a file, its dimensions and sha256, and that the file exists in ``folder``
    with that sha256. It does not read the tensors. ``subject`` starts every error message and ``fix`` ends
    it. Raises :class:`ModelError`.
    """
    record = config.get("mimic_projector")
    if record is None:
        return None

    try:
        # Only a file name is taken from the config, so a changed config cannot point outside the folder.
        path = folder / Path(record["file"]).name
        in_features, out_features = int(record["in_features"]), int(record["out_features"])
        recorded_sha256 = record["sha256"]
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(
            f"{subject} {folder}: mimic_projector in {CHECKPOINT_CONFIG} is {record!r}, expected an object with "
            f"file, in_features, out_features and sha256 ({error}). {fix}",
            value=record,
        ) from error
    if not path.is_file():
        raise ModelError(
            f"{subject} {folder}: {CHECKPOINT_CONFIG} records a mimic projector, but {path} not found. {fix}",
            value=str(path),
        )
    sha256 = file_sha256(path)
    if sha256 != recorded_sha256:
        raise ModelError(
            f"{subject} {folder}: {path.name} has sha256 {sha256}, but {CHECKPOINT_CONFIG} records {recorded_sha256}. "
            f"The projector was changed or damaged after export, or comes from another export. {fix}",
            value=sha256,
            limit=recorded_sha256,
        )
    return MimicProjectorFile(path=path, in_features=in_features, out_features=out_features, sha256=sha256)


def student_label(config: dict[str, Any]) -> str:
    """Return the name of the student that ``config`` describes, without its sha256: the architecture, or ``timm:<model>``."""
    # A timm student is named by its timm model name; the architecture "timm" alone would not tell students apart.
    architecture = config["architecture"]
    kwargs = config["architecture_kwargs"]
    if architecture == TIMM_ARCHITECTURE and isinstance(kwargs, dict):
        return f"timm:{kwargs.get('model_name')}"
    return str(architecture)
