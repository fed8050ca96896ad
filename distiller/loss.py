"""The UNITE distillation loss: symmetric InfoNCE between student embeddings and projected teacher embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNITE_TEMPERATURE = 0.07


def symmetric_info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = UNITE_TEMPERATURE) -> torch.Tensor:
    """Return the symmetric InfoNCE loss of two (B, D) batches whose row i of each side forms a positive pair.

    Both sides are L2-normalised here, so ``logits = s @ t.T / temperature`` contains cosine similarities
    scaled by ``1 / temperature``, and the loss is the mean of the cross entropy of each row (student to
    teacher) and of each column (teacher to student) against the diagonal. Computed in float32 even
    under autocast, because bf16 loses the small differences between cosines that a low temperature
    magnifies.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        student = F.normalize(student.float(), dim=-1)
        teacher = F.normalize(teacher.float(), dim=-1)
        logits = student @ teacher.T / temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class UniteDistillationLoss(nn.Module):
    """The original UNITE loss, with the learned projector that maps teacher embeddings into the student's space.

    For a batch of B tiles with student embeddings ``s_i`` (384-d) and teacher embeddings ``t_i``
    (1536-d for UNI2-h)::

        u_i = s_i / ||s_i||,   v_i = p(t_i) / ||p(t_i)||,   p = LayerNorm(Linear(t))
        L = -1/(2B) * sum_i [ log softmax_j(u_i . v_j / tau)_i + log softmax_j(v_i . u_j / tau)_i ]

    Every other tile of the batch is a negative, so the batch size sets the number of negatives
    (B - 1 per anchor) and an InfoNCE loss is only meaningful with B >= 2. The fixed temperature
    ``tau = 0.07`` scales cosines in [-1, 1] to logits in [-14.3, 14.3]: a lower value sharpens the
    softmax so hard negatives dominate the gradient, a higher value spreads it over all negatives.
    The log of the batch size is the loss of an untrained model that cannot tell tiles apart.

    Memory and compute: the B x B logit matrix costs O(B^2) (4 MiB in float32 at B = 1024), small next to
    the student's activations, which grow linearly in B.

    The projector learns with the student and is not exported. Projecting the teacher down lets the
    target drift with the projector; this is the original method's choice and is kept for parity.
    """

    def __init__(self, teacher_dim: int, student_dim: int, temperature: float = UNITE_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature
        self.projector = nn.Sequential(nn.Linear(teacher_dim, student_dim), nn.LayerNorm(student_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Return the loss of (B, student_dim) student and (B, teacher_dim) teacher embeddings."""
        return symmetric_info_nce(student, self.projector(teacher), self.temperature)
