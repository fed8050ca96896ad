"""``unite publish``: list the students of a publish root, roll ``current`` back, or publish an export by hand.

A publish root is the folder that ``unite distill-worker --publish-root`` publishes into and that the student
server's checkpoint folder names (:mod:`shared.publish` describes its layout).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from shared.checkpoint_format import ONNX_WEIGHTS
from shared.errors import ConfigError, ModelError
from shared.publish import (
    CURRENT_LINK,
    DEFAULT_KEEP,
    VERSIONS_DIR,
    CurrentLink,
    PublishedVersion,
    current_version,
    list_versions,
    publish_student,
    read_current_link,
    rollback_current,
)

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Manage a publish root: ROOT/versions/<time>-<sha> holds each published student and the link ROOT/current names the one "
    "that student servers with --checkpoint ROOT serve. They follow a change of current within "
    "UNITE_STUDENT_RELOAD_INTERVAL_S seconds. A running distill-worker publishing into ROOT moves current to each new student "
    "it trains. See docs/operations.md."
)


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``unite publish`` to its subparser."""
    actions = parser.add_subparsers(dest="publish_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="list the published versions, newest first, and which one is current",
        description="List the versions under ROOT/versions, newest first: the student name and weights sha256 from config.json, "
        "the teacher, whether model.onnx is included, the size, and whether the version is complete. A version is complete "
        "when its weights have the sha256 that config.json records. Each weights file is hashed, so this reads every version once.",
    )
    listing.add_argument("root", type=Path, metavar="ROOT", help="publish root (the folder containing versions/ and current)")

    rollback = actions.add_parser(
        "rollback",
        help="point current at the previous version, or at the version given with --to",
        description="Switch ROOT/current atomically to the newest complete version older than the current one, or to --to. "
        "Student servers serve it after their next reload check. A running distill-worker moves current again when it "
        "publishes its next student; stop it first to keep the rollback (docs/operations.md).",
    )
    rollback.add_argument("root", type=Path, metavar="ROOT", help="publish root (the folder containing versions/ and current)")
    rollback.add_argument(
        "--to",
        default=None,
        metavar="VERSION",
        help="version folder name under ROOT/versions, as `unite publish list` prints it (default: the previous version)",
    )

    add = actions.add_parser(
        "add",
        help="publish an exported student folder into a publish root and make it current",
        description="Copy an exported student (the OUT/student folder of `unite distill`, optionally with model.onnx from "
        "`unite export-onnx` beside model.safetensors) into ROOT/versions and point ROOT/current at it. The export must load "
        "on the CPU, and a model.onnx must load with onnxruntime and come from the same weights. An export identical "
        "to the current version is not published again.",
    )
    add.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="exported student folder containing model.safetensors and config.json")
    add.add_argument("root", type=Path, metavar="ROOT", help="publish root; created when missing")
    add.add_argument(
        "--keep",
        type=int,
        default=DEFAULT_KEEP,
        help=f"published versions kept on disk after publishing, the current one always; older ones are deleted (default: {DEFAULT_KEEP})",
    )


def run_publish(args: argparse.Namespace) -> int:
    """Run ``unite publish ACTION`` and return the exit status."""
    if args.publish_command == "list":
        versions = list_versions(args.root)
        # A bad current link is printed as a WARNING line, and the exit status stays 0, because listing succeeded.
        print(format_versions(args.root, versions, read_current_link(args.root)))
        return 0
    if args.publish_command == "rollback":
        version = rollback_current(args.root, args.to)
        print(f"{args.root / CURRENT_LINK} -> {VERSIONS_DIR}/{version.name}")
        return 0
    if args.publish_command == "add":
        check_onnx_export(args.export_dir)
        previous = current_version(args.root) if args.root.is_dir() else None
        version = publish_student(args.export_dir, args.root, keep=args.keep)
        status = "already current, nothing copied" if version == previous else "published"
        print(f"{args.root / CURRENT_LINK} -> {VERSIONS_DIR}/{version.name} ({status})")
        return 0
    raise AssertionError(f"unhandled publish action {args.publish_command!r}")


def check_onnx_export(export_dir: Path) -> None:
    """Load the export's model.onnx with onnxruntime, when it has one, raising :class:`ConfigError` when that fails.

    The onnx runtime of the student server checks that the file was exported from the weights that
    config.json records, so a model.onnx left over from other weights is rejected here, before publishing.
    """
    if not (export_dir / ONNX_WEIGHTS).is_file():
        return
    from student_server.onnx_runtime import load_onnx_export

    try:
        load_onnx_export(export_dir, device="cpu")
    except (ModelError, RuntimeError) as error:
        raise ConfigError(
            f"cannot publish {export_dir}: its {ONNX_WEIGHTS} does not load with the onnx runtime ({error}). Export it again with "
            f"`unite export-onnx {export_dir} --out {export_dir / ONNX_WEIGHTS}`, or delete it to publish the torch student alone.",
            value=str(export_dir / ONNX_WEIGHTS),
        ) from error


def format_versions(root: Path, versions: list[PublishedVersion], link: CurrentLink | None = None) -> str:
    """Return the table that ``unite publish list`` prints, newest version first, with ``*`` marking the current one.

    When ``link`` has a problem, the first line shows where ``current`` points and a WARNING line follows it.
    """
    warning = []
    if link is not None and link.problem:
        move = f"Move {root / CURRENT_LINK} out of the publish root, then point" if link.target is None else "Point"
        warning = [
            f"WARNING: {link.problem}. A student server given {root} serves whatever {CURRENT_LINK} points at. {move} "
            f"{CURRENT_LINK} at a published version with `unite publish rollback {root} --to VERSION`, or publish one with "
            f"`unite publish add EXPORT_DIR {root}`."
        ]
    if not versions:
        return "\n".join([f"publish root {root}: no versions published", *warning])
    current = next((version.name for version in versions if version.current), "none")
    if link is not None and link.problem:
        current = f"-> {link.target} (invalid)" if link.target is not None else "not a symbolic link (invalid)"
    header = ("", "VERSION", "STUDENT", "TEACHER", "ONNX", "SIZE", "STATUS")
    rows = [
        (
            "*" if version.current else "",
            version.name,
            version.student,
            version.teacher,
            "yes" if version.has_onnx else "no",
            f"{version.size_bytes / 1e6:.1f} MB",
            _status(version),
        )
        for version in versions
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    count = f"{len(versions)} version" if len(versions) == 1 else f"{len(versions)} versions"
    lines = [f"publish root {root}: {count}, newest first; current: {current}"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return "\n".join([*lines, *warning])


def _status(version: PublishedVersion) -> str:
    if not version.problem:
        return "complete"
    return f"{'invalid' if version.invalid else 'incomplete'}: {version.problem}"
