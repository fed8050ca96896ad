"""Distillation losses from teacher embeddings: the original UNITE loss, feature mimicry, and mimicry plus InfoNCE.

Every loss is a :class:`DistillLoss`: ``loss(student_embedding, teacher_embedding)`` takes a (B,
student_dim) and a (B, teacher_dim) batch whose rows i form a positive pair, and returns the scalar loss
and a dict of detached tensors to log. Each computes in float32 with autocast disabled, because bf16
loses the small differences between cosines that a low temperature magnifies. ``build_loss`` selects one
by name:

- ``unite``: the original. The teacher is projected down into the student's space and matched by
  symmetric InfoNCE at a fixed temperature of 0.07. The projector is not exported.
- ``mimic``: a linear projector maps the student into the teacher's space and matches each teacher
  embedding by cosine or smooth-L1. The projector is exported, so a server can return teacher-space output.
- ``mimic+infonce`` (the default): the mimic term plus symmetric InfoNCE in the teacher's space with a
  learnable temperature.

Projecting the student up makes the student reproduce the teacher's geometry, while projecting the
teacher down lets the target drift with the projector.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ConfigError, ModelError

UNITE_TEMPERATURE = 0.07
LOSSES = ("unite", "mimic", "mimic+infonce")
DEFAULT_LOSS = "mimic+infonce"
MIMIC_KINDS = ("cosine", "smooth_l1")
# Bounds of a learnable temperature. Below 0.01 the logits of cosines exceed 100 and the softmax saturates,
# which is where CLIP clamps its logit scale. Above 1 the loss barely separates positives from negatives.
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 1.0
SMOOTH_L1_BETA = 1.0


def symmetric_info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float | torch.Tensor = UNITE_TEMPERATURE) -> torch.Tensor:
    """Return the symmetric InfoNCE loss of two (B, D) batches whose row i of each side forms a positive pair.

    Both sides are L2-normalised here, so ``logits = s @ t.T / temperature`` contains cosine similarities
    scaled by ``1 / temperature``, and the loss is the mean of the cross entropy of each row (student to
    teacher) and of each column (teacher to student) against the diagonal. Every other tile of the batch
    is a negative, so B - 1 negatives per anchor. The B x B logit matrix costs O(B^2) memory (4 MiB in
    float32 at B = 1024), small next to the student's activations. Computed in float32 even under autocast.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        student = F.normalize(student.float(), dim=-1)
        teacher = F.normalize(teacher.float(), dim=-1)
        logits = student @ teacher.T / temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def mimic_loss(projected: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Return the mean mimicry loss of projected student embeddings against (B, D) teacher embeddings.

    ``cosine``: ``mean_i (1 - cos(p_i, t_i))``, in [0, 2]. It matches directions only, so the projection's
    norm is free. ``smooth_l1``: the mean over all B x D elements of Huber's loss with ``beta = 1`` on
    ``p_i - t_i``, which matches the raw teacher embedding, norm included.
    """
    with torch.autocast(device_type=projected.device.type, enabled=False):
        projected, teacher = projected.float(), teacher.float()
        if kind == "cosine":
            return (1.0 - F.cosine_similarity(projected, teacher, dim=-1)).mean()
        if kind == "smooth_l1":
            return F.smooth_l1_loss(projected, teacher, beta=SMOOTH_L1_BETA)
    raise ConfigError(f"mimic is {kind!r}, expected one of {list(MIMIC_KINDS)}.", value=kind, limit=list(MIMIC_KINDS))


def check_mimic_kind(kind: str) -> str:
    """Return ``kind`` if it is one of :data:`MIMIC_KINDS`, and raise :class:`ConfigError` otherwise."""
    if kind not in MIMIC_KINDS:
        raise ConfigError(
            f"mimic is {kind!r}, expected one of {list(MIMIC_KINDS)}. Pass --mimic with one of them.", value=kind, limit=list(MIMIC_KINDS)
        )
    return kind


class DistillLoss(nn.Module):
    """Base of the distillation losses: shape checks, the temperature and the record an export keeps.

    ``mimic_projector`` is the nn.Linear from the student's space into the teacher's, or None where
    the loss has none. The temperature is fixed (a buffer) or learnable. A learnable temperature is
    stored as ``log_temperature``, so every step keeps it positive and changes it by a factor rather
    than by a fixed amount. It is clamped to [TEMPERATURE_MIN, TEMPERATURE_MAX] when used.
    """

    name = ""

    def __init__(self, *, student_dim: int, teacher_dim: int, temperature: float | None, learnable_temperature: bool) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.learnable_temperature = learnable_temperature
        self.mimic_projector: nn.Linear | None = None
        if temperature is None:
            self.log_temperature = None
        elif learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            # Not persistent: a fixed temperature is a setting, not trained state, so checkpoints need not store it.
            self.register_buffer("log_temperature", torch.tensor(math.log(temperature)), persistent=False)

    @property
    def temperature(self) -> torch.Tensor | None:
        """Temperature of the InfoNCE term as a scalar tensor, or None for a loss without one."""
        if self.log_temperature is None:
            return None
        if not self.learnable_temperature:
            return self.log_temperature.exp()
        return self.log_temperature.clamp(math.log(TEMPERATURE_MIN), math.log(TEMPERATURE_MAX)).exp()

    def summary(self) -> dict[str, Any]:
        """Return the JSON-serialisable record of this loss that an export's config.json keeps."""
        projector = self.mimic_projector
        temperature = self.temperature
        if projector is not None:
            projector = {"in_features": projector.in_features, "out_features": projector.out_features}
        return {
            "name": self.name,
            "mimic": getattr(self, "mimic", None),
            "temperature": None if temperature is None else round(float(temperature.detach()), 6),
            "learnable_temperature": self.learnable_temperature,
            "mimic_projector": projector,
        }

    def _check_shapes(self, student: torch.Tensor, teacher: torch.Tensor, *, min_batch: int) -> None:
        expected = f"(B, {self.student_dim}) and (B, {self.teacher_dim}) with B >= {min_batch}"
        valid = (
            student.ndim == 2
            and teacher.ndim == 2
            and student.shape == (student.shape[0], self.student_dim)
            and teacher.shape == (student.shape[0], self.teacher_dim)
            and student.shape[0] >= min_batch
        )
        if not valid:
            raise ModelError(
                f"{self.name} loss received student embeddings of shape {tuple(student.shape)} and teacher embeddings of "
                f"shape {tuple(teacher.shape)}, expected {expected}. Build the loss with the student's embedding "
                f"dimension and the shards' teacher dimension{', and batch at least 2 tiles' if min_batch > 1 else ''}.",
                value=[list(student.shape), list(teacher.shape)],
                limit=expected,
            )


class UniteDistillationLoss(DistillLoss):
    """The original UNITE loss: the teacher projected down into the student's space, then symmetric InfoNCE.

    For a batch of B tiles with student embeddings ``s_i`` (384-d) and teacher embeddings ``t_i``
    (1536-d for UNI2-h)::

        u_i = s_i / ||s_i||,   v_i = q(t_i) / ||q(t_i)||,   q(t) = LayerNorm(W t + b)
        L = -1/(2B) * sum_i [ log softmax_j(u_i . v_j / tau)_i + log softmax_j(v_i . u_j / tau)_i ]

    ``tau = 0.07`` (fixed unless ``learnable_temperature``) turns cosines in [-1, 1] into logits in
    [-14.3, 14.3]. A lower value sharpens the softmax, so hard negatives dominate the gradient. The log
    of the batch size is the loss of a student that cannot tell tiles apart. The projector ``q`` learns
    with the student and is not exported, so this loss has no ``mimic_projector``.
    """

    name = "unite"

    def __init__(
        self, teacher_dim: int, student_dim: int, temperature: float = UNITE_TEMPERATURE, *, learnable_temperature: bool = False
    ) -> None:
        super().__init__(
            student_dim=student_dim, teacher_dim=teacher_dim, temperature=temperature, learnable_temperature=learnable_temperature
        )
        self.projector = nn.Sequential(nn.Linear(teacher_dim, student_dim), nn.LayerNorm(student_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss of (B, student_dim) student and (B, teacher_dim) teacher embeddings, and what to log."""
        self._check_shapes(student, teacher, min_batch=2)
        with torch.autocast(device_type=student.device.type, enabled=False):
            target = self.projector(teacher.float())
            temperature = self.temperature
            infonce = symmetric_info_nce(student, target, temperature)
            cosine = F.cosine_similarity(student.float(), target, dim=-1).mean()
        return infonce, {"infonce": infonce.detach(), "temperature": temperature.detach(), "positive_cosine": cosine.detach()}


class MimicLoss(DistillLoss):
    """Feature mimicry: a linear projector from the student's space into the teacher's, matched per tile.

    With ``p(s) = W s + b`` (W of shape teacher_dim x student_dim)::

        cosine:     L = 1/B * sum_i (1 - cos(p(s_i), t_i))
        smooth_l1:  L = 1/(B D) * sum_i sum_d huber_1(p(s_i)_d - t_i,d)

    No other tile enters a tile's loss, so the loss does not depend on the batch size. The projector is
    exported beside the student, and ``p(student(x))`` is the student's estimate of the teacher's embedding.
    """

    name = "mimic"

    def __init__(self, student_dim: int, teacher_dim: int, mimic: str = "cosine") -> None:
        super().__init__(student_dim=student_dim, teacher_dim=teacher_dim, temperature=None, learnable_temperature=False)
        self.mimic = check_mimic_kind(mimic)
        self.mimic_projector = nn.Linear(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss of (B, student_dim) student and (B, teacher_dim) teacher embeddings, and what to log."""
        self._check_shapes(student, teacher, min_batch=1)
        with torch.autocast(device_type=student.device.type, enabled=False):
            projected = self.mimic_projector(student.float())
            loss = mimic_loss(projected, teacher, self.mimic)
            cosine = F.cosine_similarity(projected, teacher.float(), dim=-1).mean()
        return loss, {"mimic": loss.detach(), "positive_cosine": cosine.detach()}


class MimicInfoNCELoss(DistillLoss):
    """Mimicry plus symmetric InfoNCE in the teacher's space, with a learnable temperature.

    With the projector ``p`` and the mimic term of :class:`MimicLoss`::

        L = L_mimic(p(s), t) + L_infonce(p(s), t; tau)

    where ``L_infonce`` is the symmetric InfoNCE of :func:`symmetric_info_nce` between the projected
    student and the raw teacher embeddings, and ``tau = exp(clamp(log_tau, log 0.01, log 1))`` starts at
    ``temperature`` and learns with the student unless ``learnable_temperature`` is False. The mimic term
    pins each tile to its teacher embedding, and the contrastive term keeps the other tiles of the batch
    apart, which the per-tile term alone does not ask for.
    """

    name = "mimic+infonce"

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        mimic: str = "cosine",
        temperature: float = UNITE_TEMPERATURE,
        *,
        learnable_temperature: bool = True,
    ) -> None:
        super().__init__(
            student_dim=student_dim, teacher_dim=teacher_dim, temperature=temperature, learnable_temperature=learnable_temperature
        )
        self.mimic = check_mimic_kind(mimic)
        self.mimic_projector = nn.Linear(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss of (B, student_dim) student and (B, teacher_dim) teacher embeddings, and what to log."""
        self._check_shapes(student, teacher, min_batch=2)
        with torch.autocast(device_type=student.device.type, enabled=False):
            projected = self.mimic_projector(student.float())
            mimic = mimic_loss(projected, teacher, self.mimic)
            temperature = self.temperature
            infonce = symmetric_info_nce(projected, teacher, temperature)
            cosine = F.cosine_similarity(projected, teacher.float(), dim=-1).mean()
        logs = {
            "mimic": mimic.detach(),
            "infonce": infonce.detach(),
            "temperature": temperature.detach(),
            "positive_cosine": cosine.detach(),
        }
        return mimic + infonce, logs


def build_loss(
    name: str = DEFAULT_LOSS,
    *,
    student_dim: int,
    teacher_dim: int,
    mimic: str = "cosine",
    temperature: float = UNITE_TEMPERATURE,
    learnable_temperature: bool | None = None,
) -> DistillLoss:
    """Build the distillation loss ``name`` (one of :data:`LOSSES`) for the given embedding dimensions.

    ``mimic`` ("cosine" or "smooth_l1") selects the matching of the mimic losses and is unused by
    ``unite``. ``temperature`` is the InfoNCE temperature (the starting value where it learns) and is
    unused by ``mimic``. ``learnable_temperature`` None takes each loss's own choice: fixed for
    ``unite``, learnable for ``mimic+infonce``. Raises :class:`ConfigError` for an unknown name or kind,
    a non-positive dimension, a temperature outside [0.01, 1], or a learnable temperature for ``mimic``.
    """
    if name not in LOSSES:
        raise ConfigError(
            f"loss is {name!r}, expected one of {list(LOSSES)}. Pass --loss with one of them.", value=name, limit=list(LOSSES)
        )
    check_mimic_kind(mimic)
    for option, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"{name} loss: {option} is {dim!r}, expected a positive integer embedding dimension.", value=dim, limit=1)
    if not (isinstance(temperature, (int, float)) and TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX):
        raise ConfigError(
            f"{name} loss: temperature is {temperature!r}, expected a number in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]. "
            f"Pass --temperature in that range (the original UNITE value is {UNITE_TEMPERATURE}).",
            value=temperature,
            limit=[TEMPERATURE_MIN, TEMPERATURE_MAX],
        )

    if name == "unite":
        return UniteDistillationLoss(teacher_dim, student_dim, temperature, learnable_temperature=bool(learnable_temperature))
    if name == "mimic":
        if learnable_temperature:
            raise ConfigError(
                "mimic loss: learnable_temperature is True, but this loss has no InfoNCE term and so no temperature. "
                "Drop the option, or use loss 'mimic+infonce'.",
                value=learnable_temperature,
            )
        return MimicLoss(student_dim, teacher_dim, mimic)
    return MimicInfoNCELoss(
        student_dim, teacher_dim, mimic, temperature, learnable_temperature=True if learnable_temperature is None else learnable_temperature
    )
