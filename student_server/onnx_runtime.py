"""The student run by onnxruntime from its ONNX export, with no torch imported.

The server's ``onnx`` runtime (setting ``UNITE_STUDENT_RUNTIME=onnx``) reads these files from the
checkpoint folder:

- ``model.onnx``: the graph that ``unite export-onnx`` writes. Its input ``pixels`` is a normalised
  (batch, 3, 224, 224) float32 batch, its output ``embedding`` the (batch, D) student embedding, and its
  metadata records the sha256 of the ``model.safetensors`` it was exported from.
- ``config.json``: the export's config, as ``unite distill`` writes it.
- ``mimic_projector.safetensors``: only for teacher-space output, where config.json records a projector.

``unite export-onnx OUT/student --out OUT/student/model.onnx`` makes an export folder that both runtimes
serve and that :func:`shared.publish.publish_student` still accepts.

The projector is read with safetensors' numpy loader and applied with numpy. The graph's own
``teacher_embedding`` output is not used, so the engine computes one embedding per tile and projects only
the rows of teacher-space requests, as it does with torch.

A served ONNX student has the name and checkpoint sha256 of the torch student it was exported from: the
sha256 of ``model.safetensors``, read from the graph's metadata and checked against config.json. Clients
therefore see one identity whichever runtime serves the student. Tiles are normalised by
:func:`shared.imaging.to_model_input`, as in the torch runtime. The graph runs in float32, while the torch
runtime uses bfloat16 autocast, so the two differ by bfloat16 rounding.

Packages needed: numpy, onnxruntime (onnxruntime-gpu for CUDA) and, for teacher-space output, safetensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from shared.checkpoint_format import (
    CHECKPOINT_CONFIG,
    ONNX_EMBEDDING_OUTPUT,
    ONNX_FORMAT,
    ONNX_FORMAT_KEY,
    ONNX_INPUT,
    ONNX_WEIGHTS,
    file_sha256,
    mimic_projector_file,
    read_config,
    student_label,
)
from shared.errors import ImageError, ModelError
from shared.imaging import MODEL_INPUT_SIZE, prepare_tile, to_model_input
from shared.onnx_graph import count_onnx_parameters

logger = logging.getLogger(__name__)

INPUT_NAME = ONNX_INPUT
EMBEDDING_OUTPUT = ONNX_EMBEDDING_OUTPUT
# Subject and fixes of the error messages about an export folder whose files do not belong together.
_ERROR_SUBJECT = "ONNX student"
_CONFIG_FIX = "Copy config.json again from the folder that `unite distill` exported."
_PROJECTOR_FIX = "Copy config.json and the projector beside model.onnx from the same export."


@dataclass
class OnnxStudent:
    """A student loaded as an onnxruntime session, with the identity of the torch weights it was exported from.

    ``sha256`` is the sha256 of the export's model.safetensors, ``onnx_sha256`` that of model.onnx.
    """

    session: Any
    config: dict[str, Any]
    sha256: str
    folder: Path
    embed_dim: int
    name: str
    onnx_sha256: str
    providers: list[str]

    @cached_property
    def parameters(self) -> int | None:
        """Number of weights that compute the ``embedding`` output, or None when the onnx package cannot read the graph.

        These are the elements of the graph initializers that the output depends on, so the mimic projector,
        which feeds only ``teacher_embedding``, is left out. Read from model.onnx on first use.
        """
        return count_onnx_parameters(self.folder / ONNX_WEIGHTS, EMBEDDING_OUTPUT)


@dataclass
class LinearProjector:
    """The export's student-to-teacher projector as numpy arrays: ``weight`` (out, in) and ``bias`` (out,), float32."""

    weight: np.ndarray
    bias: np.ndarray

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """Map (N, in_features) embeddings to (N, out_features) float32, as torch.nn.Linear does."""
        projected = embeddings.astype(np.float32, copy=False) @ self.weight.T + self.bias
        return projected.astype(np.float32, copy=False)


def load_onnx_export(folder: Path, *, device: str = "cpu") -> tuple[OnnxStudent, LinearProjector | None]:
    """Load the ONNX student in ``folder`` on ``device`` and its mimic projector, or None where the export has none.

    Raises :class:`ModelError` when a file is missing, unreadable or does not belong to the others, or
    onnxruntime is not installed. Raises RuntimeError when onnxruntime has no execution provider for
    ``device`` (the server then names the device setting).
    """
    folder = Path(folder)
    onnx_path = folder / ONNX_WEIGHTS
    config_path = folder / CHECKPOINT_CONFIG
    for path in (onnx_path, config_path):
        if not path.is_file():
            raise ModelError(
                f"ONNX student {folder}: {path} not found. The onnx runtime needs {ONNX_WEIGHTS} and {CHECKPOINT_CONFIG}: "
                f"run `unite export-onnx CHECKPOINT --out CHECKPOINT/{ONNX_WEIGHTS}` on a folder that `unite distill` exported.",
                value=str(path),
            )
    config = read_config(config_path, subject=_ERROR_SUBJECT, fix=_CONFIG_FIX)
    session = _create_session(onnx_path, device)
    providers = list(session.get_providers())
    embed_dim = _check_graph(session, onnx_path, config)

    sha256 = str(config["weights_sha256"])
    name = f"{student_label(config)}@{sha256[:12]}"
    student = OnnxStudent(
        session=session,
        config=config,
        sha256=sha256,
        folder=folder,
        embed_dim=embed_dim,
        name=name,
        onnx_sha256=file_sha256(onnx_path),
        providers=providers,
    )
    projector = _load_projector(folder, config, embed_dim)
    logger.info(
        "loaded ONNX student %s from %s with %s: %d-d embeddings, %s sha256 %s, teacher %s (licence %s)",
        name,
        folder,
        providers[0],
        embed_dim,
        ONNX_WEIGHTS,
        student.onnx_sha256,
        config.get("teacher"),
        config.get("teacher_licence"),
    )
    return student, projector


def embed_onnx(student: OnnxStudent, tiles: np.ndarray) -> np.ndarray:
    """Embed (N, H, W, 3) uint8 RGB tiles in one run of the session and return (N, D) float32 embeddings.

    Tiles that are not 224 x 224 are resized and centre-cropped first, as in the torch runtime. Raises
    :class:`ImageError` for a tile array of the wrong shape or dtype and :class:`ModelError` when the
    session fails or returns another shape.
    """
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[3] != 3 or tiles.dtype != np.uint8:
        shape = list(tiles.shape) if isinstance(tiles, np.ndarray) else type(tiles).__name__
        raise ImageError(f"tiles have shape {shape}, expected an (N, H, W, 3) uint8 RGB array.", value=shape)
    if len(tiles) == 0:
        return np.zeros((0, student.embed_dim), dtype=np.float32)
    if tiles.shape[1:3] != (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE):
        tiles = np.stack([prepare_tile(tile) for tile in tiles])

    pixels = to_model_input(tiles)
    try:
        (embeddings,) = student.session.run([EMBEDDING_OUTPUT], {INPUT_NAME: pixels})
    except _onnxruntime_errors() as error:
        raise ModelError(f"onnxruntime failed to embed {len(tiles)} tiles with {student.name} ({error}).") from error
    if embeddings.shape != (len(tiles), student.embed_dim):
        raise ModelError(
            f"ONNX student {student.name} returned shape {embeddings.shape} for {len(tiles)} tiles, expected "
            f"({len(tiles)}, {student.embed_dim}). Export the ONNX file again with `unite export-onnx`.",
            value=list(embeddings.shape),
        )
    return embeddings.astype(np.float32, copy=False)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ModelError(
            f"the onnx runtime needs the onnxruntime package ({error}). Install it with `pip install onnxruntime` "
            "(onnxruntime-gpu for CUDA), or set UNITE_STUDENT_RUNTIME=torch."
        ) from error
    return onnxruntime


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    # onnxruntime's errors derive from Exception only, so they are caught by the classes its binding defines.
    state = _import_onnxruntime().capi.onnxruntime_pybind11_state
    return (
        state.Fail,
        state.InvalidArgument,
        state.InvalidGraph,
        state.InvalidProtobuf,
        state.NoSuchFile,
        state.NotImplemented,
        state.RuntimeException,
    )


def _providers(onnxruntime, device: str) -> list:
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider for device {device!r}, "
            f"only {available}; install onnxruntime-gpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def _create_session(path: Path, device: str):
    onnxruntime = _import_onnxruntime()
    providers = _providers(onnxruntime, device)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except _onnxruntime_errors() as error:
        raise ModelError(
            f"onnxruntime {onnxruntime.__version__} cannot load {path} ({error}). Export it again with `unite export-onnx`.",
            value=str(path),
        ) from error
    # A provider that fails to start may leave the session on the CPU provider alone, so check which one it took.
    # NOTE: the CUDA path has not been run, because the test machine's onnxruntime has no CUDA provider.
    if device != "cpu" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime started {session.get_providers()} instead of CUDAExecutionProvider for device {device!r}")
    return session


def _check_graph(session, path: Path, config: dict[str, Any]) -> int:
    """Return the embedding dimension after checking the graph's metadata, input and output against config.json."""
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get(ONNX_FORMAT_KEY) != ONNX_FORMAT:
        raise ModelError(
            f"{path} has metadata unite.format {metadata.get(ONNX_FORMAT_KEY)!r}, expected {ONNX_FORMAT!r}. "
            "Write the file with `unite export-onnx`.",
            value=metadata.get(ONNX_FORMAT_KEY),
            limit=ONNX_FORMAT,
        )
    if metadata.get("unite.weights_sha256") != config["weights_sha256"]:
        raise ModelError(
            f"{path} was exported from weights with sha256 {metadata.get('unite.weights_sha256')}, but {CHECKPOINT_CONFIG} "
            f"records {config['weights_sha256']}. Export the ONNX file again from this export's folder.",
            value=metadata.get("unite.weights_sha256"),
            limit=config["weights_sha256"],
        )

    inputs = session.get_inputs()
    expected_input = ["batch", 3, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or list(inputs[0].shape)[1:] != expected_input[1:]:
        found = [(item.name, item.shape) for item in inputs]
        raise ModelError(
            f"{path} has inputs {found}, expected one input {INPUT_NAME!r} of shape {expected_input}. "
            "Export it again with `unite export-onnx`.",
            value=str(found),
        )

    embed_dim = int(config["embed_dim"])
    outputs = {item.name: item.shape for item in session.get_outputs()}
    shape = outputs.get(EMBEDDING_OUTPUT)
    # A symbolic or unknown width is checked on each batch by embed_onnx instead.
    if shape is None or len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != embed_dim):
        raise ModelError(
            f"{path} has outputs {outputs}, expected {EMBEDDING_OUTPUT!r} of shape [batch, {embed_dim}] as {CHECKPOINT_CONFIG} records.",
            value=str(outputs),
        )
    return embed_dim


def _load_projector(folder: Path, config: dict[str, Any], embed_dim: int) -> LinearProjector | None:
    projector_file = mimic_projector_file(config, folder, subject=_ERROR_SUBJECT, fix=_PROJECTOR_FIX)
    if projector_file is None:
        return None

    path, in_features, out_features = projector_file.path, projector_file.in_features, projector_file.out_features
    tensors = _read_safetensors(path)
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if (
        weight is None
        or bias is None
        or weight.shape != (out_features, in_features)
        or bias.shape != (out_features,)
        or in_features != embed_dim
    ):
        found = {key: list(value.shape) for key, value in tensors.items()}
        raise ModelError(
            f"ONNX student {folder}: {path.name} contains {found}, expected weight [{out_features}, {embed_dim}] and "
            f"bias [{out_features}]. Copy the projector and config.json from the same export.",
            value=str(found),
        )
    logger.info("loaded mimic projector %d -> %d from %s with numpy", in_features, out_features, folder)
    return LinearProjector(weight=weight.astype(np.float32), bias=bias.astype(np.float32))


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError as error:
        raise ModelError(
            f"teacher-space output of the onnx runtime needs the safetensors package to read {path.name} ({error}). "
            "Install it with `pip install safetensors`."
        ) from error
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ModelError(f"cannot read {path} as safetensors ({error}). Copy the projector from the export again.") from error
