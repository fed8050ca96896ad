"""The distillation run: training shards in, an exported student checkpoint out.

:func:`distill` checks the teacher's licence, splits the shards' tiles by slide, trains
:class:`~distiller.module.DistillModule` with a Lightning Trainer (bf16 autocast on CPU and GPU by default,
on one device or data-parallel over several), validates the student's agreement with the teacher after
every epoch, writes Lightning checkpoints so a run can resume exactly, and exports the student with
:func:`shared.checkpoint.save_student`. Output folder layout::

    out_dir/
        logs/csv/version_N/metrics.csv   per-step train loss and learning rate, per-epoch validation metrics
        logs/tensorboard/version_N/      the same values as TensorBoard events
        lightning/last.ckpt              full training state (student, loss, optimiser, schedule, data position),
                                         replaced at every epoch end, so it is the newest state any run saved
        student/                         the exported checkpoint: weights, mimic projector, config.json, README.md
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from distiller.augment import build_augmentation
from distiller.callbacks import LAST_CHECKPOINT, LastCheckpoint, LossHistory, StderrProgressBar
from distiller.config import LOGS_SUBDIR, PRECISIONS, DistillConfig
from distiller.data import ShardDataset
from distiller.licence import check_teacher_licence
from distiller.loader import EpochSampler, ResumableLoader, loader_options
from distiller.loss import build_loss
from distiller.module import DistillModule
from distiller.split import Split, split_by_slide
from distiller.validation import AgreementValidation
from shared.checkpoint import save_student
from shared.errors import ConfigError
from shared.models.student import build_student, embedding_dim
from shared.shards import ShardInfo, list_shards, read_metadata

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistillResult", "distill", "LossHistory", "LastCheckpoint", "LAST_CHECKPOINT", "LOGS_SUBDIR", "PRECISIONS"]

STUDENT_SUBDIR = "student"
LIGHTNING_SUBDIR = "lightning"


@dataclass
class DistillResult:
    """Outputs of a distillation run: the exported folder, the loss curve, the validation record and the split.

    In a distributed run every rank returns a result, and only the one with ``is_global_zero`` exported
    the student.
    """

    checkpoint_dir: Path
    first_loss: float
    last_loss: float
    train_tiles: int
    val_tiles: int
    split_description: str
    # Train loss of every training batch this process ran, in order. After a resume, only the batches run since.
    history: list[float] = field(default_factory=list)
    val_loss: float | None = None
    steps: int = 0
    # One record per validation epoch: loss, k-NN overlap and its chance level, linear CKA, tiles compared.
    validation: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    is_global_zero: bool = True


def distill(
    config: DistillConfig,
    *,
    progress: bool = True,
    command: str | None = None,
    callbacks: list[Callback] | None = None,
) -> DistillResult:
    """Train a student on the shards in ``config.shard_dir`` and export it to ``out_dir/student``.

    ``progress`` shows Lightning's progress bar on stderr. ``command`` is the command line that started
    the run, recorded in the model card. ``callbacks`` are added to the Trainer's own. Raises
    :class:`ConfigError` before any training when the teacher's licence restricts derivatives or
    commercial use and ``config.accept_teacher_licence`` is False.
    """
    _check_accelerator_available(config.accelerator)
    resume = _resolve_resume(config)
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    shards = list_shards(config.shard_dir)
    teacher, licence, teacher_dim = shards[0].teacher, shards[0].teacher_licence, shards[0].embedding_dim
    restrictions = check_teacher_licence(teacher, licence, accepted=config.accept_teacher_licence)
    slide_ids, coords = _read_all_metadata(shards)

    split = split_by_slide(slide_ids, coords, val_fraction=config.val_fraction, seed=config.seed)
    logger.log(logging.INFO if split.unit == "slide" else logging.WARNING, "train/validation split %s", split.description)

    student = build_student(config.student, weights=config.student_weights)
    loss = build_loss(config.loss, student_dim=embedding_dim(student), teacher_dim=teacher_dim, mimic=config.mimic, temperature=config.temperature)

    history, agreement = LossHistory(), AgreementValidation()
    trainer = _trainer(config, [history, agreement, *(callbacks or [])], progress=progress)
    world_size, rank = trainer.world_size, trainer.global_rank
    batch_size = _clamp_batch_size(config.batch_size, len(split.train) // world_size)
    train_loader = _train_loader(shards, split, batch_size, config, rank=rank, world_size=world_size)
    val_loader = _validation_loader(shards, split, batch_size, config, rank=rank, world_size=world_size)

    batches_per_epoch = len(split.train) // world_size // batch_size
    planned_steps = config.epochs * math.ceil(batches_per_epoch / config.accumulate_grad_batches)
    if config.max_steps is not None:
        planned_steps = min(planned_steps, config.max_steps)
    warmup_steps = round(config.warmup_fraction * planned_steps)
    if config.warmup_fraction > 0:
        warmup_steps = max(1, warmup_steps)
    module = DistillModule(
        student, loss, lr=config.lr, weight_decay=config.weight_decay, warmup_steps=warmup_steps, total_steps=planned_steps
    )

    logger.info(
        "distilling %s: student %s, loss %s, %d train and %d validation tiles, batch %d x %d accumulated x %d processes, "
        "%d planned steps (%d warm-up), augmentations %s, precision %s, teacher %s",
        config.shard_dir,
        config.student,
        config.loss,
        len(split.train),
        len(split.val),
        batch_size,
        config.accumulate_grad_batches,
        world_size,
        planned_steps,
        warmup_steps,
        config.augmentations or "none",
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
    validation = agreement.history[-1] if agreement.history else None
    checkpoint_dir = config.out_dir / STUDENT_SUBDIR
    if trainer.is_global_zero:
        training = _training_summary(
            config, steps=int(trainer.global_step), batch_size=batch_size, world_size=world_size, warmup_steps=warmup_steps,
            losses={"first_train": history.train[0], "last_train": history.train[-1], "val": val_loss},
        )
        data = _data_summary(shards, split, slide_ids, teacher_dim=teacher_dim, restrictions=restrictions)
        save_student(
            module.student,
            checkpoint_dir,
            teacher=teacher,
            teacher_licence=licence,
            training=training,
            student=config.student,
            loss=loss.summary(),
            mimic_projector=loss.mimic_projector,
            validation_metrics=validation,
            data=data,
            command=command,
        )
        logger.info(
            "distilled in %d steps: train loss %.4f -> %.4f, validation loss %s, %s; student exported to %s",
            trainer.global_step,
            history.train[0],
            history.train[-1],
            "none" if val_loss is None else f"{val_loss:.4f}",
            "no agreement metrics" if validation is None else f"k-NN overlap {validation['knn_overlap']:.4f}, CKA {validation['cka']:.4f}",
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
        validation=list(agreement.history),
        world_size=world_size,
        is_global_zero=trainer.is_global_zero,
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
    config: DistillConfig, *, steps: int, batch_size: int, world_size: int, warmup_steps: int, losses: dict[str, float | None]
) -> dict[str, Any]:
    """Build the training record that config.json and the model card carry."""
    return {
        "epochs": config.epochs,
        "steps": steps,
        "batch_size": batch_size,
        "accumulate_grad_batches": config.accumulate_grad_batches,
        "processes": world_size,
        "tiles_per_step": batch_size * config.accumulate_grad_batches * world_size,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "warmup_steps": warmup_steps,
        "schedule": "AdamW, linear warm-up, then one cosine decay to 0 (no restarts)",
        "gradient_clip_val": config.gradient_clip_val,
        "augmentations": list(config.augmentations),
        "precision": config.precision,
        "strategy": config.strategy,
        "seed": config.seed,
        "losses": losses,
    }


def _data_summary(shards: list[ShardInfo], split: Split, slide_ids: list[str], *, teacher_dim: int, restrictions: list[str]) -> dict[str, Any]:
    """Build the data record that config.json and the model card carry: shards, split and teacher licence terms."""
    return {
        "shards": len(shards),
        "tiles": len(slide_ids),
        "slides": len({slide for slide in slide_ids if slide}),
        "teacher_dim": teacher_dim,
        "split": split.description,
        "split_unit": split.unit,
        "train_tiles": len(split.train),
        "val_tiles": len(split.val),
        "train_slides": _count_slides(slide_ids, split.train),
        "val_slides": _count_slides(slide_ids, split.val),
        "teacher_licence_restrictions": restrictions,
    }


def _clamp_batch_size(requested: int, train_tiles: int) -> int:
    # InfoNCE needs at least one negative per anchor, hence two tiles per batch. ``train_tiles`` is one process's share.
    if train_tiles < 2:
        raise ConfigError(
            f"distill: the training side of the split gives each process {train_tiles} tile, expected at least 2 for a contrastive batch. "
            "Add tiles, lower val_fraction or use fewer devices.",
            value=train_tiles,
            limit=2,
        )
    if requested > train_tiles:
        logger.warning(
            "batch size %d is larger than the %d training tiles of each process, so batch size %d is used and each epoch is one batch",
            requested,
            train_tiles,
            train_tiles,
        )
        return train_tiles
    return requested


def _train_loader(shards: list[ShardInfo], split: Split, batch_size: int, config: DistillConfig, *, rank: int, world_size: int) -> ResumableLoader:
    # Batches are always full: InfoNCE's difficulty, and so its value, depends on the batch size.
    dataset = ShardDataset(shards, split.train, augmentation=build_augmentation(config.augmentations))
    sampler = EpochSampler(len(split.train), seed=config.seed, shuffle=True, rank=rank, world_size=world_size)
    return ResumableLoader(dataset, sampler=sampler, batch_size=batch_size, **loader_options(config.num_workers))


def _validation_loader(
    shards: list[ShardInfo], split: Split, batch_size: int, config: DistillConfig, *, rank: int, world_size: int
) -> DataLoader | None:
    per_process = len(split.val) // world_size
    if per_process < 2:
        if len(split.val):
            logger.warning(
                "the validation side contains %d tiles, %d per process, too few for a contrastive loss, so training runs without validation",
                len(split.val),
                per_process,
            )
        return None
    val_batch_size = min(batch_size, per_process)
    validated = (per_process // val_batch_size) * val_batch_size * world_size
    if validated < len(split.val):
        logger.info("validating %d of the %d validation tiles each epoch, in full batches of %d", validated, len(split.val), val_batch_size)
    sampler = EpochSampler(len(split.val), seed=config.seed, shuffle=False, rank=rank, world_size=world_size)
    return DataLoader(ShardDataset(shards, split.val), batch_size=val_batch_size, sampler=sampler, drop_last=True, **loader_options(config.num_workers))


def _trainer(config: DistillConfig, callbacks: list[Callback], *, progress: bool) -> lightning.Trainer:
    checkpoint = LastCheckpoint(config.out_dir / LIGHTNING_SUBDIR, every_n_steps=config.checkpoint_every_n_steps)
    callbacks = [*callbacks, checkpoint, LearningRateMonitor(logging_interval="step")]
    if progress:
        callbacks.append(StderrProgressBar())
    loggers = [CSVLogger(config.log_dir, name="csv"), TensorBoardLogger(config.log_dir, name="tensorboard", default_hp_metric=False)]
    try:
        return lightning.Trainer(
            accelerator=config.accelerator,
            strategy=config.strategy,
            devices=config.devices,
            num_nodes=config.num_nodes,
            precision=config.precision,
            max_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            accumulate_grad_batches=config.accumulate_grad_batches,
            gradient_clip_val=config.gradient_clip_val,
            logger=loggers,
            callbacks=callbacks,
            # EpochSampler splits the data across processes itself, in an order that survives a resume.
            use_distributed_sampler=False,
            enable_checkpointing=True,
            enable_progress_bar=progress,
            enable_model_summary=False,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
        )
    except MisconfigurationException as error:
        raise ConfigError(
            f"distill: Lightning cannot run accelerator {config.accelerator!r}, strategy {config.strategy!r}, devices "
            f"{config.devices!r} and precision {config.precision!r}: {error} "
            "Use --accelerator cpu or auto, or a combination that this machine supports.",
            value={"accelerator": config.accelerator, "strategy": config.strategy, "devices": config.devices, "precision": config.precision},
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
