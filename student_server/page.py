"""The student server's web page: drop a tile or a slide and see its embedding.

``GET /`` returns ``static/index.html``, and ``GET /static/{name}`` returns its scripts and style sheet.
The page is plain HTML, CSS and JavaScript with no build step and loads nothing from other hosts, so it
works on a machine with no internet access. It calls the same API as any client:

- a tile (PNG, JPEG, or a TIFF smaller than the setting ``page_tiff_slide_min_bytes``) goes to
  ``POST /v1/embeddings/upload`` and the page shows the embedding's dimension, the model, the checkpoint
  sha256, the L2 norm and a sparkline of the values;
- a slide goes to ``POST /v1/slides``, the page polls ``GET /v1/jobs/{id}`` for the progress bar, then shows
  the overlay of tissue and patches and draws the job's ``map`` on a canvas, one dot per patch.
  ``GET /?job={id}`` (the parameter may repeat) shows jobs submitted earlier in the same way.

Server settings reach the script as ``data-*`` attributes of ``<body>``, filled in when ``index.html`` is
served, because the Content-Security-Policy allows no inline script.

The page itself needs no API key, because it contains no data. The key typed into it is kept in the
browser's ``sessionStorage`` and sent as ``X-API-Key`` with each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

from student_server.settings import StudentSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_FILE = "index.html"
# Placeholders of index.html, each replaced by a value derived from the server's settings.
TIFF_SLIDE_MIN_BYTES_PLACEHOLDER = "{{tiff_slide_min_bytes}}"
TIFF_SLIDE_MIN_SIZE_PLACEHOLDER = "{{tiff_slide_min_size}}"
BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
# Only these files are served, so no request path reaches the file system.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "map.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page runs only its own scripts and style sheet and talks only to this server.
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


def format_size(size_bytes: int) -> str:
    """Format a byte count for people, as "8 MiB" when a binary unit divides it exactly, else as "1500 bytes"."""
    for unit, unit_bytes in BYTE_UNITS:
        if size_bytes % unit_bytes == 0:
            return f"{size_bytes // unit_bytes} {unit}"
    return f"{size_bytes} bytes"


def render_index(settings: StudentSettings) -> str:
    """Return index.html with the settings the script reads filled in.

    Raises RuntimeError when the file lacks a placeholder, so an edit of the page that drops one fails
    at the first request instead of leaving the script without its setting.
    """
    text = (STATIC_DIR / INDEX_FILE).read_text(encoding="utf-8")
    values = {
        TIFF_SLIDE_MIN_BYTES_PLACEHOLDER: str(settings.page_tiff_slide_min_bytes),
        TIFF_SLIDE_MIN_SIZE_PLACEHOLDER: format_size(settings.page_tiff_slide_min_bytes),
    }
    for placeholder, value in values.items():
        if placeholder not in text:
            raise RuntimeError(
                f"{STATIC_DIR / INDEX_FILE} is missing the placeholder {placeholder}. Restore it where the page shows that setting."
            )
        text = text.replace(placeholder, value)
    return text


@router.get("/")
def index(request: Request) -> HTMLResponse:
    """Serve the page, with the server's page settings filled in."""
    return HTMLResponse(render_index(request.app.state.settings), headers=_HEADERS)


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """Serve the page's scripts or style sheet, or return 404 for any other name."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        # shared.http turns this into the API's JSON error shape with code "not_found".
        raise HTTPException(404, detail=f"static file not found; the page's files are {', '.join(sorted(STATIC_FILES))}.")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
