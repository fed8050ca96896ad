"""Entry point of the ``unite`` command line.

Every option has help text with its unit and default; no path is ever edited into source. Heavy
imports (torch, Lightning, the services) happen inside each command, so ``unite --help`` is fast.
User errors (invalid options or settings, unusable folders) end the command with one log line and
exit status 2; the command's result goes to stdout, logs and progress bars to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from pydantic import ValidationError

from shared.errors import ConfigError, UniteError
from unite_cli.serve_gateway import GATEWAY_OPTIONS, add_gateway_arguments
from unite_cli.tile import add_tile_arguments, run_tile

logger = logging.getLogger("unite")


def _add_slide_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="resolution of the slides in µm per pixel, overriding their metadata (default: read from the slide)",
    )
    parser.add_argument("--patch-size", type=int, default=224, help="patch size in pixels at the target resolution (default: 224)")
    parser.add_argument("--target-mpp", type=float, default=0.5, help="target resolution in µm per pixel (default: 0.5, about 20x)")


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of every ``unite`` subcommand."""
    parser = argparse.ArgumentParser(prog="unite", description="Black-box distillation of pathology foundation models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level instead of INFO")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch-sample", help="download the CMU-1 sample slide and print its path")
    fetch.add_argument("--data-dir", type=Path, default=None, help="folder for the slide (default: $UNITE_DATA_DIR or ~/.cache/unite/data)")

    tile = commands.add_parser(
        "tile",
        help="detect tissue and write a TRIDENT-layout patch file per slide, skipping slides already done",
        description="Tile slides in resumable jobs: several processes may share one --out folder, because each slide "
        "is locked while it is tiled. Exit status: 0 when every slide is done or skipped, 1 when any failed, "
        "2 for invalid options.",
    )
    add_tile_arguments(tile)

    teach = commands.add_parser("teach", help="embed slides' tiles through the teacher gateway and export training shards")
    teach.add_argument("slides", nargs="+", type=Path, help="slide files openslide can read")
    teach.add_argument("--gateway", required=True, help="base URL of the teacher gateway, for example http://127.0.0.1:8100")
    teach.add_argument("--cache-dir", type=Path, default=None, help="the gateway's cache folder, read to export the shards (required unless --dry-run)")
    teach.add_argument("--shards", type=Path, default=None, help="output folder for the training shards (required unless --dry-run)")
    teach.add_argument("--batch-size", type=int, default=64, help="tiles per request to the gateway (default: 64)")
    teach.add_argument(
        "--dry-run",
        action="store_true",
        help="tile the slides and print the tiles to pay for, the cache hits and the budget left; send nothing to the teacher",
    )
    _add_slide_options(teach)

    distill = commands.add_parser("distill", help="train the student from training shards and export it")
    distill.add_argument("--shards", type=Path, required=True, help="folder of training shards written by `unite teach`")
    distill.add_argument("--out", type=Path, required=True, help="output folder; the student is exported to OUT/student")
    distill.add_argument("--epochs", type=int, default=1, help="passes over the training tiles (default: 1)")
    distill.add_argument("--batch-size", type=int, default=32, help="tiles per step (default: 32)")
    distill.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of AdamW (default: 5e-4)")
    distill.add_argument("--seed", type=int, default=0, help="random seed of the run (default: 0)")
    distill.add_argument("--val-fraction", type=float, default=0.2, help="share of slides held out for validation (default: 0.2)")
    distill.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps (default: EPOCHS full passes)")
    distill.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default: bf16-mixed, autocast on CPU and GPU)")
    distill.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu or gpu (default: auto)")
    distill.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (default: 0, load in the main process)")
    distill.add_argument(
        "--resume",
        default=None,
        help="Lightning checkpoint to resume from, or 'last' for OUT/lightning/last.ckpt (default: start afresh)",
    )

    gateway = commands.add_parser("serve-gateway", help="run the teacher gateway HTTP service")
    add_gateway_arguments(gateway)

    student = commands.add_parser("serve-student", help="run the student embedding HTTP service")
    student.add_argument("--host", default=None, help="address to bind (default: UNITE_STUDENT_HOST or 127.0.0.1)")
    student.add_argument("--port", type=int, default=None, help="port to bind (default: UNITE_STUDENT_PORT or 8200)")
    student.add_argument("--checkpoint", type=Path, default=None, help="exported student folder (default: UNITE_STUDENT_CHECKPOINT_DIR or ./runs/student)")

    demo = commands.add_parser("demo", help="run the whole chain on one slide: tile, teach, distill, serve, embed")
    demo.add_argument("--slide", type=Path, default=None, help="slide to use (default: the CMU-1 sample slide, downloaded once)")
    demo.add_argument("--mpp", type=float, default=None, help="resolution of the slide in µm per pixel, overriding its metadata")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    demo.add_argument("--epochs", type=int, default=5, help="distillation epochs (default: 5; the sample slide has about 60 tissue patches)")
    demo.add_argument("--batch-size", type=int, default=16, help="tiles per training step (default: 16)")
    return parser


# Command-line options of the serve commands, by the settings field they set.
_SETTINGS_OPTIONS = {
    "serve-gateway": GATEWAY_OPTIONS,
    "serve-student": {"host": "--host", "port": "--port", "checkpoint_dir": "--checkpoint"},
}


def _overrides(**values) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def _check_output_folder(path: Path, option: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a writable folder or can be created as one.

    ``option`` names where the path came from, for example ``--out``. Commands call this before any
    work, so a file in the way fails at once instead of after tiling, teaching or training.
    """
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {path} is a folder this user cannot write to. Pass a writable folder.", value=str(path))
        return
    if path.exists() or path.is_symlink():
        raise ConfigError(
            f"{option} {path} is a file, expected a folder. Pass a folder path (a missing folder is created), or move the file away.",
            value=str(path),
        )
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"{option} {path} cannot be created because {ancestor} is a file, not a folder. Pass a path under a folder.",
            value=str(path),
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {path} cannot be created because this user cannot write to {ancestor}. Pass a writable folder.",
            value=str(path),
        )


def _check_input_folder(path: Path, option: str) -> None:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{option} {path} not found. Pass an existing folder.", value=str(path))
    if not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, expected a folder. Pass the folder that contains it.", value=str(path))


def _settings_error(error: ValidationError, args: argparse.Namespace) -> ConfigError | None:
    """Convert a ValidationError of a service's settings class into a ConfigError, or return None for other models.

    Each invalid value is named by its field, its environment variable and, for the serve commands, its
    command-line option, with the value received and the expectation pydantic states.
    """
    from student_server.settings import StudentSettings
    from teacher_gateway.settings import GatewaySettings

    services = {GatewaySettings.__name__: (GatewaySettings, "gateway"), StudentSettings.__name__: (StudentSettings, "student server")}
    if error.title not in services:
        return None
    settings_class, service = services[error.title]
    prefix = settings_class.model_config.get("env_prefix", "")
    options = _SETTINGS_OPTIONS.get(args.command, {})

    problems = []
    values = {}
    for item in error.errors():
        field = "__".join(str(part) for part in item["loc"])
        variable = f"{prefix}{field.upper()}"
        option = options.get(field)
        values[field] = item.get("input")
        if option is not None and getattr(args, option.lstrip("-").replace("-", "_"), None) is not None:
            source, fix = f"option {option}", f"Pass a valid {option}."
        elif option is not None:
            source, fix = f"environment variable {variable}", f"Fix or unset {variable}, or pass {option}."
        else:
            source, fix = f"environment variable {variable}", f"Fix or unset {variable}."
        problems.append(f"{field} is {item.get('input')!r} (from {source}): {item['msg']}. {fix}")
    return ConfigError(f"unite {args.command}: invalid {service} setting: " + " ".join(problems), value=values)


def _run(args: argparse.Namespace) -> int:
    if args.command == "fetch-sample":
        from shared.sample_data import default_data_dir, fetch_cmu1

        data_dir = args.data_dir or default_data_dir()
        _check_output_folder(data_dir, "--data-dir" if args.data_dir else "the sample data folder (UNITE_DATA_DIR)")
        print(fetch_cmu1(data_dir))
        return 0

    if args.command == "tile":
        _check_output_folder(args.out, "--out")
        return run_tile(args)

    if args.command == "teach" and args.dry_run:
        from unite_cli.teach_plan import plan_teach

        plan = plan_teach(
            args.slides,
            gateway_url=args.gateway,
            mpp=args.mpp,
            patch_size=args.patch_size,
            target_mpp=args.target_mpp,
            batch_size=args.batch_size,
        )
        print(plan.summary())
        return 0

    if args.command == "teach":
        from unite_cli.pipeline import teach_slides

        for option, value in (("--cache-dir", args.cache_dir), ("--shards", args.shards)):
            if value is None:
                raise ConfigError(f"unite teach: {option} is missing. Pass it, or pass --dry-run to only print the plan.", value=None)
        # Checked before any tile is sent, because the shards are written only after every tile has gone through the gateway.
        _check_output_folder(args.shards, "--shards")
        _check_output_folder(args.cache_dir, "--cache-dir")
        result = teach_slides(
            args.slides,
            gateway_url=args.gateway,
            cache_dir=args.cache_dir,
            shard_dir=args.shards,
            mpp=args.mpp,
            patch_size=args.patch_size,
            target_mpp=args.target_mpp,
            batch_size=args.batch_size,
        )
        print(result.summary())
        return 0

    if args.command == "distill":
        from distiller.train import DistillConfig, distill

        _check_input_folder(args.shards, "--shards")
        _check_output_folder(args.out, "--out")
        config = DistillConfig(
            shard_dir=args.shards,
            out_dir=args.out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            val_fraction=args.val_fraction,
            max_steps=args.max_steps,
            precision=args.precision,
            accelerator=args.accelerator,
            num_workers=args.num_workers,
            resume_from=args.resume,
        )
        # The progress bar and the logs go to stderr, so the result line below is all that stdout carries.
        result = distill(config, progress=sys.stderr.isatty(), command=" ".join(["unite", *sys.argv[1:]]))
        print(f"first loss {result.first_loss:.4f}, last loss {result.last_loss:.4f}; student exported to {result.checkpoint_dir}")
        return 0

    if args.command == "serve-gateway":
        from unite_cli.serve_gateway import gateway_settings, serve_gateway

        settings = gateway_settings(args)
        _check_output_folder(settings.cache_dir, "--cache-dir (or UNITE_GATEWAY_CACHE_DIR)")
        return serve_gateway(settings)

    if args.command == "serve-student":
        import uvicorn

        from student_server.app import create_app
        from student_server.settings import StudentSettings

        settings = StudentSettings(**_overrides(host=args.host, port=args.port, checkpoint_dir=args.checkpoint))
        _check_output_folder(settings.upload_dir, "UNITE_STUDENT_UPLOAD_DIR")
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
        return 0

    if args.command == "demo":
        from unite_cli.demo import run_demo

        _check_output_folder(args.out, "--out")
        run_demo(slide=args.slide, mpp=args.mpp, out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size)
        return 0

    raise AssertionError(f"unhandled command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    """Run the ``unite`` command line; a UNITE error ends it with its message and exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Lightning 2.6 calls a torch API that torch 2.14 deprecates, on every run; the user can do nothing about it.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning attaches its own console handler; without this every Lightning line is printed twice.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False
    try:
        try:
            return _run(args)
        except ValidationError as error:
            # The serve commands and the demo build the services' settings, which also read UNITE_* environment variables.
            converted = _settings_error(error, args)
            if converted is None:
                raise
            raise converted from error
    except UniteError as error:
        logger.error("%s", error.message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
