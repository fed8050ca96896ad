"""``unite cache backup``: a consistent copy of the gateway's embedding cache, taken while the gateway runs.

The copy itself is in :mod:`shared.cache_backup`. This module adds the command line and prints what the
backup contains.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.cache import DATABASE_NAME
from shared.cache_backup import CacheBackup, backup_cache

DESCRIPTION = (
    "Manage the teacher gateway's embedding cache. `backup` copies it with SQLite's backup API while gateways keep "
    "reading and writing it; see docs/operations.md for restoring a backup."
)

BACKUP_DESCRIPTION = (
    f"Copy the embedding cache ({DATABASE_NAME}) into one file, as it was when the copy began, without stopping the gateway. "
    "The copy is written under a temporary name beside --out, checked with PRAGMA integrity_check and then renamed "
    "to --out, so an interrupted backup never leaves a partial file under that name. Prints the rows per teacher and "
    "the file size. To restore, stop the gateway and copy the file back to CACHE_DIR/"
    f"{DATABASE_NAME} (docs/operations.md)."
)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``unite cache`` to its subparser."""
    actions = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    backup = actions.add_parser("backup", help="copy the embedding cache into one file while the gateway runs", description=BACKUP_DESCRIPTION)
    backup.add_argument(
        "source",
        type=Path,
        metavar="CACHE_DIR_OR_DB",
        help=f"the gateway's cache folder (its --cache-dir or UNITE_GATEWAY_CACHE_DIR) or the {DATABASE_NAME} file in it",
    )
    backup.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="backup file to write, outside the cache folder (a subfolder of it is accepted); its folder is created if missing",
    )
    backup.add_argument("--force", action="store_true", help="replace --out when it exists (default: fail instead)")


def run_cache(args: argparse.Namespace) -> int:
    """Run ``unite cache ACTION`` and return the exit status."""
    if args.cache_command == "backup":
        print(format_backup(backup_cache(args.source, args.out, force=args.force)))
        return 0
    raise AssertionError(f"unhandled cache action {args.cache_command!r}")


def format_backup(backup: CacheBackup) -> str:
    """Return the summary that ``unite cache backup`` prints: the files, the integrity check, the size and rows per teacher."""
    lines = [
        f"backed up embedding cache {backup.source}",
        f"  to               {backup.out}",
        "  integrity_check  ok",
        f"  bytes            {backup.bytes}",
        f"  schema version   {backup.schema_version}",
        f"  rows             {backup.rows}",
    ]
    width = max((len(teacher) for teacher in backup.rows_by_teacher), default=0)
    for teacher, count in backup.rows_by_teacher.items():
        lines.append(f"    {teacher:<{width}}  {count}")
    lines.append(f"  quarantined      {backup.quarantined}")
    lines.append(f"  seconds          {backup.seconds:.1f}")
    return "\n".join(lines)
