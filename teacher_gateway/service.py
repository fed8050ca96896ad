"""The gateway's core, free of HTTP: tiles in, teacher embeddings out, from the cache first.

For each request the service decodes and prepares every tile and looks all keys up in the cache. It
claims each distinct missing tile in the process's in-flight map (:mod:`teacher_gateway.coalesce`) and
waits for the tiles another request is already embedding. It charges the rest to the teacher's budget
and the caller's quota (:mod:`teacher_gateway.usage`) and sends them to the teacher in one call. Then it
checks the teacher's output, stores it, and returns the embeddings in request order.

When the budget or the quota grants only some of the missing tiles, the granted ones are sent and
cached, and the request then fails with the error of the limit that bound it. A retry finds them cached.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from shared.cache import CacheEntry, EmbeddingCache
from shared.errors import CacheError, TeacherError
from shared.imaging import decode_base64_image, encode_png, prepare_tile
from shared.protocol import EmbeddingInput
from teacher_gateway.coalesce import InFlightTiles, NotSent
from teacher_gateway.errors import TeacherDriftError
from teacher_gateway.metrics import GatewayMetrics
from teacher_gateway.teachers.base import Teacher
from teacher_gateway.unavailable import CacheUnavailableError, GatewayBusyError
from teacher_gateway.usage import (
    ANONYMOUS,
    CANARY,
    Budget,
    Caller,
    Reservation,
    UsageLedger,
    budget_status,
    calls_for,
    refusal,
)

logger = logging.getLogger(__name__)

ANONYMOUS_CALLER = Caller(ANONYMOUS)
CANARY_CALLER = Caller(CANARY)
# Seconds that a 503 for a busy gateway or an unwritable cache asks the client to wait (Retry-After).
RETRY_AFTER_S = 5
# Seconds between two log lines about a cache that still cannot be written.
STORAGE_LOG_INTERVAL_S = 60.0
MAX_TEACHER_REQUESTS_SETTING = "UNITE_GATEWAY_MAX_TEACHER_REQUESTS"


@dataclass(frozen=True)
class TileInput:
    """A decoded RGB tile and where it came from; provenance is stored with its cache row."""

    tile: np.ndarray
    slide_id: str | None = None
    coords: tuple[int, int] | None = None
    mpp: float | None = None


@dataclass
class RequestUsage:
    """Counts of one request, returned in its ``usage`` field.

    ``tiles`` received; ``cache_hits``, tiles served from the cache; ``coalesced``, distinct tiles
    served by another request's teacher call in flight; ``model_calls``, teacher calls charged (one
    per batch of the teacher's maximum batch size); ``tiles_sent_to_teacher``, distinct tiles sent.
    """

    tiles: int = 0
    cache_hits: int = 0
    coalesced: int = 0
    model_calls: int = 0
    tiles_sent_to_teacher: int = 0


class EmbeddingService:
    """The embedding pipeline of one teacher over one cache and usage ledger; safe to call from several threads.

    ``budget`` limits what the teacher identity may ever be sent, over every process sharing the
    ledger. ``teacher_block`` is set by the canary check when the teacher drifted, and then every
    request that needs the teacher fails with it.
    """

    def __init__(
        self,
        teacher: Teacher,
        cache: EmbeddingCache,
        ledger: UsageLedger,
        *,
        budget: Budget | None = None,
        metrics: GatewayMetrics | None = None,
        max_teacher_requests: int | None = None,
    ) -> None:
        self.teacher = teacher
        self.cache = cache
        self.ledger = ledger
        self.budget = budget if budget is not None else Budget()
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.inflight = InFlightTiles()
        self.teacher_block: TeacherDriftError | None = None
        self.batch_size = max_batch_size(teacher)
        self.started_at = time.time()
        # Requests waiting on the teacher now, calling it or waiting for another request's call; None: no limit.
        self.max_teacher_requests = max_teacher_requests
        self._teacher_requests = 0
        self._teacher_requests_lock = threading.Lock()
        # Set while the cache or the usage ledger cannot be written; /readyz then reports not ready.
        self.storage_error: str | None = None
        # Paid embeddings that a failed cache write could not store, by key. They are served from here and
        # written again by check_storage(), which runs before the next teacher call.
        self._unsaved: dict[str, CacheEntry] = {}
        self._unsaved_lock = threading.Lock()
        self._storage_check_lock = threading.Lock()
        self._storage_logged_at = 0.0
        # The Teacher protocol does not require thread safety, so calls are serialised unless the backend
        # declares ``thread_safe = True`` (the remote client, which caps its own concurrency).
        self._teacher_lock: AbstractContextManager[Any] = (
            nullcontext() if getattr(teacher, "thread_safe", False) is True else threading.Lock()
        )

    def admit(self, caller: Caller, *, count_request: bool = True) -> None:
        """Count a request of ``caller`` against its per-minute quota, and in its usage when ``count_request``.

        Raises :class:`QuotaExceededError` when the caller's requests of this minute are used up.
        """
        try:
            self.ledger.admit(teacher=self.teacher.identity, caller=caller, count_request=count_request)
        except CacheError as error:
            # Cache hits cost nothing, so they are served while the ledger cannot be written. A request that
            # needs the teacher still fails at ledger.reserve, so nothing is spent without being charged.
            self._storage_failed(f"the usage ledger cannot count a request of {caller.name}", error)
        if count_request:
            self.metrics.requests.labels(self.teacher.identity, caller.name).inc()

    def embed(self, inputs: Sequence[EmbeddingInput], *, caller: Caller = ANONYMOUS_CALLER) -> tuple[np.ndarray, dict[str, int]]:
        """Decode the protocol inputs and embed them; see :meth:`embed_tiles`."""
        return self.embed_tiles(decode_inputs(inputs), caller=caller)

    def embed_tiles(self, inputs: Sequence[TileInput], *, caller: Caller = ANONYMOUS_CALLER) -> tuple[np.ndarray, dict[str, int]]:
        """Return the (N, dim) float32 teacher embeddings of ``inputs`` in order, and the usage counts.

        Raises :class:`TeacherError` when the teacher's output has the wrong shape or non-finite values
        (nothing is cached then), :class:`BudgetExhaustedError` or :class:`QuotaExceededError` when a limit
        kept some missing tiles from the teacher, and :class:`TeacherDriftError` when the canary check
        found that the teacher changed.
        """
        prepared = [prepare_tile(item.tile, name=f"input[{index}]") for index, item in enumerate(inputs)]
        keys = [EmbeddingCache.tile_key(tile, self.teacher.identity) for tile in prepared]
        usage = RequestUsage(tiles=len(inputs))
        try:
            found = self._lookup(keys)
            usage.cache_hits = sum(1 for key in keys if key in found)
            # The first input with each missing key is the one sent to the teacher and stored.
            first_index: dict[str, int] = {}
            for index, key in enumerate(keys):
                if key not in found:
                    first_index.setdefault(key, index)
            if first_index:
                with self._teacher_slot():
                    self._fill_misses(first_index, prepared, inputs, found, caller, usage, Counter(keys))
        finally:
            self._record(caller, usage)

        if keys:
            result = np.stack([found[key] for key in keys])
        else:
            result = np.zeros((0, self.teacher.dim), dtype=np.float32)
        return result, asdict(usage)

    def plan(self, inputs: Sequence[EmbeddingInput]) -> dict[str, Any]:
        """Return what embedding ``inputs`` would cost now, without calling the teacher or charging anything.

        ``cache_hits`` counts tiles found in the cache, ``tiles_to_embed`` the distinct missing tiles
        (tiles in flight for another request count as missing), ``teacher_calls`` their calls, and
        ``within_budget`` whether the budget left covers them.
        """
        keys = [EmbeddingCache.tile_key(item.tile, self.teacher.identity) for item in decode_inputs(inputs)]
        found = self.cache.get_many(keys)
        missing = {key for key in keys if key not in found}
        calls = calls_for(len(missing), self.batch_size)
        budget = budget_status(self.budget, self.ledger.spent(self.teacher.identity))
        within = all(
            status["left"] is None or status["left"] >= needed
            for status, needed in ((budget["tiles"], len(missing)), (budget["calls"], calls))
        )
        return {
            "model": self.teacher.identity,
            "tiles": len(keys),
            "distinct_tiles": len(set(keys)),
            "cache_hits": sum(1 for key in keys if key in found),
            "tiles_to_embed": len(missing),
            "teacher_calls": calls,
            "budget": budget,
            "within_budget": within,
            "teacher_blocked": self.teacher_block is not None,
        }

    def block_for_drift(
        self, block: TeacherDriftError, *, last_passed_at: float | None = None, keep: Sequence[str] = ()
    ) -> int:
        """Block the teacher for drift and quarantine its cache entries created since the last passing canary check.

        ``last_passed_at`` is the Unix time at which the last passing check started. None takes it from the
        usage ledger, where every process sharing the cache records its passing checks. With no passing check
        recorded either, every entry of the identity is quarantined, because none was ever compared. Returns
        the number of entries quarantined. Entries whose keys are in ``keep`` (the canary tiles) stay, so the
        next check compares against the same reference. Embeddings of teacher calls still in flight are not cached
        (see :meth:`_store`).
        """
        self.teacher_block = block
        identity = self.teacher.identity
        since = last_passed_at
        if since is None:
            since = self._last_passed_check(identity)
        try:
            moved = self.cache.quarantine(identity, since, reason=f"teacher drift: {block.message}", keep=keep)
        except CacheError as error:
            logger.error(
                "teacher %s drifted, but its cache entries created since %.0f cannot be quarantined: %s",
                identity,
                since,
                error.message,
            )
            return 0
        logger.error(
            "teacher %s drifted: blocked, and %d cache entries created since the last passing canary check "
            "(Unix time %.0f) quarantined",
            identity,
            moved,
            since,
        )
        return moved

    def _last_passed_check(self, identity: str) -> float:
        """Return the start time of the last passing canary check the ledger records, or 0.0 when there is none."""
        read = getattr(self.ledger, "last_canary_check", None)
        try:
            check = read(identity) if callable(read) else None
        except CacheError as error:
            logger.error("cannot read the last canary check of teacher %s from the usage ledger: %s", identity, error.message)
            check = None
        return float(check.checked_at) if check is not None else 0.0

    def check_storage(self) -> bool:
        """Write the kept embeddings to the cache and check that it can be written; return whether it can.

        Clears :attr:`storage_error` on success. Safe to call from several threads: one check runs at a time.
        """
        with self._storage_check_lock:
            with self._unsaved_lock:
                entries = list(self._unsaved.values())
            try:
                if entries:
                    self.cache.put_many(entries)
                self.cache.check_writable()
            except CacheError as error:
                self._storage_failed(f"{len(entries)} kept embeddings still cannot be written to the cache", error)
                return False
            with self._unsaved_lock:
                for entry in entries:
                    self._unsaved.pop(entry.key, None)
                remaining = len(self._unsaved)
            if remaining:
                return False
            if self.storage_error is not None or entries:
                logger.warning(
                    "embedding cache %s can be written again: %d kept embeddings written", self.cache.path, len(entries)
                )
            self.storage_error = None
            return True

    @property
    def unsaved_count(self) -> int:
        """Number of paid embeddings kept in memory because the cache could not store them."""
        with self._unsaved_lock:
            return len(self._unsaved)

    def call_teacher(self, tiles: np.ndarray, *, caller: Caller, all_or_nothing: bool = False) -> tuple[np.ndarray, Reservation]:
        """Charge ``tiles`` to the budget and the caller's quota, and embed the granted ones with the teacher.

        Returns the checked (granted, dim) float32 embeddings of the first ``reservation.tiles`` tiles and
        the reservation. Only the canary caller may call a teacher blocked for drift.
        """
        identity = self.teacher.identity
        block = self.teacher_block
        if block is not None and caller.name != CANARY:
            raise TeacherDriftError(block.message, limit=block.limit, value=block.value)

        self._ensure_storage()
        try:
            reservation = self.ledger.reserve(
                teacher=identity,
                caller=caller,
                tiles=len(tiles),
                batch_size=self.batch_size,
                budget=self.budget,
                all_or_nothing=all_or_nothing,
            )
        except CacheError as error:
            self._storage_failed(f"the usage ledger cannot charge {len(tiles)} tiles of {caller.name}", error)
            raise self._storage_unavailable() from error
        if not reservation.tiles:
            return np.zeros((0, self.teacher.dim), dtype=np.float32), reservation
        self.metrics.teacher_calls.labels(identity, caller.name).inc(reservation.calls)
        self.metrics.teacher_tiles.labels(identity, caller.name).inc(reservation.tiles)

        granted = tiles[: reservation.tiles]
        started = time.perf_counter()
        try:
            with self._teacher_lock:
                output = self.teacher.embed(granted)
        except Exception as error:
            self.metrics.teacher_errors.labels(identity, getattr(error, "code", type(error).__name__)).inc()
            raise
        finally:
            self.metrics.teacher_seconds.labels(identity).observe(time.perf_counter() - started)
        logger.info(
            "teacher %s embedded %d tiles (%d calls charged) in %.3f s for %s",
            identity,
            len(granted),
            reservation.calls,
            time.perf_counter() - started,
            caller.name,
        )
        try:
            return self._check_output(output, len(granted)), reservation
        except TeacherError as error:
            self.metrics.teacher_errors.labels(identity, error.code).inc()
            raise

    def _fill_misses(
        self,
        first_index: dict[str, int],
        prepared: list[np.ndarray],
        inputs: Sequence[TileInput],
        found: dict[str, np.ndarray],
        caller: Caller,
        usage: RequestUsage,
        occurrences: Counter[str],
    ) -> None:
        """Put the embedding of every key of ``first_index`` into ``found``, by teacher call or by waiting.

        A key that another request's call did not send (:class:`NotSent`) is claimed again, so the loop
        ends when every key is found or when this request's own reservation fails.
        """
        pending = dict(first_index)
        while pending:
            owned, waiting = self.inflight.claim(list(pending))
            if owned:
                self._embed_claimed(owned, pending, prepared, inputs, found, caller, usage, occurrences)
            for key, future in waiting.items():
                try:
                    found[key] = self.inflight.wait(future)
                except NotSent:
                    continue
                usage.coalesced += 1
                del pending[key]

    def _embed_claimed(
        self,
        owned: list[str],
        pending: dict[str, int],
        prepared: list[np.ndarray],
        inputs: Sequence[TileInput],
        found: dict[str, np.ndarray],
        caller: Caller,
        usage: RequestUsage,
        occurrences: Counter[str],
    ) -> None:
        """Embed and store the tiles of the keys this request claimed, and settle every claim on success or on any error."""
        settled: set[str] = set()
        try:
            # Another request may have stored some of them between the cache lookup and the claim.
            stored = self._lookup(owned)
            for key, embedding in stored.items():
                found[key] = embedding
                usage.cache_hits += occurrences[key]
                del pending[key]
                self.inflight.resolve(key, embedding)
                settled.add(key)
            to_send = [key for key in owned if key not in stored]
            if not to_send:
                return

            tiles = np.stack([prepared[pending[key]] for key in to_send])
            try:
                embeddings, reservation = self.call_teacher(tiles, caller=caller)
            except TeacherError as error:
                # A remote teacher's partial failure still returns the batches it was paid for: keep them.
                kept = self._partial_embeddings(error, to_send)
                self._store(kept, prepared, inputs, pending, found, settled)
                raise
            usage.model_calls += reservation.calls
            sent = to_send[: reservation.tiles]
            self._store(dict(zip(sent, embeddings)), prepared, inputs, pending, found, settled)
            usage.tiles_sent_to_teacher += len(sent)
            for key in to_send[reservation.tiles :]:
                self.inflight.fail(key, NotSent())
                settled.add(key)
            if reservation.tiles < len(to_send):
                raise refusal(reservation, teacher=self.teacher.identity, caller=caller, budget=self.budget)
        except BaseException as error:
            for key in owned:
                if key not in settled:
                    self.inflight.fail(key, error)
            raise

    def _store(
        self,
        embeddings: dict[str, np.ndarray],
        prepared: list[np.ndarray],
        inputs: Sequence[TileInput],
        pending: dict[str, int],
        found: dict[str, np.ndarray],
        settled: set[str],
    ) -> None:
        """Cache the teacher's embeddings of claimed keys, then hand the stored ones to this request and its waiters."""
        if not embeddings:
            return
        block = self.teacher_block
        if block is not None:
            # The canary found drift while this call was in flight, so its output may come from the changed model.
            logger.warning(
                "teacher %s: %d embeddings of a call that ended after the drift block are not cached",
                self.teacher.identity,
                len(embeddings),
            )
            raise TeacherDriftError(block.message, limit=block.limit, value=block.value)
        entries = []
        for key, embedding in embeddings.items():
            index = pending[key]
            item = inputs[index]
            entries.append(
                CacheEntry(
                    key=key,
                    teacher=self.teacher.identity,
                    embedding=embedding,
                    tile_png=encode_png(prepared[index]),
                    slide_id=item.slide_id,
                    coords=item.coords,
                    mpp=item.mpp,
                )
            )
        try:
            self.cache.put_many(entries)
            # Read back what the cache contains: when another process stored the same tile first, its
            # embedding wins, so every client gets the same embedding for a tile.
            stored = self.cache.get_many(list(embeddings))
        except CacheError as error:
            if not isinstance(error.__cause__, sqlite3.Error):
                raise
            # The teacher was paid for these, so they are kept and served rather than lost.
            with self._unsaved_lock:
                for entry in entries:
                    self._unsaved.setdefault(entry.key, entry)
            self._storage_failed(f"{len(entries)} paid embeddings cannot be stored, so they are kept in memory", error)
            stored = {entry.key: np.asarray(entry.embedding, dtype=np.float32) for entry in entries}
        for key in embeddings:
            found[key] = stored[key]
            del pending[key]
            self.inflight.resolve(key, stored[key])
            settled.add(key)

    def _partial_embeddings(self, error: TeacherError, keys: list[str]) -> dict[str, np.ndarray]:
        """Return the checked embeddings, by key, of the tiles a partly failed teacher call did embed.

        A backend reports a partial failure with an ``outcome`` on its error, holding ``embeddings`` and a
        boolean ``succeeded`` row mask in the order of the tiles sent (the remote teacher does). An outcome
        that fails the output checks is dropped, so nothing unchecked is cached.
        """
        outcome = getattr(error, "outcome", None)
        succeeded = np.asarray(getattr(outcome, "succeeded", []), dtype=bool)
        if outcome is None or not succeeded.any() or len(succeeded) > len(keys):
            return {}
        try:
            rows = self._check_output(np.asarray(outcome.embeddings)[succeeded], int(succeeded.sum()))
        except TeacherError:
            logger.warning("teacher %s: the embeddings of a partly failed call fail the output checks and are dropped", self.teacher.identity)
            return {}
        kept_keys = [keys[index] for index in np.flatnonzero(succeeded)]
        logger.info("teacher %s: caching %d embeddings of a partly failed call", self.teacher.identity, len(kept_keys))
        return dict(zip(kept_keys, rows))

    def _lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Return the embeddings of ``keys`` found in the cache or among the kept embeddings not yet stored."""
        found = self.cache.get_many(keys)
        if self._unsaved:
            with self._unsaved_lock:
                for key in keys:
                    entry = self._unsaved.get(key)
                    if key not in found and entry is not None:
                        found[key] = np.asarray(entry.embedding, dtype=np.float32)
        return found

    @contextmanager
    def _teacher_slot(self) -> Iterator[None]:
        """Count this request among those waiting on the teacher, or raise :class:`GatewayBusyError` when they are at the maximum."""
        limit = self.max_teacher_requests
        with self._teacher_requests_lock:
            if limit is not None and self._teacher_requests >= limit:
                raise GatewayBusyError(
                    f"the gateway is busy: {self._teacher_requests} requests already wait on teacher {self.teacher.identity}, "
                    f"the maximum ({MAX_TEACHER_REQUESTS_SETTING} = {limit}). Retry after the Retry-After seconds; "
                    "tiles that are cached are served without waiting.",
                    retry_after_s=RETRY_AFTER_S,
                    limit=limit,
                    value=self._teacher_requests + 1,
                )
            self._teacher_requests += 1
        try:
            yield
        finally:
            with self._teacher_requests_lock:
                self._teacher_requests -= 1

    def _ensure_storage(self) -> None:
        """Raise :class:`CacheUnavailableError` while the cache cannot be written, so no more embeddings are paid for."""
        if self.storage_error is None and not self._unsaved:
            return
        if not self.check_storage():
            raise self._storage_unavailable()

    def _storage_unavailable(self) -> CacheUnavailableError:
        # No path here: the message goes to clients, and the log names the path and the cause.
        kept = self.unsaved_count
        return CacheUnavailableError(
            "the gateway's cache or usage ledger cannot be written now (the gateway log names the cause, such as a "
            "full disk), so the gateway sends no tiles to the teacher until it can. "
            f"{kept} embeddings already paid for are kept in memory and served, and cached tiles are served too. "
            "Retry after the Retry-After seconds.",
            retry_after_s=RETRY_AFTER_S,
            value=kept,
        )

    def _storage_failed(self, failure: str, error: CacheError) -> None:
        """Record a failed write for /readyz, and log it at most once per STORAGE_LOG_INTERVAL_S seconds."""
        self.storage_error = failure
        now = time.monotonic()
        if now - self._storage_logged_at < STORAGE_LOG_INTERVAL_S:
            return
        self._storage_logged_at = now
        logger.error(
            "cache write failed for teacher %s: %s (%d kept in memory in all): %s. Free space or fix the folder; "
            "the gateway refuses teacher calls and reports not ready until a write succeeds.",
            self.teacher.identity,
            failure,
            self.unsaved_count,
            error.message,
        )

    def _record(self, caller: Caller, usage: RequestUsage) -> None:
        identity = self.teacher.identity
        try:
            self.ledger.record(
                teacher=identity, caller=caller.name, tiles=usage.tiles, cache_hits=usage.cache_hits, coalesced=usage.coalesced
            )
        except CacheError as error:
            # Raised from a finally block, it would hide the request's own error, so it is logged instead.
            self._storage_failed(f"the usage ledger cannot record a request of {caller.name}", error)
        self.metrics.tiles.labels(identity, caller.name).inc(usage.tiles)
        self.metrics.cache_hits.labels(identity, caller.name).inc(usage.cache_hits)
        self.metrics.coalesced.labels(identity, caller.name).inc(usage.coalesced)

    def _check_output(self, output: Any, count: int) -> np.ndarray:
        """Check the teacher's output for ``count`` tiles, (count, dim) and finite, and return it as float32."""
        identity = self.teacher.identity
        output = np.asarray(output)
        expected_shape = (count, self.teacher.dim)
        if output.shape != expected_shape:
            raise TeacherError(
                f"teacher {identity} returned embeddings of shape {output.shape} for {count} tiles, "
                f"expected {expected_shape}. Check the teacher backend and its declared dim.",
                limit=list(expected_shape),
                value=list(output.shape),
            )
        if not np.issubdtype(output.dtype, np.floating):
            raise TeacherError(
                f"teacher {identity} returned embeddings of dtype {output.dtype}, expected a floating-point type such as float32. "
                "Check the teacher backend.",
                value=str(output.dtype),
            )
        finite = np.isfinite(output)
        if not finite.all():
            bad_rows = int((~finite).any(axis=1).sum())
            raise TeacherError(
                f"teacher {identity} returned NaN or infinite values in {bad_rows} of {count} embeddings; "
                "nothing was cached. Check the teacher backend (weights, input preprocessing, precision).",
                value=bad_rows,
            )
        return output.astype(np.float32)


def decode_inputs(inputs: Sequence[EmbeddingInput]) -> list[TileInput]:
    """Decode and prepare protocol inputs, raising :class:`ImageError` naming the index of the first bad one."""
    tiles = []
    for index, item in enumerate(inputs):
        name = f"input[{index}].image"
        # Prepared at once, so a request of large images never keeps more than one of them in memory.
        tile = prepare_tile(decode_base64_image(item.image, name=name), name=name)
        tiles.append(TileInput(tile=tile, slide_id=item.slide_id, coords=item.coords, mpp=item.mpp))
    return tiles


def max_batch_size(teacher: Teacher) -> int | None:
    """Return the most tiles the teacher sends in one call, which turns tiles into billable calls, or None.

    A backend declares it as ``max_batch_size``, or in its ``config`` (the remote teacher). None means a
    backend without a maximum, which counts as one call per :meth:`Teacher.embed`.
    """
    for holder in (teacher, getattr(teacher, "config", None)):
        value = getattr(holder, "max_batch_size", None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None
