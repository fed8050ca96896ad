"""The exported student checkpoint: a folder the distiller writes and the student server reads.

The folder contains three files:

- ``model.safetensors``: the student's weights (float32 state dict, no pickled code).
- ``config.json``: ``format`` "unite-student", ``format_version``, the architecture name and keyword
  arguments, the embedding dimension, the input size, normalisation mean and std, the target µm/px, the
  teacher's identity and licence, a training summary, and ``weights_sha256``.
- ``README.md``: the model card. It names the teacher and its licence first, because a student trained on
  a teacher's outputs may be a derivative work under the teacher's licence.

The sha256 of ``model.safetensors`` is the checkpoint's identity: the server reports it, and
:func:`load_student` checks it against the value recorded in ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.errors import ModelError
from shared.imaging import IMAGENET_MEAN, IMAGENET_STD, MODEL_INPUT_SIZE
from shared.models.student import UNITE_STUDENT_NAME, build_unite_student

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_CARD = "README.md"
CHECKPOINT_FORMAT = "unite-student"
CHECKPOINT_FORMAT_VERSION = 1
# Resolution the student was trained at: 20x, the resolution UNI2-h expects.
CHECKPOINT_TARGET_MPP = 0.5

# Builders of the architectures a checkpoint may name; each takes the recorded keyword arguments.
STUDENT_ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    UNITE_STUDENT_NAME: build_unite_student,
}

_REQUIRED_CONFIG_KEYS = ("format", "format_version", "architecture", "architecture_kwargs", "embed_dim", "weights_sha256")
_RESTRICTIVE_LICENCE_TERMS = {"NC", "ND", "NONCOMMERCIAL", "NODERIVATIVES", "NODERIVS"}
_HASH_CHUNK_BYTES = 1 << 20


@dataclass
class LoadedStudent:
    """A student read back from a checkpoint folder, in eval mode, with its recorded configuration."""

    model: torch.nn.Module
    config: dict[str, Any]
    sha256: str
    folder: Path
    embed_dim: int
    name: str


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_restrictive_licence(licence: str) -> bool:
    """Tell whether a licence string carries a non-commercial or no-derivatives term (CC "NC" or "ND")."""
    tokens = {token for token in re.split(r"[^A-Za-z]+", licence.upper()) if token}
    return bool(tokens & _RESTRICTIVE_LICENCE_TERMS)


def save_student(
    model: torch.nn.Module,
    folder: Path,
    *,
    architecture: str,
    architecture_kwargs: dict[str, Any],
    teacher: str,
    teacher_licence: str,
    training: dict[str, Any],
    command: str | None = None,
) -> Path:
    """Export ``model`` into ``folder`` as weights, config and model card, replacing an older export.

    The three files are written into a temporary sibling folder ``.<name>.partial-<8 hex digits>`` first.
    An existing ``folder`` is then renamed aside, the new folder renamed into place, and the old one
    deleted, so a reader never sees a half-written export. A crash between the two renames leaves the
    old export under a ``.<name>.old-*`` sibling. Temporary folders that a killed export left behind are
    deleted at the start of the next export to the same folder, so two exports to one folder must not
    run at the same time. Returns the folder.
    """
    if architecture not in STUDENT_ARCHITECTURES:
        raise ModelError(
            f"cannot export architecture {architecture!r}: it is not one of the known student architectures "
            f"{sorted(STUDENT_ARCHITECTURES)}, so the checkpoint could not be loaded. "
            "Register its builder in shared.checkpoint.STUDENT_ARCHITECTURES.",
            value=architecture,
            limit=sorted(STUDENT_ARCHITECTURES),
        )
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder)
    staging = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_export(
            model,
            staging,
            architecture=architecture,
            architecture_kwargs=architecture_kwargs,
            teacher=teacher,
            teacher_licence=teacher_licence,
            training=training,
            command=command,
        )
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("exported student %s to %s (teacher %s, licence %s)", architecture, folder, teacher, teacher_licence)
    return folder


def load_student(folder: Path, *, device: str = "cpu") -> LoadedStudent:
    """Load an exported student onto ``device`` in eval mode, checking its format, weights hash and keys."""
    folder = Path(folder)
    weights_path = folder / CHECKPOINT_WEIGHTS
    config_path = folder / CHECKPOINT_CONFIG
    for path in (folder, config_path, weights_path):
        if not path.exists():
            raise ModelError(
                f"student checkpoint {folder}: {path} not found. "
                "Point at a folder exported by `unite distill` (it contains "
                f"{CHECKPOINT_WEIGHTS}, {CHECKPOINT_CONFIG} and {CHECKPOINT_CARD}).",
                value=str(path),
            )

    config = _read_config(config_path)
    sha256 = file_sha256(weights_path)
    if sha256 != config["weights_sha256"]:
        raise ModelError(
            f"student checkpoint {folder}: {CHECKPOINT_WEIGHTS} has sha256 {sha256}, but {CHECKPOINT_CONFIG} "
            f"records {config['weights_sha256']}. The weights were changed or damaged after export; export the student again.",
            value=sha256,
            limit=config["weights_sha256"],
        )

    model = _build_architecture(config, folder)
    try:
        state = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ModelError(
            f"student checkpoint {folder}: cannot read {weights_path} as safetensors ({error}). Export the student again."
        ) from error
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"student checkpoint {folder}: weights do not match architecture {config['architecture']!r}: "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}. "
            "Export the checkpoint again with the same architecture and arguments.",
            value={"missing": sorted(missing), "unexpected": sorted(unexpected)},
        )

    model.to(device).eval()
    embed_dim = int(config["embed_dim"])
    name = f"{config['architecture']}@{sha256[:12]}"
    logger.info(
        "loaded student %s from %s on %s: %d tensors, %d-d embeddings, teacher %s (licence %s)",
        name,
        folder,
        device,
        len(state),
        embed_dim,
        config.get("teacher"),
        config.get("teacher_licence"),
    )
    return LoadedStudent(model=model, config=config, sha256=sha256, folder=folder, embed_dim=embed_dim, name=name)


def _write_export(
    model: torch.nn.Module,
    target: Path,
    *,
    architecture: str,
    architecture_kwargs: dict[str, Any],
    teacher: str,
    teacher_licence: str,
    training: dict[str, Any],
    command: str | None,
) -> None:
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    weights_path = target / CHECKPOINT_WEIGHTS
    save_file(state, weights_path, metadata={"format": "pt", "architecture": architecture})
    # safetensors creates the file owner-only; a server running as another user must be able to read it.
    weights_path.chmod(0o644)

    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "architecture": architecture,
        "architecture_kwargs": dict(architecture_kwargs),
        "embed_dim": _embedding_dim(model, architecture_kwargs),
        "input_size": MODEL_INPUT_SIZE,
        "mean": [round(float(value), 6) for value in IMAGENET_MEAN],
        "std": [round(float(value), 6) for value in IMAGENET_STD],
        "target_mpp": CHECKPOINT_TARGET_MPP,
        "teacher": teacher,
        "teacher_licence": teacher_licence,
        "training": training,
        "command": command,
        "weights_sha256": file_sha256(weights_path),
    }
    try:
        text = json.dumps(config, indent=2, default=_json_default)
    except TypeError as error:
        raise ModelError(f"cannot write {CHECKPOINT_CONFIG}: a value is not JSON-serialisable ({error}).") from error
    (target / CHECKPOINT_CONFIG).write_text(text + "\n", encoding="utf-8")
    (target / CHECKPOINT_CARD).write_text(_model_card(json.loads(text)), encoding="utf-8")


def _remove_stale_staging(folder: Path) -> None:
    # Only siblings named exactly like save_student's temporary folders, ".<name>.partial-<8 hex digits>".
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.partial-[0-9a-f]{{8}}")
    for path in folder.parent.iterdir():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            shutil.rmtree(path)
        except OSError as error:
            logger.warning("cannot remove %s, left by an interrupted export of %s: %s", path, folder, error)
            continue
        logger.info("removed %s, left by an interrupted export of %s", path, folder)


def _replace_folder(staging: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except OSError:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _embedding_dim(model: torch.nn.Module, architecture_kwargs: dict[str, Any]) -> int:
    # timm models expose the pre-logits width as num_features.
    dim = getattr(model, "num_features", None) or architecture_kwargs.get("embed_dim")
    if not dim:
        raise ModelError(
            f"cannot tell the embedding dimension of {type(model).__name__}: it has no num_features attribute "
            "and architecture_kwargs has no embed_dim. Pass embed_dim in architecture_kwargs."
        )
    return int(dim)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(
            f"student checkpoint config {path} is not valid JSON ({error}). Export the student again with `unite distill`."
        ) from error
    if not isinstance(config, dict):
        raise ModelError(f"student checkpoint config {path} contains a {type(config).__name__}, expected a JSON object.")
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ModelError(
            f"student checkpoint config {path} lacks the keys {missing}. Export the student again with `unite distill`.",
            value=missing,
        )
    if config["format"] != CHECKPOINT_FORMAT or config["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise ModelError(
            f"student checkpoint config {path}: format {config['format']!r} version {config['format_version']!r}, "
            f"expected {CHECKPOINT_FORMAT!r} version {CHECKPOINT_FORMAT_VERSION}. Export the student again with this version.",
            value=[config["format"], config["format_version"]],
            limit=[CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION],
        )
    return config


def _build_architecture(config: dict[str, Any], folder: Path) -> torch.nn.Module:
    architecture = config["architecture"]
    builder = STUDENT_ARCHITECTURES.get(architecture)
    if builder is None:
        raise ModelError(
            f"student checkpoint {folder}: unknown architecture {architecture!r}, expected one of {sorted(STUDENT_ARCHITECTURES)}. "
            "The checkpoint comes from another version of UNITE; load it with that version or export it again.",
            value=architecture,
            limit=sorted(STUDENT_ARCHITECTURES),
        )
    kwargs = config["architecture_kwargs"]
    if not isinstance(kwargs, dict):
        raise ModelError(f"student checkpoint {folder}: architecture_kwargs is {kwargs!r}, expected a JSON object.")
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as error:
        raise ModelError(
            f"student checkpoint {folder}: cannot build {architecture!r} from architecture_kwargs {kwargs} ({error}). "
            "Export the student again."
        ) from error


def _model_card(config: dict[str, Any]) -> str:
    teacher = config["teacher"]
    licence = config["teacher_licence"] or "unknown"
    training = dict(config.get("training") or {})
    losses = training.pop("losses", None) or {}

    lines = [
        f"# UNITE student `{config['architecture']}`",
        "",
        f"**Teacher:** `{teacher}`  ",
        f"**Teacher licence:** {licence}",
        "",
    ]
    if is_restrictive_licence(licence):
        lines += [
            f"> **Derivative-work warning.** This student was trained only on the embeddings of `{teacher}`, whose licence "
            f"({licence}) restricts commercial use or derivatives. Model cards of such teachers may count a model trained "
            "on their outputs as a derivative, so this student may inherit the same restrictions. "
            "Check the teacher's terms before you share or use it.",
            "",
        ]
    elif licence == "unknown":
        lines += [
            "> **Unknown teacher licence.** The teacher's terms were not recorded. Terms of some models and APIs forbid "
            "training on their outputs; check them before you share or use this student.",
            "",
        ]

    lines += [
        "## Model",
        "",
        f"- Architecture: `{config['architecture']}` with arguments `{json.dumps(config['architecture_kwargs'], sort_keys=True)}`",
        f"- Embedding dimension: {config['embed_dim']}",
        f"- Input: {config['input_size']} x {config['input_size']} RGB at {config['target_mpp']} µm/px, "
        f"normalised with mean {config['mean']} and std {config['std']}",
        f"- Weights: `{CHECKPOINT_WEIGHTS}`, sha256 `{config['weights_sha256']}`",
        "",
        "## Training data",
        "",
    ]
    if training:
        lines += ["| field | value |", "|---|---|"]
        lines += [f"| {key} | {_card_value(value)} |" for key, value in training.items()]
    else:
        lines.append("No training summary was recorded.")
    lines += ["", "## Metrics", ""]
    if losses:
        lines += ["| loss | value |", "|---|---|"]
        lines += [f"| {key} | {_card_value(value)} |" for key, value in losses.items()]
    else:
        lines.append("No metrics were recorded.")
    lines += ["", "## Command", ""]
    lines.append(f"```\n{config['command']}\n```" if config.get("command") else "Not recorded.")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from shared.checkpoint import load_student",
        "student = load_student(FOLDER)  # FOLDER: the folder that contains this file",
        "```",
        "",
    ]
    return "\n".join(lines)


def _card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")
