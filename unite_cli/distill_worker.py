"""``unite distill-worker``: the training options of ``unite distill`` plus the worker's, and the loop.

The training options come from :func:`unite_cli.distill.add_distill_arguments` and become a
DistillConfig through :func:`unite_cli.distill.config_from_args`, so both commands take the same options
with the same defaults. Torch and Lightning are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from unite_cli.distill import add_distill_arguments, config_from_args

logger = logging.getLogger(__name__)

# Kept equal to distiller.worker's defaults (checked by a test); repeated here so --help needs no torch import.
DEFAULT_MIN_NEW_TILES = 2048
DEFAULT_POLL_S = 60.0
DEFAULT_KEEP = 5

DESCRIPTION = (
    "Watch a shards folder and, each time at least --min-new-tiles new tiles arrived since the last training, "
    "train a student as `unite distill` does (in OUT/runs/RUN, which the options' OUT means here) and publish it "
    "into --publish-root, where a student server whose --checkpoint is that folder serves it. OUT/worker-state.json "
    "records the tiles trained on; a training interrupted by a crash or SIGTERM resumes from its last.ckpt at the "
    "next start. With --onnx each published student also contains model.onnx. A teacher licence that restricts "
    "derivatives or commercial use stops the worker unless --accept-teacher-licence is given. Exit status: 0 after "
    "--once or a SIGTERM between checks, 143 after a SIGTERM that stopped a training, 2 for invalid options."
)


def add_distill_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``unite distill-worker``: those of ``unite distill`` without --resume, and the worker's."""
    add_distill_arguments(parser, out_help="worker folder: worker-state.json and one training folder per run under OUT/runs", resume=False)
    worker = parser.add_argument_group("worker")
    worker.add_argument(
        "--publish-root",
        type=Path,
        required=True,
        help="folder to publish each student into (versions/ and the link current); the student server's checkpoint folder",
    )
    worker.add_argument(
        "--min-new-tiles",
        type=int,
        default=DEFAULT_MIN_NEW_TILES,
        help=f"new tiles since the last training that start a training (default: {DEFAULT_MIN_NEW_TILES})",
    )
    worker.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S, help=f"seconds between two checks of the shards folder (default: {DEFAULT_POLL_S:.0f})")
    worker.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, help=f"published versions and run folders kept on disk, the current one always (default: {DEFAULT_KEEP})"
    )
    worker.add_argument(
        "--warm-start", action="store_true", help="start each new training from the published student's weights instead of --student-weights or random ones"
    )
    worker.add_argument("--once", action="store_true", help="check once, train at most once, and exit")
    worker.add_argument(
        "--onnx",
        action="store_true",
        help="also export each student as model.onnx (as `unite export-onnx` does) before publishing it, for a student server "
        "with --runtime onnx; a failed ONNX export is logged and the student is published without it",
    )


def run_distill_worker(args: argparse.Namespace) -> int:
    """Run ``unite distill-worker`` until SIGTERM, or for one check with --once."""
    from distiller.worker import DistillWorker, WorkerOptions, WorkerStopped, check_not_launched, training_rank

    config = config_from_args(args)
    options = WorkerOptions(
        publish_root=args.publish_root,
        min_new_tiles=args.min_new_tiles,
        poll_s=args.poll_s,
        keep=args.keep,
        warm_start=args.warm_start,
        once=args.once,
        onnx=args.onnx,
    )
    worker = DistillWorker(config, options, command=" ".join(["unite", *sys.argv[1:]]), progress=sys.stderr.isatty())

    def request_stop(signal_number: int, frame: object) -> None:
        logger.info("received %s: stopping after the current check or optimiser step", signal.Signals(signal_number).name)
        worker.request_stop()

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        # Lightning's DDP launcher runs this command again for the other processes of a training. They only train.
        if training_rank() != 0:
            worker.join_training()
            return 0
        check_not_launched()
        trainings = worker.run()
    except WorkerStopped as stopped:
        logger.info("%s", stopped)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{trainings} trainings; published students are in {args.publish_root}")
    return 0
