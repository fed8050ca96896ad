"""The usage ledger: what each caller asked for and spent on each teacher, in SQLite beside the cache.

The ledger is ``usage.sqlite3`` in the cache folder, so every gateway process that serves one cache shares
it, and it survives restarts. It follows the cache's crash rules (see :mod:`shared.cache`): WAL mode,
``synchronous=NORMAL``, one ``BEGIN IMMEDIATE`` transaction per change and a file lock while a new database
is set up. A killed process loses at most the change it was writing and never leaves a damaged ledger.

A caller is an API key's name, :data:`ANONYMOUS` when the gateway runs without keys, or :data:`CANARY` for
the drift check. Three tables:

- ``usage``: per (teacher, caller), the counts ``requests``, ``tiles``, ``cache_hits``, ``coalesced``,
  ``teacher_calls`` and ``teacher_tiles``. A teacher's budget is spent by the sum of ``teacher_tiles``
  and ``teacher_calls`` over all its callers.
- ``key_windows``: per (caller, minute), the requests and teacher tiles of callers with a quota.
- ``canary_checks``: per teacher, the time and result of its last canary check that passed, so a
  restarted gateway repeats the check only when that one is older than the check interval.

:meth:`UsageLedger.reserve` reads what is spent, grants what fits the budget and the caller's quota,
and charges it, in one transaction that holds SQLite's write lock. So concurrent requests in any
number of processes never spend past a limit. Tiles are charged when they are granted, before they are
sent, and are not refunded when the teacher call fails, because a paid API may bill a failed call.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared.cache_backup import DatabaseKind
from shared.sqlite import ThreadLocalConnections, converted_sqlite_errors, open_wal_database
from teacher_gateway.errors import (
    BudgetExhaustedError,
    GatewayLimitError,
    QuotaExceededError,
)

logger = logging.getLogger(__name__)

DATABASE_NAME = "usage.sqlite3"
SCHEMA_VERSION = 1
# The ledger as `unite cache backup --usage-out` checks it: its name in messages, table and schema version.
BACKUP_KIND = DatabaseKind("usage ledger", "usage", SCHEMA_VERSION)
WINDOW_S = 60
ANONYMOUS = "anonymous"
CANARY = "canary"
RESERVED_CALLERS = frozenset({ANONYMOUS, CANARY})
COUNTERS = ("requests", "tiles", "cache_hits", "coalesced", "teacher_calls", "teacher_tiles")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    teacher TEXT NOT NULL,
    caller TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tiles INTEGER NOT NULL DEFAULT 0,
    cache_hits INTEGER NOT NULL DEFAULT 0,
    coalesced INTEGER NOT NULL DEFAULT 0,
    teacher_calls INTEGER NOT NULL DEFAULT 0,
    teacher_tiles INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (teacher, caller)
);
CREATE TABLE IF NOT EXISTS key_windows (
    caller TEXT NOT NULL,
    window INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    teacher_tiles INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (caller, window)
);
CREATE TABLE IF NOT EXISTS canary_checks (
    teacher TEXT PRIMARY KEY,
    checked_at REAL NOT NULL,
    tiles INTEGER NOT NULL,
    min_cosine REAL NOT NULL
);
"""
# Command-line options of `unite serve-gateway` and settings that set each unit of the budget.
BUDGET_OPTIONS = {"tiles": "--budget-tiles", "calls": "--budget-calls"}
BUDGET_SETTINGS = {"tiles": "UNITE_GATEWAY_BUDGET_TILES", "calls": "UNITE_GATEWAY_BUDGET_CALLS"}


@dataclass(frozen=True)
class Budget:
    """Maximum numbers of tiles and teacher calls that one teacher identity may ever be sent; None means no limit.

    ``from_options`` names the units (``"tiles"``, ``"calls"``) set by a command-line option of
    ``unite serve-gateway`` rather than by a setting, so that errors name what the operator used.
    """

    tiles: int | None = None
    calls: int | None = None
    from_options: frozenset[str] = frozenset()

    def source(self, unit: str) -> str:
        """Return what set the limit of ``unit``: its command-line option, or its setting (which the option overrides)."""
        if unit in self.from_options:
            return f"option {BUDGET_OPTIONS[unit]}"
        return f"setting {BUDGET_SETTINGS[unit]}"

    def fix(self, unit: str) -> str:
        """Return how to raise the limit of ``unit``, naming the option or setting that set it."""
        if unit in self.from_options:
            return f"Restart the gateway with a higher {BUDGET_OPTIONS[unit]}"
        return f"Raise {BUDGET_SETTINGS[unit]} (or pass a higher {BUDGET_OPTIONS[unit]} to unite serve-gateway) and restart the gateway"


@dataclass(frozen=True)
class Quota:
    """Per-minute limits of an API key; None means no limit."""

    requests_per_minute: int | None = None
    teacher_tiles_per_minute: int | None = None


@dataclass(frozen=True)
class Caller:
    """The sender of a request: an API key's name (never the key itself) and its quota."""

    name: str
    quota: Quota = field(default_factory=Quota)


@dataclass(frozen=True)
class Spent:
    """Tiles and calls granted so far for one teacher, summed over all its callers, and the canary's share of them."""

    tiles: int
    calls: int
    canary_tiles: int = 0
    canary_calls: int = 0


@dataclass(frozen=True)
class CanaryCheck:
    """A passed canary check as the ledger stores it: Unix time, tiles re-embedded and their minimum cosine similarity."""

    checked_at: float
    tiles: int
    min_cosine: float


@dataclass(frozen=True)
class Reservation:
    """The outcome of :meth:`UsageLedger.reserve`.

    ``tiles`` of the ``requested`` tiles may be sent, in ``calls`` teacher calls, where sending all would
    take ``requested_calls``. ``limited_by`` is None
    when all were granted, else ``"budget_tiles"``, ``"budget_calls"`` or ``"quota"``. ``spent`` is
    the teacher's spending after this reservation, and ``quota_used`` the caller's teacher tiles in
    this minute before it. ``retry_after_s`` is the time until the next quota window.
    """

    requested: int
    requested_calls: int
    tiles: int
    calls: int
    limited_by: str | None
    spent: Spent
    quota_used: int = 0
    retry_after_s: float = 0.0


def calls_for(tiles: int, batch_size: int | None) -> int:
    """Return the teacher calls that ``tiles`` tiles take: one per batch of ``batch_size``, or one when it is None."""
    if tiles <= 0:
        return 0
    if batch_size is None:
        return 1
    return math.ceil(tiles / batch_size)


class UsageLedger:
    """The ledger ``root/usage.sqlite3``, safe for threads and processes.

    Raises :class:`CacheError` for every SQLite failure, naming the database path and what to do.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / DATABASE_NAME
        self._connections = ThreadLocalConnections(self.path, f"usage ledger {self.path} is closed. Open a new UsageLedger.")
        open_wal_database(
            self._connections,
            self._sqlite_errors,
            kind="usage ledger",
            schema=_SCHEMA,
            schema_version=SCHEMA_VERSION,
            schema_fix="Use the UNITE version that wrote it, or move the file away to start counting afresh "
            "(budgets then start from zero).",
            create_action="create the ledger tables",
        )
        logger.info("opened usage ledger %s", self.path)

    def admit(self, *, teacher: str, caller: Caller, count_request: bool, now: float | None = None) -> None:
        """Count one request of ``caller``, or raise :class:`QuotaExceededError` when its minute's requests are used up.

        ``count_request`` adds the request to the caller's ``requests`` count of ``teacher``; every request
        counts against the per-minute quota either way.
        """
        now = time.time() if now is None else now
        window = int(now // WINDOW_S)
        limit = caller.quota.requests_per_minute
        with self._transaction("count a request") as connection:
            if limit is not None:
                used = self._window_counts(connection, caller.name, window)[0]
                if used >= limit:
                    raise QuotaExceededError(
                        f"API key {caller.name!r} has used its quota of {limit} requests per minute "
                        f"({used} this minute). Retry after the Retry-After seconds, or raise requests_per_minute "
                        "for this key in the gateway's keys file.",
                        retry_after_s=(window + 1) * WINDOW_S - now,
                        limit=limit,
                        value=used + 1,
                    )
                self._add_to_window(connection, caller.name, window, requests=1)
            if count_request:
                self._add_usage(connection, teacher, caller.name, requests=1)

    def record(self, *, teacher: str, caller: str, tiles: int, cache_hits: int, coalesced: int) -> None:
        """Add a finished request's tile counts to the caller's usage of ``teacher``."""
        with self._transaction("record a request's usage") as connection:
            self._add_usage(connection, teacher, caller, tiles=tiles, cache_hits=cache_hits, coalesced=coalesced)

    def reserve(
        self,
        *,
        teacher: str,
        caller: Caller,
        tiles: int,
        batch_size: int | None,
        budget: Budget,
        all_or_nothing: bool = False,
        now: float | None = None,
    ) -> Reservation:
        """Grant and charge as many of ``tiles`` as the budget of ``teacher`` and the caller's quota allow.

        ``batch_size`` is the teacher's maximum batch, which turns tiles into calls for the calls budget.
        With ``all_or_nothing`` a reservation that cannot grant every tile grants none.
        """
        now = time.time() if now is None else now
        window = int(now // WINDOW_S)
        with self._transaction("reserve teacher tiles") as connection:
            spent = self._spent(connection, teacher)
            budget_cap, budget_reason = _budget_cap(tiles, spent, budget, batch_size)

            quota_limit = caller.quota.teacher_tiles_per_minute
            quota_used = self._window_counts(connection, caller.name, window)[1] if quota_limit is not None else 0
            quota_cap = tiles if quota_limit is None else max(0, quota_limit - quota_used)

            granted = min(tiles, budget_cap, quota_cap)
            limited_by = None
            if budget_cap < tiles and budget_cap <= quota_cap:
                limited_by = budget_reason
            elif quota_cap < tiles:
                limited_by = "quota"
            if all_or_nothing and granted < tiles:
                granted = 0

            calls = calls_for(granted, batch_size)
            if granted:
                self._add_usage(connection, teacher, caller.name, teacher_calls=calls, teacher_tiles=granted)
                if quota_limit is not None:
                    self._add_to_window(connection, caller.name, window, teacher_tiles=granted)
        return Reservation(
            requested=tiles,
            requested_calls=calls_for(tiles, batch_size),
            tiles=granted,
            calls=calls,
            limited_by=limited_by,
            spent=Spent(
                tiles=spent.tiles + granted,
                calls=spent.calls + calls,
                canary_tiles=spent.canary_tiles + (granted if caller.name == CANARY else 0),
                canary_calls=spent.canary_calls + (calls if caller.name == CANARY else 0),
            ),
            quota_used=quota_used,
            retry_after_s=(window + 1) * WINDOW_S - now,
        )

    def spent(self, teacher: str) -> Spent:
        """Return the tiles and calls granted so far for ``teacher``, over all callers and processes."""
        with self._sqlite_errors("read the spending"):
            return self._spent(self._connection(), teacher)

    def record_canary_check(self, teacher: str, check: CanaryCheck) -> None:
        """Store ``check`` as the last passed canary check of ``teacher``, replacing the one before."""
        with self._transaction("record a canary check") as connection:
            connection.execute(
                "INSERT INTO canary_checks (teacher, checked_at, tiles, min_cosine) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (teacher) DO UPDATE SET checked_at = excluded.checked_at, tiles = excluded.tiles, "
                "min_cosine = excluded.min_cosine",
                (teacher, check.checked_at, check.tiles, check.min_cosine),
            )

    def last_canary_check(self, teacher: str) -> CanaryCheck | None:
        """Return the last passed canary check of ``teacher`` by any process sharing this ledger, or None."""
        with self._sqlite_errors("read the last canary check"):
            row = self._connection().execute(
                "SELECT checked_at, tiles, min_cosine FROM canary_checks WHERE teacher = ?", (teacher,)
            ).fetchone()
        return None if row is None else CanaryCheck(checked_at=row[0], tiles=row[1], min_cosine=row[2])

    def usage(self) -> dict[str, dict[str, dict[str, int]]]:
        """Return the counts of :data:`COUNTERS` per teacher identity, then per caller."""
        with self._sqlite_errors("read the usage"):
            rows = self._connection().execute(
                f"SELECT teacher, caller, {', '.join(COUNTERS)} FROM usage ORDER BY teacher, caller"
            ).fetchall()
        report: dict[str, dict[str, dict[str, int]]] = {}
        for teacher, caller, *counts in rows:
            report.setdefault(teacher, {})[caller] = dict(zip(COUNTERS, counts))
        return report

    def close(self) -> None:
        """Close every connection this ledger opened, in any thread."""
        self._connections.close()

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UsageLedger({str(self.root)!r})"

    @staticmethod
    def _spent(connection: sqlite3.Connection, teacher: str) -> Spent:
        tiles, calls, canary_tiles, canary_calls = connection.execute(
            "SELECT COALESCE(SUM(teacher_tiles), 0), COALESCE(SUM(teacher_calls), 0), "
            "COALESCE(SUM(CASE WHEN caller = ? THEN teacher_tiles ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN caller = ? THEN teacher_calls ELSE 0 END), 0) FROM usage WHERE teacher = ?",
            (CANARY, CANARY, teacher),
        ).fetchone()
        return Spent(tiles=tiles, calls=calls, canary_tiles=canary_tiles, canary_calls=canary_calls)

    @staticmethod
    def _window_counts(connection: sqlite3.Connection, caller: str, window: int) -> tuple[int, int]:
        row = connection.execute(
            "SELECT requests, teacher_tiles FROM key_windows WHERE caller = ? AND window = ?", (caller, window)
        ).fetchone()
        return (0, 0) if row is None else (row[0], row[1])

    @staticmethod
    def _add_to_window(connection: sqlite3.Connection, caller: str, window: int, *, requests: int = 0, teacher_tiles: int = 0) -> None:
        connection.execute(
            "INSERT INTO key_windows (caller, window, requests, teacher_tiles) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (caller, window) DO UPDATE SET requests = requests + excluded.requests, "
            "teacher_tiles = teacher_tiles + excluded.teacher_tiles",
            (caller, window, requests, teacher_tiles),
        )
        # Only the current minute is ever read, so older windows of this caller can go.
        connection.execute("DELETE FROM key_windows WHERE caller = ? AND window < ?", (caller, window))

    @staticmethod
    def _add_usage(connection: sqlite3.Connection, teacher: str, caller: str, **counts: int) -> None:
        values = [counts.get(name, 0) for name in COUNTERS]
        updates = ", ".join(f"{name} = {name} + excluded.{name}" for name in COUNTERS)
        connection.execute(
            f"INSERT INTO usage (teacher, caller, {', '.join(COUNTERS)}) VALUES (?, ?, {', '.join('?' * len(COUNTERS))}) "
            f"ON CONFLICT (teacher, caller) DO UPDATE SET {updates}",
            (teacher, caller, *values),
        )

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """Run the block in one ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
        with self._sqlite_errors(action):
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def _connection(self) -> sqlite3.Connection:
        """Return this thread's connection, opening it on first use."""
        return self._connections.get()

    @contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[None]:
        """Convert sqlite3 errors raised while doing ``action`` into :class:`CacheError`."""
        with converted_sqlite_errors(
            f"usage ledger {self.path}",
            action,
            "The file is damaged; move it away to start counting afresh (budgets then start from zero).",
        ):
            yield


def refusal(reservation: Reservation, *, teacher: str, caller: Caller, budget: Budget) -> GatewayLimitError:
    """Return the error for a reservation that granted fewer tiles than requested, naming the limit that bound it."""
    granted, requested = reservation.tiles, reservation.requested
    outcome = (
        f"this request needed {requested} teacher tiles, so {granted} were sent to the teacher and cached "
        f"and {requested - granted} were not"
    )
    if reservation.limited_by == "quota":
        limit = caller.quota.teacher_tiles_per_minute
        return QuotaExceededError(
            f"API key {caller.name!r} has used {reservation.quota_used} of its quota of {limit} teacher tiles per "
            f"minute; {outcome}. Retry after the Retry-After seconds (cached tiles cost nothing again), or raise "
            "teacher_tiles_per_minute for this key in the gateway's keys file.",
            retry_after_s=reservation.retry_after_s,
            limit=limit,
            value=reservation.quota_used + requested,
        )
    if reservation.limited_by == "budget_calls":
        used = reservation.spent.calls - reservation.calls
        return BudgetExhaustedError(
            f"budget of teacher {teacher!r} is {budget.calls} teacher calls ({budget.source('calls')}) and {used} are "
            f"used, {reservation.spent.canary_calls} of them by canary checks; {outcome}. {budget.fix('calls')} to "
            f"continue; cached tiles cost nothing again. {_CANARY_NOTE}",
            limit=budget.calls,
            value=used + reservation.requested_calls,
        )
    used = reservation.spent.tiles - granted
    return BudgetExhaustedError(
        f"budget of teacher {teacher!r} is {budget.tiles} tiles ({budget.source('tiles')}) and {used} are used, "
        f"{reservation.spent.canary_tiles} of them by canary checks; {outcome}. {budget.fix('tiles')} to continue; "
        f"cached tiles cost nothing again. {_CANARY_NOTE}",
        limit=budget.tiles,
        value=used + requested,
    )


# Canary checks are charged to the budget too, so a raised budget must leave room for the next one.
_CANARY_NOTE = (
    "Leave room for a canary check too: a start more than UNITE_GATEWAY_CANARY_INTERVAL_MINUTES after the last "
    "passed check, and every interval after it, re-embeds UNITE_GATEWAY_CANARY_TILES tiles (8 by default)."
)


def _budget_cap(tiles: int, spent: Spent, budget: Budget, batch_size: int | None) -> tuple[int, str]:
    """Return the maximum number of ``tiles`` that the budget still allows, and the limit that sets this cap."""
    cap, reason = tiles, "budget_tiles"
    if budget.tiles is not None:
        cap = min(cap, max(0, budget.tiles - spent.tiles))
    if budget.calls is not None:
        calls_left = max(0, budget.calls - spent.calls)
        if batch_size is not None:
            by_calls = calls_left * batch_size
        else:
            # Without a maximum batch, one call takes any number of tiles.
            by_calls = tiles if calls_left else 0
        if by_calls < cap:
            cap, reason = by_calls, "budget_calls"
    return cap, reason


def budget_status(budget: Budget, spent: Spent) -> dict[str, dict[str, int | None]]:
    """Return ``{"tiles": {"limit", "spent", "left"}, "calls": {...}}``; ``limit`` and ``left`` are None without a limit."""
    status: dict[str, dict[str, int | None]] = {}
    for unit, limit, used in (("tiles", budget.tiles, spent.tiles), ("calls", budget.calls, spent.calls)):
        status[unit] = {"limit": limit, "spent": used, "left": None if limit is None else max(0, limit - used)}
    return status
