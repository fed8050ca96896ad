"""Online backup of the embedding cache, and of the gateway's usage ledger, with SQLite's backup API, safe while a gateway keeps writing.

A plain file copy of a WAL database can miss the transactions still in ``embeddings.sqlite3-wal`` or
catch the main file halfway through a checkpoint. :func:`backup_cache` instead copies the database with
``sqlite3.Connection.backup`` in one step. That step reads inside one read transaction, so the copy is
the database as it was when the step began. Writers are not blocked, because in WAL mode a reader does not
block a writer (SQLite's WAL documentation). Rows committed after the step began are not in the copy. While
the backup reads, SQLite cannot start the ``-wal`` file over, so it grows with the gateway's writes until then.

The copy is written under a temporary name beside the output file and renamed into place after
``PRAGMA integrity_check`` passed, so a killed backup never leaves a partial file under the final name.
The output is one self-contained file in rollback-journal mode. A gateway started on a restored copy
switches it back to WAL when it opens it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.cache import DATABASE_NAME, SCHEMA_VERSION
from shared.errors import CacheError
from shared.fsync import fsync_dir, fsync_file
from shared.sqlite import BUSY_TIMEOUT_S, converted_sqlite_errors

logger = logging.getLogger(__name__)

# Suffixes of the files SQLite keeps beside a WAL database.
_SIDE_FILE_SUFFIXES = ("-wal", "-shm", "-journal", ".lock")


@dataclass(frozen=True)
class DatabaseKind:
    """A UNITE SQLite database that :func:`copy_database` can back up: its name in messages, a table it must have, its schema version."""

    label: str
    table: str
    schema_version: int


EMBEDDING_CACHE = DatabaseKind("embedding cache", "embeddings", SCHEMA_VERSION)


@dataclass
class CacheBackup:
    """The result of :func:`backup_cache`: the output file, its size and the rows it contains."""

    source: Path
    out: Path
    bytes: int
    rows_by_teacher: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    schema_version: int = SCHEMA_VERSION
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Return the number of cached embeddings over all teachers."""
        return sum(self.rows_by_teacher.values())


def cache_database_path(source: Path) -> Path:
    """Return the database file that ``source`` names: ``source/embeddings.sqlite3`` for a folder, else ``source``.

    Raises :class:`CacheError` when neither exists.
    """
    source = Path(source)
    if source.is_dir():
        database = source / DATABASE_NAME
        if not database.is_file():
            raise CacheError(
                f"cache folder {source} contains no {DATABASE_NAME}, expected the gateway's cache folder "
                "(its --cache-dir or UNITE_GATEWAY_CACHE_DIR). Pass that folder or the database file itself.",
                value=str(source),
            )
        return database
    if not source.is_file():
        raise CacheError(
            f"embedding cache {source} not found, expected a cache folder containing {DATABASE_NAME} or that file. "
            "Pass the gateway's cache folder (its --cache-dir or UNITE_GATEWAY_CACHE_DIR).",
            value=str(source),
        )
    return source


def backup_cache(source: Path, out: Path, *, force: bool = False) -> CacheBackup:
    """Copy the embedding cache at ``source`` (a cache folder or its database file) into the file ``out``.

    Returns what was written. Raises :class:`CacheError` as :func:`copy_database` does, and when ``source``
    is neither a cache folder nor a database file. ``out`` is then unchanged.
    """
    started = time.monotonic()
    database = cache_database_path(source)
    out = Path(out)
    copy_database(database, out, EMBEDDING_CACHE, force=force)
    rows_by_teacher, quarantined, schema_version = _summarise_cache(out)
    backup = CacheBackup(
        source=database,
        out=out,
        bytes=out.stat().st_size,
        rows_by_teacher=rows_by_teacher,
        quarantined=quarantined,
        schema_version=schema_version,
        seconds=time.monotonic() - started,
    )
    logger.info("backed up embedding cache %s to %s: %d rows, %d bytes in %.1f s", database, out, backup.rows, backup.bytes, backup.seconds)
    return backup


def copy_database(database: Path, out: Path, kind: DatabaseKind, *, force: bool = False, option: str = "--out") -> None:
    """Copy the SQLite database ``database`` of ``kind`` into the file ``out``, checked, while others keep writing it.

    Raises :class:`CacheError` when ``database`` lacks the table of ``kind`` or has another schema version, or
    when ``out`` cannot take the backup (see :func:`check_backup_out`). It also raises it when SQLite fails or
    when the copy fails ``PRAGMA integrity_check``. ``out`` is then unchanged. ``option`` is the command-line
    option that gave ``out``, named in the messages.
    """
    out = Path(out)
    check_backup_out(database, out, force=force, option=option)
    make_backup_folder(out, option=option)

    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with _open_read_only(database, kind) as source:
            _check_kind(source, database, kind)
            _copy_into(source, partial, out, option)
        _check_integrity(partial, database, kind)
        fsync_file(partial)
        # Checked again because another backup may have written ``out`` while this one ran.
        if not force and out.exists():
            raise CacheError(_exists_message(out, option), value=str(out))
        os.replace(partial, out)
        fsync_dir(out.parent)
    finally:
        for path in [partial, *(partial.with_name(partial.name + suffix) for suffix in _SIDE_FILE_SUFFIXES)]:
            # A folder that became unwritable must not hide the error that ended the copy.
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def check_database(database: Path, kind: DatabaseKind) -> None:
    """Raise :class:`CacheError` unless ``database`` opens read-only and has the table and schema version of ``kind``."""
    with _open_read_only(database, kind) as source:
        _check_kind(source, database, kind)


def check_backup_out(database: Path, out: Path, *, force: bool, option: str = "--out") -> None:
    """Raise :class:`CacheError` when ``out`` cannot take a backup of ``database``.

    That is when ``out`` is a folder or another non-regular file, is directly in the folder of
    ``database``, or exists while ``force`` is false.
    """
    cache_folder = database.resolve().parent
    suggestion = cache_folder / "backups" / f"{database.stem}-backup.sqlite3"
    if out.is_dir():
        if out.resolve() != cache_folder:
            suggestion = out / f"{database.stem}-backup.sqlite3"
        raise CacheError(f"backup output {out} is a folder, expected a file path. Pass an {option} such as {suggestion}.", value=str(out))
    if out.exists() and not out.is_file():
        raise CacheError(
            f"backup output {out} exists and is not a regular file (a device, pipe or socket), expected a new file or "
            f"an earlier backup. Pass an {option} such as {suggestion}.",
            value=str(out),
        )
    # The top level of the cache folder belongs to the gateway: embeddings.sqlite3, the usage ledger
    # usage.sqlite3, their -wal, -shm and -journal files and their lock files. Replacing any of them under a
    # running gateway damages it, so the output must be elsewhere, for example in a subfolder such as backups/.
    if out.resolve().parent == cache_folder:
        raise CacheError(
            f"backup output {out} is in the cache folder {cache_folder}, where the gateway keeps its databases, their "
            f"side files and lock files, expected a path outside that folder. Pass an {option} in another folder, such as "
            f"{cache_folder / 'backups' / out.name}, or preferably on another disk.",
            value=str(out),
        )
    if out.exists() and not force:
        raise CacheError(_exists_message(out, option), value=str(out))


def make_backup_folder(out: Path, *, option: str = "--out") -> None:
    """Create the folder of ``out`` if it is missing, or raise :class:`CacheError` naming ``option`` when that fails."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(
            f"backup output {out}: cannot create its folder {out.parent} ({error.strerror or error}). "
            f"Pass an {option} in a folder you can write to.",
            value=str(out),
        ) from error


def _exists_message(out: Path, option: str) -> str:
    return f"backup output {out} already exists, expected a new file. Pass another {option}, or --force to replace it."


@contextlib.contextmanager
def _open_read_only(database: Path, kind: DatabaseKind) -> Iterator[sqlite3.Connection]:
    """Open ``database`` read-only: the backup never writes to it, and a wrong path cannot create an empty database."""
    with converted_sqlite_errors(f"{kind.label} {database}", "open it for reading", _damaged_fix(kind)):
        connection = sqlite3.connect(_read_only_uri(database), uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        yield connection
    finally:
        connection.close()


def _damaged_fix(kind: DatabaseKind) -> str:
    return f"The file is damaged or is not a UNITE {kind.label}: check the path, or restore the {kind.label} from a backup."


def _check_kind(source: sqlite3.Connection, database: Path, kind: DatabaseKind) -> None:
    """Raise :class:`CacheError` unless the open ``source`` has the table and the schema version of ``kind``."""
    name = f"{kind.label} {database}"
    with converted_sqlite_errors(name, "read its schema", _damaged_fix(kind)):
        tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = source.execute("PRAGMA user_version").fetchone()[0]
    if kind.table not in tables:
        raise CacheError(
            f"{name} has no {kind.table} table (tables: {sorted(tables)}), expected a UNITE {kind.label}. "
            "Pass the gateway's cache folder, or the database file of that kind in it.",
            value=str(database),
        )
    if version != kind.schema_version:
        raise CacheError(
            f"{name} has schema version {version}, expected {kind.schema_version}. Back it up with the UNITE version that wrote it.",
            limit=kind.schema_version,
            value=version,
        )


def _copy_into(source: sqlite3.Connection, partial: Path, out: Path, option: str) -> None:
    """Copy the open ``source`` into the new file ``partial`` with the backup API, naming ``out`` in errors."""
    fix = f"Pass an {option} on a local disk with free space, in a folder you can write to."
    with converted_sqlite_errors(f"backup {out}", "be written", fix, operational_fix=fix):
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            # pages=-1 copies every page in one step, inside one read transaction of the source. Copying a
            # few pages per step would restart from the first page whenever the gateway commits in between,
            # so under steady writes the backup might never finish.
            source.backup(target, pages=-1)
            # The copy keeps the source's WAL flag. Rollback-journal mode makes it one self-contained file.
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()


def _check_integrity(partial: Path, database: Path, kind: DatabaseKind) -> None:
    """Run ``PRAGMA integrity_check`` on the copy ``partial`` of ``database``, and raise :class:`CacheError` unless it is ok."""
    with converted_sqlite_errors(f"backup of {database}", "be checked", "Run the backup again; if it fails again, check the disk."):
        connection = sqlite3.connect(_read_only_uri(partial), uri=True)
        try:
            problems = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        finally:
            connection.close()
    if problems != ["ok"]:
        raise CacheError(
            f"backup of {database} failed PRAGMA integrity_check: {problems[:5]}, expected ['ok']. "
            f"Nothing was written to --out. Run the backup again. If it fails again, the {kind.label} itself is damaged: restore "
            "the last good backup, or move the file away so that the gateway starts an empty one.",
            value=problems[:5],
        )


def _summarise_cache(path: Path) -> tuple[dict[str, int], int, int]:
    """Return the rows per teacher, the quarantined rows and the schema version of the cache backup ``path``."""
    with converted_sqlite_errors(f"backup {path}", "be read", "Run the backup again; if it fails again, check the disk."):
        connection = sqlite3.connect(_read_only_uri(path), uri=True)
        try:
            rows = connection.execute("SELECT teacher, COUNT(*) FROM embeddings GROUP BY teacher ORDER BY teacher").fetchall()
            has_quarantine = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'").fetchone()
            quarantined = connection.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] if has_quarantine else 0
            version = connection.execute("PRAGMA user_version").fetchone()[0]
        finally:
            connection.close()
    return {teacher: count for teacher, count in rows}, quarantined, version


def _read_only_uri(path: Path) -> str:
    """Return an SQLite URI that opens ``path`` read-only, with the characters a URI reserves escaped."""
    return path.resolve().as_uri() + "?mode=ro"
