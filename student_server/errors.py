"""The student server's own errors, and the handlers that give every failure the protocol's JSON shape.

Every response that is not a success has the body ``{"error": {"code", "message", "limit", "value"}}``,
as in the teacher gateway, so one client handles both services:

- a :class:`shared.errors.UniteError` keeps its status code and becomes ``to_dict()``, except that an
  internal error (500) shows only its code and a request id, because its message may hold server paths;
- a request that fails validation becomes 422 ``invalid_request`` listing each field and problem;
- an unknown route or method becomes 404 or 405 in the same shape;
- any other exception becomes a generic 500 ``internal_error`` that names only a request id, and the
  traceback goes to the log under that id, so no stack trace or server path reaches a client.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import UniteError

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


class InvalidRequestError(UniteError):
    """The request is not shaped as the endpoint expects: a missing field or a malformed body."""

    code = "invalid_request"
    status_code = 422


class RequestTooLargeError(UniteError):
    """The request has more tiles or more bytes than the server accepts (the gateway's code, too)."""

    code = "request_too_large"
    status_code = 413


class UploadTooLargeError(RequestTooLargeError):
    """An uploaded slide file is larger than the configured limit."""

    code = "upload_too_large"


class TooManyPatchesError(RequestTooLargeError):
    """An uploaded slide has more tissue patches than the server embeds for one slide."""

    code = "too_many_patches"


class ModelNotFoundError(UniteError):
    """The request names a model that this server does not serve."""

    code = "model_not_found"
    status_code = 404


class NotReadyError(UniteError):
    """No student is loaded, so the server cannot embed yet. The message gives the reason."""

    code = "not_ready"
    status_code = 503


def install_error_handlers(app: FastAPI, *, max_body_bytes: int, streamed_paths: frozenset[str]) -> None:
    """Register the error handlers and the request guard (request ids, body limit, crash handling) on ``app``.

    Bodies of ``streamed_paths`` are left to the route, which streams them with its own limit.
    """
    app.add_exception_handler(UniteError, _handle_unite_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_middleware(RequestGuardMiddleware, max_body_bytes=max_body_bytes, streamed_paths=streamed_paths)


def request_id_of(request: Request) -> str:
    """Return the id the request guard gave this request ("-" outside the guard)."""
    return request.scope.get("state", {}).get("request_id", "-")


def _internal_error_body(code: str, request_id: str) -> dict[str, Any]:
    message = f"internal error in the student server (request id {request_id}). The server log has the cause."
    return {"error": {"code": code, "message": message, "limit": None, "value": None}}


async def _handle_unite_error(request: Request, error: UniteError) -> JSONResponse:
    request_id = request_id_of(request)
    if error.status_code >= 500 and not isinstance(error, NotReadyError):
        logger.error("request %s failed: %s", request_id, error.message, exc_info=error)
        return JSONResponse(_internal_error_body(error.code, request_id), status_code=error.status_code)
    # Readiness probes repeat every few seconds, and StudentModel logs each new reason once already.
    level = logging.DEBUG if isinstance(error, NotReadyError) else logging.WARNING
    logger.log(level, "request %s rejected with %d %s: %s", request_id, error.status_code, error.code, error.message)
    return JSONResponse(jsonable_encoder(error.to_dict()), status_code=error.status_code)


async def _handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message = "invalid request: " + "; ".join(describe_validation_problem(problem) for problem in error.errors())
    logger.warning("request %s rejected with 422: %s", request_id_of(request), message)
    body = {"error": {"code": InvalidRequestError.code, "message": message, "limit": None, "value": None}}
    return JSONResponse(body, status_code=422)


async def _handle_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{request.method} {request.url.path}: {error.detail}"
    body = {"error": {"code": codes.get(error.status_code, "http_error"), "message": message, "limit": None, "value": None}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def describe_validation_problem(problem: dict[str, Any]) -> str:
    """Describe one pydantic problem as ``field: message``, with the field written like ``input[3].image``."""
    if problem.get("type") == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', problem.get('msg'))})"
    field = ""
    for part in problem.get("loc", ()):
        if part == "body":
            continue
        if isinstance(part, int):
            field += f"[{part}]"
        elif field:
            field += f".{part}"
        else:
            field = str(part)
    return f"{field or 'body'}: {problem.get('msg')}"


class RequestGuardMiddleware:
    """Give each request an id, reject bodies over ``max_body_bytes`` with 413, and turn crashes into 500.

    The body is read before the app runs, so a body without a Content-Length header is limited too,
    except on ``streamed_paths``, whose routes stream the body themselves. An exception that no handler
    took is logged once with the request id, and the client gets a generic 500 in the protocol's error
    shape, never as a stack trace.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, streamed_paths: frozenset[str]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.streamed_paths = streamed_paths

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

        app_receive = receive
        if scope["path"] not in self.streamed_paths:
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

            app_receive = replay_body

        try:
            await self.app(scope, app_receive, send_with_request_id)
        except Exception:
            logger.exception("request %s (%s %s) failed with an unexpected error", request_id, scope["method"], scope["path"])
            if response_started:
                # Part of the response is out, so no error body can follow; the server closes the connection.
                return
            await _send_json(send_with_request_id, 500, _internal_error_body("internal_error", request_id))

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
            "(setting UNITE_STUDENT_MAX_REQUEST_BYTES). Send fewer tiles per request.",
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
