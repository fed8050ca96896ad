"""The Lightning module that trains a student against teacher embeddings with a distillation loss."""

from __future__ import annotations

import math
from typing import Any

import lightning
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from distiller.loss import DistillLoss
from shared.errors import ConfigError


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
    """A student and a :class:`DistillLoss`, trained together with AdamW, a linear warm-up and one cosine decay.

    The student's embedding is taken where timm's contract puts it, ``forward_head(forward_features(x),
    pre_logits=True)``, which is also what the student server computes. The loss's own parameters (its
    projector and a learnable temperature) train with the student. ``total_steps`` is the number of
    optimiser steps the schedule spans; when None it is taken from the Trainer's estimate. Gradient
    clipping is left to the Trainer (``gradient_clip_val``).

    NOTE: under DDP each process computes InfoNCE over its own batch only, so the number of negatives
    per anchor is the per-device batch size minus one, not the global one.
    """

    def __init__(
        self,
        student: nn.Module,
        loss: DistillLoss,
        *,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"DistillModule: lr is {lr!r}, expected a positive finite learning rate.", value=lr)
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ConfigError(f"DistillModule: weight_decay is {weight_decay!r}, expected a number >= 0.", value=weight_decay, limit=0)
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ConfigError(f"DistillModule: warmup_steps is {warmup_steps!r}, expected an integer >= 0.", value=warmup_steps, limit=0)
        if total_steps is not None:
            _check_total_steps(total_steps, warmup_steps)
        # The student and the loss are modules, stored in the state dict; only the schedule goes to hparams.
        self.save_hyperparameters(ignore=["student", "loss"])
        self.student = student
        self.loss = loss

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embed (B, 3, H, W) normalised images into (B, D) student embeddings, as the exported student does."""
        return self.student.forward_head(self.student.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return :meth:`embed` of ``images``."""
        return self.embed(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        loss, logs = self.loss(self.embed(images), targets)
        training = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=training, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=not training)
        for name, value in logs.items():
            self.log(f"{stage}/{name}", value, on_step=training, on_epoch=True, batch_size=len(images), sync_dist=not training)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = self.hparams.total_steps
        if total_steps is None:
            total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = self.hparams.warmup_steps
        _check_total_steps(total_steps, warmup_steps)

        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=self.hparams.lr)
        scheduler = LambdaLR(
            optimizer,
            lambda step: warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        # Weight decay applies to weight matrices only: biases, norm scales, layer-scale gammas, the temperature
        # and the position and register tokens are excluded, as timm's own optimiser factory does.
        no_weight_decay = getattr(self.student, "no_weight_decay", None)
        skip = {f"student.{name}" for name in (no_weight_decay() if callable(no_weight_decay) else ())}
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


def _check_total_steps(total_steps: int, warmup_steps: int) -> None:
    if not (isinstance(total_steps, int) and total_steps >= max(warmup_steps, 1)):
        raise ConfigError(
            f"DistillModule: the schedule spans {total_steps!r} optimiser steps, expected an integer >= 1 and >= the "
            f"{warmup_steps} warm-up steps. Add training tiles or epochs, or lower the batch size or the warm-up.",
            value=total_steps,
            limit=max(warmup_steps, 1),
        )
