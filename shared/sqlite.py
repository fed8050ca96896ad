"""SQLite setup shared by the embedding cache (:mod:`shared.cache`) and the usage ledger (:mod:`teacher_gateway.usage`).

Both keep one database file in WAL mode, open one connection per thread and raise :class:`CacheError`
naming the database for every SQLite failure. The reasons for each setting are in :mod:`shared.cache`.
Error messages start with the caller's ``name``, such as ``embedding cache /data/embeddings.sqlite3``, so
that each names its own database and fix.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from shared.errors import CacheError

BUSY_TIMEOUT_S = 60.0


class ThreadLocalConnections:
    """One connection per thread to the database at ``path``, all closed together by :meth:`close`.

    :meth:`get` raises :class:`CacheError` with ``closed_message`` once :meth:`close` has been called.
    """

    def __init__(self, path: Path, closed_message: str) -> None:
        self.path = path
        self._closed_message = closed_message
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False

    def get(self) -> sqlite3.Connection:
        """Return this thread's connection, opening it on first use."""
        if self._closed:
            raise CacheError(self._closed_message)
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection

        # check_same_thread=False only so that close() may close it from another thread: each
        # connection is used by the one thread that opened it.
        connection = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        connection.execute("PRAGMA synchronous = NORMAL")
        with self._connections_lock:
            if self._closed:
                connection.close()
                raise CacheError(self._closed_message)
            self._connections.append(connection)
        self._local.connection = connection
        return connection

    def close(self) -> None:
        """Close every connection opened by :meth:`get`, in any thread."""
        with self._connections_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()


def open_wal_database(
    connections: ThreadLocalConnections,
    sqlite_errors: Callable[[str], AbstractContextManager[None]],
    *,
    kind: str,
    schema: str,
    schema_version: int,
    schema_fix: str,
    create_action: str,
) -> None:
    """Create the database's folder, switch the database to WAL and create the tables of ``schema``.

    ``kind`` names the database in messages (``"embedding cache"``). ``sqlite_errors(create_action)`` converts
    SQLite errors of these steps. Raises :class:`CacheError` when the folder cannot be created, when SQLite
    keeps another journal mode, or when the stored ``PRAGMA user_version`` is neither 0 (a new database)
    nor ``schema_version``, ending that message with ``schema_fix``.
    """
    path = connections.path
    root = path.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(
            f"{kind} folder {root} cannot be created ({error}). "
            "Point the cache folder setting at a writable local directory."
        ) from error
    # Switching a new database to WAL and creating its tables can fail at once with "database is
    # locked" when several processes open it together, because SQLite skips the busy handler where
    # waiting could deadlock. An exclusive file lock makes these first steps run one process at a time.
    with path.with_name(path.name + ".lock").open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        with sqlite_errors(create_action):
            connection = connections.get()
            # WAL mode is stored in the database file, so connections opened later use it too.
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise CacheError(
                    f"{kind} {path}: SQLite kept journal mode {mode!r}, expected 'wal'. "
                    "Put the cache folder on a local file system that supports WAL (not NFS)."
                )
            connection.executescript(schema)
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                connection.execute(f"PRAGMA user_version = {schema_version}")
            elif version != schema_version:
                raise CacheError(f"{kind} {path} has schema version {version}, expected {schema_version}. {schema_fix}")


@contextmanager
def converted_sqlite_errors(name: str, action: str, damaged_fix: str, *, operational_fix: str | None = None) -> Iterator[None]:
    """Convert sqlite3 errors raised while doing ``action`` into :class:`CacheError` starting with ``name``.

    ``damaged_fix`` ends the message of a damaged or foreign file (``sqlite3.DatabaseError``), and
    ``operational_fix`` the message of a failed operation such as a full disk (``sqlite3.OperationalError``),
    in place of the advice about the cache folder.
    """
    try:
        yield
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            fix = f"Another process held the write lock for more than {BUSY_TIMEOUT_S:.0f} s; retry, or stop the other writer."
        else:
            fix = operational_fix or "Check that the cache folder is on a local disk, writable and not full."
        raise CacheError(f"{name}: cannot {action} ({error}). {fix}") from error
    except sqlite3.DatabaseError as error:
        raise CacheError(f"{name}: cannot {action} ({error}). {damaged_fix}") from error
    except sqlite3.Error as error:
        raise CacheError(f"{name}: cannot {action} ({error}).") from error
