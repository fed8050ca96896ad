"""Error handling and request guard shared by the teacher gateway and the student server.

Every response that is not a success has the embeddings protocol's body
``{"error": {"code", "message", "limit", "value"}}``, so one client handles both services:

- a :class:`shared.errors.UniteError` keeps its status code and becomes ``to_dict()``. A 5xx error shows
  only its code and a request id, because its message may hold server paths, unless the service lists
  its class in ``public_errors``;
- a request that fails validation becomes 422 ``invalid_request`` listing each field and problem, with
  the first offending value, shortened to 100 characters, in ``value``;
- an unknown route or method becomes 404 or 405 in the same shape;
- any other exception becomes a generic 500 ``internal_error`` that names only a request id, and the
  traceback goes to the log under that id, so no stack trace or server path reaches a client;
- a body over the service's byte limit becomes 413 ``request_too_large`` before the app runs.

Every response carries its request id in the ``x-request-id`` header. This module imports no torch.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidRequestError, ModelNotFoundError, NotReadyError, RequestTooLargeError, UniteError
from shared.logs import request_id_var

REQUEST_ID_HEADER = "x-request-id"

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
# Maximum length, in characters, of the request text that a 422 error copies into its message or ``value``.
MAX_ECHOED_CHARS = 100


def install_error_handling(
    app: FastAPI,
    *,
    max_request_bytes: int,
    max_request_bytes_setting: str,
    internal_error_message: str,
    logger: logging.Logger,
    public_errors: tuple[type[UniteError], ...] = (),
    streamed_paths: frozenset[str] = frozenset(),
) -> None:
    """Register the exception handlers and the request guard (request ids, body limit, crash handling) on ``app``.

    ``max_request_bytes_setting`` is the setting that raises the body limit, named in the 413 message.
    ``internal_error_message``, formatted with ``request_id``, is the message that clients get for an
    unexpected exception and for a 5xx UniteError outside ``public_errors``.
    ``public_errors`` are 5xx UniteErrors whose message goes to the client whole, because it contains no
    server detail. Bodies of ``streamed_paths`` are left to the route, which streams them with its own limit.
    Errors are logged on ``logger`` under the request id.
    """
    handlers = _ErrorHandlers(internal_error_message=internal_error_message, logger=logger, public_errors=public_errors)
    app.add_exception_handler(UniteError, handlers.handle_unite_error)
    app.add_exception_handler(RequestValidationError, handlers.handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handlers.handle_http_error)
    app.add_middleware(
        RequestGuardMiddleware,
        max_body_bytes=max_request_bytes,
        max_body_bytes_setting=max_request_bytes_setting,
        internal_error_message=internal_error_message,
        logger=logger,
        streamed_paths=streamed_paths,
    )


def check_embedding_request(
    *, model: str | None, tile_count: int, served_names: list[str], max_tiles: int, max_tiles_setting: str, service: str
) -> None:
    """Check an embeddings request's ``model`` against the served names and its tile count against the limit.

    Raises :class:`ModelNotFoundError` (404) or :class:`RequestTooLargeError` (413) naming the value and
    the limit, so both services reject the same requests with the same errors.
    """
    if model is not None and model not in served_names:
        raise ModelNotFoundError(
            f"model {model!r} is not served here; this {service} serves {served_names}. "
            "Omit 'model' or use one of these names.",
            limit=served_names,
            value=model,
        )
    if tile_count > max_tiles:
        raise RequestTooLargeError(
            f"request has {tile_count} tiles, the limit is {max_tiles} per request (setting {max_tiles_setting}). "
            "Split the tiles into smaller batches.",
            limit=max_tiles,
            value=tile_count,
        )


def request_id_of(request: Request) -> str:
    """Return the id the request guard gave this request ("-" outside the guard)."""
    return request.scope.get("state", {}).get("request_id", "-")


def _internal_error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "limit": None, "value": None}}


class _ErrorHandlers:
    """Exception handlers of one app, with its service's internal-error message, logger and public errors."""

    def __init__(
        self, *, internal_error_message: str, logger: logging.Logger, public_errors: tuple[type[UniteError], ...]
    ) -> None:
        self.internal_error_message = internal_error_message
        self.logger = logger
        self.public_errors = public_errors

    async def handle_unite_error(self, request: Request, error: UniteError) -> JSONResponse:
        request_id = request_id_of(request)
        if error.status_code >= 500 and not isinstance(error, self.public_errors):
            self.logger.error("request %s failed: %s", request_id, error.message, exc_info=error)
            message = self.internal_error_message.format(request_id=request_id)
            return JSONResponse(_internal_error_body(error.code, message), status_code=error.status_code)
        # Readiness probes repeat every few seconds, and the services log each new reason once already.
        level = logging.DEBUG if isinstance(error, NotReadyError) else logging.WARNING
        self.logger.log(level, "request %s rejected with %d %s: %s", request_id, error.status_code, error.code, error.message)
        # An error may carry headers for the client, such as Retry-After on a full queue.
        headers = getattr(error, "headers", None) or None
        return JSONResponse(jsonable_encoder(error.to_dict()), status_code=error.status_code, headers=headers)

    async def handle_validation_error(self, request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        content_type = request.headers.get("content-type")
        described = [describe_validation_problem(problem, content_type=content_type) for problem in problems]
        message = _printable("invalid request: " + "; ".join(described))
        self.logger.warning("request %s rejected with 422: %s", request_id_of(request), message)
        value = offending_value(problems)
        body = {"error": {"code": InvalidRequestError.code, "message": message, "limit": declared_range(request, problems), "value": value}}
        return JSONResponse(body, status_code=422)

    async def handle_http_error(self, request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and isinstance(error.__cause__, (RecursionError, ValueError)):
            # FastAPI turns every JSON parsing failure other than JSONDecodeError into a bare 400.
            return self._invalid_json(request, error.__cause__)
        message = f"{request.method} {shorten_echoed(request.url.path)}: {error.detail}"
        code = _HTTP_ERROR_CODES.get(error.status_code, "http_error")
        body = {"error": {"code": code, "message": message, "limit": None, "value": None}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    def _invalid_json(self, request: Request, cause: BaseException) -> JSONResponse:
        message = f"invalid request: the body is not valid JSON ({_json_parse_problem(cause)}). Send a JSON body of the protocol."
        self.logger.warning("request %s rejected with 422: %s", request_id_of(request), message)
        body = {"error": {"code": InvalidRequestError.code, "message": message, "limit": None, "value": None}}
        return JSONResponse(body, status_code=422)


def _json_parse_problem(cause: BaseException) -> str:
    """Describe why Python's json module failed on a body, for the errors it raises besides JSONDecodeError."""
    if isinstance(cause, RecursionError):
        return "arrays or objects are nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not valid {cause.encoding} text"
    if "integer string conversion" in str(cause):
        # CPython 3.11 limits int() to 4300 digits (sys.get_int_max_str_digits()).
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return f"{type(cause).__name__}: {shorten_echoed(str(cause))}"


def describe_validation_problem(problem: dict[str, Any], *, content_type: str | None = None) -> str:
    """Describe one pydantic problem as ``field: message``, with the field written like ``input[3].image``.

    ``content_type`` is the request's Content-Type header. FastAPI leaves a body that is not declared as
    JSON unparsed, so that problem is described as a wrong Content-Type rather than a wrong body.
    """
    if problem.get("type") == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', problem.get('msg'))})"
    location = tuple(problem.get("loc", ()))
    if location == ("body",) and isinstance(problem.get("input"), (bytes, bytearray)):
        sent = f"with Content-Type {shorten_echoed(content_type)!r}" if content_type else "without a Content-Type header"
        return (
            f"the body was sent {sent}, so it was not read as JSON. "
            "Send the JSON body with the header `Content-Type: application/json`"
        )
    field = ""
    for part in location:
        if part == "body":
            continue
        if isinstance(part, int):
            field += f"[{part}]"
        elif field:
            field += f".{shorten_echoed(str(part))}"
        else:
            field = shorten_echoed(str(part))
    return f"{field or 'body'}: {problem.get('msg')}"


def declared_range(request: Request, problems: list[dict[str, Any]]) -> list[Any] | None:
    """Return ``[minimum, maximum]`` that the route's schema states for the one query or path parameter the problems name, or None.

    A parameter whose range the endpoint checks itself declares it as ``minimum`` and ``maximum`` in its
    schema, so a value that is not even a number gets the same ``limit`` as one out of range.
    """
    locations = {tuple(problem.get("loc", ()))[:2] for problem in problems}
    if len(locations) != 1:
        return None
    location = locations.pop()
    if len(location) != 2 or location[0] not in ("query", "path"):
        return None
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return None
    parameters = dependant.query_params if location[0] == "query" else dependant.path_params
    for parameter in parameters:
        if parameter.alias == location[1]:
            schema = parameter.field_info.json_schema_extra
            if isinstance(schema, dict) and ("minimum" in schema or "maximum" in schema):
                return [schema.get("minimum"), schema.get("maximum")]
    return None


def offending_value(problems: list[dict[str, Any]]) -> Any:
    """Return the input of the first problem that has one, in a form that JSON can encode, or None.

    A missing field has no input, an invalid JSON body or an unparsed body is not echoed, and text longer
    than :data:`MAX_ECHOED_CHARS` characters is cut, so a 422 never copies a whole tile back.
    """
    for problem in problems:
        if problem.get("type") in ("missing", "json_invalid") or "input" not in problem:
            continue
        value = problem["input"]
        if isinstance(value, (bytes, bytearray)):
            continue
        return _jsonable_preview(value)
    return None


def _jsonable_preview(value: Any) -> Any:
    """Return ``value`` as JSON can encode it: numbers unchanged, other values as shortened printable text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**MAX_ECHOED_CHARS else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        # JSON has no Infinity or NaN, and starlette's encoder raises for them.
        return value if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else repr(value)
    return _printable(shorten_echoed(text))


def shorten_echoed(text: str) -> str:
    """Return ``text`` cut to :data:`MAX_ECHOED_CHARS` characters plus "...", for echoing request text in errors."""
    return text if len(text) <= MAX_ECHOED_CHARS else text[:MAX_ECHOED_CHARS] + "..."


def _printable(text: str) -> str:
    """Escape lone surrogates and other characters that UTF-8 cannot encode, so the response can be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class AccessLogQueryFilter(logging.Filter):
    """Remove the query string from uvicorn's access log lines, because a client may send an API key in it.

    uvicorn (0.30 and later) logs ``(client, method, path with query, HTTP version, status)`` on the
    ``uvicorn.access`` logger. Install the filter on that logger after uvicorn configured its logging.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            arguments = list(record.args)
            arguments[2] = arguments[2].partition("?")[0]
            record.args = tuple(arguments)
        return True


class RequestGuardMiddleware:
    """Give each request an id, reject bodies over ``max_body_bytes`` with 413, and turn crashes into 500.

    The body is read before the app runs, so a body without a Content-Length header is limited too,
    except on ``streamed_paths``, whose routes stream the body themselves. An exception that no handler
    took is logged once with the request id, and the client gets a generic 500 in the protocol's error
    shape, never as a stack trace.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_body_bytes_setting: str,
        internal_error_message: str,
        logger: logging.Logger,
        streamed_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_body_bytes_setting = max_body_bytes_setting
        self.internal_error_message = internal_error_message
        self.logger = logger
        self.streamed_paths = streamed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        # Log records made while this request runs carry its id (see shared.logs).
        request_id_token = request_id_var.set(request_id)
        try:
            await self._guard(scope, receive, send, request_id)
        finally:
            request_id_var.reset(request_id_token)

    async def _guard(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
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
                self.logger.warning("request %s rejected with 413: %s", request_id, too_large.message)
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
            self.logger.exception(
                "request %s (%s %s) failed with an unexpected error", request_id, scope["method"], scope["path"]
            )
            if response_started:
                # Part of the response is out, so no error body can follow; the server closes the connection.
                return
            message = self.internal_error_message.format(request_id=request_id)
            await _send_json(send_with_request_id, 500, _internal_error_body("internal_error", message))

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
            f"(setting {self.max_body_bytes_setting}). Send fewer tiles per request.",
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
