"""The content-addressed cache of teacher embeddings: one SQLite database in WAL mode.

A row per tile and teacher, keyed by :meth:`EmbeddingCache.tile_key`, which hashes the teacher identity and
the exact pixels the teacher is given. A tile re-encoded by another client therefore still hits, and two
teachers never share a row. Rows are never updated: ``put_many`` inserts with ``INSERT OR IGNORE``, so the
first embedding stored for a key wins.

SQLite settings and why:

- ``journal_mode=WAL``: readers do not block the writer and the writer does not block readers (SQLite's
  WAL documentation), so the gateway serves cache hits while another process fills the cache. WAL needs a local file system (not NFS).
- ``synchronous=NORMAL``: in WAL mode this cannot corrupt the database. A process crash loses nothing that
  was committed. A power cut or OS crash may roll back the last few committed transactions, which only
  means asking the teacher again for those tiles. ``FULL`` would add an fsync per commit for that case.
- ``busy_timeout``: a writer that finds the database locked by another process waits up to
  :data:`shared.sqlite.BUSY_TIMEOUT_S` seconds instead of failing at once.
- ``embeddings.sqlite3.lock``: an exclusive file lock (``fcntl.flock``, so POSIX only) held while a
  process switches the database to WAL and creates its tables, steps where SQLite skips the busy handler.

Each thread gets its own connection (FastAPI runs synchronous handlers in a thread pool), and every
write is one ``BEGIN IMMEDIATE`` transaction, so a crash loses at most the batch being written.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import CacheError, ImageError
from shared.sqlite import ThreadLocalConnections, converted_sqlite_errors, open_wal_database

logger = logging.getLogger(__name__)

DATABASE_NAME = "embeddings.sqlite3"
SCHEMA_VERSION = 1
# SQLite before 3.32 allows at most 999 bound parameters per statement.
_MAX_PARAMETERS = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    embedding BLOB NOT NULL,
    dim INTEGER NOT NULL,
    tile_png BLOB NOT NULL,
    slide_id TEXT,
    x INTEGER,
    y INTEGER,
    mpp REAL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS embeddings_teacher ON embeddings (teacher);
CREATE TABLE IF NOT EXISTS quarantine (
    key TEXT NOT NULL,
    teacher TEXT NOT NULL,
    embedding BLOB NOT NULL,
    dim INTEGER NOT NULL,
    tile_png BLOB NOT NULL,
    slide_id TEXT,
    x INTEGER,
    y INTEGER,
    mpp REAL,
    created_at REAL NOT NULL,
    quarantined_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

_COLUMNS = "key, teacher, embedding, dim, tile_png, slide_id, x, y, mpp"


@dataclass
class CacheEntry:
    """One cached teacher embedding with the prepared tile it was computed from and its provenance."""

    key: str
    teacher: str
    embedding: np.ndarray
    tile_png: bytes
    slide_id: str | None = None
    coords: tuple[int, int] | None = None
    mpp: float | None = None


class EmbeddingCache:
    """The embedding cache under ``root`` (the file ``root/embeddings.sqlite3``), safe for threads and processes.

    Raises :class:`CacheError` for every SQLite failure, naming the database path and what to do.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / DATABASE_NAME
        self._connections = ThreadLocalConnections(
            self.path, f"embedding cache {self.path} is closed. Open a new EmbeddingCache."
        )
        open_wal_database(
            self._connections,
            self._sqlite_errors,
            kind="embedding cache",
            schema=_SCHEMA,
            schema_version=SCHEMA_VERSION,
            schema_fix="Use a UNITE version that wrote it, or point the cache folder setting at a new directory.",
            create_action="create the cache tables",
        )
        logger.info("opened embedding cache %s", self.path)

    @staticmethod
    def tile_key(tile: np.ndarray, teacher_identity: str) -> str:
        """Return the cache key of a prepared tile for a teacher.

        The key is the sha256 hex digest of the teacher identity, a NUL byte, the tile's shape as text
        (for example ``224x224x3``), a NUL byte and the tile's raw C-order bytes. It depends on the pixels
        only, never on how the image file was encoded.
        """
        if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
            raise ImageError(
                f"tile has shape {tile.shape} and dtype {tile.dtype}, expected (H, W, 3) uint8 RGB. "
                "Pass the output of shared.imaging.prepare_tile.",
                value=list(tile.shape),
            )
        digest = hashlib.sha256()
        digest.update(teacher_identity.encode("utf-8"))
        digest.update(b"\0")
        digest.update("x".join(str(size) for size in tile.shape).encode("ascii"))
        digest.update(b"\0")
        digest.update(np.ascontiguousarray(tile).tobytes())
        return digest.hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Return the cached embeddings (float32) of those ``keys`` that are present; absent keys are left out."""
        found: dict[str, np.ndarray] = {}
        unique_keys = list(dict.fromkeys(keys))
        with self._sqlite_errors("read embeddings"):
            connection = self._connection()
            for start in range(0, len(unique_keys), _MAX_PARAMETERS):
                chunk = unique_keys[start : start + _MAX_PARAMETERS]
                placeholders = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT key, embedding FROM embeddings WHERE key IN ({placeholders})", chunk
                ).fetchall()
                for key, blob in rows:
                    found[key] = _decode_embedding(blob)
        return found

    def put_many(self, entries: list[CacheEntry]) -> None:
        """Store ``entries`` in one transaction; a key already stored keeps its first embedding.

        Raises :class:`CacheError` when an embedding is not a finite 1-D vector, or when its length differs
        from other entries of the same teacher in the batch or already in the cache.
        """
        if not entries:
            return
        batch_dims = self._check_entries(entries)
        now = time.time()
        rows = [_entry_row(entry, now) for entry in entries]

        with self._sqlite_errors(f"store {len(entries)} embeddings"):
            connection = self._connection()
            # IMMEDIATE takes the write lock before the dimension check, so no other writer can store a
            # different dimension for the same teacher between the check and the insert.
            connection.execute("BEGIN IMMEDIATE")
            try:
                for teacher, dim in batch_dims.items():
                    stored = connection.execute(
                        "SELECT dim FROM embeddings WHERE teacher = ? LIMIT 1", (teacher,)
                    ).fetchone()
                    if stored is not None and stored[0] != dim:
                        raise CacheError(
                            f"embedding cache {self.path}: teacher {teacher!r} has {stored[0]}-d embeddings stored, "
                            f"got {dim}-d. A teacher identity must name one model; give the new model its own "
                            "identity or use a new cache folder.",
                            limit=stored[0],
                            value=dim,
                        )
                connection.executemany(
                    f"INSERT OR IGNORE INTO embeddings ({_COLUMNS}, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def quarantine(self, identity: str, since: float, *, reason: str = "teacher drift", keep: Sequence[str] = ()) -> int:
        """Move the entries of teacher ``identity`` created at or after ``since`` (Unix time) to the quarantine table.

        Entries whose key is in ``keep`` stay, such as the canary tiles that the drift was measured
        against, so a restarted gateway measures the same drift again. Returns the number moved.
        Moved entries are no longer cache hits or exported, so the teacher embeds those tiles again
        under a new identity. They stay in the ``quarantine`` table of the same database,
        with ``reason``, for inspection. One transaction, so a crash moves all of them or none.
        """
        now = time.time()
        kept = list(keep)
        # The kept keys are bound as parameters, one placeholder each.
        condition = "teacher = ? AND created_at >= ?" + (f" AND key NOT IN ({', '.join('?' * len(kept))})" if kept else "")
        with self._sqlite_errors(f"quarantine the entries of teacher {identity!r}"):
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(
                    f"INSERT INTO quarantine ({_COLUMNS}, created_at, quarantined_at, reason) "
                    f"SELECT {_COLUMNS}, created_at, ?, ? FROM embeddings WHERE {condition}",
                    (now, reason, identity, since, *kept),
                )
                moved = connection.execute(f"DELETE FROM embeddings WHERE {condition}", (identity, since, *kept)).rowcount
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        logger.warning(
            "embedding cache %s: moved %d entries of teacher %s created since %s to the quarantine table (%s)",
            self.path,
            moved,
            identity,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
            reason,
        )
        return moved

    def check_writable(self) -> None:
        """Write and commit one small row, raising :class:`CacheError` when the database cannot be written now.

        The gateway calls it to find out whether a failed write (such as a full disk) has cleared.
        """
        with self._sqlite_errors("write a test row"):
            connection = self._connection()
            connection.execute("CREATE TABLE IF NOT EXISTS write_check (id INTEGER PRIMARY KEY, checked_at REAL NOT NULL)")
            connection.execute("INSERT OR REPLACE INTO write_check (id, checked_at) VALUES (1, ?)", (time.time(),))

    def count_quarantined(self, teacher: str | None = None) -> int:
        """Return the number of quarantined entries, of one teacher or of all."""
        with self._sqlite_errors("count quarantined entries"):
            connection = self._connection()
            if teacher is None:
                return connection.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
            return connection.execute("SELECT COUNT(*) FROM quarantine WHERE teacher = ?", (teacher,)).fetchone()[0]

    def count(self, teacher: str | None = None) -> int:
        """Return the number of cached embeddings, of one teacher or of all."""
        with self._sqlite_errors("count embeddings"):
            connection = self._connection()
            if teacher is None:
                return connection.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            return connection.execute("SELECT COUNT(*) FROM embeddings WHERE teacher = ?", (teacher,)).fetchone()[0]

    def count_by_teacher(self) -> dict[str, int]:
        """Return the number of cached embeddings per teacher identity."""
        with self._sqlite_errors("count embeddings"):
            rows = self._connection().execute(
                "SELECT teacher, COUNT(*) FROM embeddings GROUP BY teacher ORDER BY teacher"
            ).fetchall()
        return {teacher: count for teacher, count in rows}

    def iter_entries(self, teacher: str, batch: int = 256) -> Iterator[CacheEntry]:
        """Yield the entries of ``teacher`` in insertion order, reading ``batch`` rows per query.

        Rows inserted while iterating are yielded too when they come after the last row read.
        """
        if batch < 1:
            raise CacheError(f"iter_entries batch is {batch}, expected at least 1.", limit=1, value=batch)
        last_rowid = 0
        while True:
            with self._sqlite_errors(f"read the entries of teacher {teacher!r}"):
                rows = self._connection().execute(
                    f"SELECT rowid, {_COLUMNS} FROM embeddings WHERE teacher = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                    (teacher, last_rowid, batch),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _row_entry(row[1:])
            last_rowid = rows[-1][0]

    def close(self) -> None:
        """Close every connection this cache opened, in any thread; later calls raise :class:`CacheError`."""
        self._connections.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    def _connection(self) -> sqlite3.Connection:
        """Return this thread's connection, opening it on first use."""
        return self._connections.get()

    @contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[None]:
        """Convert sqlite3 errors raised while doing ``action`` into :class:`CacheError`."""
        with converted_sqlite_errors(
            f"embedding cache {self.path}",
            action,
            "The file is damaged or not a UNITE cache; move it away to start an empty cache "
            "(its embeddings will be requested from the teacher again).",
        ):
            yield

    @staticmethod
    def _check_entries(entries: list[CacheEntry]) -> dict[str, int]:
        """Check each embedding and return the one dimension of each teacher in the batch."""
        dims: dict[str, int] = {}
        for index, entry in enumerate(entries):
            embedding = np.asarray(entry.embedding)
            if embedding.ndim != 1 or not np.all(np.isfinite(embedding)):
                raise CacheError(
                    f"cache entry {index} (key {entry.key}): embedding has shape {embedding.shape} or non-finite "
                    "values, expected a finite 1-D vector. Check the teacher's output before caching it.",
                    value=list(embedding.shape),
                )
            dim = dims.setdefault(entry.teacher, embedding.shape[0])
            if embedding.shape[0] != dim:
                raise CacheError(
                    f"cache entry {index} (key {entry.key}): teacher {entry.teacher!r} embedding has "
                    f"{embedding.shape[0]} values, but earlier entries in the batch have {dim}. "
                    "Send one model's embeddings per teacher identity.",
                    limit=dim,
                    value=embedding.shape[0],
                )
        return dims


def _decode_embedding(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _entry_row(entry: CacheEntry, created_at: float) -> tuple:
    embedding = np.ascontiguousarray(entry.embedding, dtype="<f4")
    x, y = entry.coords if entry.coords is not None else (None, None)
    return (
        entry.key,
        entry.teacher,
        embedding.tobytes(),
        int(embedding.shape[0]),
        bytes(entry.tile_png),
        entry.slide_id,
        None if x is None else int(x),
        None if y is None else int(y),
        None if entry.mpp is None else float(entry.mpp),
        created_at,
    )


def _row_entry(row: tuple) -> CacheEntry:
    key, teacher, blob, _dim, tile_png, slide_id, x, y, mpp = row
    return CacheEntry(
        key=key,
        teacher=teacher,
        embedding=_decode_embedding(blob),
        tile_png=bytes(tile_png),
        slide_id=slide_id,
        coords=None if x is None or y is None else (int(x), int(y)),
        mpp=mpp,
    )
