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
from unite_cli.bench import DESCRIPTION as BENCH_DESCRIPTION
from unite_cli.bench import add_bench_arguments, run_bench_command
from unite_cli.cache_backup import DESCRIPTION as CACHE_DESCRIPTION
from unite_cli.cache_backup import add_cache_arguments, run_cache
from unite_cli.distill import add_distill_arguments, run_distill
from unite_cli.distill_worker import DESCRIPTION as DISTILL_WORKER_DESCRIPTION
from unite_cli.distill_worker import add_distill_worker_arguments, run_distill_worker
from unite_cli.embed import DESCRIPTION as EMBED_DESCRIPTION
from unite_cli.embed import add_embed_arguments, run_embed
from unite_cli.evaluate import DESCRIPTION as EVALUATE_DESCRIPTION
from unite_cli.evaluate import add_evaluate_arguments, run_evaluate
from unite_cli.pool import DESCRIPTION as POOL_DESCRIPTION
from unite_cli.pool import add_pool_arguments, run_pool
from unite_cli.publish import DESCRIPTION as PUBLISH_DESCRIPTION
from unite_cli.publish import add_publish_arguments, run_publish
from unite_cli.serve_gateway import GATEWAY_OPTIONS, add_gateway_arguments
from unite_cli.teach import DESCRIPTION as TEACH_DESCRIPTION
from unite_cli.teach import add_teach_arguments, run_teach
from unite_cli.tile import add_tile_arguments, run_tile

logger = logging.getLogger("unite")


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
        "2 for invalid options or an unusable --out folder, 130 after Ctrl-C (SIGINT) and 143 after SIGTERM, which "
        "print the summary so far.",
    )
    add_tile_arguments(tile)

    teach = commands.add_parser(
        "teach", help="embed slides' tiles through the teacher gateway and export training shards", description=TEACH_DESCRIPTION
    )
    add_teach_arguments(teach)

    distill = commands.add_parser(
        "distill",
        help="train the student from training shards and export it",
        description="Train a student on the teacher embeddings of training shards and export it to OUT/student. "
        "A teacher licence that restricts derivatives or commercial use stops the run unless --accept-teacher-licence is given.",
    )
    add_distill_arguments(distill)

    distill_worker = commands.add_parser(
        "distill-worker", help="train and publish a new student whenever enough new training tiles arrived", description=DISTILL_WORKER_DESCRIPTION
    )
    add_distill_worker_arguments(distill_worker)

    export_onnx = commands.add_parser(
        "export-onnx",
        help="write an exported student as an ONNX file, checked against torch with onnxruntime",
        description="The ONNX graph takes normalised (batch, 3, 224, 224) float32 pixels and returns the student's "
        "embedding, plus the teacher-space embedding when the export has a mimic projector.",
    )
    export_onnx.add_argument("checkpoint", type=Path, help="exported student folder, as `unite distill` writes it (OUT/student)")
    export_onnx.add_argument("--out", type=Path, required=True, help="ONNX file to write, replaced if it exists")
    export_onnx.add_argument("--opset", type=int, default=17, help="ONNX opset version, at least 14 (default: 17)")

    embed = commands.add_parser(
        "embed", help="embed slides' patches with an exported student and pool them, skipping slides already done", description=EMBED_DESCRIPTION
    )
    add_embed_arguments(embed)

    pool = commands.add_parser(
        "pool", help="pool patch feature files into slide or case feature files (mean, max or mean+max)", description=POOL_DESCRIPTION
    )
    add_pool_arguments(pool)

    bench = commands.add_parser(
        "bench", help="compare two or more models' features on labelled samples and write a report", description=BENCH_DESCRIPTION
    )
    add_bench_arguments(bench)

    evaluate = commands.add_parser(
        "evaluate", help="embed labelled slides with two or more served models, pool and benchmark them", description=EVALUATE_DESCRIPTION
    )
    add_evaluate_arguments(evaluate)

    publish = commands.add_parser(
        "publish", help="list, roll back or add the students of a publish root that student servers serve", description=PUBLISH_DESCRIPTION
    )
    add_publish_arguments(publish)

    cache = commands.add_parser(
        "cache", help="back up the teacher gateway's embedding cache and usage ledger while the gateway runs", description=CACHE_DESCRIPTION
    )
    add_cache_arguments(cache)

    gateway = commands.add_parser("serve-gateway", help="run the teacher gateway HTTP service")
    add_gateway_arguments(gateway)

    student = commands.add_parser(
        "serve-student",
        help="run the student embedding HTTP service",
        description="Serve tile and slide embeddings of an exported student over HTTP (docs/student-server.md). "
        "Every setting is an environment variable UNITE_STUDENT_*, listed with its default in docs/configuration.md. "
        "The options below override four of them. A server locks its slide jobs folder (UNITE_STUDENT_JOBS_DIR, "
        "default $TMPDIR/unite-student-jobs) while it runs, so a second server on one machine needs its own folder. "
        "Stop it with Ctrl-C or SIGTERM: running slide jobs resume at the next start.",
    )
    student.add_argument("--host", default=None, help="address to bind (default: UNITE_STUDENT_HOST or 127.0.0.1)")
    student.add_argument("--port", type=int, default=None, help="port to bind (default: UNITE_STUDENT_PORT or 8200)")
    student.add_argument("--checkpoint", type=Path, default=None, help="exported student folder (default: UNITE_STUDENT_CHECKPOINT_DIR or ./runs/student)")
    student.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default=None,
        help="'torch' runs model.safetensors, 'onnx' runs model.onnx with onnxruntime and imports no torch (default: UNITE_STUDENT_RUNTIME or torch)",
    )

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
    "serve-student": {"host": "--host", "port": "--port", "checkpoint_dir": "--checkpoint", "runtime": "--runtime"},
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


def _check_input_folder(path: Path, option: str, fix: str = "Pass the folder that contains it.") -> None:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{option} {path} not found. Pass an existing folder.", value=str(path))
    if not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, expected a folder. {fix}", value=str(path))


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
        # A remote teacher's value can contain a URL with a credential, so it is not repeated.
        shown = "not shown" if item["loc"] and item["loc"][0] == "remote" else repr(item.get("input"))
        if shown == "not shown":
            values[field] = None
        problems.append(f"{field} is {shown} (from {source}): {item['msg']}. {fix}")
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

    if args.command == "teach":
        if not args.dry_run:
            for option, value in (("--cache-dir", args.cache_dir), ("--shards", args.shards)):
                if value is None:
                    raise ConfigError(f"unite teach: {option} is missing. Pass it, or pass --dry-run to only print the plan.", value=None)
            # Checked before any tile is sent, because the shards are written only after every tile has gone through the gateway.
            _check_output_folder(args.shards, "--shards")
            _check_output_folder(args.cache_dir, "--cache-dir")
        if args.patches is not None:
            _check_input_folder(args.patches, "--patches")
        return run_teach(args)

    if args.command == "distill":
        _check_input_folder(args.shards, "--shards")
        _check_output_folder(args.out, "--out")
        return run_distill(args)

    if args.command == "distill-worker":
        _check_output_folder(args.out, "--out")
        _check_output_folder(args.publish_root, "--publish-root")
        return run_distill_worker(args)

    if args.command == "export-onnx":
        from distiller.onnx_export import export_onnx

        _check_input_folder(args.checkpoint, "CHECKPOINT")
        print(export_onnx(args.checkpoint, args.out, opset=args.opset).summary())
        return 0

    if args.command == "embed":
        _check_input_folder(args.checkpoint, "--checkpoint")
        _check_output_folder(args.out, "--out")
        return run_embed(args)

    if args.command == "pool":
        _check_output_folder(args.out, "--out")
        return run_pool(args)

    if args.command == "bench":
        _check_output_folder(args.out, "--out")
        return run_bench_command(args)

    if args.command == "evaluate":
        _check_output_folder(args.out, "--out")
        return run_evaluate(args)

    if args.command == "publish":
        if args.publish_command == "add":
            _check_input_folder(args.export_dir, "EXPORT_DIR")
            _check_output_folder(args.root, "ROOT")
        else:
            _check_input_folder(args.root, "ROOT", "Pass the publish root, the folder that contains versions/ and current.")
        return run_publish(args)

    if args.command == "cache":
        return run_cache(args)

    if args.command == "serve-gateway":
        from unite_cli.serve_gateway import gateway_settings, serve_gateway

        settings = gateway_settings(args)
        _check_output_folder(settings.cache_dir, "--cache-dir (or UNITE_GATEWAY_CACHE_DIR)")
        return serve_gateway(settings)

    if args.command == "serve-student":
        import uvicorn

        from student_server.app import create_app
        from student_server.settings import StudentSettings

        settings = StudentSettings(**_overrides(host=args.host, port=args.port, checkpoint_dir=args.checkpoint, runtime=args.runtime))
        _check_output_folder(settings.upload_dir, "UNITE_STUDENT_UPLOAD_DIR")
        from shared.logs import configure_logging

        configure_logging(settings.log_format, level=logging.getLogger().level)
        # The app logs each request with its path only, while uvicorn's access log would copy the query string,
        # where a client may have put its API key. After shutdown_grace_s seconds of a shutdown (SIGTERM or
        # SIGINT), uvicorn cancels the requests still running, such as a stalled upload, and the app stops.
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            access_log=False,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )
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
