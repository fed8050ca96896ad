"""Lightning callbacks of a distillation run: the loss record, the resumable ``last.ckpt`` and a progress bar on stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.callbacks import Callback, Checkpoint, TQDMProgressBar

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


class LossHistory(Callback):
    """Records the train loss of every training batch and the validation loss of every epoch."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train.append(float(loss.detach()))

    def on_validation_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.val.append(float(value))


class LastCheckpoint(Checkpoint):
    """Writes the full training state to ``last.ckpt`` at every epoch end and every ``every_n_steps`` optimiser steps.

    Lightning 2.6's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes ``last.ckpt`` only when training
    ends, and a second run into the same folder writes ``last-v1.ckpt`` beside the older ``last.ckpt``. This
    callback always replaces ``last.ckpt``, so ``resume_from="last"`` takes the newest state. Each save
    goes to ``.last.ckpt.partial`` in the same folder first, which ``os.replace`` then moves over
    ``last.ckpt``, so a kill during a save leaves the previous checkpoint whole.
    """

    def __init__(self, folder: Path, every_n_steps: int | None = None) -> None:
        self.path = Path(folder) / LAST_CHECKPOINT
        self.every_n_steps = every_n_steps
        self._saved_step: int | None = None

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps is None or trainer.global_step % self.every_n_steps != 0:
            return
        # Only the batch that made the optimiser step saves: with gradient accumulation the next batches
        # keep the same global step, and a save among them would lose their accumulated gradients.
        if trainer.global_step in (0, self._saved_step):
            return
        # The epoch-end save follows the last batch and also records the finished validation.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        self._save(trainer)

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        # Lightning 2.6 also calls on_train_epoch_end when max_steps stops a run mid-epoch, so this saves
        # only where a Lightning version skips that call.
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    def _save(self, trainer: lightning.Trainer) -> None:
        if trainer.sanity_checking:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        # Every rank of a distributed run calls save_checkpoint, and only global rank 0 writes the file.
        trainer.save_checkpoint(partial, weights_only=False)
        self._saved_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, self.path)
        logger.debug("saved %s at epoch %d, global step %d", self.path, trainer.current_epoch, trainer.global_step)


class StderrProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, drawn on stderr beside the logs, so stdout carries only a command's result.

    Lightning 2.6 creates each bar with ``file=sys.stdout``, read when the bar is created, so creating it
    under ``redirect_stdout(sys.stderr)`` sends it to stderr.
    """

    def init_sanity_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def init_predict_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()

    def init_test_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_test_tqdm()

