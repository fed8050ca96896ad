"""shared.http over real HTTP: a tiny FastAPI app served by uvicorn on 127.0.0.1 and called through httpx."""

from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel
from servers import run_app

from shared.errors import CacheError, ModelNotFoundError, NotReadyError
from shared.http import REQUEST_ID_HEADER, install_error_handling

MAX_REQUEST_BYTES = 1000
STREAMED_PATH = "/streamed"
LOGGER_NAME = "test_http.service"
INTERNAL_MESSAGE = "internal error in the test service (request id {request_id}). Its log has the cause."


class Item(BaseModel):
    name: str
    count: int


def build_app() -> FastAPI:
    app = FastAPI()
    install_error_handling(
        app,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_request_bytes_setting="UNITE_TEST_MAX_REQUEST_BYTES",
        internal_error_message=INTERNAL_MESSAGE,
        logger=logging.getLogger(LOGGER_NAME),
        public_errors=(NotReadyError,),
        streamed_paths=frozenset({STREAMED_PATH}),
    )

    @app.get("/model-not-found")
    def model_not_found() -> None:
        raise ModelNotFoundError("model 'x' is not served here.", limit=["a", "b"], value="x")

    @app.get("/cache-broken")
    def cache_broken() -> None:
        raise CacheError("cache database /srv/private/cache.sqlite3 is damaged.")

    @app.get("/not-ready")
    def not_ready() -> None:
        raise NotReadyError("the test service is not ready: no model loaded.")

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("secret detail /srv/private/path")

    @app.post("/items")
    def create_item(item: Item) -> dict[str, str]:
        return {"name": item.name}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.post(STREAMED_PATH)
    async def streamed(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    return app


@pytest.fixture(scope="module")
def client():
    with run_app(build_app()) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    """Check the protocol's error shape and the request id header, and return the ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert len(response.headers[REQUEST_ID_HEADER]) == 16
    error = response.json()["error"]
    assert set(error) == {"code", "message", "limit", "value"}
    assert error["code"] == code
    return error


def test_unite_error_keeps_status_and_fields(client):
    error = error_of(client.get("/model-not-found"), 404, "model_not_found")

    assert error["message"] == "model 'x' is not served here."
    assert error["limit"] == ["a", "b"]
    assert error["value"] == "x"


def test_internal_unite_error_hides_message(client):
    response = client.get("/cache-broken")

    error = error_of(response, 500, "cache_error")
    request_id = response.headers[REQUEST_ID_HEADER]
    assert error["message"] == INTERNAL_MESSAGE.format(request_id=request_id)
    assert "/srv/private" not in response.text
    assert (error["limit"], error["value"]) == (None, None)


def test_public_5xx_error_keeps_message(client):
    error = error_of(client.get("/not-ready"), 503, "not_ready")

    assert error["message"] == "the test service is not ready: no model loaded."


def test_validation_error_is_invalid_request(client):
    error = error_of(client.post("/items", json={"name": "a", "count": "many"}), 422, "invalid_request")

    assert error["message"].startswith("invalid request: count: ")
    assert (error["limit"], error["value"]) == (None, "many")


def test_validation_value_is_shortened(client):
    error = error_of(client.post("/items", json={"name": "a", "count": "x" * 500}), 422, "invalid_request")

    assert error["value"] == "x" * 100 + "..."


def test_validation_value_infinity_is_text(client):
    response = client.post("/items", content=b'{"name": "a", "count": Infinity}', headers={"content-type": "application/json"})

    error = error_of(response, 422, "invalid_request")
    assert error["value"] == "inf"
    assert error["message"].startswith("invalid request: count: ")


def test_validation_value_lone_surrogate_escaped(client):
    # Python's json module decodes "\ud800" to a lone surrogate, which UTF-8 cannot encode.
    response = client.post("/items", content=b'{"name": "a", "count": "\\ud800"}', headers={"content-type": "application/json"})

    error = error_of(response, 422, "invalid_request")
    assert error["value"] == "\\ud800"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_without_json_content_type(client, content_type):
    headers = {"content-type": content_type} if content_type else {}

    response = client.post("/items", content=b'{"name": "a", "count": 1}', headers=headers)

    error = error_of(response, 422, "invalid_request")
    assert "Content-Type: application/json" in error["message"]
    if content_type:
        assert repr(content_type) in error["message"]
    else:
        assert "without a Content-Type header" in error["message"]
    assert error["value"] is None


def test_missing_field_names_field(client):
    error = error_of(client.post("/items", json={"count": 1}), 422, "invalid_request")

    assert error["message"] == "invalid request: name: Field required"


def test_invalid_json_is_invalid_request(client):
    response = client.post("/items", content=b"{nope", headers={"content-type": "application/json"})

    error = error_of(response, 422, "invalid_request")
    assert "the body is not valid JSON" in error["message"]


def test_unknown_route_is_not_found(client):
    error = error_of(client.get("/nothing-here"), 404, "not_found")

    assert error["message"] == "GET /nothing-here: Not Found"


def test_wrong_method_is_method_not_allowed(client):
    response = client.get("/items")

    error = error_of(response, 405, "method_not_allowed")
    assert error["message"] == "GET /items: Method Not Allowed"
    assert response.headers["allow"] == "POST"


def test_unexpected_error_is_generic_500(client, caplog):
    with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
        response = client.get("/crash")

    error = error_of(response, 500, "internal_error")
    request_id = response.headers[REQUEST_ID_HEADER]
    assert error["message"] == INTERNAL_MESSAGE.format(request_id=request_id)
    assert "secret" not in response.text
    assert "/srv/private/path" not in response.text
    assert "Traceback" not in response.text
    crash_records = [record for record in caplog.records if record.name == LOGGER_NAME and request_id in record.getMessage()]
    assert len(crash_records) == 1
    assert crash_records[0].exc_info is not None
    assert "secret detail" in caplog.text


def test_success_has_request_id(client):
    response = client.post("/echo", content=b"x" * MAX_REQUEST_BYTES)

    assert response.status_code == 200
    assert response.json() == {"bytes": MAX_REQUEST_BYTES}
    assert len(response.headers[REQUEST_ID_HEADER]) == 16


def test_request_ids_differ(client):
    first = client.get("/nothing-here").headers[REQUEST_ID_HEADER]
    second = client.get("/nothing-here").headers[REQUEST_ID_HEADER]

    assert first != second


def test_declared_body_over_limit_is_413(client):
    error = error_of(client.post("/echo", content=b"x" * (MAX_REQUEST_BYTES + 1)), 413, "request_too_large")

    assert error["limit"] == MAX_REQUEST_BYTES
    assert error["value"] == MAX_REQUEST_BYTES + 1
    assert f"request body has {MAX_REQUEST_BYTES + 1} bytes" in error["message"]
    assert "UNITE_TEST_MAX_REQUEST_BYTES" in error["message"]


def test_chunked_body_over_limit_is_413(client):
    def chunks():
        for _ in range(3):
            yield b"x" * 600

    response = client.post("/echo", content=chunks())

    assert "content-length" not in response.request.headers
    error = error_of(response, 413, "request_too_large")
    assert error["limit"] == MAX_REQUEST_BYTES
    assert error["value"] > MAX_REQUEST_BYTES
    assert f"request body has at least {error['value']} bytes" in error["message"]


def test_streamed_path_skips_body_limit(client):
    response = client.post(STREAMED_PATH, content=b"x" * (MAX_REQUEST_BYTES * 3))

    assert response.status_code == 200
    assert response.json() == {"bytes": MAX_REQUEST_BYTES * 3}


def test_import_loads_no_torch():
    code = "import sys, shared.http; print('torch' in sys.modules)"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)

    assert result.stdout.strip() == "False"
