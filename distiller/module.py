"""The Lightning module that trains the UNITE student against teacher embeddings."""

from __future__ import annotations

import math
from typing import Any

import lightning
import torch
from torch.optim.lr_scheduler import LambdaLR

from distiller.loss import UNITE_TEMPERATURE, UniteDistillationLoss
from shared.errors import ConfigError
from shared.models.student import build_unite_student


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Return the learning-rate factor at optimiser step ``step`` (0-based).

    The factor rises linearly from 1 / warmup_steps to 1 over the first ``warmup_steps`` steps, then
    follows one half cosine from 1 down to 0 at ``total_steps``, with no restarts. Steps past
    ``total_steps`` keep the factor 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class DistillModule(lightning.LightningModule):
    """The UNITE student and the loss's projector, trained with AdamW and a warm-up plus cosine schedule.

    The student's embedding is taken where timm's contract puts it, ``forward_head(forward_features(x),
    pre_logits=True)``, which is also what the student server computes. ``total_steps`` is the number of
    optimiser steps the schedule spans; when None it is taken from the Trainer's estimate. Gradient
    clipping is left to the Trainer (``gradient_clip_val``).
    """

    def __init__(
        self,
        *,
        teacher_dim: int,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        total_steps: int | None = None,
        temperature: float = UNITE_TEMPERATURE,
        student_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_fraction < 1.0:
            raise ConfigError(
                f"warmup_fraction is {warmup_fraction}, expected a value in [0, 1).", value=warmup_fraction, limit="[0, 1)"
            )
        self.save_hyperparameters()
        self.student = build_unite_student(**(student_kwargs or {}))
        self.loss = UniteDistillationLoss(teacher_dim, self.student.num_features, temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed (B, 3, 224, 224) normalised images into (B, 384) student embeddings."""
        tokens = self.student.forward_features(images)
        return self.student.forward_head(tokens, pre_logits=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = self.loss(self(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = self.loss(self(images), targets)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = self.hparams.total_steps
        if total_steps is None:
            total_steps = int(self.trainer.estimated_stepping_batches)
        if total_steps < 1:
            raise ConfigError(
                f"the schedule spans {total_steps} optimiser steps, expected at least 1. "
                "Add training tiles or lower the batch size.",
                value=total_steps,
                limit=1,
            )
        warmup_steps = max(1, round(self.hparams.warmup_fraction * total_steps))

        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=self.hparams.lr)
        scheduler = LambdaLR(
            optimizer,
            lambda step: warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        # Weight decay applies to weight matrices only: biases, norm scales, layer-scale gammas and the
        # position and register tokens are excluded, as timm's own optimiser factory does.
        skip = {f"student.{name}" for name in self.student.no_weight_decay()}
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if parameter.ndim <= 1 or name in skip:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
