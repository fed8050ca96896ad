"""The student server's web page: drop a tile or a slide and see its embedding.

``GET /`` returns ``static/index.html``, and ``GET /static/{name}`` returns its script and style sheet.
The page is plain HTML, CSS and JavaScript with no build step and loads nothing from other hosts, so it
works on a machine with no internet access. It calls the same API as any client:

- a tile (PNG, JPEG, or a TIFF of at most 8 MiB) goes to ``POST /v1/embeddings/upload`` and the page shows
  the embedding's dimension, the model, the checkpoint sha256, the L2 norm and a sparkline of the values;
- a slide goes to ``POST /v1/slides``, the page polls ``GET /v1/jobs/{id}`` for the progress bar, then shows
  the overlay of tissue and patches and draws the job's ``map`` as one SVG circle per patch.

The page itself needs no API key, because it contains no data. The key typed into it is kept in the
browser's ``sessionStorage`` and sent as ``X-API-Key`` with each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_FILE = "index.html"
# Only these files are served, so no request path reaches the file system.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page runs only its own script and style sheet and talks only to this server.
# Overlay images are fetched with the API key and shown from blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # The files change with the installed version, so the browser revalidates them on each load.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """Serve the page."""
    return FileResponse(STATIC_DIR / INDEX_FILE, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """Serve the page's script or style sheet, or return 404 for any other name."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        # shared.http turns this into the API's JSON error shape with code "not_found".
        raise HTTPException(404, detail=f"static file not found; the page's files are {', '.join(sorted(STATIC_FILES))}.")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
