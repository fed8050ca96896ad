"""The teacher gateway's HTTP API: the embeddings protocol over :class:`EmbeddingService`.

Routes: ``POST /v1/embeddings``, ``POST /v1/embeddings/dry-run`` (what a request would cost, without
calling the teacher), ``GET /v1/models``, ``GET /v1/cache/stats``, ``GET /v1/usage``, ``GET /metrics``
(Prometheus), ``GET /healthz`` (the process is alive) and ``GET /readyz`` (the teacher and the cache are
open, the cache can be written and the teacher has not drifted), and the API docs ``/docs``, ``/redoc``
and ``/openapi.json``. With a keys file, every route but ``/healthz`` and ``/readyz`` needs an API key;
``/metrics`` follows the ``metrics`` setting and the docs the ``api_docs`` setting.

``/healthz`` and ``/readyz`` run on the event loop and do no blocking work, so they answer while teacher
calls are stuck. Embedding requests run in worker threads of their own limiter, so they never take the
threads of the other routes, and at most ``max_teacher_requests`` of them wait on the teacher at once.

Every error, including validation errors and unknown routes, has the protocol's one JSON shape
``{"error": {"code", "message", "limit", "value"}}``. Unexpected exceptions become a 500 whose message
contains only a request id, and the full error is logged under that id. :mod:`shared.http` does this
for both services; the gateway's own refusals (401, 402, 429, 503 drift) add their HTTP headers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from shared.api_docs import add_docs_routes
from shared.cache import EmbeddingCache
from shared.errors import NotReadyError, TeacherError
from shared.http import check_embedding_request, install_error_handling, request_id_of
from shared.protocol import (
    GATEWAY_SERVICE,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
)
from teacher_gateway.auth import KeyStore
from teacher_gateway.canary import CanaryMonitor
from teacher_gateway.errors import GatewayLimitError, TeacherDriftError
from teacher_gateway.metrics import (
    CONTENT_TYPE,
    GatewayMetrics,
    RequestLatencyMiddleware,
    gauge,
    teacher_stats_metrics,
)
from teacher_gateway.service import ANONYMOUS_CALLER, RETRY_AFTER_S, EmbeddingService
from teacher_gateway.settings import GatewaySettings, get_settings
from teacher_gateway.teachers.base import Teacher
from teacher_gateway.teachers.registry import build_configured_teacher
from teacher_gateway.unavailable import CacheUnavailableError
from teacher_gateway.usage import COUNTERS, Budget, Caller, UsageLedger, budget_status

logger = logging.getLogger(__name__)

# Worker threads for embedding requests beyond max_teacher_requests, so that requests served from the
# cache still get a thread while that many wait on the teacher.
CACHE_HIT_THREADS = 8


def create_app(
    settings: GatewaySettings | None = None,
    *,
    teacher: Teacher | None = None,
    teacher_name: str | None = None,
    close_teacher: bool | None = None,
) -> FastAPI:
    """Build the gateway app; the keys, the cache, the ledger and the teacher open in the app's lifespan.

    ``teacher`` serves a ready-made backend in place of the one ``settings.teacher`` names; the caller
    then owns it and closes it, unless ``close_teacher`` is true. A teacher built here is closed at
    shutdown. Closing it first, before the cache, cancels teacher calls still in flight. Requests may name the
    teacher by its identity, its ``name`` attribute, or ``teacher_name`` (by default ``settings.teacher``
    when the teacher is built here).
    """
    settings = settings if settings is not None else get_settings()
    metrics = GatewayMetrics()
    closes_teacher = close_teacher if close_teacher is not None else teacher is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.keys = KeyStore.load(settings.keys_file) if settings.keys_file is not None else None
        served = teacher if teacher is not None else build_configured_teacher(settings)
        cache = EmbeddingCache(settings.cache_dir)
        ledger = UsageLedger(settings.cache_dir)
        service = EmbeddingService(
            served,
            cache,
            ledger,
            budget=Budget(tiles=settings.budget_tiles, calls=settings.budget_calls),
            metrics=metrics,
            max_teacher_requests=settings.max_teacher_requests,
        )
        app.state.embedding_threads = anyio.CapacityLimiter(settings.max_teacher_requests + CACHE_HIT_THREADS)
        registry_name = teacher_name if teacher is not None else settings.teacher
        names = (served.identity, getattr(served, "name", None), registry_name)
        app.state.model_names = list(dict.fromkeys(name for name in names if name))
        canary = None
        if settings.canary_tiles > 0:
            canary = CanaryMonitor(
                service,
                tiles=settings.canary_tiles,
                interval_s=settings.canary_interval_minutes * 60.0,
                min_cosine=settings.canary_min_cosine,
            )
            canary.start()
        app.state.canary = canary
        app.state.service = service
        logger.info(
            "gateway ready: teacher %s (dim %d, licence %s), cache %s, budget %s, %s",
            served.identity,
            served.dim,
            served.licence,
            cache.path,
            budget_status(service.budget, ledger.spent(served.identity)),
            f"{len(app.state.keys)} API keys" if app.state.keys is not None else "no API keys",
        )
        try:
            yield
        finally:
            app.state.service = None
            if closes_teacher and hasattr(served, "close"):
                served.close()
            if canary is not None:
                canary.stop()
            ledger.close()
            cache.close()
            logger.info("gateway stopped: cache %s closed", cache.path)

    app = FastAPI(
        title="UNITE teacher gateway",
        summary="Teacher embeddings of pathology tiles, served from a content-addressed cache first.",
        lifespan=lifespan,
        # Served by add_docs_routes instead, behind the api_docs setting.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.embedding_threads = None
    app.state.storage_check = None
    app.state.metrics = metrics
    app.state.service = None
    app.state.canary = None
    app.state.keys = None
    app.state.model_names = []
    install_error_handling(
        app,
        max_request_bytes=settings.max_request_bytes,
        max_request_bytes_setting="UNITE_GATEWAY_MAX_REQUEST_BYTES",
        internal_error_message="internal error in the gateway (request id {request_id}); the gateway log has the cause.",
        logger=logger,
        # Teacher errors (502) describe the teacher's output and "not ready" (503) asks the client to
        # retry, so both go out whole; other server-side errors may name paths and are replaced.
        public_errors=(TeacherError, NotReadyError),
    )

    async def handle_limit_error(request: Request, error: GatewayLimitError) -> JSONResponse:
        metrics.refusals.labels(error.code).inc()
        logger.warning("request %s rejected with %d %s: %s", request_id_of(request), error.status_code, error.code, error.message)
        return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)

    app.add_exception_handler(GatewayLimitError, handle_limit_error)
    app.add_middleware(RequestLatencyMiddleware, metrics=metrics)
    metrics.add_collector(lambda: _scrape_time_metrics(app))
    _add_routes(app)
    add_docs_routes(app, access=settings.api_docs, check_key=caller_of)
    return app


async def get_service(request: Request) -> EmbeddingService:
    """Return the app's embedding service, or raise :class:`NotReadyError` outside its lifespan."""
    service = request.app.state.service
    if service is None:
        raise NotReadyError("the gateway is not ready: its teacher and cache are not open. Retry after startup.")
    return service


async def get_gateway_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


# The dependencies are async, so they run on the event loop (they do no blocking work) and take no worker thread.
async def authenticate(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """Return the caller of the request's API key, or the anonymous caller when the gateway has no keys file."""
    return caller_of(request, authorization, x_api_key)


def caller_of(request: Request, authorization: str | None, x_api_key: str | None) -> Caller:
    """Return the caller of the request's API key, or the anonymous caller when the gateway has no keys file."""
    keys: KeyStore | None = request.app.state.keys
    if keys is None:
        return ANONYMOUS_CALLER
    return keys.authenticate(authorization=authorization, api_key=x_api_key)


ServiceDep = Annotated[EmbeddingService, Depends(get_service)]
SettingsDep = Annotated[GatewaySettings, Depends(get_gateway_settings)]
CallerDep = Annotated[Caller, Depends(authenticate)]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 402, 404, 413, 422, 429, 500, 502, 503)
}


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERROR_RESPONSES)
    async def create_embeddings(
        body: EmbeddingRequest, request: Request, service: ServiceDep, settings: SettingsDep, caller: CallerDep
    ) -> JSONResponse:
        """Embed base64 PNG or JPEG tiles, taking cached embeddings first and sending only misses to the teacher."""
        _check_request(body, request, settings)

        def admit_and_embed() -> tuple[Any, dict[str, int]]:
            service.admit(caller)
            return service.embed(body.input, caller=caller)

        # A limiter of its own, so requests waiting on the teacher never take the threads of other routes.
        # abandon_on_cancel: a gateway shutting down stops waiting for the thread, and closing the teacher
        # then ends the thread's teacher call.
        embeddings, usage = await anyio.to_thread.run_sync(
            admit_and_embed, limiter=request.app.state.embedding_threads, abandon_on_cancel=True
        )
        # Built by hand rather than through the pydantic model: validating 256 x 1536 floats again
        # would only cost time. tolist() gives the exact float32 values as Python floats.
        content = {
            "object": "list",
            "model": service.teacher.identity,
            "data": [
                {"object": "embedding", "index": index, "embedding": row}
                for index, row in enumerate(embeddings.tolist())
            ],
            "usage": usage,
        }
        return JSONResponse(content)

    @app.post("/v1/embeddings/dry-run", responses=_ERROR_RESPONSES)
    def plan_embeddings(
        body: EmbeddingRequest, request: Request, service: ServiceDep, settings: SettingsDep, caller: CallerDep
    ) -> dict[str, Any]:
        """Report what the same body sent to POST /v1/embeddings would cost now: cache hits, tiles to pay for, budget left.

        Nothing is sent to the teacher and nothing is charged; the request counts against the key's
        requests per minute only.
        """
        _check_request(body, request, settings)
        service.admit(caller, count_request=False)
        return service.plan(body.input)

    @app.get("/v1/models", responses=_ERROR_RESPONSES)
    def list_models(request: Request, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
        """List the served teacher: its identity, embedding dimension, parameter count, licence and public settings."""
        teacher = service.teacher
        model: dict[str, Any] = {
            "id": teacher.identity,
            "object": "model",
            "names": request.app.state.model_names,
            "dim": teacher.dim,
            # None (JSON null) when the count is unknown, as for a remote API.
            "parameters": getattr(teacher, "parameters", None),
            "licence": teacher.licence,
        }
        describe = getattr(teacher, "describe", None)
        if callable(describe):
            model["settings"] = describe()
        return {"object": "list", "service": GATEWAY_SERVICE, "data": [model]}

    @app.get("/v1/cache/stats", responses=_ERROR_RESPONSES)
    def cache_stats(service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
        """Count the cached embeddings per teacher identity."""
        entries = service.cache.count_by_teacher()
        return {"entries": entries, "total": sum(entries.values())}

    @app.get("/v1/usage", responses=_ERROR_RESPONSES)
    def usage(request: Request, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
        """Return the usage counts per teacher and caller, the served teacher's budget and the last canary check.

        The counts are summed over every gateway process sharing the cache folder, since the ledger was created.
        """
        teachers = {}
        for identity, callers in service.ledger.usage().items():
            totals = {name: sum(counts[name] for counts in callers.values()) for name in COUNTERS}
            teachers[identity] = {"totals": totals, "keys": callers}
        canary = request.app.state.canary
        return {
            "teacher": service.teacher.identity,
            "budget": budget_status(service.budget, service.ledger.spent(service.teacher.identity)),
            "teacher_blocked": service.teacher_block is not None,
            "canary": canary.last.as_dict() if canary is not None and canary.last is not None else None,
            "teachers": teachers,
        }

    @app.get("/metrics", responses=_ERROR_RESPONSES)
    def prometheus_metrics(
        request: Request,
        settings: SettingsDep,
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Return the Prometheus metrics of this process, in the Prometheus text format."""
        if settings.metrics == "off":
            raise HTTPException(404, "metrics are off (UNITE_GATEWAY_METRICS=off); set it to 'key' or 'open' to serve them.")
        if settings.metrics == "key":
            caller_of(request, authorization, x_api_key)
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Report that the process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> dict[str, str]:
        """Report ready once the teacher and the cache are open; 503 once the teacher drifted or while the cache cannot be written.

        It needs no API key, so it names no teacher, URL or path; ``GET /v1/usage`` and the log have the details.
        """
        service: EmbeddingService | None = request.app.state.service
        if service is None:
            raise NotReadyError("the gateway is not ready: its teacher and cache are not open. Retry after startup.")
        block = service.teacher_block
        if block is not None:
            raise TeacherDriftError(
                "the gateway is not ready: the canary check found that its teacher's embeddings changed, so it no "
                "longer calls the teacher; cached embeddings are still served. GET /v1/usage (with an API key) and "
                "the gateway log give the details and the fix.",
                limit=block.limit,
                value=block.value,
            )
        if service.storage_error is not None:
            _start_storage_check(request.app, service)
            raise CacheUnavailableError(
                "the gateway is not ready: its cache or usage ledger cannot be written (the gateway log names the cause, "
                "such as a full disk). Cached embeddings are still served. It is ready again once a write succeeds.",
                retry_after_s=RETRY_AFTER_S,
            )
        return {"status": "ready"}


def _start_storage_check(app: FastAPI, service: EmbeddingService) -> None:
    """Retry the failed cache writes in a background thread, unless a retry is already running."""
    running: threading.Thread | None = app.state.storage_check
    if running is not None and running.is_alive():
        return
    app.state.storage_check = threading.Thread(target=service.check_storage, name="cache-write-check", daemon=True)
    app.state.storage_check.start()


def _check_request(body: EmbeddingRequest, request: Request, settings: GatewaySettings) -> None:
    check_embedding_request(
        model=body.model,
        tile_count=len(body.input),
        served_names=request.app.state.model_names,
        max_tiles=settings.max_tiles_per_request,
        max_tiles_setting="UNITE_GATEWAY_MAX_TILES_PER_REQUEST",
        service="gateway",
    )


def _scrape_time_metrics(app: FastAPI):
    """Yield the gauges read at scrape time: budget, tiles in flight and the teacher backend's own counters."""
    service: EmbeddingService | None = app.state.service
    if service is None:
        return
    identity = service.teacher.identity
    status = budget_status(service.budget, service.ledger.spent(identity))
    for unit, values in status.items():
        labels = {"teacher": identity, "unit": unit}
        yield gauge("budget_spent", "Budget spent by the served teacher identity, over all processes (label unit).", labels, values["spent"])
        if values["limit"] is not None:
            yield gauge("budget_limit", "Budget of the served teacher identity (label unit).", labels, values["limit"])
            yield gauge("budget_remaining", "Budget left to the served teacher identity (label unit).", labels, values["left"])
    yield gauge("inflight_tiles", "Tiles this process is embedding now with the teacher.", {"teacher": identity}, service.inflight.claimed)
    yield gauge("coalesce_waiters", "Requests waiting now for another request's teacher call.", {"teacher": identity}, service.inflight.waiters)
    stats = getattr(service.teacher, "stats", None)
    if callable(stats):
        yield from teacher_stats_metrics(identity, stats())
