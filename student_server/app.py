"""The student server's HTTP API: 384-d embeddings of tiles and whole slides from an exported student.

Routes:

- ``POST /v1/embeddings`` and ``POST /v1/embeddings/upload``: tile embeddings (see :mod:`student_server.tiles_api`).
- ``POST /v1/slides`` and ``/v1/jobs/...``: slide jobs (see :mod:`student_server.jobs_api`).
- ``GET /v1/models``: the served student, its checkpoint and its teacher.
- ``GET /metrics``: Prometheus metrics (see :mod:`student_server.metrics`).
- ``GET /healthz``: the process is alive. ``GET /readyz``: a student is loaded; otherwise 503 with the reason.
- ``GET /``: the web page of :mod:`student_server.page`.
- ``GET /docs``, ``/redoc`` and ``/openapi.json``: the API docs, as the ``api_docs`` setting allows (see :mod:`shared.api_docs`).

Tiles of concurrent requests are computed together in batches by :class:`student_server.engine.Engine`
(``app.state.engine``), and slide jobs run in :class:`student_server.jobs.JobManager` (``app.state.jobs``).
A newly published checkpoint replaces the served one without a restart (see :mod:`student_server.model`).
With a keys file (``UNITE_STUDENT_KEYS_FILE``) every route except ``/healthz``, ``/readyz`` and the page
needs an API key (see :mod:`student_server.auth`). The API docs need one only while ``api_docs`` is
``key``, the default.

Shutdown: uvicorn first completes the open requests, then the lifespan stops the checkpoint watcher, asks
the slide jobs to stop within ``shutdown_grace_s`` (unfinished ones resume at the next start), and stops
the engine after its queued batches.

Errors have the protocol's one JSON shape; see :mod:`shared.http`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client.core import Metric

from shared.api_docs import add_docs_routes
from shared.errors import NotReadyError
from shared.http import install_error_handling
from shared.protocol import STUDENT_SERVICE, ErrorResponse
from student_server import jobs_api, page, tiles_api
from student_server.auth import StudentKeys, caller_of, require_api_key
from student_server.engine import Engine
from student_server.errors import JobNotFoundError, QueueFullError
from student_server.jobs import STATUSES as JOB_STATUSES
from student_server.jobs import JobManager
from student_server.metrics import CONTENT_TYPE, RequestMetricsMiddleware, StudentMetrics, gauge
from student_server.model import Student, StudentModel
from student_server.settings import StudentSettings, get_settings

logger = logging.getLogger(__name__)

# Probes and scrapes, logged at DEBUG so they do not fill the log.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_app(settings: StudentSettings | None = None) -> FastAPI:
    """Build the student server; the keys, the student, the engine and the slide jobs start in the app's lifespan.

    A missing or unreadable checkpoint does not stop the server. ``/healthz`` stays 200, ``/readyz`` and
    the embedding routes return 503 with the reason, and the folder is checked again every
    ``reload_interval_s``, which also picks up each newly published student.
    """
    settings = settings if settings is not None else get_settings()
    metrics = StudentMetrics()
    student = StudentModel(settings, metrics=metrics)
    engine = Engine(student, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.keys = StudentKeys.load(settings.keys_file) if settings.keys_file is not None else None
        loaded = await run_in_threadpool(student.ensure_loaded)
        if loaded is None:
            logger.warning("student server started without a student: %s", student.reason)
        engine.start()
        jobs = JobManager(settings, engine)
        await run_in_threadpool(jobs.start)
        app.state.jobs = jobs
        reloader = asyncio.create_task(_watch_checkpoint(student, settings.reload_interval_s), name="checkpoint-reload")
        logger.info(
            "student server started: %s, %s",
            f"{loaded.name} from {loaded.folder}" if loaded is not None else "no student yet",
            f"{len(app.state.keys)} API keys" if app.state.keys is not None else "no API keys",
        )
        try:
            yield
        finally:
            # Uvicorn has completed the open requests by now. Slide jobs stop first, because they feed the engine.
            reloader.cancel()
            await run_in_threadpool(jobs.stop, settings.shutdown_grace_s)
            await run_in_threadpool(engine.stop, settings.shutdown_grace_s)
            logger.info("student server stopped")

    app = FastAPI(
        title="UNITE student server",
        summary="384-d embeddings of pathology tiles and slides from a distilled student.",
        lifespan=lifespan,
        # Served by add_docs_routes instead, behind the api_docs setting.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.student = student
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.jobs = None
    app.state.keys = None
    # Added before the error handling, so it runs inside the request guard and its log lines carry the request id.
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, logger=logger, quiet_paths=QUIET_PATHS)
    install_error_handling(
        app,
        max_request_bytes=settings.max_request_bytes,
        max_request_bytes_setting="UNITE_STUDENT_MAX_REQUEST_BYTES",
        internal_error_message="internal error in the student server (request id {request_id}). The server log has the cause.",
        logger=logger,
        # Clients see why no student is loaded, as StudentModel.public_reason words it without server paths,
        # and when to retry a full queue.
        public_errors=(NotReadyError, QueueFullError),
        streamed_paths=frozenset({jobs_api.SLIDES_PATH, tiles_api.UPLOAD_PATH}),
    )
    metrics.add_collector(lambda: _scrape_time_metrics(app))
    # Before _add_routes, so these routes take precedence over any older route on the same path.
    app.include_router(tiles_api.router, dependencies=KEYED)
    app.include_router(jobs_api.router, dependencies=KEYED)
    _add_routes(app)
    add_docs_routes(app, access=settings.api_docs, check_key=caller_of)
    app.include_router(page.router)
    return app


async def _watch_checkpoint(student: StudentModel, interval_s: float) -> None:
    """Check the checkpoint folder for a new export every ``interval_s`` seconds, until cancelled."""
    # NOTE: an interval of 0 is taken as 0.1 s, so the check cannot occupy a worker thread without a pause.
    interval_s = max(interval_s, 0.1)
    while True:
        await asyncio.sleep(interval_s)
        await run_in_threadpool(student.check_for_update)


def _scrape_time_metrics(app: FastAPI) -> Iterator[Metric]:
    """Yield the gauges read at scrape time: the queue, the served checkpoint and the slide jobs by status."""
    yield gauge("queue_tiles", "Tiles waiting for a batch of the engine.", {}, app.state.engine.queued_tiles)
    student = app.state.student.loaded
    if student is not None:
        yield gauge(
            "checkpoint_info", "The served checkpoint: always 1, labelled with its sha256 and name.", {"sha256": student.sha256, "model": student.name}, 1
        )
    jobs = app.state.jobs
    if jobs is not None:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for job_id in jobs.known_ids():
            try:
                counts[jobs.get(job_id).status] += 1
            except JobNotFoundError:
                continue
        for status, count in counts.items():
            yield gauge("slide_jobs", "Slide jobs known to this server, by status (label state).", {"state": status}, count)


def get_student_settings(request: Request) -> StudentSettings:
    return request.app.state.settings


def get_student_model(request: Request) -> StudentModel:
    return request.app.state.student


def require_student(request: Request) -> Student:
    """Return the loaded student, or raise :class:`NotReadyError` (503) with the reason there is none.

    The message gives the public reason, which names settings but no server path.
    """
    model: StudentModel = request.app.state.student
    loaded = model.ensure_loaded()
    if loaded is None:
        raise NotReadyError(f"the student server is not ready: {model.public_reason.rstrip('.')}.")
    return loaded


SettingsDep = Annotated[StudentSettings, Depends(get_student_settings)]
ModelDep = Annotated[StudentModel, Depends(get_student_model)]
StudentDep = Annotated[Student, Depends(require_student)]

# Routes that need an API key when the server has a keys file.
KEYED = [Depends(require_api_key)]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 404, 413, 422, 500, 503)
}


def _add_routes(app: FastAPI) -> None:
    @app.get("/v1/models", dependencies=KEYED)
    def list_models(model: ModelDep) -> dict[str, Any]:
        """List the served student's outputs: its own embedding and, with a mimic projector, teacher-space output."""
        # "service" lets clients such as `unite teach` check which UNITE service they reached.
        return {"object": "list", "service": STUDENT_SERVICE, "data": tiles_api.model_entries(model)}

    @app.get("/metrics", dependencies=KEYED, responses=_ERROR_RESPONSES)
    def prometheus_metrics(request: Request) -> Response:
        """Return the Prometheus metrics of this process, in the Prometheus text format."""
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Report that the process is alive, with or without a student."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    def readyz(student: StudentDep) -> dict[str, str]:
        """Report ready once a student is loaded, and 503 with the reason until then."""
        return {"status": "ready", "model": student.name, "checkpoint_sha256": student.sha256}

