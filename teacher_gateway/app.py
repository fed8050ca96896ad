"""The teacher gateway's HTTP API: the embeddings protocol over :class:`EmbeddingService`.

Routes: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/cache/stats``, ``GET /healthz`` (the process
is alive) and ``GET /readyz`` (the teacher and the cache are open). Every error, including validation
errors and unknown routes, has the protocol's one JSON shape ``{"error": {"code", "message", "limit",
"value"}}``. Unexpected exceptions become a 500 whose message contains only a request id, and the full
error is logged under that id.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.cache import EmbeddingCache
from shared.errors import TeacherError, UniteError
from shared.protocol import EmbeddingRequest, EmbeddingResponse, ErrorResponse
from teacher_gateway.service import EmbeddingService
from teacher_gateway.settings import GatewaySettings, get_settings
from teacher_gateway.teachers.base import Teacher
from teacher_gateway.teachers.registry import build_teacher

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


class ModelNotFoundError(UniteError):
    """The request names a model that this server does not serve."""

    code = "model_not_found"
    status_code = 404


class RequestTooLargeError(UniteError):
    """The request has more tiles or more bytes than the server accepts."""

    code = "request_too_large"
    status_code = 413


class NotReadyError(UniteError):
    """The teacher or the cache is not open yet, or no longer."""

    code = "not_ready"
    status_code = 503


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
    app.add_middleware(RequestGuardMiddleware, max_body_bytes=settings.max_request_bytes)
    _add_exception_handlers(app)
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
        if body.model is not None and body.model not in model_names:
            raise ModelNotFoundError(
                f"model {body.model!r} is not served here; this gateway serves {model_names}. "
                "Omit 'model' or use one of these names.",
                limit=model_names,
                value=body.model,
            )
        if len(body.input) > settings.max_tiles_per_request:
            raise RequestTooLargeError(
                f"request has {len(body.input)} tiles, the limit is {settings.max_tiles_per_request} per request. "
                "Split the tiles into smaller batches.",
                limit=settings.max_tiles_per_request,
                value=len(body.input),
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


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(UniteError)
    async def handle_unite_error(request: Request, error: UniteError) -> JSONResponse:
        request_id = _request_id(request)
        # Internal errors (500) may carry server paths, so the client gets the code and the request id
        # only. Teacher errors (502) describe the teacher's output and go out whole.
        if error.status_code >= 500 and not isinstance(error, TeacherError):
            logger.error("request %s failed: %s", request_id, error.message, exc_info=error)
            body = {
                "error": {
                    "code": error.code,
                    "message": f"internal error in the gateway (request id {request_id}); the gateway log has the cause.",
                    "limit": None,
                    "value": None,
                }
            }
            return JSONResponse(body, status_code=error.status_code)
        logger.warning("request %s rejected with %d %s: %s", request_id, error.status_code, error.code, error.message)
        return JSONResponse(error.to_dict(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message = "invalid request: " + "; ".join(_describe_validation_problem(problem) for problem in error.errors())
        logger.warning("request %s rejected with 422: %s", _request_id(request), message)
        body = {"error": {"code": "invalid_request", "message": message, "limit": None, "value": None}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {request.url.path}: {error.detail}"
        body = {"error": {"code": codes.get(error.status_code, "http_error"), "message": message, "limit": None, "value": None}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def _describe_validation_problem(problem: dict[str, Any]) -> str:
    """Describe one pydantic problem as ``field: message``, with the field written like ``input[3].image``."""
    location = [part for part in problem.get("loc", ()) if part != "body"]
    if problem.get("type") == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', problem.get('msg'))})"
    field = ""
    for part in location:
        if isinstance(part, int):
            field += f"[{part}]"
        elif field:
            field += f".{part}"
        else:
            field = str(part)
    return f"{field or 'body'}: {problem.get('msg')}"


class RequestGuardMiddleware:
    """Give each request an id, reject bodies over ``max_body_bytes`` with 413, and turn crashes into 500.

    The whole body is read before the app runs, so a body without a Content-Length header is limited too.
    An exception that no handler took is logged once with the request id and gets a generic
    500 in the protocol's error shape, never with a stack trace.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        too_large = self._check_declared_length(scope)
        messages: list[Message] = []
        if too_large is None:
            messages, too_large = await self._read_body(receive)
        if too_large is not None:
            logger.warning("request %s rejected with 413: %s", request_id, too_large.message)
            await _send_json(send_with_request_id, too_large.status_code, too_large.to_dict())
            return

        async def replay_body() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        try:
            await self.app(scope, replay_body, send_with_request_id)
        except Exception:
            logger.exception("request %s (%s %s) failed with an unexpected error", request_id, scope["method"], scope["path"])
            if response_started:
                return
            body = {
                "error": {
                    "code": "internal_error",
                    "message": f"internal error in the gateway (request id {request_id}); the gateway log has the cause.",
                    "limit": None,
                    "value": None,
                }
            }
            await _send_json(send_with_request_id, 500, body)

    def _check_declared_length(self, scope: Scope) -> RequestTooLargeError | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return self._too_large(int(value))
        return None

    async def _read_body(self, receive: Receive) -> tuple[list[Message], RequestTooLargeError | None]:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return [], self._too_large(size, at_least=True)
            if not message.get("more_body", False):
                return messages, None

    def _too_large(self, size: int, *, at_least: bool = False) -> RequestTooLargeError:
        found = f"at least {size}" if at_least else str(size)
        return RequestTooLargeError(
            f"request body has {found} bytes, the limit is {self.max_body_bytes} bytes "
            "(setting UNITE_GATEWAY_MAX_REQUEST_BYTES). Send fewer tiles per request.",
            limit=self.max_body_bytes,
            value=size,
        )


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))],
        }
    )
    await send({"type": "http.response.body", "body": body})
