"""``DistillConfig``: every setting of one distillation run, checked when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from distiller.augment import DEFAULT_AUGMENTATIONS, build_augmentation
from distiller.loss import DEFAULT_LOSS, LOSSES, MIMIC_KINDS, TEMPERATURE_MAX, TEMPERATURE_MIN, UNITE_TEMPERATURE
from shared.errors import ConfigError
from shared.models.student import UNITE_STUDENT

PRECISIONS = ("bf16-mixed", "16-mixed", "32-true", "bf16-true")
LOGS_SUBDIR = "logs"


@dataclass
class DistillConfig:
    """Settings of one distillation run.

    Data: ``batch_size`` tiles go through the student per forward pass on each device, and
    ``accumulate_grad_batches`` such batches make one optimiser step, so a step uses
    ``batch_size * accumulate_grad_batches * devices * num_nodes`` tiles. InfoNCE takes its negatives from
    one forward batch only (``batch_size - 1`` per anchor), so accumulation enlarges the step but not the
    negatives. ``augmentations`` are names from :data:`distiller.augment.AUGMENTATIONS`, applied to the
    student's view of each training tile. ``num_workers`` loader processes read the shards.

    Model: ``student`` is "unite" or a timm model name, initialised at random or from the local file
    ``student_weights``. ``loss``, ``mimic`` and ``temperature`` select the loss (:func:`distiller.loss.build_loss`).

    Schedule: ``epochs`` passes, capped at ``max_steps`` optimiser steps, and AdamW at peak ``lr`` with a
    linear warm-up over ``warmup_fraction`` of the steps, then one cosine decay to 0. Gradients are
    clipped to a total norm of ``gradient_clip_val`` (None: no clipping).

    Hardware: ``accelerator``, ``strategy``, ``devices`` and ``num_nodes`` go to the Lightning Trainer as
    given, so "ddp" with several devices or nodes runs data-parallel. ``precision`` "bf16-mixed" is bf16
    autocast on CPU and GPU.

    Run: ``resume_from`` is a Lightning checkpoint to continue from, or "last" for
    ``out_dir/lightning/last.ckpt``. The split is recomputed from the same shards and seed, so it matches
    the interrupted run's. ``checkpoint_every_n_steps`` also saves ``last.ckpt`` within epochs (None: at
    each epoch's end only). ``log_dir`` receives CSV and TensorBoard logs (None: ``out_dir/logs``).
    ``accept_teacher_licence`` acknowledges a teacher licence that restricts derivatives or commercial use.
    Without it such a run stops before training.

    NOTE: the learning-rate schedule is rebuilt from the resumed run's ``epochs`` and ``max_steps``, so
    resuming with a longer plan than the first run continues on the longer cosine, not the original one.
    """

    shard_dir: Path
    out_dir: Path
    student: str = UNITE_STUDENT
    student_weights: Path | None = None
    loss: str = DEFAULT_LOSS
    mimic: str = "cosine"
    temperature: float = UNITE_TEMPERATURE
    epochs: int = 1
    batch_size: int = 64
    accumulate_grad_batches: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    gradient_clip_val: float | None = 1.0
    augmentations: list[str] = field(default_factory=lambda: list(DEFAULT_AUGMENTATIONS))
    val_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 2
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    max_steps: int | None = None
    resume_from: Path | str | None = None
    checkpoint_every_n_steps: int | None = None
    log_dir: Path | None = None
    accept_teacher_licence: bool = False

    def __post_init__(self) -> None:
        self.shard_dir = Path(self.shard_dir)
        self.out_dir = Path(self.out_dir)
        self.log_dir = self.out_dir / LOGS_SUBDIR if self.log_dir is None else Path(self.log_dir)
        if self.student_weights is not None:
            self.student_weights = Path(self.student_weights)
        self.augmentations = list(self.augmentations)
        build_augmentation(self.augmentations)
        self.devices = _parse_devices(self.devices)

        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accumulate_grad_batches": self.accumulate_grad_batches, "num_nodes": self.num_nodes}
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
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(
                f"distill: warmup_fraction is {self.warmup_fraction}, expected a value in [0, 1).", value=self.warmup_fraction, limit="[0, 1)"
            )
        if self.gradient_clip_val is not None and not (self.gradient_clip_val > 0 and math.isfinite(self.gradient_clip_val)):
            raise ConfigError(
                f"distill: gradient_clip_val is {self.gradient_clip_val}, expected a positive gradient norm, or None for no clipping.",
                value=self.gradient_clip_val,
            )
        if self.num_workers < 0:
            raise ConfigError(f"distill: num_workers is {self.num_workers}, expected >= 0.", value=self.num_workers, limit=0)
        self._check_choices()
        # val_fraction is checked where it is used, by split_by_slide.

    def _check_choices(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"distill: loss is {self.loss!r}, expected one of {list(LOSSES)}.", value=self.loss, limit=list(LOSSES))
        if self.mimic not in MIMIC_KINDS:
            raise ConfigError(f"distill: mimic is {self.mimic!r}, expected one of {list(MIMIC_KINDS)}.", value=self.mimic, limit=list(MIMIC_KINDS))
        if not TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX:
            raise ConfigError(
                f"distill: temperature is {self.temperature}, expected a value in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}] "
                f"(the original UNITE value is {UNITE_TEMPERATURE}).",
                value=self.temperature,
                limit=[TEMPERATURE_MIN, TEMPERATURE_MAX],
            )
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
        strategies = ["auto", *StrategyRegistry.available_strategies()]
        if self.strategy not in strategies:
            raise ConfigError(
                f"distill: strategy is {self.strategy!r}, expected 'auto' or a Lightning strategy name such as 'ddp' "
                f"(one of {strategies}).",
                value=self.strategy,
                limit=strategies,
            )


def _parse_devices(devices: int | str) -> int | str:
    """Return ``devices`` as Lightning takes it: "auto", a positive count, or a comma-separated list of device indices."""
    text = str(devices).strip()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    indices = [part.strip() for part in text.split(",")]
    if "," in text and all(index.isdigit() for index in indices):
        return ",".join(indices)
    raise ConfigError(
        f"distill: devices is {devices!r}, expected 'auto', a positive number of devices such as 2, "
        "or a comma-separated list of device indices such as '0,1'.",
        value=devices,
    )
