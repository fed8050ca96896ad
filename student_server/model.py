"""The served student, shared by every request of one server process, and replaced when a new one is published.

A server may start before ``unite distill`` has exported a checkpoint (docker compose starts both at
once). It then stays alive but not ready, and becomes ready once the export appears.

Every ``reload_interval_s`` the app calls :meth:`StudentModel.check_for_update`. It resolves the
checkpoint folder with :func:`shared.publish.resolve_checkpoint_dir` (so a publish root's ``current``
link is followed) and compares the export's folder, weights mtime and size with the served one. A
changed export is loaded fully off to the side and then swapped in with one assignment, so a batch
that took :meth:`snapshot` before the swap finishes with the old weights. A failed load keeps the old
student served and is logged once per export. While a student is served, so does a new export folder
without the runtime's weights file (model.onnx or model.safetensors), logged once per folder. Both count
as failed reloads.

An export with a mimic projector also gets teacher-space output: the projector maps the student's
embeddings to the teacher's space, 1536-d for a UNI2-h teacher.

The setting ``runtime`` picks how the student runs. ``torch`` (:mod:`student_server.torch_runtime`)
loads model.safetensors. ``onnx`` (:mod:`student_server.onnx_runtime`) runs model.onnx with onnxruntime,
and this module then never imports torch, because the torch runtime is imported only when it is chosen.
:func:`embed_with` and :func:`project` pick the runtime by the type of the student and projector, so a
snapshot always runs on the runtime that loaded it.

Why no student is loaded is kept twice: ``reason`` names the checkpoint folder and the loader's error
for the log, and ``public_reason`` names only the setting to change, because it goes to HTTP clients.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from shared.errors import ModelError, NotReadyError
from shared.publish import CURRENT_LINK, resolve_checkpoint_dir
from student_server.errors import TeacherSpaceUnavailable
from student_server.metrics import StudentMetrics
from student_server.onnx_runtime import ONNX_WEIGHTS, LinearProjector, OnnxStudent, embed_onnx, load_onnx_export
from student_server.settings import StudentSettings

if TYPE_CHECKING:
    import torch

    from shared.checkpoint import LoadedStudent

logger = logging.getLogger(__name__)


class Student(Protocol):
    """A loaded student of either runtime, ``LoadedStudent`` (torch) or :class:`OnnxStudent`, as the server reads it."""

    name: str
    sha256: str
    config: dict[str, Any]
    folder: Path
    embed_dim: int


@dataclass(frozen=True)
class ExportIdentity:
    """Identity of an export without hashing its weights: the resolved folder and the weights' mtime and size."""

    folder: Path
    mtime_ns: int
    size: int


@dataclass(frozen=True)
class ServedStudent:
    """A loaded student with its projector and the identity of the export they came from."""

    student: LoadedStudent | OnnxStudent
    projector: torch.nn.Linear | LinearProjector | None
    identity: ExportIdentity


class StudentModel:
    """The served student: loaded when it appears, replaced when a new export is published.

    ``embed`` calls the model directly under a lock, one batch at a time. The server's
    :class:`student_server.engine.Engine` batches requests instead and calls :func:`embed_with` on a
    :meth:`snapshot`.
    """

    def __init__(self, settings: StudentSettings, *, metrics: StudentMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.reason = "the student checkpoint has not been loaded yet"
        self.public_reason = self.reason
        self._served: ServedStudent | None = None
        self._failed: ExportIdentity | None = None
        # The folder last found without its weights file while a student was served, so it is logged once.
        self._missing: Path | None = None
        self._load_lock = threading.Lock()
        self._inference_lock = threading.Lock()
        self._last_attempt: float | None = None

    @property
    def loaded(self) -> Student | None:
        """The served student, or None before the first successful load."""
        served = self._served
        return None if served is None else served.student

    @property
    def mimic_projector(self) -> torch.nn.Linear | LinearProjector | None:
        """The served export's student-to-teacher projector, or None."""
        served = self._served
        return None if served is None else served.projector

    @property
    def teacher_dim(self) -> int | None:
        """Width of the teacher-space output, or None when the served export has no mimic projector."""
        projector = self.mimic_projector
        return None if projector is None else projector.out_features

    def snapshot(self) -> tuple[Student, torch.nn.Linear | LinearProjector | None]:
        """Return the served student and its projector as one consistent pair.

        Raises :class:`NotReadyError` (503) with the public reason when no student is loaded.
        """
        served = self._served
        if served is None:
            raise NotReadyError(f"the student server is not ready: {self.public_reason.rstrip('.')}.")
        return served.student, served.projector

    def ensure_loaded(self) -> Student | None:
        """Return the served student, first trying to load one if none is and the retry interval has passed."""
        if self._served is not None:
            return self._served.student
        due = self._last_attempt is None or time.monotonic() - self._last_attempt >= self.settings.reload_interval_s
        if due:
            self.check_for_update()
        return self.loaded

    def check_for_update(self) -> bool:
        """Load the export that the checkpoint folder names now, if it differs from the served one.

        Returns True when a new student was swapped in. A failed load leaves the served student (or none)
        in place, and the same export is not tried again until its weights change.
        """
        with self._load_lock:
            self._last_attempt = time.monotonic()
            folder = resolve_checkpoint_dir(self.settings.checkpoint_dir)
            weights = folder / weights_file(self.settings.runtime)
            try:
                stat = weights.stat()
            except OSError:
                self._record_missing(folder)
                return False
            self._missing = None
            identity = ExportIdentity(folder=folder, mtime_ns=stat.st_mtime_ns, size=stat.st_size)
            served = self._served
            if (served is not None and served.identity == identity) or identity == self._failed:
                return False
            return self._load(identity)

    def embed(self, tiles: np.ndarray, *, teacher_space: bool = False) -> np.ndarray:
        """Embed (N, H, W, 3) uint8 tiles with the served student and return (N, D) float32 embeddings.

        With ``teacher_space``, D is the teacher's dimension: the student's embeddings go through the
        export's mimic projector, which must exist. Every batch of one call uses the same checkpoint.
        """
        student, projector = self.snapshot()
        batch_size = self.settings.batch_size
        if len(tiles) == 0:
            check_teacher_space(student, projector, teacher_space)
            dim = projector.out_features if teacher_space and projector is not None else student.embed_dim
            return np.zeros((0, dim), dtype=np.float32)

        parts = []
        for start in range(0, len(tiles), batch_size):
            with self._inference_lock:
                parts.append(
                    embed_with(student, projector, tiles[start : start + batch_size], teacher_space=teacher_space, device=self.settings.device)
                )
        return np.concatenate(parts, axis=0)

    def _load(self, identity: ExportIdentity) -> bool:
        folder = identity.folder
        device = self.settings.device
        runtime = self.settings.runtime
        try:
            student, projector = load_export(folder, runtime=runtime, device=device)
        except ModelError as error:
            export_again = "Export the ONNX file again with `unite export-onnx`" if runtime == "onnx" else "Export the student again with `unite distill`"
            self._record_failure(
                identity,
                f"cannot load the student checkpoint at {folder} with the {runtime} runtime: {error.message}",
                public_reason=(
                    "the student checkpoint in the configured folder (setting UNITE_STUDENT_CHECKPOINT_DIR) cannot be "
                    f"loaded, and the server log has the cause. {export_again}"
                ),
            )
            return False
        except (RuntimeError, AssertionError) as error:
            # torch raises these when the configured device does not exist, for example CUDA on a CPU-only build,
            # and the onnx runtime raises RuntimeError when onnxruntime has no provider for the device.
            self._record_failure(
                identity,
                f"cannot load the student checkpoint at {folder} onto device {device!r} ({error}). "
                "Set UNITE_STUDENT_DEVICE to an available device such as 'cpu'",
                public_reason=(
                    f"the student checkpoint cannot be loaded onto device {device!r} (setting "
                    "UNITE_STUDENT_DEVICE), and the server log has the cause. Set UNITE_STUDENT_DEVICE to an "
                    "available device such as 'cpu'"
                ),
            )
            return False

        previous = self._served
        # One assignment: a batch uses either the old snapshot or the new one, never half of each.
        self._served = ServedStudent(student=student, projector=projector, identity=identity)
        self._failed = None
        self.reason = ""
        self.public_reason = ""
        if self.metrics is not None:
            self.metrics.reloads.labels("success").inc()
        logger.info(
            "serving student %s (checkpoint sha256 %s) from %s with the %s runtime on %s, teacher-space output %s%s",
            student.name,
            student.sha256,
            folder,
            runtime,
            device,
            "none" if projector is None else f"{projector.out_features}-d",
            "" if previous is None else f", replacing {previous.student.name} (sha256 {previous.student.sha256})",
        )
        return True

    def _record_failure(self, identity: ExportIdentity, reason: str, *, public_reason: str) -> None:
        self._failed = identity
        if self.metrics is not None:
            self.metrics.reloads.labels("failed").inc()
        if self._served is None:
            self._set_reason(reason, public_reason=public_reason, level=logging.ERROR)
        else:
            logger.error("%s; still serving %s (sha256 %s)", reason, self._served.student.name, self._served.student.sha256)

    def _record_missing(self, folder: Path) -> None:
        """Record that ``folder``, the export the checkpoint setting names now, has no weights file for the runtime.

        With no student served, the server stays not ready with a reason. With one served, it keeps serving it,
        and the missing file counts as one failed reload and one warning per folder, not one per check.
        """
        served = self._served
        if served is None:
            self._set_missing_reason()
            return
        if folder == self._missing:
            return
        self._missing = folder
        if self.metrics is not None:
            self.metrics.reloads.labels("failed").inc()
        runtime = self.settings.runtime
        logger.warning(
            "cannot reload the student from %s: it has no %s, which the %s runtime loads. Still serving %s (sha256 %s) from %s. To fix, %s",
            folder,
            weights_file(runtime),
            runtime,
            served.student.name,
            served.student.sha256,
            served.identity.folder,
            missing_weights_fix(runtime, folder, self.settings.checkpoint_dir),
        )

    def _set_missing_reason(self) -> None:
        folder = self.settings.checkpoint_dir
        weights = weights_file(self.settings.runtime)
        if self.settings.runtime == "onnx":
            export = f"run `unite export-onnx CHECKPOINT --out CHECKPOINT/{ONNX_WEIGHTS}` on a student that `unite distill` exported"
        else:
            export = "run `unite distill` to export a student"
        self._set_reason(
            f"no student checkpoint at {folder} ({weights} not found): {export}, "
            "or set UNITE_STUDENT_CHECKPOINT_DIR to an exported student folder or a publish root",
            public_reason=(
                f"no student checkpoint is loaded: the configured checkpoint folder has no {weights}. "
                f"To serve one, {export}, or set UNITE_STUDENT_CHECKPOINT_DIR to an exported student folder"
            ),
        )

    def _set_reason(self, reason: str, *, public_reason: str, level: int = logging.WARNING) -> None:
        # Probes retry every few seconds; log a reason only when it changes.
        if reason != self.reason:
            logger.log(level, "student server not ready: %s", reason)
        self.reason = reason
        self.public_reason = public_reason


def weights_file(runtime: str) -> str:
    """Return the name of the file that ``runtime`` loads and whose changes trigger a reload."""
    if runtime == "onnx":
        return ONNX_WEIGHTS
    from student_server.torch_runtime import WEIGHTS_FILE

    return WEIGHTS_FILE


def missing_weights_fix(runtime: str, folder: Path, checkpoint_dir: Path) -> str:
    """Return the commands that give the export in ``folder`` the weights file that ``runtime`` loads.

    ``checkpoint_dir`` is the configured folder: a publish root, its ``current`` link, or an export folder.
    """
    if runtime == "onnx":
        return (
            f"run `unite export-onnx {folder} --out {folder / ONNX_WEIGHTS}`, and run `unite distill-worker` with --onnx "
            f"so that every student it publishes includes {ONNX_WEIGHTS}"
        )
    root = publish_root(checkpoint_dir)
    if root is None:
        return f"export the student into {folder} again with `unite distill`"
    return (
        f"publish a complete export with `unite publish add EXPORT_DIR {root}`, or point current back at a "
        f"complete version with `unite publish rollback {root}`"
    )


def publish_root(checkpoint_dir: Path) -> Path | None:
    """Return the publish root that the configured ``checkpoint_dir`` names, or None for a plain export folder."""
    if (checkpoint_dir / CURRENT_LINK).is_symlink():
        return checkpoint_dir
    if checkpoint_dir.name == CURRENT_LINK and checkpoint_dir.is_symlink():
        return checkpoint_dir.parent
    return None


def load_export(folder: Path, *, runtime: str, device: str) -> tuple[Student, torch.nn.Linear | LinearProjector | None]:
    """Load the student in ``folder`` and its mimic projector (or None) with ``runtime`` onto ``device``."""
    if runtime == "onnx":
        return load_onnx_export(folder, device=device)
    from student_server.torch_runtime import load_torch_export

    return load_torch_export(folder, device=device)


def check_teacher_space(student: Student, projector: torch.nn.Linear | LinearProjector | None, teacher_space: bool) -> None:
    """Raise :class:`TeacherSpaceUnavailable` (422) when teacher-space output is requested from an export without a projector."""
    if teacher_space and projector is None:
        raise TeacherSpaceUnavailable(
            f"cannot embed in the teacher's space: the student {student.name} was exported without a mimic projector "
            "(trained with the 'unite' loss, or exported before projectors were). Request the student's own embeddings, "
            "or export a student trained with a mimic loss.",
            value=student.name,
        )


def parameter_count(student: Student, projector: torch.nn.Linear | LinearProjector | None = None) -> int | None:
    """Count the weights of ``student``, plus those of ``projector`` when one is given for teacher-space output.

    Returns None when the ONNX runtime cannot read its graph (see :attr:`OnnxStudent.parameters`).
    """
    if isinstance(student, OnnxStudent):
        count = student.parameters
    else:
        count = sum(parameter.numel() for parameter in student.model.parameters())
    if count is None or projector is None:
        return count
    if isinstance(projector, LinearProjector):
        return count + projector.weight.size + projector.bias.size
    return count + sum(parameter.numel() for parameter in projector.parameters())


def embed_with(
    student: Student, projector: torch.nn.Linear | LinearProjector | None, tiles: np.ndarray, *, teacher_space: bool, device: str
) -> np.ndarray:
    """Embed one batch with ``student`` (and ``projector`` for teacher-space output) as (N, D) float32."""
    check_teacher_space(student, projector, teacher_space)
    if isinstance(student, OnnxStudent):
        embeddings = embed_onnx(student, tiles)
    else:
        from student_server.torch_runtime import embed_torch

        embeddings = embed_torch(student, tiles, device=device)
    if teacher_space:
        embeddings = project(projector, embeddings, device=device)
    return embeddings


def project(projector: torch.nn.Linear | LinearProjector, embeddings: np.ndarray, *, device: str) -> np.ndarray:
    """Map student embeddings to the teacher's space with the mimic projector, in float32."""
    if isinstance(projector, LinearProjector):
        return projector(embeddings)
    from student_server.torch_runtime import project_torch

    return project_torch(projector, embeddings, device=device)

