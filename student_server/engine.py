"""The inference engine: one batcher thread that gathers the tiles of concurrent requests into batches.

Requests put their prepared tiles on one queue. The batcher thread takes tiles in arrival order and
runs a forward pass as soon as it has ``batch_size`` tiles, or when ``max_batch_wait_ms`` has passed
since the first waiting tile arrived. One batch may hold tiles of several requests, and a request larger
than ``batch_size`` is split across consecutive batches.

All tiles of one request are computed by the same checkpoint: a request takes the model's
:meth:`~student_server.model.StudentModel.snapshot` when its first tiles enter a batch, and its later
batches keep that snapshot even if a newer checkpoint was swapped in meanwhile. A batch whose tiles
belong to two snapshots runs one forward pass per snapshot.

Admission: :meth:`Engine.embed` (HTTP requests) raises :class:`QueueFullError` (503 with Retry-After)
when the queue has no room, so clients back off. :meth:`Engine.embed_blocking` (slide jobs, from worker
threads) waits for room instead, so a slide never fails because tile requests filled the queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import NotReadyError, UniteError
from shared.imaging import MODEL_INPUT_SIZE
from student_server.errors import QueueFullError
from student_server.metrics import StudentMetrics
from student_server.model import Student, StudentModel, check_teacher_space, embed_with, project
from student_server.onnx_runtime import LinearProjector
from student_server.settings import StudentSettings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# A served student and its projector, as StudentModel.snapshot returns them.
Snapshot = tuple[Student, "torch.nn.Linear | LinearProjector | None"]


@dataclass(frozen=True)
class EngineResult:
    """The embeddings of one request and the checkpoint that computed them."""

    embeddings: np.ndarray
    model: str
    checkpoint_sha256: str
    teacher_space: bool


@dataclass(eq=False)
class _Request:
    """One request in the queue: its tiles, how many were taken into batches, and the parts computed so far."""

    tiles: np.ndarray
    teacher_space: bool
    arrived: float
    on_done: Callable[[EngineResult | None, BaseException | None], None]
    taken: int = 0
    snapshot: Snapshot | None = None
    parts: dict[int, np.ndarray] = field(default_factory=dict)
    computed: int = 0
    failed: bool = False

    @property
    def remaining(self) -> int:
        return len(self.tiles) - self.taken


@dataclass
class _Piece:
    """A slice of one request's tiles inside a batch."""

    request: _Request
    start: int
    stop: int


class Engine:
    """Dynamic batching of tile embeddings over the served student; see the module docstring for the rules."""

    def __init__(self, model: StudentModel, settings: StudentSettings, metrics: StudentMetrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._queue: deque[_Request] = deque()
        self._queued_tiles = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0

    @property
    def queued_tiles(self) -> int:
        """Tiles that wait for a batch, not counting those of the batch being computed."""
        return self._queued_tiles

    def start(self) -> None:
        """Start the batcher thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="student-batcher", daemon=True)
        self._thread.start()
        logger.info(
            "engine started: batch size %d, max batch wait %.1f ms, max queued tiles %d",
            self.settings.batch_size,
            self.settings.max_batch_wait_ms,
            self.settings.max_queued_tiles,
        )

    def stop(self, timeout: float) -> None:
        """Stop taking requests, finish the queued ones, and wait up to ``timeout`` seconds for the batcher thread."""
        thread = self._thread
        if thread is None:
            return
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("engine stop: the batcher thread did not finish within %.1f s, %d tiles still queued", timeout, self._queued_tiles)
        else:
            logger.info("engine stopped after %d batches", self.batches_run)
        self._thread = None

    async def embed(self, tiles: np.ndarray, *, teacher_space: bool = False) -> EngineResult:
        """Embed (N, 224, 224, 3) uint8 prepared tiles; raise :class:`QueueFullError` when the queue has no room.

        Also raises :class:`NotReadyError` (503) when no student is loaded, and
        :class:`TeacherSpaceUnavailable` (422) when ``teacher_space`` is requested from an export without
        a mimic projector.
        """
        self._check_admissible(tiles, teacher_space)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EngineResult] = loop.create_future()

        def on_done(result: EngineResult | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, result, error)

        with self._condition:
            room = self.settings.max_queued_tiles - self._queued_tiles
            if len(tiles) > room:
                raise QueueFullError(
                    f"the embedding queue is full: {self._queued_tiles} tiles wait and this request has {len(tiles)}, "
                    f"the limit is {self.settings.max_queued_tiles} queued tiles (setting UNITE_STUDENT_MAX_QUEUED_TILES). "
                    f"Retry after {self.settings.retry_after_s} s, or send fewer tiles per request.",
                    retry_after_s=self.settings.retry_after_s,
                    limit=self.settings.max_queued_tiles,
                    value=self._queued_tiles + len(tiles),
                )
            request = self._enqueue(tiles, teacher_space, on_done)
        try:
            return await future
        except asyncio.CancelledError:
            # The client disconnected, so its tiles still in the queue are dropped instead of computed.
            self._cancel(request)
            raise

    def embed_blocking(self, tiles: np.ndarray, *, teacher_space: bool = False) -> EngineResult:
        """Embed tiles from a worker thread, waiting for room in the queue instead of raising :class:`QueueFullError`.

        A request larger than ``max_queued_tiles`` is admitted once the queue is empty.
        """
        self._check_admissible(tiles, teacher_space)
        done = threading.Event()
        outcome: list[EngineResult | BaseException | None] = [None]

        def on_done(result: EngineResult | None, error: BaseException | None) -> None:
            outcome[0] = error if error is not None else result
            done.set()

        with self._condition:
            while self._queued_tiles > 0 and self._queued_tiles + len(tiles) > self.settings.max_queued_tiles:
                self._check_running()
                self._condition.wait()
            self._enqueue(tiles, teacher_space, on_done)
        done.wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def embed_tiles(self, tiles: np.ndarray) -> tuple[np.ndarray, str, str]:
        """Embed tiles for a slide job: the :class:`student_server.slide_pipeline.TileEmbedder` protocol."""
        result = self.embed_blocking(tiles)
        return result.embeddings, result.model, result.checkpoint_sha256

    def _check_admissible(self, tiles: np.ndarray, teacher_space: bool) -> None:
        expected = (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3)
        if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[1:] != expected or tiles.dtype != np.uint8:
            shape = list(tiles.shape) if isinstance(tiles, np.ndarray) else type(tiles).__name__
            raise ValueError(f"engine tiles have shape {shape}, expected (N, {MODEL_INPUT_SIZE}, {MODEL_INPUT_SIZE}, 3) uint8.")
        self._check_running()
        self.model.ensure_loaded()
        student, projector = self.model.snapshot()
        check_teacher_space(student, projector, teacher_space)

    def _check_running(self) -> None:
        if self._thread is None or self._stopping:
            raise NotReadyError("the student server is shutting down and takes no new tiles. Retry on a running server.")

    def _enqueue(self, tiles: np.ndarray, teacher_space: bool, on_done: Callable) -> _Request:
        # Called with the condition held.
        request = _Request(tiles=tiles, teacher_space=teacher_space, arrived=time.monotonic(), on_done=on_done)
        if len(tiles) == 0:
            student, projector = self.model.snapshot()
            dim = projector.out_features if teacher_space and projector is not None else student.embed_dim
            on_done(_result(request, np.zeros((0, dim), dtype=np.float32), (student, projector)), None)
            return request
        self._queue.append(request)
        self._queued_tiles += len(tiles)
        self._condition.notify_all()
        return request

    def _cancel(self, request: _Request) -> None:
        with self._condition:
            if request in self._queue:
                self._queue.remove(request)
                self._queued_tiles -= request.remaining
                request.taken = len(request.tiles)
                self._condition.notify_all()
            request.failed = True

    def _run(self) -> None:
        while True:
            pieces = self._next_batch()
            if pieces is None:
                return
            self._compute(pieces)

    def _next_batch(self) -> list[_Piece] | None:
        """Wait for a full batch or for the wait limit of the first waiting tile; None once stopped and drained."""
        batch_size = self.settings.batch_size
        wait_s = self.settings.max_batch_wait_ms / 1000.0
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait()
            deadline = self._queue[0].arrived + wait_s
            while self._queued_tiles < batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)

            pieces: list[_Piece] = []
            count = 0
            while self._queue and count < batch_size:
                request = self._queue[0]
                take = min(request.remaining, batch_size - count)
                pieces.append(_Piece(request=request, start=request.taken, stop=request.taken + take))
                request.taken += take
                count += take
                if request.remaining == 0:
                    self._queue.popleft()
            self._queued_tiles -= count
            # Threads in embed_blocking wait for room.
            self._condition.notify_all()
            return pieces

    def _compute(self, pieces: list[_Piece]) -> None:
        size = sum(piece.stop - piece.start for piece in pieces)
        self.batches_run += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)
            self.metrics.tiles.inc(size)

        # A request keeps the snapshot of its first batch; new requests take the one served now.
        current: Snapshot | None = None
        groups: dict[int, tuple[Snapshot, list[_Piece]]] = {}
        for piece in pieces:
            request = piece.request
            if request.snapshot is None:
                if current is None:
                    current = self.model.snapshot()
                request.snapshot = current
            key = id(request.snapshot[0])
            groups.setdefault(key, (request.snapshot, []))[1].append(piece)

        for snapshot, group in groups.values():
            self._compute_group(snapshot, group)

    def _compute_group(self, snapshot: Snapshot, pieces: list[_Piece]) -> None:
        student, projector = snapshot
        device = self.settings.device
        live = [piece for piece in pieces if not piece.request.failed]
        if not live:
            return
        try:
            tiles = np.concatenate([piece.request.tiles[piece.start : piece.stop] for piece in live])
            embeddings = embed_with(student, projector, tiles, teacher_space=False, device=device)
        except Exception as error:
            # Every request of the batch gets the error, and the batcher thread lives on for the next batch.
            logger.exception("engine batch of %d tiles failed with %s", len(tiles), student.name)
            for piece in live:
                self._fail(piece.request, error)
            return

        offset = 0
        for piece in live:
            rows = embeddings[offset : offset + piece.stop - piece.start]
            offset += piece.stop - piece.start
            request = piece.request
            try:
                if request.teacher_space:
                    check_teacher_space(student, projector, True)
                    rows = project(projector, rows, device=device)
            except UniteError as error:
                self._fail(request, error)
                continue
            request.parts[piece.start] = rows
            request.computed += piece.stop - piece.start
            if request.computed == len(request.tiles):
                ordered = np.concatenate([request.parts[start] for start in sorted(request.parts)])
                request.on_done(_result(request, ordered, snapshot), None)

    def _fail(self, request: _Request, error: BaseException) -> None:
        if request.failed:
            return
        request.failed = True
        with self._condition:
            if request in self._queue:
                self._queue.remove(request)
                self._queued_tiles -= request.remaining
                request.taken = len(request.tiles)
                self._condition.notify_all()
        request.on_done(None, error)


def _result(request: _Request, embeddings: np.ndarray, snapshot: Snapshot) -> EngineResult:
    student = snapshot[0]
    return EngineResult(
        embeddings=embeddings, model=student.name, checkpoint_sha256=student.sha256, teacher_space=request.teacher_space
    )


def _settle(future: asyncio.Future, result: EngineResult | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
