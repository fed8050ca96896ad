"""A teacher from any ONNX embedding model, run by onnxruntime, with the embedding read from a named output.

The model takes one channel-first float input, (B, 3, S, S), and returns the embeddings as one of its
outputs, (B, D). Its preprocessing is configured (ONNX files carry none): input size, resize size,
interpolation, mean and std, with ImageNet's mean and std and no crop by default. A model exported
with a fixed batch size is run at that size, the last batch padded with copies of its last tile.
The graph runs in the precision it was exported in, since onnxruntime does no autocast.

Identity: ``onnx:<file name>@sha256:<16 hex of the file>:<output name>/<preprocessing>``, for example
``onnx:encoder.onnx@sha256:0123456789abcdef:embedding/resize224-crop224-bicubic-mean0.485,0.456,0.406-std0.229,0.224,0.225``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError, ModelError, TeacherError
from shared.imaging import IMAGENET_MEAN, IMAGENET_STD
from shared.onnx_graph import count_onnx_parameters
from teacher_gateway.teachers.options import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    check_device,
    resolve_licence,
    setting,
)
from teacher_gateway.teachers.preprocessing import TilePreprocessing, check_tiles
from teacher_gateway.teachers.weights import find_weights

logger = logging.getLogger(__name__)

ONNX_SUFFIXES = (".onnx",)
DEFAULT_INPUT_SIZE = 224
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
# Exception classes of onnxruntime's C++ core, which derive from Exception and from nothing narrower.
_ORT_ERROR_NAMES = (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
    "NotImplemented", "RuntimeException", "EPFail", "ModelLoaded",
)


class OnnxTeacher:
    """An onnxruntime session behind the Teacher protocol. ``embed`` may be called from several threads.

    ``parameters`` counts the elements of the graph's initializers that the embedding output depends on,
    or is None when the onnx package cannot read the file.
    """

    def __init__(
        self,
        session: Any,
        *,
        identity: str,
        dim: int,
        licence: str,
        preprocessing: TilePreprocessing,
        input_name: str,
        output_name: str,
        input_dtype: type[np.floating],
        batch_size: int,
        fixed_batch: int | None,
        errors: tuple[type[BaseException], ...],
        details: dict[str, Any],
        parameters: int | None = None,
    ) -> None:
        self.name = "onnx"
        self.identity = identity
        self.dim = dim
        self.licence = licence
        self.parameters = parameters
        self.preprocessing = preprocessing
        self.input_name = input_name
        self.output_name = output_name
        self.batch_size = fixed_batch or batch_size
        self._session = session
        self._input_dtype = input_dtype
        self._fixed_batch = fixed_batch
        self._errors = errors
        self._details = details

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Embed (N, 224, 224, 3) uint8 RGB tiles into (N, dim) float32 vectors, ``batch_size`` tiles per run.

        Raises :class:`ImageError` for a tile array of another shape or dtype, and :class:`TeacherError`
        when onnxruntime fails or the output has another shape.
        """
        check_tiles(tiles, teacher=self.identity)
        if self._session is None:
            raise TeacherError(f"teacher {self.identity} is closed. Restart the gateway to embed tiles again.")
        embeddings = np.empty((len(tiles), self.dim), dtype=np.float32)
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size]
            embeddings[start : start + len(batch)] = self._run(batch)
        return embeddings

    def _run(self, batch: np.ndarray) -> np.ndarray:
        inputs = self.preprocessing.to_model_input(batch).astype(self._input_dtype, copy=False)
        if self._fixed_batch is not None and len(inputs) < self._fixed_batch:
            padding = np.repeat(inputs[-1:], self._fixed_batch - len(inputs), axis=0)
            inputs = np.concatenate([inputs, padding])
        try:
            (output,) = self._session.run([self.output_name], {self.input_name: inputs})
        except self._errors as error:
            raise TeacherError(
                f"teacher {self.identity}: onnxruntime failed on a batch of {len(batch)} tiles ({error}). "
                "Check that the model accepts this input size and dtype.",
                value=list(inputs.shape),
            ) from error

        output = np.asarray(output)[: len(batch)]
        if output.shape != (len(batch), self.dim):
            raise TeacherError(
                f"teacher {self.identity}: output {self.output_name!r} has shape {output.shape} for a batch of "
                f"{len(batch)} tiles, expected ({len(batch)}, {self.dim}).",
                value=list(output.shape),
                limit=[len(batch), self.dim],
            )
        return output.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        """Return the teacher's settings for ``/v1/models``: the file, input and output names, providers and preprocessing."""
        return {
            **self._details,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "batch_size": self.batch_size,
            "preprocessing": self.preprocessing.describe(),
        }

    def close(self) -> None:
        """Release the onnxruntime session. Afterwards :meth:`embed` raises TeacherError."""
        self._session = None
        logger.info("teacher %s closed", self.identity)


def build_onnx_teacher(
    *,
    weights: str | Path | None,
    output_name: str | None = None,
    input_name: str | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    input_size: int | None = None,
    resize_size: int | None = None,
    interpolation: str = "bicubic",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    licence: str | None = None,
) -> OnnxTeacher:
    """Open the ONNX model at ``weights`` with onnxruntime and return it as a teacher.

    ``output_name`` and ``input_name`` may be left out when the model has only one output or input.
    ``input_size`` defaults to the model's fixed spatial size, or 224 px when the size is dynamic.
    Raises :class:`ConfigError` for a missing file, an unknown input or output name (listing the
    model's names), sizes the model does not accept, or an unavailable device. Raises
    :class:`ModelError` for a file onnxruntime cannot load or an output that is not one embedding per tile.
    """
    label = "onnx"
    check_batch_size(batch_size, teacher=label)
    device = check_device(device, teacher=label)
    # NOTE: only the .onnx file is hashed. A model whose weights sit in external data files beside it
    # keeps its identity when those files change.
    weights_file = find_weights(weights, teacher=label, suffixes=ONNX_SUFFIXES)
    label = f"onnx:{weights_file.path.name}"
    ort = _import_onnxruntime()
    errors = _onnxruntime_errors(ort)

    session = _open_session(ort, weights_file.path, device, errors=errors, teacher=label)
    model_input = _pick(session.get_inputs(), input_name, kind="input", option="input_name", teacher=label)
    model_output = _pick(session.get_outputs(), output_name, kind="output", option="output_name", teacher=label)
    input_dtype, fixed_batch, fixed_size = _check_input(model_input, teacher=label)
    if input_size is not None and fixed_size is not None and input_size != fixed_size:
        raise ConfigError(
            f"teacher {label}: input size is set to {input_size} px, but input {model_input.name!r} has the fixed "
            f"shape {model_input.shape}. Set {setting('input_size')} to {fixed_size} or leave it unset.",
            value=input_size,
            limit=fixed_size,
        )
    preprocessing = TilePreprocessing.create(
        teacher=label,
        input_size=input_size or fixed_size or DEFAULT_INPUT_SIZE,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=tuple(IMAGENET_MEAN) if mean is None else mean,
        std=tuple(IMAGENET_STD) if std is None else std,
    )
    identity = f"{label}@sha256:{weights_file.short_hash}:{model_output.name}/{preprocessing.tag}"
    if fixed_batch is not None and fixed_batch != batch_size:
        logger.info("teacher %s: input %r has a fixed batch of %d, used in place of %d", identity, model_input.name, fixed_batch, batch_size)

    dim = _output_dim(
        session,
        model_input,
        model_output,
        input_size=preprocessing.input_size,
        input_dtype=input_dtype,
        fixed_batch=fixed_batch,
        errors=errors,
        teacher=identity,
    )
    teacher = OnnxTeacher(
        session,
        identity=identity,
        dim=dim,
        licence=resolve_licence(licence, teacher=identity),
        preprocessing=preprocessing,
        input_name=model_input.name,
        output_name=model_output.name,
        input_dtype=input_dtype,
        batch_size=batch_size,
        fixed_batch=fixed_batch,
        errors=errors,
        parameters=count_onnx_parameters(weights_file.path, model_output.name),
        details={
            "backend": "onnx",
            "weights": weights_file.path.name,
            "weights_sha256": weights_file.sha256,
            "providers": session.get_providers(),
            "onnxruntime": ort.__version__,
        },
    )
    logger.info(
        "teacher %s ready on %s: %d-d embeddings from output %r, batch size %d",
        identity,
        session.get_providers()[0],
        teacher.dim,
        model_output.name,
        teacher.batch_size,
    )
    return teacher


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ConfigError(
            f"the onnx teacher needs onnxruntime, which is not installed ({error}). Install it with "
            "`pip install onnxruntime`, or onnxruntime-gpu for CUDA.",
        ) from error
    return onnxruntime


def _onnxruntime_errors(ort: Any) -> tuple[type[BaseException], ...]:
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(getattr(state, name) for name in _ORT_ERROR_NAMES if hasattr(state, name))


def _open_session(ort: Any, path: Path, device: str, *, errors: tuple[type[BaseException], ...], teacher: str) -> Any:
    available = ort.get_available_providers()
    wants_cuda = device.startswith("cuda") or (device == "auto" and CUDA_PROVIDER in available)
    if device.startswith("cuda") and CUDA_PROVIDER not in available:
        raise ConfigError(
            f"teacher {teacher}: device is {device!r}, but onnxruntime {ort.__version__} offers only {available}. "
            f"Install onnxruntime-gpu in place of onnxruntime, or set {setting('device')} to cpu or auto.",
            value=device,
            limit=available,
        )
    providers: list[Any] = [CPU_PROVIDER]
    if wants_cuda:
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers = [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]

    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except errors as error:
        raise ModelError(
            f"teacher {teacher}: onnxruntime cannot load {path} ({error}). The file is damaged or not an ONNX "
            f"model. Export it again and point {setting('weights')} at it.",
            value=str(path),
        ) from error

    # onnxruntime falls back to the CPU, with only a log line, when the CUDA provider fails to start.
    if wants_cuda and CUDA_PROVIDER not in session.get_providers():
        if device != "auto":
            raise ConfigError(
                f"teacher {teacher}: onnxruntime could not start on {device}, so the session runs on "
                f"{session.get_providers()}. Check the CUDA and cuDNN libraries that onnxruntime-gpu needs, "
                f"or set {setting('device')} to cpu.",
                value=device,
            )
        logger.warning("teacher %s: the CUDA provider failed to start, so the model runs on the CPU", teacher)
    return session


def _pick(nodes: Sequence[Any], name: str | None, *, kind: str, option: str, teacher: str) -> Any:
    """Return the input or output called ``name``, or the only one when ``name`` is None."""
    names = [node.name for node in nodes]
    if name is None and len(nodes) == 1:
        return nodes[0]
    for node in nodes:
        if node.name == name:
            return node
    found = "is not set" if name is None else f"is {name!r}"
    raise ConfigError(
        f"teacher {teacher}: the {kind} name {found}, and the model has the {kind}s {names}. "
        f"Set {setting(option)} to the {kind} that {'holds the embeddings' if kind == 'output' else 'takes the tiles'}.",
        value=name,
        limit=names,
    )


def _check_input(model_input: Any, *, teacher: str) -> tuple[type[np.floating], int | None, int | None]:
    """Return the input's numpy dtype, its fixed batch size and its fixed square size (None when dynamic)."""
    input_dtype = _INPUT_DTYPES.get(model_input.type)
    if input_dtype is None:
        raise ConfigError(
            f"teacher {teacher}: input {model_input.name!r} has type {model_input.type}, expected one of "
            f"{', '.join(_INPUT_DTYPES)}. Export the model with a float image input.",
            value=model_input.type,
            limit=list(_INPUT_DTYPES),
        )
    shape = list(model_input.shape)
    fixed = [dim if isinstance(dim, int) and dim > 0 else None for dim in shape]
    if len(shape) != 4 or fixed[1] not in (3, None) or fixed[2] != fixed[3]:
        raise ConfigError(
            f"teacher {teacher}: input {model_input.name!r} has shape {shape}, expected (batch, 3, size, size): "
            "channel-first RGB images. Export the model with such an input.",
            value=shape,
        )
    return input_dtype, fixed[0], fixed[2]


def _output_dim(
    session: Any,
    model_input: Any,
    model_output: Any,
    *,
    input_size: int,
    input_dtype: type[np.floating],
    fixed_batch: int | None,
    errors: tuple[type[BaseException], ...],
    teacher: str,
) -> int:
    """Return the embedding width: from the output's shape, or from one run on a blank batch when it is dynamic."""
    shape = list(model_output.shape)
    if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return shape[1]

    blank = np.zeros((fixed_batch or 1, 3, input_size, input_size), dtype=input_dtype)
    try:
        (output,) = session.run([model_output.name], {model_input.name: blank})
    except errors as error:
        raise ModelError(
            f"teacher {teacher}: onnxruntime failed on a blank batch of shape {list(blank.shape)} ({error}). "
            f"Check {setting('input_size')} against the size the model was exported for.",
            value=list(blank.shape),
        ) from error
    if np.ndim(output) != 2 or np.shape(output)[0] != len(blank):
        raise ModelError(
            f"teacher {teacher}: output {model_output.name!r} has shape {list(np.shape(output))} for a batch of "
            f"{len(blank)} tiles (declared {shape}), expected ({len(blank)}, D): one embedding per tile. Set "
            f"{setting('output_name')} to the pooled embedding output, or export the model with one.",
            value=list(np.shape(output)),
        )
    return int(np.shape(output)[1])
