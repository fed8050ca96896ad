"""``unite cache backup``: consistent copies of the gateway's embedding cache and usage ledger, taken while the gateway runs.

The copy itself is in :mod:`shared.cache_backup`. This module adds the command line and prints what the
backup contains.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.cache import DATABASE_NAME
from shared.cache_backup import CacheBackup, backup_cache, cache_database_path, check_backup_out, check_database, copy_database, make_backup_folder
from shared.errors import ConfigError
from teacher_gateway.usage import BACKUP_KIND as LEDGER_KIND
from teacher_gateway.usage import DATABASE_NAME as LEDGER_NAME

DESCRIPTION = (
    "Manage the teacher gateway's embedding cache. `backup` copies it, and with --usage-out the usage ledger, with "
    "SQLite's backup API while gateways keep reading and writing them; see docs/operations.md for restoring a backup."
)

BACKUP_DESCRIPTION = (
    f"Copy the embedding cache ({DATABASE_NAME}) into one file, as it was when the copy began, without stopping the gateway. "
    "The copy is written under a temporary name beside --out, checked with PRAGMA integrity_check and then renamed "
    "to --out, so an interrupted backup never leaves a partial file under that name. Prints the rows per teacher and "
    "the file size. To restore, stop the gateway and copy the file back to CACHE_DIR/"
    f"{DATABASE_NAME} (docs/operations.md). --usage-out also copies the usage ledger (usage.sqlite3: budget "
    "spent, quota windows, canary checks) the same way."
)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``unite cache`` to its subparser."""
    actions = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    backup = actions.add_parser(
        "backup", help="copy the embedding cache (and the usage ledger) into files while the gateway runs", description=BACKUP_DESCRIPTION
    )
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
    backup.add_argument(
        "--usage-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="also copy the gateway's usage ledger (usage.sqlite3 beside the cache) into FILE, outside the cache folder",
    )
    backup.add_argument("--force", action="store_true", help="replace --out and --usage-out when they exist (default: fail instead)")


def run_cache(args: argparse.Namespace) -> int:
    """Run ``unite cache ACTION`` and return the exit status."""
    if args.cache_command == "backup":
        ledger = _usage_ledger_path(args) if args.usage_out is not None else None
        print(format_backup(backup_cache(args.source, args.out, force=args.force)))
        if ledger is not None:
            copy_database(ledger, args.usage_out, LEDGER_KIND, force=args.force, option="--usage-out")
            lines = [f"backed up usage ledger {ledger}", f"  to               {args.usage_out}", "  integrity_check  ok"]
            print("\n".join([*lines, f"  bytes            {args.usage_out.stat().st_size}"]))
        return 0
    raise AssertionError(f"unhandled cache action {args.cache_command!r}")


def _usage_ledger_path(args: argparse.Namespace) -> Path:
    """Return the usage ledger beside the cache that ``args.source`` names, after checking it and ``--usage-out``.

    The checks run before the cache is copied, so a missing or foreign ledger or an unusable ``--usage-out``
    stops the command before it writes anything. A failure while the ledger is copied leaves ``--out`` written.
    """
    if args.usage_out.resolve() == args.out.resolve():
        raise ConfigError(
            f"--usage-out {args.usage_out} is the same file as --out, expected two files. Pass for example --usage-out "
            f"{args.out.with_name('usage-backup.sqlite3')}.",
            value=str(args.usage_out),
        )
    # The ledger lies beside the real database file, also when the source is a symbolic link to it.
    ledger = cache_database_path(args.source).resolve().parent / LEDGER_NAME
    if not ledger.is_file():
        raise ConfigError(
            f"usage ledger {ledger} not found, expected it beside the embedding cache: a gateway creates it when it starts. "
            "Leave out --usage-out for a cache that no gateway has served.",
            value=str(ledger),
        )
    check_backup_out(ledger, args.usage_out, force=args.force, option="--usage-out")
    check_database(ledger, LEDGER_KIND)
    make_backup_folder(args.usage_out, option="--usage-out")
    return ledger


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
