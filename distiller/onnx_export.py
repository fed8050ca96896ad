"""ONNX export of an exported student, checked against torch with onnxruntime before it is put in place.

The ONNX graph takes ``pixels``, a (batch, 3, S, S) float32 tensor normalised as the checkpoint's
config.json states (S is its ``input_size``, 224), and returns ``embedding``, the (batch, D) student
embedding. Where the export has a mimic projector, the graph also returns ``teacher_embedding``, the
(batch, teacher_dim) projection into the teacher's space. The batch axis is dynamic and the image size is
fixed. The file's metadata (``metadata_props``) records the student, the teacher, its licence and the
sha256 of the weights it came from, so the licence travels with the file.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.checkpoint import load_mimic_projector, load_student
from shared.checkpoint_format import ONNX_EMBEDDING_OUTPUT, ONNX_FORMAT, ONNX_FORMAT_KEY, ONNX_INPUT, ONNX_TEACHER_OUTPUT
from shared.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# torch's scaled_dot_product_attention, which timm's attention layers call, exports from opset 14 on.
MIN_OPSET = 14
_OPSET_FIX = f"Try another --opset: the default is {DEFAULT_OPSET}, and any from {MIN_OPSET} to the newest your onnxruntime supports may work."
INPUT_NAME = ONNX_INPUT
EMBEDDING_OUTPUT = ONNX_EMBEDDING_OUTPUT
TEACHER_OUTPUT = ONNX_TEACHER_OUTPUT
# The largest |onnxruntime - torch| accepted, relative to max(1, the largest |torch output|). The UNITE
# student measured 1.5e-6 against outputs up to 3.7 (torch 2.14.1, onnxruntime 1.32.0, CPU).
RELATIVE_TOLERANCE = 1e-4
_EXPORT_BATCH = 2
_CHECK_BATCH = 3


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX file written by :func:`export_onnx`, with the largest difference to torch of each output."""

    path: Path
    opset: int
    output_dims: dict[str, int]
    max_abs_diff: dict[str, float]

    def summary(self) -> str:
        """Return one line naming the file, its outputs and their differences to torch."""
        outputs = ", ".join(
            f"{name} ({dim}-d, max abs difference to torch {self.max_abs_diff[name]:.2e})" for name, dim in self.output_dims.items()
        )
        return f"wrote {self.path} (opset {self.opset}): {outputs}"


class _OnnxStudent(nn.Module):
    """The student's embedding and, with a projector, its teacher-space projection, as one traceable module."""

    def __init__(self, student: nn.Module, projector: nn.Linear | None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        embedding = self.student.forward_head(self.student.forward_features(pixels), pre_logits=True)
        if self.projector is None:
            return embedding
        return embedding, self.projector(embedding)


def export_onnx(checkpoint_dir: Path, out_path: Path, *, opset: int = DEFAULT_OPSET) -> OnnxExport:
    """Write the student exported in ``checkpoint_dir`` to the ONNX file ``out_path`` and check it with onnxruntime.

    The graph is written to a temporary file beside ``out_path`` and checked on a seeded random batch of
    another size than the traced one, so the dynamic batch axis is exercised. Only a graph whose outputs
    match torch within :data:`RELATIVE_TOLERANCE` replaces ``out_path``. Raises :class:`ConfigError` for
    an invalid ``opset`` or ``out_path``, and :class:`ModelError` when the checkpoint cannot be loaded,
    onnx or onnxruntime is missing, the export fails, or the outputs differ.
    """
    onnx, onnxruntime = _import_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(
            f"ONNX opset is {opset!r}, expected an integer >= {MIN_OPSET} (attention exports from opset 14). "
            f"Pass --opset {DEFAULT_OPSET}.",
            value=opset,
            limit=MIN_OPSET,
        )
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ConfigError(
            f"ONNX output {out_path} is a folder, expected a file path such as {out_path / 'student.onnx'}.", value=str(out_path)
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)

    loaded = load_student(checkpoint_dir)
    projector = load_mimic_projector(checkpoint_dir)
    module = _OnnxStudent(loaded.model, projector).eval()
    outputs = [EMBEDDING_OUTPUT] if projector is None else [EMBEDDING_OUTPUT, TEACHER_OUTPUT]
    size = int(loaded.config.get("input_size", 224))

    partial = out_path.with_name(f".{out_path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _trace(module, partial, outputs=outputs, size=size, opset=opset)
        _write_metadata(onnx, partial, loaded.config, loaded.sha256)
        differences, dims = _compare_with_torch(onnxruntime, partial, module, outputs=outputs, size=size)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)

    export = OnnxExport(path=out_path, opset=opset, output_dims=dims, max_abs_diff=differences)
    logger.info("exported student %s from %s as ONNX: %s", loaded.name, checkpoint_dir, export.summary())
    return export


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ModelError(
            f"ONNX export needs the onnx and onnxruntime packages ({error}). Install them with `pip install onnx onnxruntime`."
        ) from error
    return onnx, onnxruntime


def _trace(module: nn.Module, path: Path, *, outputs: list[str], size: int, opset: int) -> None:
    dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    example = torch.zeros(_EXPORT_BATCH, 3, size, size)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo exporter, which needs the onnxscript
        # package as well. Tracer warnings about shape-dependent branches are checked by the comparison that
        # follows, which runs another batch size through the graph.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        except (RuntimeError, ValueError) as error:
            raise ModelError(
                f"torch.onnx.export failed for the student at opset {opset} ({error}). {_OPSET_FIX}",
                value=opset,
            ) from error


def _write_metadata(onnx, path: Path, config: dict, sha256: str) -> None:
    model = onnx.load(str(path))
    properties = {
        ONNX_FORMAT_KEY: ONNX_FORMAT,
        "unite.student": str(config.get("student") or config["architecture"]),
        "unite.teacher": str(config.get("teacher")),
        "unite.teacher_licence": str(config.get("teacher_licence")),
        "unite.weights_sha256": sha256,
        "unite.embed_dim": str(config["embed_dim"]),
        "unite.input_size": str(config.get("input_size")),
        "unite.mean": str(config.get("mean")),
        "unite.std": str(config.get("std")),
        "unite.target_mpp": str(config.get("target_mpp")),
    }
    onnx.helper.set_model_props(model, properties)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"the exported ONNX graph is invalid ({error}). {_OPSET_FIX}") from error
    onnx.save(model, str(path))


def _compare_with_torch(
    onnxruntime, path: Path, module: nn.Module, *, outputs: list[str], size: int
) -> tuple[dict[str, float], dict[str, int]]:
    pixels = torch.randn(_CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(pixels)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)

    # onnxruntime's errors derive from Exception only, so they are caught by the module that defines them.
    state = onnxruntime.capi.onnxruntime_pybind11_state
    runtime_errors = (state.Fail, state.InvalidArgument, state.InvalidGraph, state.NotImplemented, state.RuntimeException)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        actual = session.run(outputs, {INPUT_NAME: pixels.numpy()})
    except runtime_errors as error:
        raise ModelError(
            f"onnxruntime {onnxruntime.__version__} cannot run the exported graph ({error}). {_OPSET_FIX}"
        ) from error

    differences, dims = {}, {}
    for name, reference, result in zip(outputs, expected, actual):
        reference = reference.numpy()
        if result.shape != reference.shape:
            raise ModelError(
                f"ONNX output {name} has shape {result.shape} for a batch of {_CHECK_BATCH}, expected {reference.shape} as torch "
                "returns. The batch axis was not exported as dynamic; export again.",
                value=list(result.shape),
                limit=list(reference.shape),
            )
        difference = float(np.abs(result - reference).max())
        tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference).max()))
        if not difference <= tolerance:
            raise ModelError(
                f"ONNX output {name} differs from torch by up to {difference:.3g}, expected at most {tolerance:.3g}. "
                f"{_OPSET_FIX}",
                value=difference,
                limit=tolerance,
            )
        differences[name] = difference
        dims[name] = int(reference.shape[1])
    return differences, dims
