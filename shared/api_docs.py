"""The API docs routes of both services: ``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``.

FastAPI's own docs routes need no key, so each service turns them off (``docs_url``, ``redoc_url`` and
``openapi_url`` set to None) and calls :func:`add_docs_routes`, which serves the same three routes
behind the service's ``api_docs`` setting:

- ``open``: anyone may read them;
- ``key``: with a keys file, each of the three routes needs an API key; without one they are open;
- ``off``: none of them is served, so each is 404.

A browser that opens ``/docs`` or ``/redoc`` sends no ``Authorization`` or ``X-API-Key`` header, so with
``key`` and a keys file the pages return 401 in a browser. Clients that can send a header fetch
``/openapi.json`` with the key instead, or the operator sets ``open``.

The pages load Swagger UI and ReDoc from :data:`ASSETS_PATH` on the service itself, files of the
fastapi-offline package, and nothing from a CDN, so they work on a network without internet access.
Those files are public library code and are served without a key while the docs are not ``off``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Header, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

ApiDocsAccess = Literal["open", "key", "off"]
DOCS_PATHS = ("/openapi.json", "/docs", "/redoc")
ASSETS_PATH = "/docs-assets"

# Called with the request and its Authorization and X-API-Key headers. It returns when the server has no
# keys file or the key is listed, and raises the service's 401 error otherwise.
KeyCheck = Callable[[Request, str | None, str | None], object]


def add_docs_routes(app: FastAPI, *, access: ApiDocsAccess, check_key: KeyCheck) -> None:
    """Serve /openapi.json, /docs and /redoc on ``app`` as ``access`` allows, checking keys with ``check_key``.

    ``app`` must be created with ``docs_url=None``, ``redoc_url=None`` and ``openapi_url=None``, so that
    FastAPI does not serve its own open copies of these routes. With ``access`` ``off`` nothing is added.
    """
    routes = {route.path for route in app.routes if hasattr(route, "path")}
    served_by_fastapi = sorted(routes.intersection(DOCS_PATHS))
    if served_by_fastapi:
        raise ValueError(
            f"app {app.title!r} already serves {', '.join(served_by_fastapi)}, which would bypass the api_docs setting. "
            "Create it with FastAPI(docs_url=None, redoc_url=None, openapi_url=None)."
        )
    if access == "off":
        return
    title = app.title
    app.mount(ASSETS_PATH, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    def check_access(request: Request, authorization: str | None, x_api_key: str | None) -> None:
        if access == "key":
            check_key(request, authorization, x_api_key)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        check_access(request, authorization, x_api_key)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_page(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> HTMLResponse:
        check_access(request, authorization, x_api_key)
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - docs",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc_page(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> HTMLResponse:
        check_access(request, authorization, x_api_key)
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )


def docs_assets_dir() -> Path:
    """Return the folder of Swagger UI's and ReDoc's files in the installed fastapi-offline package."""
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))
