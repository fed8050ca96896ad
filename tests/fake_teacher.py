"""A fake paid embeddings API for tests and benchmarks: a real HTTP server on 127.0.0.1 that fails on purpose.

::

    fake = FakeTeacher(dim=32, latency_s=0.0)
    fake.script(Fault.error(429, retry_after="1"), Fault.truncated())
    with fake.serve():
        teacher = RemoteTeacher(RemoteTeacherConfig(url=fake.url, model=fake.model, dim=fake.dim, licence="test"))
        ...
    fake.calls          # one CallRecord per request, in order of completion
    fake.embed_counts   # tile digest -> how many times a fresh, valid embedding was returned for it

Routes:

- ``POST /v1/embeddings`` speaks UNITE's embeddings protocol (base64 PNG or JPEG in ``input[*].image``,
  vectors in ``data[*].embedding`` with ``data[*].index``, the model name in ``model``);
- ``POST /vendor/predict`` speaks another vendor's shape: ``{"instances": [{"image": {"b64":
  "data:image/jpeg;base64,..."}}]}`` in, ``{"deployed_model": ..., "output": {"predictions": [{"vector":
  [...]}]}}`` out, in input order and without indices. It accepts only JPEG data URLs.

Every request waits ``latency_s`` and then takes the next scripted :class:`Fault`, in order of arrival;
once the script is used up, requests get normal responses. The embedding of a tile is a fixed projection
of the mean colours of a 4 x 4 grid of cells (:func:`fake_embedding`), so tests can compute what to expect.

Like a paid API that honours ``Idempotency-Key``, a request whose key got a 200 response before gets the
same body again: recorded with ``replayed=True`` and not counted in ``embed_counts``, so a client that
retries after a lost response is not charged twice. Responses with a scripted fault are never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from servers import run_app

from shared.errors import ImageError
from shared.imaging import decode_base64_image

DEFAULT_MODEL = "fake-teacher-1"
PROTOCOL_PATH = "/v1/embeddings"
VENDOR_PATH = "/vendor/predict"
_JPEG_DATA_URL = "data:image/jpeg;base64,"
_GRID = 4
_PROJECTION_SEED = 7


def fake_embedding(tiles: np.ndarray, dim: int) -> np.ndarray:
    """Return the fake teacher's (N, dim) float32 embeddings of (N, H, W, 3) uint8 tiles.

    Each tile's 48 mean colours of a 4 x 4 grid of cells, scaled to [0, 1], are multiplied by a fixed
    Gaussian (48, dim) matrix, so close images get close embeddings and every tile is embedded on its own.
    """
    count, height, width, _ = tiles.shape
    cells = tiles[:, : height // _GRID * _GRID, : width // _GRID * _GRID].astype(np.float64)
    means = cells.reshape(count, _GRID, height // _GRID, _GRID, width // _GRID, 3).mean(axis=(2, 4)) / 255.0
    projection = np.random.default_rng(_PROJECTION_SEED).standard_normal((_GRID * _GRID * 3, dim))
    return (means.reshape(count, -1) @ projection / math.sqrt(_GRID * _GRID * 3)).astype(np.float32)


def tile_digest(tile: np.ndarray) -> str:
    """Return the key of ``embed_counts``: the first 16 hex digits of the sha256 of the tile's pixels."""
    return hashlib.sha256(np.ascontiguousarray(tile).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, applied to one request. Build it with the class methods."""

    kind: str
    status: int = 200
    retry_after: str | None = None
    message: str = ""
    delay_s: float = 0.0
    model: str | None = None

    @classmethod
    def error(cls, status: int, *, retry_after: str | None = None, message: str | None = None) -> Fault:
        """Return ``status`` with a protocol error body and an optional ``Retry-After`` header; embed nothing."""
        return cls("error", status=status, retry_after=retry_after, message=message or f"fake teacher fault {status}")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Embed and store the response under the idempotency key, then wait ``seconds`` before sending it."""
        return cls("delay", delay_s=seconds)

    @classmethod
    def truncated(cls) -> Fault:
        """Return 200 with the first half of the JSON body, as a complete HTTP response."""
        return cls("truncated")

    @classmethod
    def wrong_dim(cls) -> Fault:
        """Return 200 with every vector one value short."""
        return cls("wrong_dim")

    @classmethod
    def nan(cls) -> Fault:
        """Return 200 with NaN (JSON ``NaN``) as one value of the last vector."""
        return cls("nan")

    @classmethod
    def wrong_count(cls) -> Fault:
        """Answer 200 with the last vector left out."""
        return cls("wrong_count")

    @classmethod
    def invalid_shape(cls) -> Fault:
        """Answer 200 with a JSON object that has none of the expected fields."""
        return cls("invalid_shape")

    @classmethod
    def other_model(cls, name: str) -> Fault:
        """Answer 200 with valid vectors but declare model ``name`` in the response."""
        return cls("other_model", model=name)


@dataclass(frozen=True)
class CallRecord:
    """One request as the fake received it.

    ``started`` and ``finished`` are ``time.monotonic()`` values on arrival and when the response was ready,
    ``wall_started`` is ``time.time()`` on arrival. ``batch_size`` is the number of tiles (0 for a body
    that could not be read) and ``headers`` contains every request header with lower-case names. ``fault``
    is the kind of the scripted fault applied or None, and ``replayed`` whether the response was a stored one.
    """

    route: str
    started: float
    finished: float
    wall_started: float
    batch_size: int
    idempotency_key: str | None
    headers: dict[str, str]
    status: int
    fault: str | None
    replayed: bool


class FakeTeacher:
    """The fake API's state: its settings, the fault script, the call records and the embedding counts.

    ``api_key`` makes every request without ``Authorization: Bearer <api_key>`` fail with 401.
    ``max_batch_size`` makes larger requests fail with 413. Reading ``calls``, ``embed_counts`` and
    ``max_in_flight`` is safe while the server runs.
    """

    def __init__(
        self,
        *,
        dim: int = 32,
        model: str = DEFAULT_MODEL,
        latency_s: float = 0.0,
        max_batch_size: int | None = None,
        api_key: str | None = None,
    ) -> None:
        self.dim = dim
        self.model = model
        self.latency_s = latency_s
        self.max_batch_size = max_batch_size
        self.api_key = api_key
        self.base_url: str | None = None
        self.embed_counts: Counter[str] = Counter()
        self.max_in_flight = 0
        self._faults: deque[Fault] = deque()
        self._calls: list[CallRecord] = []
        self._stored_responses: dict[str, bytes] = {}
        self._in_flight = 0
        self._lock = threading.Lock()
        self.app = self._build_app()

    @property
    def url(self) -> str:
        """URL of the protocol route; valid inside :meth:`serve`."""
        return f"{self._require_base_url()}{PROTOCOL_PATH}"

    @property
    def vendor_url(self) -> str:
        """URL of the vendor-shaped route; valid inside :meth:`serve`."""
        return f"{self._require_base_url()}{VENDOR_PATH}"

    @property
    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until no request is in flight, for instance one still sleeping after its client timed out."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._in_flight == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fake teacher still had requests in flight after {timeout_s} s")
            time.sleep(0.01)

    def script(self, *faults: Fault) -> None:
        """Append ``faults`` to the script: each one is applied to one coming request, in order of arrival."""
        with self._lock:
            self._faults.extend(faults)

    def expected(self, tiles: np.ndarray) -> np.ndarray:
        """Return the embeddings the fake returns for ``tiles``: :func:`fake_embedding` at this fake's dim."""
        return fake_embedding(tiles, self.dim)

    @contextmanager
    def serve(self) -> Iterator[FakeTeacher]:
        """Serve the fake on a free port of 127.0.0.1 and yield it, with ``url`` and ``vendor_url`` set."""
        with run_app(self.app) as base_url:
            self.base_url = base_url
            try:
                yield self
            finally:
                self.base_url = None

    def _require_base_url(self) -> str:
        if self.base_url is None:
            raise RuntimeError("the fake teacher is not serving; use its URLs inside `with fake.serve():`")
        return self.base_url

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake teacher")

        @app.post(PROTOCOL_PATH)
        async def protocol_route(request: Request) -> Response:
            return await self._handle(request, PROTOCOL_PATH)

        @app.post(VENDOR_PATH)
        async def vendor_route(request: Request) -> Response:
            return await self._handle(request, VENDOR_PATH)

        return app

    async def _handle(self, request: Request, route: str) -> Response:
        started, wall_started = time.monotonic(), time.time()
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        headers = {name.lower(): value for name, value in request.headers.items()}
        key = headers.get("idempotency-key")
        batch_size, fault, replayed = 0, None, False
        response = _error_response(500, "the fake teacher failed; see the test log")
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            body = await request.body()
            try:
                tiles = _read_tiles(body, route)
            except ValueError as error:
                response = _error_response(400, f"invalid request: {error}")
                return response
            batch_size = len(tiles)
            with self._lock:
                fault = self._faults.popleft() if self._faults else None
            response, replayed = await self._respond(tiles, route, headers, key, fault)
            return response
        finally:
            record = CallRecord(
                route=route,
                started=started,
                finished=time.monotonic(),
                wall_started=wall_started,
                batch_size=batch_size,
                idempotency_key=key,
                headers=headers,
                status=response.status_code,
                fault=None if fault is None else fault.kind,
                replayed=replayed,
            )
            with self._lock:
                self._in_flight -= 1
                self._calls.append(record)

    async def _respond(
        self, tiles: np.ndarray, route: str, headers: dict[str, str], key: str | None, fault: Fault | None
    ) -> tuple[Response, bool]:
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error_response(401, "missing or invalid API key"), False
        if fault is not None and fault.kind == "error":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return _error_response(fault.status, fault.message, headers=extra), False
        if self.max_batch_size is not None and len(tiles) > self.max_batch_size:
            return _error_response(413, f"batch of {len(tiles)} images, the maximum is {self.max_batch_size}"), False

        with self._lock:
            stored = self._stored_responses.get(key) if key is not None and fault is None else None
        if stored is not None:
            return Response(stored, media_type="application/json"), True

        embeddings = self.expected(tiles)
        model = fault.model if fault is not None and fault.kind == "other_model" else self.model
        content = _encode_response(embeddings, route, model, fault)
        if fault is None or fault.kind == "delay":
            with self._lock:
                self.embed_counts.update(tile_digest(tile) for tile in tiles)
                if key is not None:
                    self._stored_responses[key] = content
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
        return Response(content, media_type="application/json"), False


def _read_tiles(body: bytes, route: str) -> np.ndarray:
    """Decode the tiles of a request body of either route; raise ValueError for a body of another shape."""
    try:
        document = json.loads(body)
        if route == PROTOCOL_PATH:
            images = [item["image"] for item in document["input"]]
        else:
            images = []
            for item in document["instances"]:
                text = item["image"]["b64"]
                if not text.startswith(_JPEG_DATA_URL):
                    raise ValueError(f"image does not start with {_JPEG_DATA_URL!r}")
                images.append(text[len(_JPEG_DATA_URL) :])
        tiles = [decode_base64_image(image) for image in images]
    except (KeyError, TypeError, json.JSONDecodeError, ImageError) as error:
        raise ValueError(f"{type(error).__name__}: {error}") from error
    if not tiles:
        raise ValueError("no images in the request")
    return np.stack(tiles)


def _encode_response(embeddings: np.ndarray, route: str, model: str, fault: Fault | None) -> bytes:
    vectors = embeddings.tolist()
    kind = None if fault is None else fault.kind
    if kind == "wrong_dim":
        vectors = [vector[:-1] for vector in vectors]
    elif kind == "nan":
        vectors[-1][0] = math.nan
    elif kind == "wrong_count":
        vectors = vectors[:-1]

    if kind == "invalid_shape":
        document: dict[str, Any] = {"result": "ok"}
    elif route == PROTOCOL_PATH:
        data = [{"object": "embedding", "index": index, "embedding": vector} for index, vector in enumerate(vectors)]
        document = {"object": "list", "model": model, "data": data, "usage": {"tiles": len(embeddings)}}
    else:
        document = {"deployed_model": model, "output": {"predictions": [{"vector": vector} for vector in vectors]}}

    # allow_nan writes NaN as the bare word NaN, which Python's json module and many others read back.
    content = json.dumps(document, allow_nan=True).encode("utf-8")
    if kind == "truncated":
        content = content[: len(content) // 2]
    return content


def _error_response(status: int, message: str, *, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"code": f"fake_{status}", "message": message, "limit": None, "value": None}}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)
