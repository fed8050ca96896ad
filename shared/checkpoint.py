"""The exported student checkpoint: a folder the distiller writes and the student server reads.

The folder contains three or four files:

- ``model.safetensors``: the student's weights (float32 state dict, no pickled code).
- ``mimic_projector.safetensors``: only where the loss had one, the ``weight`` and ``bias`` of the
  nn.Linear that maps the student's embedding into the teacher's space.
- ``config.json``: ``format`` "unite-student", ``format_version``, the student name, the architecture
  name and keyword arguments, and ``weights_sha256``. It also records the embedding dimension, the input
  size, the normalisation mean and std and the target µm/px, and then the teacher's identity and
  licence, the loss, the projector's dimensions and sha256, the training and data summaries, the
  validation metrics and the command.
- ``README.md``: the model card. It names the teacher and its licence first, because a student trained on
  a teacher's outputs may be a derivative work under the teacher's licence.

The sha256 of ``model.safetensors`` is the checkpoint's identity: the server reports it, and
:func:`load_student` checks it against the value recorded in ``config.json``. Exports written before the
student name, the loss and the projector were recorded lack those keys and load as before.
"""

from __future__ import annotations

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

from shared.checkpoint_format import (
    CHECKPOINT_CARD,
    CHECKPOINT_CONFIG,
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_TARGET_MPP,
    CHECKPOINT_WEIGHTS,
    MIMIC_PROJECTOR_WEIGHTS,
    file_sha256,
    mimic_projector_file,
    read_config,
    student_label,
)
from shared.errors import ModelError
from shared.imaging import IMAGENET_MEAN, IMAGENET_STD, MODEL_INPUT_SIZE
from shared.models.student import (
    TIMM_ARCHITECTURE,
    UNITE_STUDENT,
    UNITE_STUDENT_NAME,
    build_timm_student,
    build_unite_student,
    embedding_dim,
    student_architecture,
)

# The export's file names, format constants and file_sha256 live in shared.checkpoint_format, which the
# onnx runtime imports without torch. They are imported here too, so existing imports keep working.
__all__ = [
    "CHECKPOINT_CARD",
    "CHECKPOINT_CONFIG",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_TARGET_MPP",
    "CHECKPOINT_WEIGHTS",
    "MIMIC_PROJECTOR_WEIGHTS",
    "STUDENT_ARCHITECTURES",
    "LoadedStudent",
    "file_sha256",
    "is_restrictive_licence",
    "load_mimic_projector",
    "load_student",
    "save_student",
]

logger = logging.getLogger(__name__)

# Builders of the architectures a checkpoint may name; each takes the recorded keyword arguments.
STUDENT_ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    UNITE_STUDENT_NAME: build_unite_student,
    TIMM_ARCHITECTURE: build_timm_student,
}

_RESTRICTIVE_LICENCE_TERMS = {"NC", "ND", "NONCOMMERCIAL", "NODERIVATIVES", "NODERIVS"}
# Subject and fix of the error messages about a damaged export.
_ERROR_SUBJECT = "student checkpoint"
_CONFIG_FIX = "Export the student again with `unite distill`."
_PROJECTOR_FIX = "Export the student again."


@dataclass
class LoadedStudent:
    """A student read back from a checkpoint folder, in eval mode, with its recorded configuration."""

    model: torch.nn.Module
    config: dict[str, Any]
    sha256: str
    folder: Path
    embed_dim: int
    name: str


def is_restrictive_licence(licence: str) -> bool:
    """Tell whether a licence string carries a non-commercial or no-derivatives term (CC "NC" or "ND")."""
    tokens = {token for token in re.split(r"[^A-Za-z]+", licence.upper()) if token}
    return bool(tokens & _RESTRICTIVE_LICENCE_TERMS)


def save_student(
    model: torch.nn.Module,
    folder: Path,
    *,
    teacher: str,
    teacher_licence: str,
    training: dict[str, Any],
    student: str = UNITE_STUDENT,
    architecture: str | None = None,
    architecture_kwargs: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    mimic_projector: torch.nn.Linear | None = None,
    validation_metrics: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    command: str | None = None,
) -> Path:
    """Export ``model`` into ``folder`` as weights, projector, config and model card, replacing an older export.

    ``student`` is the name :func:`shared.models.student.build_student` built the model from; the
    architecture and its keyword arguments are derived from it unless given. ``loss`` is the loss's
    record (``DistillLoss.summary()``), ``mimic_projector`` the loss's student-to-teacher projector, or
    None. ``training``, ``data`` (the data summary) and ``validation_metrics`` are JSON-serialisable
    records that config.json keeps and the model card shows as tables. ``command`` is the command line
    that produced the export.

    The files are written into a temporary sibling folder ``.<name>.partial-<8 hex digits>`` first.
    An existing ``folder`` is then renamed aside, the new folder renamed into place, and the old one
    deleted, so a reader never sees a half-written export. A crash between the two renames leaves the
    old export under a ``.<name>.old-*`` sibling. Temporary folders that a killed export left behind are
    deleted at the start of the next export to the same folder, so two exports to one folder must not
    run at the same time. Returns the folder.
    """
    derived, derived_kwargs = student_architecture(student)
    architecture = architecture or derived
    architecture_kwargs = derived_kwargs if architecture_kwargs is None else architecture_kwargs
    if architecture != derived:
        raise ModelError(
            f"cannot export student {student!r} as architecture {architecture!r}: that student is built as {derived!r}. "
            "Pass the student name the model was built from, and no architecture.",
            value=architecture,
            limit=derived,
        )
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
            {
                "student": student,
                "architecture": architecture,
                "architecture_kwargs": dict(architecture_kwargs),
                "teacher": teacher,
                "teacher_licence": teacher_licence,
                "loss": loss,
                "training": training,
                "data": data,
                "validation_metrics": validation_metrics,
                "command": command,
            },
            mimic_projector,
        )
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info(
        "exported student %s to %s (teacher %s, licence %s, mimic projector %s)",
        student,
        folder,
        teacher,
        teacher_licence,
        "none" if mimic_projector is None else f"{mimic_projector.in_features} -> {mimic_projector.out_features}",
    )
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

    config = read_config(config_path, subject=_ERROR_SUBJECT, fix=_CONFIG_FIX)
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
    name = f"{student_label(config)}@{sha256[:12]}"
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


def load_mimic_projector(folder: Path, *, device: str = "cpu") -> torch.nn.Linear | None:
    """Load the export's student-to-teacher projector in eval mode, or return None when the export has none.

    Exports of the ``unite`` loss, and exports written before projectors were exported, have none.
    Raises :class:`ModelError` when config.json records a projector whose file is missing, changed or
    of the wrong shape.
    """
    folder = Path(folder)
    config_path = folder / CHECKPOINT_CONFIG
    if not config_path.is_file():
        raise ModelError(
            f"student checkpoint {folder}: {config_path} not found. Point at a folder exported by `unite distill`.",
            value=str(config_path),
        )
    config = read_config(config_path, subject=_ERROR_SUBJECT, fix=_CONFIG_FIX)
    projector_file = mimic_projector_file(config, folder, subject=_ERROR_SUBJECT, fix=_PROJECTOR_FIX)
    if projector_file is None:
        return None

    path, in_features, out_features = projector_file.path, projector_file.in_features, projector_file.out_features
    projector = torch.nn.Linear(in_features, out_features)
    try:
        projector.load_state_dict(load_file(path, device="cpu"))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ModelError(
            f"student checkpoint {folder}: {path.name} does not contain the weight and bias of a {in_features} -> {out_features} "
            f"linear projector ({error}). Export the student again.",
            value=str(path),
        ) from error
    logger.info("loaded mimic projector %d -> %d from %s on %s", in_features, out_features, folder, device)
    return projector.to(device).eval()


def _write_export(model: torch.nn.Module, target: Path, record: dict[str, Any], mimic_projector: torch.nn.Linear | None) -> None:
    """Write the weights, the projector, config.json (``record`` plus the fixed fields) and the model card into ``target``."""
    weights_path = target / CHECKPOINT_WEIGHTS
    _save_tensors(model.state_dict(), weights_path, architecture=record["architecture"])
    embed_dim = _embedding_dim(model, record["architecture_kwargs"])
    projector = None
    if mimic_projector is not None:
        projector = _save_projector(mimic_projector, target / MIMIC_PROJECTOR_WEIGHTS, embed_dim=embed_dim)

    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        **record,
        "embed_dim": embed_dim,
        "input_size": MODEL_INPUT_SIZE,
        "mean": [round(float(value), 6) for value in IMAGENET_MEAN],
        "std": [round(float(value), 6) for value in IMAGENET_STD],
        "target_mpp": CHECKPOINT_TARGET_MPP,
        "mimic_projector": projector,
        "weights_sha256": file_sha256(weights_path),
    }
    try:
        text = json.dumps(config, indent=2, default=_json_default)
    except TypeError as error:
        raise ModelError(f"cannot write {CHECKPOINT_CONFIG}: a value is not JSON-serialisable ({error}).") from error
    (target / CHECKPOINT_CONFIG).write_text(text + "\n", encoding="utf-8")
    (target / CHECKPOINT_CARD).write_text(_model_card(json.loads(text)), encoding="utf-8")


def _save_tensors(state: dict[str, torch.Tensor], path: Path, *, architecture: str) -> None:
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(tensors, path, metadata={"format": "pt", "architecture": architecture})
    # safetensors creates the file owner-only; a server running as another user must be able to read it.
    path.chmod(0o644)


def _save_projector(projector: torch.nn.Linear, path: Path, *, embed_dim: int) -> dict[str, Any]:
    if not isinstance(projector, torch.nn.Linear) or projector.bias is None or projector.in_features != embed_dim:
        found = type(projector).__name__
        if isinstance(projector, torch.nn.Linear):
            found += f" {projector.in_features} -> {projector.out_features}"
        raise ModelError(
            f"cannot export mimic_projector {found}: expected an nn.Linear with a bias from the student's {embed_dim}-d "
            "embedding into the teacher's space. Pass the loss's mimic_projector, or None.",
            value=found,
            limit=embed_dim,
        )
    _save_tensors(projector.state_dict(), path, architecture="linear")
    return {
        "file": path.name,
        "in_features": projector.in_features,
        "out_features": projector.out_features,
        "sha256": file_sha256(path),
    }


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
    try:
        return embedding_dim(model)
    except ModelError:
        dim = architecture_kwargs.get("embed_dim")
        if not dim:
            raise ModelError(
                f"cannot tell the embedding dimension of {type(model).__name__}: it has no num_features attribute "
                "and architecture_kwargs has no embed_dim. Pass embed_dim in architecture_kwargs."
            ) from None
        return int(dim)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r}")


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
    student = config.get("student") or config["architecture"]

    lines = [
        f"# UNITE student `{student}`",
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

    projector = config.get("mimic_projector")
    lines += [
        "## Model",
        "",
        f"- Student: `{student}`, architecture `{config['architecture']}` with arguments "
        f"`{json.dumps(config['architecture_kwargs'], sort_keys=True)}`",
        f"- Embedding dimension: {config['embed_dim']}",
        f"- Input: {config['input_size']} x {config['input_size']} RGB at {config['target_mpp']} µm/px, "
        f"normalised with mean {config['mean']} and std {config['std']}",
        f"- Weights: `{CHECKPOINT_WEIGHTS}`, sha256 `{config['weights_sha256']}`",
        (
            f"- Teacher-space projector: `{projector['file']}`, {projector['in_features']} -> {projector['out_features']}, "
            f"sha256 `{projector['sha256']}`"
            if projector
            else "- Teacher-space projector: none"
        ),
        "",
    ]
    lines += _card_table("Loss", "field", config.get("loss"), "No loss was recorded.")
    lines += _card_table("Training data", "field", config.get("data"), "No data summary was recorded.")
    lines += _card_table("Training", "field", training, "No training summary was recorded.")
    lines += _card_table("Validation metrics", "metric", config.get("validation_metrics"), "No validation metrics were recorded.")
    lines += _card_table("Losses", "loss", losses, "No losses were recorded.")
    lines += ["## Command", ""]
    lines.append(f"```\n{config['command']}\n```" if config.get("command") else "Not recorded.")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from shared.checkpoint import load_mimic_projector, load_student",
        "student = load_student(FOLDER)  # FOLDER: the folder that contains this file",
        "projector = load_mimic_projector(FOLDER)  # None when the export has no teacher-space projector",
        "```",
        "",
    ]
    return "\n".join(lines)


def _card_table(title: str, key_header: str, values: dict[str, Any] | None, empty: str) -> list[str]:
    lines = [f"## {title}", ""]
    if values:
        lines += [f"| {key_header} | value |", "|---|---|"]
        lines += [f"| {key} | {_card_value(value)} |" for key, value in values.items()]
    else:
        lines.append(empty)
    return lines + [""]


def _card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")
