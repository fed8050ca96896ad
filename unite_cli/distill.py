"""``unite distill``: its options and the run.

Options that set a :class:`distiller.config.DistillConfig` field default to None here and are passed on
only when given. So the defaults live in DistillConfig alone, and the help text states them. Torch and
Lightning are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distiller.augment import AUGMENTATIONS, DEFAULT_AUGMENTATIONS

# Options of this command, by the DistillConfig field they set.
CONFIG_OPTIONS = {
    "shard_dir": "--shards",
    "out_dir": "--out",
    "student": "--student",
    "student_weights": "--student-weights",
    "loss": "--loss",
    "mimic": "--mimic",
    "temperature": "--temperature",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "accumulate_grad_batches": "--accumulate-grad-batches",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "warmup_fraction": "--warmup-fraction",
    "gradient_clip_val": "--gradient-clip-val",
    "augmentations": "--augment",
    "val_fraction": "--val-fraction",
    "seed": "--seed",
    "num_workers": "--num-workers",
    "precision": "--precision",
    "accelerator": "--accelerator",
    "strategy": "--strategy",
    "devices": "--devices",
    "num_nodes": "--num-nodes",
    "max_steps": "--max-steps",
    "resume_from": "--resume",
    "checkpoint_every_n_steps": "--checkpoint-every-n-steps",
    "log_dir": "--log-dir",
    "accept_teacher_licence": "--accept-teacher-licence",
}


def _augmentation_list(text: str) -> list[str]:
    """Parse "--augment hflip,rot90" into names. "none" or "" gives no augmentation."""
    if text.strip().lower() in ("", "none"):
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def add_distill_arguments(
    parser: argparse.ArgumentParser, *, out_help: str = "output folder; the student is exported to OUT/student", resume: bool = True
) -> None:
    """Add the options of ``unite distill`` to ``parser``.

    ``unite distill-worker`` shares them, with its own help for ``--out`` and without ``--resume``
    (``resume=False``), because the worker resumes its own runs.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--shards", type=Path, required=True, help="folder of training shards written by `unite teach`")
    data.add_argument("--out", type=Path, required=True, help=out_help)
    data.add_argument("--val-fraction", type=float, default=None, help="share of tiles held out for validation, whole slides at a time (default: 0.2)")
    data.add_argument(
        "--augment",
        type=_augmentation_list,
        default=None,
        help=f"comma-separated augmentations of the student's view, from {', '.join(AUGMENTATIONS)}, or 'none' "
        f"(default: {','.join(DEFAULT_AUGMENTATIONS)}, the transforms the reference teacher is measured to be invariant to)",
    )
    data.add_argument("--num-workers", type=int, default=None, help="data loader worker processes per training process (default: 2)")

    model = parser.add_argument_group("student and loss")
    model.add_argument("--student", default=None, help="'unite' (the original ViT-S/14) or a timm model name such as vit_small_patch16_224 (default: unite)")
    model.add_argument(
        "--student-weights", type=Path, default=None, help="local .safetensors or .pth file to initialise the student from (default: random weights)"
    )
    model.add_argument("--loss", default=None, help="unite, mimic or mimic+infonce (default: mimic+infonce)")
    model.add_argument("--mimic", default=None, help="matching of the mimic losses: cosine or smooth_l1 (default: cosine)")
    model.add_argument(
        "--temperature", type=float, default=None, help="InfoNCE temperature, the starting value where it is learned, in [0.01, 1] (default: 0.07)"
    )

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=int, default=None, help="passes over the training tiles (default: 1)")
    schedule.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps (default: EPOCHS full passes)")
    schedule.add_argument(
        "--batch-size", type=int, default=None, help="tiles per forward pass on each device; InfoNCE negatives come from one such batch (default: 64)"
    )
    schedule.add_argument("--accumulate-grad-batches", type=int, default=None, help="forward batches per optimiser step (default: 1)")
    schedule.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default: 5e-4)")
    schedule.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay of weight matrices (default: 0.05)")
    schedule.add_argument("--warmup-fraction", type=float, default=None, help="share of the optimiser steps spent in linear warm-up, in [0, 1) (default: 0.1)")
    schedule.add_argument("--gradient-clip-val", type=float, default=None, help="maximum total gradient norm; 0 turns clipping off (default: 1.0)")
    schedule.add_argument("--seed", type=int, default=None, help="random seed of the split, the initialisation, the order and the augmentations (default: 0)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed, autocast on CPU and GPU)")
    hardware.add_argument("--accelerator", default=None, help="Lightning accelerator: auto, cpu or gpu (default: auto)")
    hardware.add_argument("--strategy", default=None, help="Lightning strategy, such as ddp for data-parallel training (default: auto)")
    hardware.add_argument("--devices", default=None, help="devices per node: auto, a count such as 2, or indices such as 0,1 (default: auto)")
    hardware.add_argument("--num-nodes", type=int, default=None, help="machines taking part in a distributed run (default: 1)")

    run = parser.add_argument_group("run")
    if resume:
        run.add_argument("--resume", default=None, help="Lightning checkpoint to resume from, or 'last' for OUT/lightning/last.ckpt (default: start afresh)")
    run.add_argument(
        "--checkpoint-every-n-steps",
        type=int,
        default=None,
        help="also save OUT/lightning/last.ckpt every N optimiser steps (default: at each epoch's end only)",
    )
    run.add_argument("--log-dir", type=Path, default=None, help="folder of the CSV and TensorBoard logs (default: OUT/logs)")
    run.add_argument(
        "--accept-teacher-licence",
        action="store_true",
        default=None,
        help="train even though the teacher's licence restricts derivatives or commercial use (non-commercial, no-derivatives or gated terms); "
        "without it such a run stops before training",
    )


def config_from_args(args: argparse.Namespace):
    """Build the DistillConfig of the options given; options left out take DistillConfig's defaults."""
    from distiller.config import DistillConfig

    values = {field: getattr(args, option.lstrip("-").replace("-", "_"), None) for field, option in CONFIG_OPTIONS.items()}
    overrides = {field: value for field, value in values.items() if value is not None}
    if overrides.get("gradient_clip_val") == 0:
        overrides["gradient_clip_val"] = None
    return DistillConfig(**overrides)


def run_distill(args: argparse.Namespace) -> int:
    """Run ``unite distill`` and print one result line on global rank 0."""
    from distiller.train import distill

    config = config_from_args(args)
    # The progress bar and the logs go to stderr, so the result line below is all that stdout carries.
    result = distill(config, progress=sys.stderr.isatty(), command=" ".join(["unite", *sys.argv[1:]]))
    if result.is_global_zero:
        print(f"first loss {result.first_loss:.4f}, last loss {result.last_loss:.4f}; student exported to {result.checkpoint_dir}")
    return 0
