"""A remote teacher: a paid, rate-limited and sometimes failing embeddings API, behind the Teacher protocol.

:meth:`RemoteTeacher.embed` is synchronous, because the gateway calls it from FastAPI's thread pool, and
runs on an ``httpx.AsyncClient`` in the teacher's own event-loop thread. Each call:

1. splits the tiles into batches of at most ``max_batch_size`` and gives each batch an id, sent as its
   ``Idempotency-Key`` on every attempt, so a provider that honours the header returns its stored response to a
   retried batch without charging for it again;
2. sends the batches concurrently, at most ``max_concurrency`` at a time, and each attempt first waits for
   the :class:`RateLimiter` that every caller of the teacher shares (requests and tiles per minute);
3. retries transient failures (connection errors, timeouts, HTTP 408, 429 and 5xx other than 501 and 505)
   with tenacity, up to ``max_attempts`` attempts in all, after a fully jittered exponential backoff capped
   at ``backoff_cap_s`` or after the provider's ``Retry-After``, whichever is longer. Any other failure
   ends the batch at once. The policy is in :mod:`teacher_gateway.teachers.retry`;
4. checks every response with the adapter (JSON shape, count, dimension, finite numbers) and against the
   configured model name, and rejects a bad one without retrying it, since the provider may bill for it.

When any batch fails, :class:`PartialEmbeddingError` carries the embeddings of the batches that succeeded,
so that the gateway can keep what it paid for. The API key is read once, when the teacher starts, from the
environment variable named by ``api_key_env``. It is sent only in the auth header and never appears in a
log line, an error message or a repr; a provider message that echoes it is redacted. Only tile pixels go
to the provider: no slide id, file name or path.

The settings and their checks live in :mod:`teacher_gateway.teachers.remote_config`. This module imports
:class:`RemoteTeacherConfig` from there, so it can be imported from either module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr, ValidationError
from tenacity import RetryCallState

from shared.errors import ConfigError, ImageError, TeacherError
from teacher_gateway.teachers.adapters import INVALID_RESPONSE_KINDS, EmbeddingsAdapter, InvalidResponseError
from teacher_gateway.teachers.rate_limit import RateLimiter, per_window_limit
from teacher_gateway.teachers.remote_config import RemoteTeacherConfig
from teacher_gateway.teachers.retry import TRANSIENT_KINDS, AttemptError, batch_retrying, status_error

logger = logging.getLogger(__name__)

# Kinds of failed attempt, as counted in stats()["failures"]. The first five are retried.
FAILURE_KINDS = TRANSIENT_KINDS + (
    "http_error", "request_error", "response_too_large", *INVALID_RESPONSE_KINDS, "model_mismatch"
)
# Maximum length, in characters, of a provider's error message quoted in logs and errors.
MAX_PROVIDER_MESSAGE_CHARS = 300
REDACTED = "[redacted]"


@dataclass(frozen=True)
class BatchFailure:
    """A batch that failed for good: which tiles, why (a kind of :data:`FAILURE_KINDS`), after how many attempts."""

    batch_id: str
    start: int
    stop: int
    kind: str
    attempts: int
    message: str
    status: int | None = None

    def describe(self) -> str:
        attempts = "1 attempt" if self.attempts == 1 else f"{self.attempts} attempts"
        return f"batch {self.batch_id} (tiles {self.start} to {self.stop - 1}) failed after {attempts} ({self.kind}): {self.message}"


@dataclass(frozen=True)
class EmbeddingOutcome:
    """The result of one embed call: (N, dim) float32 ``embeddings`` with NaN rows where ``succeeded`` is False."""

    embeddings: np.ndarray
    succeeded: np.ndarray
    failures: list[BatchFailure]
    batches: int


class PartialEmbeddingError(TeacherError):
    """Some batches of an embed call failed for good; ``outcome`` contains the embeddings of the others.

    The gateway can cache ``outcome.embeddings[outcome.succeeded]``, because those responses passed every check.
    """

    def __init__(self, identity: str, outcome: EmbeddingOutcome, remedy: str) -> None:
        tiles = len(outcome.succeeded)
        failed_tiles = int((~outcome.succeeded).sum())
        listed = "; ".join(failure.describe() for failure in outcome.failures[:3])
        more = len(outcome.failures) - 3
        if more > 0:
            listed += f"; and {more} more"
        message = (
            f"remote teacher {identity}: {len(outcome.failures)} of {outcome.batches} batches failed, so {failed_tiles} "
            f"of {tiles} tiles have no embedding: {listed}. {remedy}"
        )
        super().__init__(message, limit=tiles, value=failed_tiles)
        self.outcome = outcome
        self.failures = outcome.failures


@dataclass
class _Batch:
    id: str
    start: int
    tiles: np.ndarray
    attempts: int = 0

    @property
    def stop(self) -> int:
        return self.start + len(self.tiles)


@dataclass
class _Counters:
    calls: int = 0
    responses: int = 0
    tiles_sent: int = 0
    tiles_embedded: int = 0
    batches: int = 0
    failed_batches: int = 0
    failed_tiles: int = 0
    retries: int = 0
    failures: Counter = field(default_factory=Counter)


class _EventLoopThread:
    """An asyncio event loop running forever in a daemon thread, fed coroutines from other threads."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class RemoteTeacher:
    """A remote embeddings API as a teacher; thread-safe, with one connection pool and rate limiter for all callers."""

    name = "remote"
    # embed() may be called from several threads at once: the teacher caps its own concurrency.
    thread_safe = True
    # A remote API does not disclose its model's size.
    parameters = None

    def __init__(self, config: RemoteTeacherConfig) -> None:
        self.config = config
        self.identity = config.identity
        self.dim = config.dim
        self.licence = config.licence
        self.max_batch_size = config.max_batch_size
        self._api_key = _read_api_key(config.api_key_env)
        self._adapter = EmbeddingsAdapter(config.adapter)
        self._limiter = RateLimiter(
            window_s=config.rate_window_s,
            max_requests=per_window_limit(config.requests_per_minute, config.rate_window_s),
            max_tiles=per_window_limit(config.tiles_per_minute, config.rate_window_s),
        )
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._counters = _Counters()
        self._counters_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False

        self._loop = _EventLoopThread(name=f"remote-teacher-{config.model}")
        self._http = self._loop.submit(self._open_client()).result()
        logger.info(
            "remote teacher %s ready: dim %d, batches of up to %d tiles, %d concurrent requests, "
            "%s requests and %s tiles per minute, %d attempts per batch, API key %s",
            self.identity,
            self.dim,
            config.max_batch_size,
            config.max_concurrency,
            config.requests_per_minute or "unlimited",
            config.tiles_per_minute or "unlimited",
            config.max_attempts,
            f"from {config.api_key_env}" if config.api_key_env else "not used",
        )

    def __repr__(self) -> str:
        return f"RemoteTeacher(identity={self.identity!r}, dim={self.dim})"

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Embed (N, H, W, 3) uint8 RGB tiles into (N, dim) float32 vectors. N may be 0.

        Raises :class:`PartialEmbeddingError` (a :class:`TeacherError`) when any batch fails for good; its
        ``outcome`` contains the embeddings of the batches that succeeded.
        """
        outcome = self.embed_partial(tiles)
        if outcome.failures:
            raise PartialEmbeddingError(self.identity, outcome, self._remedy(outcome.failures[0]))
        return outcome.embeddings

    def embed_partial(self, tiles: np.ndarray) -> EmbeddingOutcome:
        """Embed tiles like :meth:`embed`, but return the failed batches in the outcome instead of raising."""
        tiles = _check_tiles(tiles)
        if len(tiles) == 0:
            return EmbeddingOutcome(np.zeros((0, self.dim), np.float32), np.zeros(0, bool), [], batches=0)

        # Submitting under the lock means close() never stops the loop between the check and the submit.
        with self._state_lock:
            if self._closed:
                raise TeacherError(
                    f"remote teacher {self.identity} is closed, so it cannot embed {len(tiles)} tiles. "
                    "Build a new teacher (the gateway does so at start)."
                )
            future = self._loop.submit(self._embed_all(tiles))
        try:
            return future.result()
        except concurrent.futures.CancelledError as error:
            raise TeacherError(
                f"remote teacher {self.identity} was closed while embedding {len(tiles)} tiles, so none was returned. "
                "Send the tiles again to a running gateway."
            ) from error

    def stats(self) -> dict[str, Any]:
        """Return the counters since start: HTTP calls, tiles, batches, retries and failed attempts by kind.

        ``calls`` counts every attempt, including those that got no response; ``responses`` those that got one.
        ``tiles_sent`` counts tiles in every attempt (what a provider may bill), ``tiles_embedded`` the tiles
        returned with a checked embedding. ``failures`` maps each kind of :data:`FAILURE_KINDS` to its count
        of failed attempts, retried or not.
        """
        with self._counters_lock:
            counters = self._counters
            return {
                "calls": counters.calls,
                "responses": counters.responses,
                "tiles_sent": counters.tiles_sent,
                "tiles_embedded": counters.tiles_embedded,
                "batches": counters.batches,
                "failed_batches": counters.failed_batches,
                "failed_tiles": counters.failed_tiles,
                "retries": counters.retries,
                "failures": {kind: counters.failures[kind] for kind in FAILURE_KINDS},
            }

    def describe(self) -> dict[str, Any]:
        """Return the settings worth showing in the gateway's model listing; the API key is never among them."""
        config = self.config
        return {
            "kind": "remote",
            "url": config.url,
            "model": config.model,
            "dim": config.dim,
            "licence": config.licence,
            "api_key_env": config.api_key_env,
            "api_key_set": self._api_key is not None,
            "auth_header": config.auth_header,
            "connect_timeout_s": config.connect_timeout_s,
            "read_timeout_s": config.read_timeout_s,
            "total_timeout_s": config.total_timeout_s,
            "max_response_bytes": config.max_response_bytes,
            "max_batch_size": config.max_batch_size,
            "max_concurrency": config.max_concurrency,
            "requests_per_minute": config.requests_per_minute,
            "tiles_per_minute": config.tiles_per_minute,
            "rate_window_s": config.rate_window_s,
            "max_attempts": config.max_attempts,
            "backoff_base_s": config.backoff_base_s,
            "backoff_cap_s": config.backoff_cap_s,
            "max_retry_after_s": config.max_retry_after_s,
            "adapter": self._adapter.describe(),
        }

    def close(self) -> None:
        """Cancel embed calls in flight, close the connections and stop the event-loop thread; safe to repeat."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._loop.submit(self._shutdown()).result()
        self._loop.stop()
        logger.info("remote teacher %s closed after %d calls", self.identity, self.stats()["calls"])

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _open_client(self) -> httpx.AsyncClient:
        config = self.config
        timeout = httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.read_timeout_s,
            write=config.read_timeout_s,
            pool=config.connect_timeout_s,
        )
        limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
        # trust_env=False: no proxy or .netrc credentials from the environment reach the provider unasked.
        return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, follow_redirects=False)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._http.aclose()
        await self._loop.loop.shutdown_default_executor()

    async def _embed_all(self, tiles: np.ndarray) -> EmbeddingOutcome:
        size = self.config.max_batch_size
        batches = [_Batch(id=_new_batch_id(), start=start, tiles=tiles[start : start + size]) for start in range(0, len(tiles), size)]
        results = await asyncio.gather(*(self._embed_batch(batch) for batch in batches))

        embeddings = np.full((len(tiles), self.dim), np.nan, dtype=np.float32)
        succeeded = np.zeros(len(tiles), dtype=bool)
        failures = []
        for batch, result in zip(batches, results):
            if isinstance(result, BatchFailure):
                failures.append(result)
            else:
                embeddings[batch.start : batch.stop] = result
                succeeded[batch.start : batch.stop] = True
        return EmbeddingOutcome(embeddings=embeddings, succeeded=succeeded, failures=failures, batches=len(batches))

    async def _embed_batch(self, batch: _Batch) -> np.ndarray | BatchFailure:
        """Send one batch with retries; return its checked embeddings, or how it failed."""
        # Encoded once, off the event loop, so every attempt sends the same bytes under the same key.
        body = await asyncio.to_thread(self._adapter.encode_request, batch.tiles, self.config.model)
        retrying = batch_retrying(
            max_attempts=self.config.max_attempts,
            backoff_base_s=self.config.backoff_base_s,
            backoff_cap_s=self.config.backoff_cap_s,
            before_sleep=partial(self._log_retry, batch),
        )
        try:
            embeddings = await retrying(self._attempt, batch, body)
        except AttemptError as error:
            failure = BatchFailure(
                batch_id=batch.id,
                start=batch.start,
                stop=batch.stop,
                kind=error.kind,
                attempts=batch.attempts,
                message=error.message,
                status=error.status,
            )
            self._count(batches=1, failed_batches=1, failed_tiles=len(batch.tiles))
            logger.error("remote teacher %s: %s", self.identity, failure.describe())
            return failure

        self._count(batches=1, tiles_embedded=len(batch.tiles))
        logger.debug(
            "remote teacher %s: batch %s of %d tiles embedded in %d attempts",
            self.identity,
            batch.id,
            len(batch.tiles),
            batch.attempts,
        )
        return embeddings

    async def _attempt(self, batch: _Batch, body: bytes) -> np.ndarray:
        """Send one attempt of a batch and return its checked embeddings, or raise :class:`AttemptError`."""
        batch.attempts += 1
        count = len(batch.tiles)
        config = self.config

        async with self._semaphore:
            # Acquired inside the concurrency cap, so the logged send time is the time the request leaves.
            await self._limiter.acquire(count)
            self._count(calls=1, tiles_sent=count)
            try:
                # total_timeout_s bounds the whole attempt; httpx's timeouts bound each connect, write and read only.
                async with asyncio.timeout(config.total_timeout_s):
                    status, headers, content = await self._post(batch, body)
            except TimeoutError as error:
                raise self._failure(
                    "timeout",
                    f"the attempt took longer than total_timeout_s = {config.total_timeout_s:g} s in all",
                    transient=True,
                ) from error
            except httpx.TimeoutException as error:
                raise self._failure(
                    "timeout",
                    f"{type(error).__name__}: no response within connect_timeout_s = {config.connect_timeout_s:g} s "
                    f"or read_timeout_s = {config.read_timeout_s:g} s",
                    transient=True,
                ) from error
            except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
                raise self._failure(
                    "connection_error", f"{type(error).__name__}: {self._redact(str(error))}", transient=True
                ) from error
            except httpx.HTTPError as error:
                raise self._failure(
                    "request_error", f"{type(error).__name__}: {self._redact(str(error))}", transient=False
                ) from error
        self._count(responses=1)

        if not 200 <= status < 300:
            raise self._status_failure(status, headers, content)
        try:
            decoded = await asyncio.to_thread(self._adapter.decode_response, content, count=count, dim=self.dim)
        except InvalidResponseError as error:
            raise self._failure(error.kind, error.message, transient=False, status=status) from error
        if decoded.model is not None and decoded.model != config.model:
            raise self._failure(
                "model_mismatch",
                f"the response declares model {decoded.model!r}, expected {config.model!r}",
                transient=False,
                status=status,
            )
        return decoded.embeddings

    async def _post(self, batch: _Batch, body: bytes) -> tuple[int, httpx.Headers, bytes]:
        """POST one batch and return the status, headers and body, reading at most ``max_response_bytes`` of the body.

        Raises :class:`AttemptError` of kind ``response_too_large`` when the provider declares or sends more,
        without reading the rest, so a huge response cannot exhaust the gateway's memory.
        """
        limit = self.config.max_response_bytes
        async with self._http.stream("POST", self.config.url, content=body, headers=self._headers(batch)) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise self._too_large(response.status_code, f"declares a body of {int(declared)} bytes")
            chunks: list[bytes] = []
            size = 0
            # aiter_bytes decodes a compressed body chunk by chunk, so the limit holds for the decoded size.
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise self._too_large(response.status_code, f"sent more than {limit} bytes and was cut off")
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)

    def _too_large(self, status: int, what: str) -> AttemptError:
        limit = self.config.max_response_bytes
        return self._failure(
            "response_too_large",
            f"the provider's response (HTTP {status}) {what}, more than max_response_bytes = {limit} bytes. "
            f"Lower max_batch_size (now {self.config.max_batch_size}) or raise max_response_bytes",
            transient=False,
            status=status,
        )

    def _status_failure(self, status: int, headers: httpx.Headers, content: bytes) -> AttemptError:
        """Classify and count a response with an error status, and pause every sender for its Retry-After."""
        error = status_error(
            status,
            self._provider_message(content),
            headers.get("retry-after"),
            max_retry_after_s=self.config.max_retry_after_s,
        )
        if error.transient and error.retry_after is not None:
            self._limiter.pause_until(time.monotonic() + error.retry_after)
        self._count_failure(error.kind)
        return error

    def _failure(self, kind: str, message: str, *, transient: bool, status: int | None = None) -> AttemptError:
        self._count_failure(kind)
        return AttemptError(kind, message, transient=transient, status=status)

    def _count_failure(self, kind: str) -> None:
        with self._counters_lock:
            self._counters.failures[kind] += 1

    def _log_retry(self, batch: _Batch, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        self._count(retries=1)
        logger.warning(
            "remote teacher %s: batch %s (%d tiles) attempt %d of %d failed (%s): %s; retrying in %.2f s",
            self.identity,
            batch.id,
            len(batch.tiles),
            state.attempt_number,
            self.config.max_attempts,
            getattr(error, "kind", type(error).__name__),
            getattr(error, "message", error),
            wait_s,
        )

    def _headers(self, batch: _Batch) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key is not None:
            key = self._api_key.get_secret_value()
            headers[self.config.auth_header] = f"{self.config.auth_scheme} {key}" if self.config.auth_scheme else key
        if self.config.idempotency_header is not None:
            headers[self.config.idempotency_header] = batch.id
        return headers

    def _provider_message(self, content: bytes) -> str:
        """Return the provider's error message, from the protocol's error shape or the raw body, redacted and cut."""
        text = content.decode("utf-8", errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                text = error["message"]
            elif isinstance(error, str):
                text = error
            elif isinstance(body.get("message"), str):
                text = body["message"]
            elif isinstance(body.get("detail"), str):
                text = body["detail"]
        # Redacted before it is cut, so no part of the key can survive at the cut.
        text = " ".join(self._redact(text).split())
        if len(text) > MAX_PROVIDER_MESSAGE_CHARS:
            text = text[:MAX_PROVIDER_MESSAGE_CHARS] + "..."
        return text or "(empty body)"

    def _redact(self, text: str) -> str:
        if self._api_key is None:
            return text
        return text.replace(self._api_key.get_secret_value(), REDACTED)

    def _remedy(self, failure: BatchFailure) -> str:
        """Return what to do about a failed batch, naming the settings involved."""
        config = self.config
        kind = failure.kind
        if kind == "timeout":
            return (
                f"Raise read_timeout_s (now {config.read_timeout_s:g} s) or total_timeout_s (now {config.total_timeout_s:g} s), "
                f"or lower max_batch_size (now {config.max_batch_size})."
            )
        if kind == "response_too_large":
            return (
                f"Lower max_batch_size (now {config.max_batch_size}) or raise max_response_bytes "
                f"(now {config.max_response_bytes}) if the provider's responses are really that large."
            )
        if kind in ("connection_error", "request_error"):
            return f"Check that the provider is running at {config.url} and that this machine can reach it."
        if kind == "rate_limited":
            return (
                "Lower requests_per_minute, tiles_per_minute or max_concurrency to stay under the provider's limits, "
                f"or raise max_attempts (now {config.max_attempts})."
            )
        if kind in ("server_error", "request_timeout"):
            return f"The provider is failing; try again later or raise max_attempts (now {config.max_attempts})."

        if kind == "http_error" and failure.status in (401, 403):
            variable = config.api_key_env or "(none: api_key_env is not set)"
            return f"Check the API key in the environment variable {variable} and the auth_header and auth_scheme settings."
        if kind == "http_error" and failure.status == 413:
            return f"Lower max_batch_size (now {config.max_batch_size}) to the provider's maximum."
        if kind == "http_error" and failure.status in (404, 405):
            return f"Check that url {config.url} is the provider's embeddings endpoint."
        if kind == "http_error" and failure.status is not None and 300 <= failure.status < 400:
            return f"The provider redirects {config.url}, and redirects are not followed; set url to the final endpoint."

        if kind in ("invalid_json", "invalid_shape"):
            return "Check the adapter settings (embeddings_path, index_path, model_path) against the provider's response."
        if kind in ("wrong_count", "wrong_dim"):
            return f"Check dim (now {config.dim}) and that the endpoint serves model {config.model!r}."
        if kind == "non_finite":
            return "The provider's model returned NaN or infinite values; report it to the provider."
        if kind == "model_mismatch":
            return (
                "The provider now serves another model under this endpoint. If that is intended, set model to the new "
                "name, which starts a new cache identity, so old and new embeddings never mix."
            )
        return "Check the request shape in the adapter settings against the provider's documentation."

    def _count(self, **increments: int) -> None:
        with self._counters_lock:
            for name, increment in increments.items():
                setattr(self._counters, name, getattr(self._counters, name) + increment)


def build_remote_teacher(**options: Any) -> RemoteTeacher:
    """Build a :class:`RemoteTeacher` from keyword settings (the fields of :class:`RemoteTeacherConfig`).

    Raises :class:`ConfigError` naming each invalid setting, and for a missing API key variable.
    """
    try:
        config = RemoteTeacherConfig(**options)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'settings'}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"invalid remote teacher settings: {problems}. Fix these settings.") from error
    return RemoteTeacher(config)


def _read_api_key(variable: str | None) -> SecretStr | None:
    """Read the API key from the environment variable ``variable``; None when no variable is configured."""
    if variable is None:
        return None
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigError(
            f"environment variable {variable}, named by the remote teacher's api_key_env, is not set or is empty. "
            "Export the provider's API key in it before starting the gateway, or unset api_key_env for a provider "
            "that needs no key.",
            value=variable,
        )
    if any(character in value for character in "\r\n\0"):
        raise ConfigError(
            f"environment variable {variable} contains a line break or NUL character, which cannot go in an HTTP "
            "header. Export the key alone, without a trailing newline from the file it was read from.",
            value=variable,
        )
    return SecretStr(value)


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[3] != 3 or tiles.dtype != np.uint8:
        raise ImageError(
            f"tiles have shape {tiles.shape} and dtype {tiles.dtype}, expected (N, H, W, 3) uint8 RGB. "
            "Prepare them with shared.imaging.prepare_tile.",
            value=list(tiles.shape),
        )
    return tiles


def _new_batch_id() -> str:
    """Return a random batch id; it is also the batch's Idempotency-Key, so it must be unique per batch."""
    return os.urandom(16).hex()
