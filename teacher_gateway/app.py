"""The teacher gateway's HTTP API: the embeddings protocol over :class:`EmbeddingService`.

Routes: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/cache/stats``, ``GET /healthz`` (the process
is alive) and ``GET /readyz`` (the teacher and the cache are open). Every error, including validation
errors and unknown routes, has the protocol's one JSON shape ``{"error": {"code", "message", "limit",
"value"}}``. Unexpected exceptions become a 500 whose message contains only a request id, and the full
error is logged under that id. :mod:`shared.http` does this for both services.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from shared.cache import EmbeddingCache
from shared.errors import NotReadyError, TeacherError
from shared.http import check_embedding_request, install_error_handling
from shared.protocol import GATEWAY_SERVICE, EmbeddingRequest, EmbeddingResponse, ErrorResponse
from teacher_gateway.service import EmbeddingService
from teacher_gateway.settings import GatewaySettings, get_settings
from teacher_gateway.teachers.base import Teacher
from teacher_gateway.teachers.registry import build_teacher

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None, *, teacher: Teacher | None = None) -> FastAPI:
    """Build the gateway app; the cache opens and the teacher is built in the app's lifespan.

    ``teacher`` serves a ready-made backend in place of the one ``settings.teacher`` names.
    """
    settings = settings if settings is not None else get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = teacher if teacher is not None else build_teacher(settings.teacher)
        short_name = settings.teacher if teacher is None else getattr(served, "name", None)
        cache = EmbeddingCache(settings.cache_dir)
        app.state.service = EmbeddingService(served, cache)
        app.state.model_names = [name for name in (served.identity, short_name) if name]
        logger.info(
            "gateway ready: teacher %s (dim %d, licence %s), cache %s", served.identity, served.dim, served.licence, cache.path
        )
        try:
            yield
        finally:
            app.state.service = None
            cache.close()
            logger.info("gateway stopped: cache %s closed", cache.path)

    app = FastAPI(
        title="UNITE teacher gateway",
        summary="Teacher embeddings of pathology tiles, served from a content-addressed cache first.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
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
    _add_routes(app)
    return app


def get_service(request: Request) -> EmbeddingService:
    """Return the app's embedding service, or raise :class:`NotReadyError` outside its lifespan."""
    service = request.app.state.service
    if service is None:
        raise NotReadyError("the gateway is not ready: its teacher and cache are not open. Retry after startup.")
    return service


def get_gateway_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


ServiceDep = Annotated[EmbeddingService, Depends(get_service)]
SettingsDep = Annotated[GatewaySettings, Depends(get_gateway_settings)]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (404, 413, 422, 500, 502, 503)
}


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERROR_RESPONSES)
    def create_embeddings(body: EmbeddingRequest, request: Request, service: ServiceDep, settings: SettingsDep) -> JSONResponse:
        """Embed base64 PNG or JPEG tiles, taking cached embeddings first and sending only misses to the teacher."""
        model_names = request.app.state.model_names
        check_embedding_request(
            model=body.model,
            tile_count=len(body.input),
            served_names=model_names,
            max_tiles=settings.max_tiles_per_request,
            max_tiles_setting="UNITE_GATEWAY_MAX_TILES_PER_REQUEST",
            service="gateway",
        )

        embeddings, usage = service.embed(body.input)
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

    @app.get("/v1/models")
    def list_models(request: Request, service: ServiceDep) -> dict[str, Any]:
        """List the served teacher: its identity, embedding dimension and licence."""
        teacher = service.teacher
        return {
            "object": "list",
            "service": GATEWAY_SERVICE,
            "data": [
                {
                    "id": teacher.identity,
                    "object": "model",
                    "names": request.app.state.model_names,
                    "dim": teacher.dim,
                    "licence": teacher.licence,
                }
            ],
        }

    @app.get("/v1/cache/stats")
    def cache_stats(service: ServiceDep) -> dict[str, Any]:
        """Count the cached embeddings per teacher identity."""
        entries = service.cache.count_by_teacher()
        return {"entries": entries, "total": sum(entries.values())}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Report that the process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    def readyz(service: ServiceDep) -> dict[str, str]:
        """Report ready once the teacher and the cache are open."""
        return {"status": "ready", "model": service.teacher.identity}
