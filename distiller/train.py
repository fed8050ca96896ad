"""The distillation run: training shards in, an exported student checkpoint out.

:func:`distill` splits the shards' tiles by slide, trains :class:`~distiller.module.DistillModule` with a
Lightning Trainer (bf16 autocast on CPU and GPU by default), writes Lightning checkpoints so a run can
resume, and exports the student with :func:`shared.checkpoint.save_student`. Output folder layout::

    out_dir/
        logs/version_N/metrics.csv   per-step train loss, per-epoch validation loss, learning rate
        lightning/last.ckpt          full training state (student, projector, optimiser, schedule),
                                     replaced at every epoch end, so it is the newest state any run saved
        student/                     the exported checkpoint: model.safetensors, config.json, README.md
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import Callback, Checkpoint, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from distiller.data import ShardDataset
from distiller.loss import UNITE_TEMPERATURE
from distiller.module import DistillModule
from distiller.split import Split, split_by_slide
from shared.checkpoint import save_student
from shared.errors import ConfigError
from shared.models.student import UNITE_STUDENT_KWARGS, UNITE_STUDENT_NAME
from shared.shards import ShardInfo, list_shards, read_metadata

logger = logging.getLogger(__name__)

STUDENT_SUBDIR = "student"
LIGHTNING_SUBDIR = "lightning"
LAST_CHECKPOINT = "last.ckpt"
LOGS_SUBDIR = "logs"
GRADIENT_CLIP_NORM = 1.0
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true", "bf16-true")


@dataclass
class DistillConfig:
    """Settings of one distillation run.

    ``max_steps`` caps the optimiser steps (None: ``epochs`` full passes). ``resume_from`` is a
    Lightning checkpoint to continue from, or "last" for ``out_dir/lightning/last.ckpt``. The split is
    recomputed from the same shards and seed, so it matches the interrupted run's.
    ``checkpoint_every_n_steps`` also saves ``last.ckpt`` within epochs (None: at each epoch's end only).
    ``accelerator`` is a Lightning accelerator name: "auto", "cpu", "gpu" or another registered one.

    NOTE: the learning-rate schedule is rebuilt from the resumed run's ``epochs`` and ``max_steps``, so
    resuming with a longer plan than the first run continues on the longer cosine, not the original one.
    """

    shard_dir: Path
    out_dir: Path
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    val_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 0
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    max_steps: int | None = None
    resume_from: Path | str | None = None
    checkpoint_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        self.shard_dir = Path(self.shard_dir)
        self.out_dir = Path(self.out_dir)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.checkpoint_every_n_steps is not None:
            positive["checkpoint_every_n_steps"] = self.checkpoint_every_n_steps
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"distill: {name} is {value}, expected an integer >= 1.", value=value, limit=1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"distill: lr is {self.lr}, expected a positive learning rate.", value=self.lr)
        if self.weight_decay < 0:
            raise ConfigError(f"distill: weight_decay is {self.weight_decay}, expected >= 0.", value=self.weight_decay, limit=0)
        if self.num_workers < 0:
            raise ConfigError(f"distill: num_workers is {self.num_workers}, expected >= 0.", value=self.num_workers, limit=0)
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"distill: precision is {self.precision!r}, expected one of {list(PRECISIONS)}.",
                value=self.precision,
                limit=list(PRECISIONS),
            )
        accelerators = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
        if self.accelerator not in accelerators:
            raise ConfigError(
                f"distill: accelerator is {self.accelerator!r}, expected one of {accelerators}. Use --accelerator cpu or auto.",
                value=self.accelerator,
                limit=accelerators,
            )
        # warmup_fraction and val_fraction are checked where they are used, by DistillModule and split_by_slide.


@dataclass
class DistillResult:
    """Outputs of a distillation run: the exported folder, the loss curve and the split."""

    checkpoint_dir: Path
    first_loss: float
    last_loss: float
    train_tiles: int
    val_tiles: int
    split_description: str
    # Train loss of every optimiser step of this run, in order; after a resume, only the steps run since.
    history: list[float] = field(default_factory=list)
    val_loss: float | None = None
    steps: int = 0


class LossHistory(Callback):
    """Records the train loss of every optimiser step and the validation loss of every epoch."""

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
        trainer.save_checkpoint(partial, weights_only=False)
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, self.path)
        self._saved_step = trainer.global_step
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


def distill(config: DistillConfig, *, progress: bool = True, command: str | None = None) -> DistillResult:
    """Train the UNITE student on the shards in ``config.shard_dir`` and export it to ``out_dir/student``.

    ``progress`` shows Lightning's progress bar on stderr. ``command`` is the command line that started
    the run, recorded in the model card.
    """
    _check_accelerator_available(config.accelerator)
    resume = _resolve_resume(config)
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    shards = list_shards(config.shard_dir)
    teacher, licence, teacher_dim = shards[0].teacher, shards[0].teacher_licence, shards[0].embedding_dim
    slide_ids, coords = _read_all_metadata(shards)

    split = split_by_slide(slide_ids, coords, val_fraction=config.val_fraction, seed=config.seed)
    log_level = logging.INFO if split.unit == "slide" else logging.WARNING
    logger.log(log_level, "train/validation split %s", split.description)

    batch_size = _clamp_batch_size(config.batch_size, len(split.train))
    train_loader = _loader(ShardDataset(shards, split.train), batch_size, config, shuffle=True)
    val_loader = _validation_loader(shards, split, batch_size, config)

    steps_per_epoch = len(split.train) // batch_size
    planned_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        planned_steps = min(planned_steps, config.max_steps)
    module = DistillModule(
        teacher_dim=teacher_dim,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_fraction=config.warmup_fraction,
        total_steps=planned_steps,
    )

    history = LossHistory()
    trainer = _trainer(config, history, progress=progress)
    logger.info(
        "distilling %s: %d train tiles, %d validation tiles, batch %d, %d planned steps, precision %s, teacher %s",
        config.shard_dir,
        len(split.train),
        len(split.val),
        batch_size,
        planned_steps,
        config.precision,
        teacher,
    )
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resume)
    finally:
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.dataset.close()
    if not history.train:
        raise ConfigError(
            f"distill: no training step ran (global step {trainer.global_step} of {planned_steps} planned). "
            "A run resumed from a finished checkpoint has nothing left to do; raise epochs or max_steps.",
            value=trainer.global_step,
            limit=planned_steps,
        )

    val_loss = history.val[-1] if history.val else None
    training = _training_summary(
        config,
        steps=int(trainer.global_step),
        batch_size=batch_size,
        loss=f"symmetric InfoNCE, temperature {UNITE_TEMPERATURE}, teacher projected {teacher_dim} -> {module.student.num_features}",
        shard_count=len(shards),
        split=split,
        slide_ids=slide_ids,
        losses={"first_train": history.train[0], "last_train": history.train[-1], "val": val_loss},
    )
    checkpoint_dir = save_student(
        module.student,
        config.out_dir / STUDENT_SUBDIR,
        architecture=UNITE_STUDENT_NAME,
        architecture_kwargs=UNITE_STUDENT_KWARGS,
        teacher=teacher,
        teacher_licence=licence,
        training=training,
        command=command,
    )
    logger.info(
        "distilled in %d steps: train loss %.4f -> %.4f, validation loss %s; student exported to %s",
        trainer.global_step,
        history.train[0],
        history.train[-1],
        "none" if val_loss is None else f"{val_loss:.4f}",
        checkpoint_dir,
    )
    return DistillResult(
        checkpoint_dir=checkpoint_dir,
        first_loss=history.train[0],
        last_loss=history.train[-1],
        train_tiles=len(split.train),
        val_tiles=len(split.val),
        split_description=split.description,
        history=list(history.train),
        val_loss=val_loss,
        steps=int(trainer.global_step),
    )


def _read_all_metadata(shards: list[ShardInfo]) -> tuple[list[str], np.ndarray]:
    slide_ids: list[str] = []
    coords = []
    for info in shards:
        shard_slides, shard_coords = read_metadata(info)
        slide_ids.extend(shard_slides)
        coords.append(shard_coords)
    return slide_ids, np.concatenate(coords, axis=0)


def _training_summary(
    config: DistillConfig,
    *,
    steps: int,
    batch_size: int,
    loss: str,
    shard_count: int,
    split: Split,
    slide_ids: list[str],
    losses: dict[str, float | None],
) -> dict[str, Any]:
    """Build the training record that config.json and the model card carry."""
    return {
        "epochs": config.epochs,
        "steps": steps,
        "batch_size": batch_size,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "warmup_fraction": config.warmup_fraction,
        "schedule": "linear warm-up, then one cosine decay to 0 (no restarts)",
        "loss": loss,
        "precision": config.precision,
        "seed": config.seed,
        "shards": shard_count,
        "split": split.description,
        "train_tiles": len(split.train),
        "val_tiles": len(split.val),
        "train_slides": _count_slides(slide_ids, split.train),
        "val_slides": _count_slides(slide_ids, split.val),
        "losses": losses,
    }


def _clamp_batch_size(requested: int, train_tiles: int) -> int:
    # InfoNCE needs at least one negative per anchor, hence two tiles per batch.
    if train_tiles < 2:
        raise ConfigError(
            f"distill: the training side of the split contains {train_tiles} tile, expected at least 2 for a contrastive batch. "
            "Add tiles or lower val_fraction.",
            value=train_tiles,
            limit=2,
        )
    if requested > train_tiles:
        logger.warning(
            "batch size %d is larger than the %d training tiles; using batch size %d, so each epoch is one step",
            requested,
            train_tiles,
            train_tiles,
        )
        return train_tiles
    return requested


def _loader(dataset: ShardDataset, batch_size: int, config: DistillConfig, *, shuffle: bool) -> DataLoader:
    # drop_last keeps every batch at full size: InfoNCE's difficulty, and so its value, depends on the batch size.
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=True,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )


def _validation_loader(shards: list[ShardInfo], split: Split, batch_size: int, config: DistillConfig) -> DataLoader | None:
    if len(split.val) < 2:
        if len(split.val) == 1:
            logger.warning("the validation side contains 1 tile, too few for a contrastive loss; training without validation")
        return None
    val_batch_size = min(batch_size, len(split.val))
    if val_batch_size < batch_size:
        logger.info("validation batch size %d (all %d validation tiles)", val_batch_size, len(split.val))
    return _loader(ShardDataset(shards, split.val), val_batch_size, config, shuffle=False)


def _trainer(config: DistillConfig, history: LossHistory, *, progress: bool) -> lightning.Trainer:
    checkpoint = LastCheckpoint(config.out_dir / LIGHTNING_SUBDIR, every_n_steps=config.checkpoint_every_n_steps)
    callbacks: list[Callback] = [history, checkpoint, LearningRateMonitor(logging_interval="step")]
    if progress:
        callbacks.append(StderrProgressBar())
    try:
        return lightning.Trainer(
            accelerator=config.accelerator,
            devices=1,
            precision=config.precision,
            max_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            gradient_clip_val=GRADIENT_CLIP_NORM,
            logger=CSVLogger(config.out_dir, name=LOGS_SUBDIR),
            callbacks=callbacks,
            enable_checkpointing=True,
            enable_progress_bar=progress,
            enable_model_summary=False,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
        )
    except MisconfigurationException as error:
        raise ConfigError(
            f"distill: Lightning cannot run accelerator {config.accelerator!r} with precision {config.precision!r}: {error} "
            "Use --accelerator cpu or auto, or a precision that the accelerator supports.",
            value={"accelerator": config.accelerator, "precision": config.precision},
        ) from error


def _check_accelerator_available(accelerator: str) -> None:
    # Checked before any shard is read; Lightning would only fail when the Trainer is built.
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"distill: accelerator is {accelerator!r}, but no GPU is visible to torch (torch.cuda.is_available() is False). "
            "Use --accelerator cpu or auto, or run on a machine with a CUDA GPU.",
            value=accelerator,
        )


def _resolve_resume(config: DistillConfig) -> str | None:
    if config.resume_from is None:
        return None
    last = config.out_dir / LIGHTNING_SUBDIR / LAST_CHECKPOINT
    path = last if str(config.resume_from) == "last" else Path(config.resume_from)
    if not path.is_file():
        raise ConfigError(
            f"distill: checkpoint to resume from {path} not found. "
            f"Pass a .ckpt file, or 'last' after a run that wrote {last}.",
            value=str(path),
        )
    logger.info("resuming from %s", path)
    return str(path)


def _count_slides(slide_ids: list[str], indices: np.ndarray) -> int:
    return len({slide_ids[index] for index in indices if slide_ids[index]})
