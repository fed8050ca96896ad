"""The loaded student, shared by every request of one server process.

A server may start before ``unite distill`` has exported a checkpoint (docker compose starts both at
once). It then stays alive but not ready, and tries to load the checkpoint again on a readiness probe
or a request, at most once per ``reload_interval_s``, so it becomes ready once the export appears.

An export with a mimic projector also gets teacher-space output: ``embed(tiles, teacher_space=True)``
returns the projector's output for the student's embeddings, 1536-d for a UNI2-h teacher.

Why no student is loaded is kept twice: ``reason`` names the checkpoint folder and the loader's error
for the log, and ``public_reason`` names only the setting to change, because it goes to HTTP clients.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from shared.checkpoint import CHECKPOINT_WEIGHTS, LoadedStudent, load_mimic_projector, load_student
from shared.errors import ModelError
from shared.models.inference import embed_tiles
from student_server.settings import StudentSettings

logger = logging.getLogger(__name__)


class StudentModel:
    """The student of one server: loaded once, reloaded while missing, and called under a lock.

    The lock is held for one batch at a time, so concurrent requests take turns batch by batch instead
    of oversubscribing the CPU cores with several forward passes at once.
    """

    def __init__(self, settings: StudentSettings) -> None:
        self.settings = settings
        self.loaded: LoadedStudent | None = None
        self.mimic_projector: torch.nn.Linear | None = None
        self.reason = "the student checkpoint has not been loaded yet"
        self.public_reason = self.reason
        self._load_lock = threading.Lock()
        self._inference_lock = threading.Lock()
        self._last_attempt: float | None = None

    def ensure_loaded(self) -> LoadedStudent | None:
        """Return the loaded student, first trying to load it if it is missing and the retry interval has passed."""
        if self.loaded is not None:
            return self.loaded
        with self._load_lock:
            due = self._last_attempt is None or time.monotonic() - self._last_attempt >= self.settings.reload_interval_s
            if self.loaded is None and due:
                self._try_load()
        return self.loaded

    @property
    def teacher_dim(self) -> int | None:
        """Width of the teacher-space output, or None when the loaded export has no mimic projector."""
        return None if self.mimic_projector is None else self.mimic_projector.out_features

    def embed(self, tiles: np.ndarray, *, teacher_space: bool = False) -> np.ndarray:
        """Embed (N, H, W, 3) uint8 tiles with the loaded student and return (N, D) float32 embeddings.

        With ``teacher_space``, D is the teacher's dimension: the student's embeddings go through the
        export's mimic projector, which must exist.
        """
        student = self.loaded
        if student is None:
            raise ModelError(f"cannot embed: {self.reason}")
        projector = self.mimic_projector
        if teacher_space and projector is None:
            raise ModelError(
                f"cannot embed in the teacher's space: the student {student.name} was exported without a mimic projector "
                "(trained with the 'unite' loss, or exported before projectors were). Request the student's own embeddings, "
                "or export a student trained with a mimic loss.",
                value=student.name,
            )
        batch_size = self.settings.batch_size
        if len(tiles) == 0:
            dim = projector.out_features if teacher_space else student.embed_dim
            return np.zeros((0, dim), dtype=np.float32)

        parts = []
        for start in range(0, len(tiles), batch_size):
            with self._inference_lock:
                batch = tiles[start : start + batch_size]
                embeddings = embed_tiles(student.model, batch, batch_size=batch_size, device=self.settings.device)
                if teacher_space:
                    embeddings = self._project(projector, embeddings)
            parts.append(embeddings)
        return np.concatenate(parts, axis=0)

    def _project(self, projector: torch.nn.Linear, embeddings: np.ndarray) -> np.ndarray:
        # In float32: the projector is one small matrix product, and the output is compared with the teacher's.
        with torch.inference_mode():
            projected = projector(torch.from_numpy(embeddings).to(self.settings.device))
        return projected.float().cpu().numpy()

    def _try_load(self) -> None:
        self._last_attempt = time.monotonic()
        folder = self.settings.checkpoint_dir
        if not (folder / CHECKPOINT_WEIGHTS).is_file():
            self._set_reason(
                f"no student checkpoint at {folder}: run `unite distill` to export one, "
                "or set UNITE_STUDENT_CHECKPOINT_DIR to an exported student folder",
                public_reason=(
                    f"no student checkpoint is loaded: the configured checkpoint folder has no {CHECKPOINT_WEIGHTS}. "
                    "Run `unite distill` to export a student, or set UNITE_STUDENT_CHECKPOINT_DIR to an exported student folder"
                ),
            )
            return
        try:
            loaded = load_student(folder, device=self.settings.device)
            self.mimic_projector = load_mimic_projector(folder, device=self.settings.device)
            self.loaded = loaded
        except ModelError as error:
            self._set_reason(
                f"cannot load the student checkpoint at {folder}: {error.message}",
                public_reason=(
                    "the student checkpoint in the configured folder (setting UNITE_STUDENT_CHECKPOINT_DIR) cannot be "
                    "loaded, and the server log has the cause. Export the student again with `unite distill`"
                ),
                level=logging.ERROR,
            )
            return
        except (RuntimeError, AssertionError) as error:
            # torch raises these when the configured device does not exist, for example CUDA on a CPU-only build.
            self._set_reason(
                f"cannot load the student checkpoint at {folder} onto device {self.settings.device!r} ({error}). "
                "Set UNITE_STUDENT_DEVICE to an available device such as 'cpu'",
                public_reason=(
                    f"the student checkpoint cannot be loaded onto device {self.settings.device!r} (setting "
                    "UNITE_STUDENT_DEVICE), and the server log has the cause. Set UNITE_STUDENT_DEVICE to an "
                    "available device such as 'cpu'"
                ),
                level=logging.ERROR,
            )
            return
        self.reason = ""
        self.public_reason = ""
        logger.info(
            "serving student %s (checkpoint sha256 %s) on %s, teacher-space output %s",
            self.loaded.name,
            self.loaded.sha256,
            self.settings.device,
            "none" if self.teacher_dim is None else f"{self.teacher_dim}-d",
        )

    def _set_reason(self, reason: str, *, public_reason: str, level: int = logging.WARNING) -> None:
        # Probes retry every few seconds; log a reason only when it changes.
        if reason != self.reason:
            logger.log(level, "student server not ready: %s", reason)
        self.reason = reason
        self.public_reason = public_reason
