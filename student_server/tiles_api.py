"""Tile embeddings of the student server: base64 tiles in JSON, and tile files in a multipart upload.

Routes:

- ``POST /v1/embeddings``: the embeddings protocol the teacher gateway also speaks, so a client written
  for the teacher works unchanged. The response adds ``checkpoint_sha256``, the sha256 of the weights
  that computed the rows.
- ``POST /v1/embeddings/upload``: ``multipart/form-data`` with one or more ``file`` parts (PNG, JPEG or
  TIFF tiles) and the optional fields ``model`` and ``mpp`` (the resolution of every file, in µm/px).
  The response has the same shape, with ``data[i]`` for the i-th file. File names are never stored,
  logged or returned; errors name a file by its position, as ``file[2]``.

``model`` selects the output. The student's name or architecture (or no ``model``) gives the student's
384-d embedding. ``"teacher-space"`` or ``"<student name>:teacher-space"`` gives the output of the
export's mimic projector, in the teacher's dimension (1536 for UNI2-h), and is 422 for an export without
one. The response's ``model`` names the output computed, such as ``unite-student:teacher-space``.

Tile rules, in order (the functions are in :mod:`shared.imaging`):

1. Format and size are read from the header before decoding: PNG, JPEG or TIFF, at most
   ``max_image_pixels`` pixels (setting ``UNITE_STUDENT_MAX_IMAGE_PIXELS``), an aspect ratio of at most 4
   and a shorter side of at least 32 px. The number of tiles is at most ``max_tiles_per_request``.
2. Modes are converted to 8-bit RGB (:func:`shared.imaging.convert_to_rgb`). RGB is kept. RGBA, LA, PA
   and palettes with a transparent entry are composited on white. L, P, CMYK and YCbCr are converted by
   Pillow. 16-bit samples are mapped to 8 bits by ``round(v / 257)``. 1-bit, 32-bit integer and float
   images are rejected with 422 naming the mode.
3. A tile with a known resolution (the item's ``mpp``, or the form field ``mpp``) is resampled to
   0.5 µm/px and its centre 224 x 224 px are kept (:func:`shared.imaging.prepare_tile_at_mpp`). A tile
   of unknown resolution, or one smaller than 112 µm on its shorter side, has its shorter side resized to
   224 px and is centre-cropped (:func:`shared.imaging.prepare_tile`).

The teacher gateway keeps its strict decode (PNG or JPEG, 8-bit RGB only), because it caches exactly the
pixels that the teacher embedded.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from shared.errors import InvalidRequestError, ModelNotFoundError, RequestTooLargeError
from shared.imaging import decode_base64, decode_tile, prepare_tile, prepare_tile_at_mpp
from shared.protocol import MAX_TILE_MPP, MIN_TILE_MPP, EmbeddingRequest, EmbeddingResponse, ErrorResponse
from student_server.engine import EngineResult
from student_server.model import Student, StudentModel, check_teacher_space, embed_with, parameter_count
from student_server.onnx_runtime import LinearProjector
from student_server.settings import StudentSettings
from student_server.uploads import FormPartHeaders, new_multipart_parser

try:
    from python_multipart.exceptions import ParseError
    from python_multipart.multipart import parse_options_header
except ImportError:  # python-multipart before 0.0.13 installs the package as `multipart`
    from multipart.exceptions import ParseError
    from multipart.multipart import parse_options_header

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EMBEDDINGS_PATH = "/v1/embeddings"
UPLOAD_PATH = "/v1/embeddings/upload"
TEACHER_SPACE = "teacher-space"
FILE_FIELD = "file"
UPLOAD_FIELDS = ("model", "mpp")
MAX_FIELD_BYTES = 1024
MAX_REQUEST_BYTES_SETTING = "UNITE_STUDENT_MAX_REQUEST_BYTES"
MAX_TILES_SETTING = "UNITE_STUDENT_MAX_TILES_PER_REQUEST"

router = APIRouter()

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 404, 413, 422, 500, 503)
}


class StudentEmbeddingResponse(EmbeddingResponse):
    """The protocol's embeddings response plus the identity of the checkpoint that computed it."""

    checkpoint_sha256: str


@router.post(EMBEDDINGS_PATH, response_model=StudentEmbeddingResponse, responses=_ERROR_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    """Embed base64 PNG, JPEG or TIFF tiles, converted and resized by the tile rules of this module."""
    settings: StudentSettings = request.app.state.settings
    teacher_space = resolve_model(body.model, request.app.state.student)
    check_tile_count(len(body.input), settings)

    async with decode_slots(request):
        tiles = await run_in_threadpool(prepare_base64_tiles, body, settings.max_image_pixels)
    result = await embed_tiles(request, tiles, teacher_space=teacher_space)
    return embeddings_response(result, settings)


@router.post(
    UPLOAD_PATH,
    response_model=StudentEmbeddingResponse,
    responses=_ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILE_FIELD],
                        "properties": {
                            FILE_FIELD: {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "One or more PNG, JPEG or TIFF tiles, embedded in this order.",
                            },
                            "model": {"type": "string", "description": "Student name, or '<student name>:teacher-space'."},
                            "mpp": {"type": "number", "description": "Resolution of every file in µm per pixel."},
                        },
                    }
                }
            },
        }
    },
)
async def upload_embeddings(request: Request) -> JSONResponse:
    """Embed tile files sent as a multipart form, in file order, by the tile rules of this module."""
    settings: StudentSettings = request.app.state.settings
    form = await receive_tile_form(request, max_bytes=settings.max_request_bytes, max_files=settings.max_tiles_per_request)
    teacher_space = resolve_model(form.fields.get("model") or None, request.app.state.student)
    mpp = parse_mpp_field(form.fields.get("mpp", ""))

    names = [f"{FILE_FIELD}[{index}]" for index in range(len(form.files))]
    items = [(data, mpp) for data in form.files]
    async with decode_slots(request):
        tiles = await run_in_threadpool(prepare_tiles, items, names, settings.max_image_pixels)
    result = await embed_tiles(request, tiles, teacher_space=teacher_space)
    return embeddings_response(result, settings)


# Models


def served_model_names(student: Student, projector: torch.nn.Linear | LinearProjector | None) -> tuple[list[str], list[str]]:
    """Return the names that select the student's own output and those that select teacher-space output.

    The second list is empty when the export has no mimic projector.
    """
    own = [student.name, student.config["architecture"]]
    teacher_space = [] if projector is None else [f"{student.name}:{TEACHER_SPACE}", TEACHER_SPACE]
    return own, teacher_space


def model_entries(model: StudentModel) -> list[dict[str, Any]]:
    """Describe the outputs of ``GET /v1/models``: the student's own and, with a mimic projector, teacher space.

    ``parameters`` counts the weights that compute the output: the student's, plus the projector's for
    teacher space. Empty while no student is loaded.
    """
    if model.ensure_loaded() is None:
        return []
    student, projector = model.snapshot()
    own, teacher_space = served_model_names(student, projector)
    common = {
        "object": "model",
        "checkpoint_sha256": student.sha256,
        "teacher": student.config.get("teacher"),
        "licence": student.config.get("teacher_licence"),
    }
    entries = [{"id": student.name, "names": own, "dim": student.embed_dim, "space": "student", "parameters": parameter_count(student), **common}]
    if projector is not None:
        entries.append(
            {
                "id": teacher_space[0],
                "names": teacher_space,
                "dim": projector.out_features,
                "space": "teacher",
                "parameters": parameter_count(student, projector),
                **common,
            }
        )
    return entries


def resolve_model(requested: str | None, model: StudentModel) -> bool:
    """Return whether ``requested`` selects teacher-space output, after checking that this server serves it.

    Raises :class:`NotReadyError` (503) when no student is loaded, :class:`ModelNotFoundError` (404) for
    a name this server does not serve, and :class:`TeacherSpaceUnavailable` (422) for teacher-space
    output from an export without a mimic projector.
    """
    model.ensure_loaded()
    student, projector = model.snapshot()
    own, teacher_space = served_model_names(student, projector)
    if requested is None or requested in own:
        return False
    if requested in (TEACHER_SPACE, f"{student.name}:{TEACHER_SPACE}"):
        check_teacher_space(student, projector, True)
        return True
    served = own + teacher_space
    raise ModelNotFoundError(
        f"model {requested!r} is not served here; this student server serves {served}. Omit 'model' or use one of these names.",
        limit=served,
        value=requested,
    )


# Tiles


def check_tile_count(count: int, settings: StudentSettings) -> None:
    """Raise :class:`RequestTooLargeError` (413) for more tiles than ``max_tiles_per_request``."""
    if count > settings.max_tiles_per_request:
        raise RequestTooLargeError(
            f"request has {count} tiles, the limit is {settings.max_tiles_per_request} per request (setting "
            f"{MAX_TILES_SETTING}). Split the tiles into smaller batches.",
            limit=settings.max_tiles_per_request,
            value=count,
        )


def decode_slots(request: Request) -> asyncio.Semaphore:
    """Return the app's semaphore of ``max_concurrent_decodes`` slots, held while a request's tiles are decoded.

    A decoded tile can take far more memory than its file (a 130 KB PNG of a 4096 x 4096 16-bit RGBA tile
    takes about 230 MB to decode), so the number of requests decoding at once is bounded, and each decodes
    one tile at a time.
    """
    state = request.app.state
    slots = getattr(state, "decode_slots", None)
    if slots is None:
        # Created on the event loop's thread with no await before the assignment, so two requests cannot
        # create two semaphores.
        slots = asyncio.Semaphore(state.settings.max_concurrent_decodes)
        state.decode_slots = slots
    return slots


def prepare_tiles(items: list[tuple[bytes, float | None]], names: list[str], max_pixels: int) -> np.ndarray:
    """Decode, convert and resize encoded tiles with their resolutions into an (N, 224, 224, 3) uint8 batch.

    Raises :class:`ImageError` (422) for the first tile that breaks a rule, naming it by ``names``.
    """
    prepared = []
    for (data, mpp), name in zip(items, names):
        tile = decode_tile(data, name=name, max_pixels=max_pixels, convert_modes=True)
        prepared.append(prepare_tile(tile, name=name) if mpp is None else prepare_tile_at_mpp(tile, mpp, name=name))
    return np.stack(prepared)


def prepare_base64_tiles(body: EmbeddingRequest, max_pixels: int) -> np.ndarray:
    """Decode the base64 tiles of a JSON request and prepare them, each at its own ``mpp`` where given."""
    names = [f"input[{index}].image" for index in range(len(body.input))]
    items = [(decode_base64(item.image, name=name), item.mpp) for item, name in zip(body.input, names)]
    return prepare_tiles(items, names, max_pixels)


def parse_mpp_field(text: str) -> float | None:
    """Parse the form field ``mpp``: empty means unknown, otherwise a resolution the protocol accepts."""
    if text.strip() == "":
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and MIN_TILE_MPP <= mpp <= MAX_TILE_MPP):
        raise InvalidRequestError(
            f"form field 'mpp' is {text[:40]!r}, expected a resolution from {MIN_TILE_MPP} to {MAX_TILE_MPP} µm/px, "
            "such as 0.5 for tiles at 20x. Send the tiles' resolution, or leave the field out.",
            limit=[MIN_TILE_MPP, MAX_TILE_MPP],
            value=text[:40],
        )
    return mpp


# Embedding


async def embed_tiles(request: Request, tiles: np.ndarray, *, teacher_space: bool) -> EngineResult:
    """Embed prepared tiles with the app's engine, which batches them with the tiles of other requests.

    NOTE: an app built without ``app.state.engine`` embeds on a worker thread with the model's current
    snapshot, without batching. The app of :mod:`student_server.app` always has an engine.
    """
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        return await engine.embed(tiles, teacher_space=teacher_space)
    model: StudentModel = request.app.state.student
    student, projector = model.snapshot()
    settings: StudentSettings = request.app.state.settings
    embeddings = await run_in_threadpool(embed_with, student, projector, tiles, teacher_space=teacher_space, device=settings.device)
    return EngineResult(embeddings=embeddings, model=student.name, checkpoint_sha256=student.sha256, teacher_space=teacher_space)


def embeddings_response(result: EngineResult, settings: StudentSettings) -> JSONResponse:
    """Build the protocol response for ``result``, naming the checkpoint and the output computed."""
    count = len(result.embeddings)
    name = f"{result.model}:{TEACHER_SPACE}" if result.teacher_space else result.model
    # Built by hand rather than through the pydantic model: validating 256 x 1536 floats again would only
    # cost time. tolist() gives the exact float32 values as Python floats.
    content = {
        "object": "list",
        "model": name,
        "data": [{"object": "embedding", "index": index, "embedding": row} for index, row in enumerate(result.embeddings.tolist())],
        "usage": {
            "tiles": count,
            "cache_hits": 0,
            "model_calls": -(-count // settings.batch_size),
            "checkpoint_sha256": result.checkpoint_sha256,
        },
        "checkpoint_sha256": result.checkpoint_sha256,
    }
    return JSONResponse(content)


# Multipart


@dataclass
class TileForm:
    """The files of a tile upload, in the order sent, and its text fields."""

    files: list[bytes]
    fields: dict[str, str] = field(default_factory=dict)


async def receive_tile_form(request: Request, *, max_bytes: int, max_files: int) -> TileForm:
    """Read a multipart tile upload with python-multipart's push parser, enforcing the limits while it arrives.

    Raises :class:`RequestTooLargeError` (413) as soon as the body passes ``max_bytes`` (declared or
    received), or the form has more than ``max_files`` files. Raises :class:`InvalidRequestError` (422)
    for a body that is not multipart, is empty, malformed or cut short, has no file, or has an unknown or
    oversized field. The files stay in memory, which ``max_bytes`` bounds.
    """
    boundary = _multipart_boundary(request.headers.get("content-type"))
    receiver = _TileFormReceiver(max_bytes=max_bytes, max_files=max_files)
    receiver.count_declared(request.headers.get("content-length"))
    parser = new_multipart_parser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            receiver.count_received(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect as error:
        raise InvalidRequestError(
            f"the client disconnected after {receiver.body_bytes} bytes, before the upload was complete. Send the tiles again."
        ) from error
    except ParseError as error:
        raise InvalidRequestError(
            f"the request body is not valid multipart/form-data ({type(error).__name__}). "
            f"Send the tiles as a multipart form with each file in a field {FILE_FIELD!r}.",
        ) from error
    return receiver.result()


def _multipart_boundary(content_type: str | None) -> bytes:
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            f"Content-Type is {str(content_type)[:100]!r}, expected multipart/form-data with a boundary. Send the tiles "
            f"as a multipart form with each file in a field {FILE_FIELD!r} (for example curl -F {FILE_FIELD}=@tile.png), "
            f"or send base64 tiles as JSON to {EMBEDDINGS_PATH}.",
            limit="multipart/form-data",
            value=None if content_type is None else content_type[:100],
        )
    return boundary


class _TileFormReceiver(FormPartHeaders):
    """Callbacks of the multipart parser: ``file`` parts into a list of bytes, the other parts into ``fields``."""

    def __init__(self, *, max_bytes: int, max_files: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.body_bytes = 0
        self.files: list[bytes] = []
        self.fields: dict[str, str] = {}
        self.finished = False
        self._field_name: str | None = None
        self._value = bytearray()
        self._in_file = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.start_part,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def count_declared(self, content_length: str | None) -> None:
        if content_length is None:
            return
        if not content_length.isdigit():
            raise InvalidRequestError(f"Content-Length is {content_length[:40]!r}, expected a number of bytes.", value=content_length[:40])
        if int(content_length) > self.max_bytes:
            raise self._too_large(int(content_length), "is")

    def count_received(self, count: int) -> None:
        self.body_bytes += count
        if self.body_bytes > self.max_bytes:
            raise self._too_large(self.body_bytes, "has at least")

    def result(self) -> TileForm:
        if self.body_bytes == 0:
            raise InvalidRequestError(
                f"the request body is empty. Send one or more tiles as a multipart form, each file in a field {FILE_FIELD!r}."
            )
        if not self.finished:
            raise InvalidRequestError(
                f"the multipart body ended after {self.body_bytes} bytes without its closing boundary. Send the tiles again."
            )
        if not self.files:
            raise InvalidRequestError(
                f"the form has no {FILE_FIELD!r} part. Send each tile file in a field {FILE_FIELD!r} "
                f"(for example curl -F {FILE_FIELD}=@tile.png).",
                value=sorted(self.fields),
            )
        return TileForm(files=self.files, fields=self.fields)

    def _too_large(self, size: int, verb: str) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"request body {verb} {size} bytes, the limit is {self.max_bytes} bytes (setting {MAX_REQUEST_BYTES_SETTING}). "
            "Send fewer or smaller tiles per request.",
            limit=self.max_bytes,
            value=size,
        )

    def _on_headers_finished(self) -> None:
        name, _options = self.form_part_name()
        self._value = bytearray()
        if name == FILE_FIELD:
            if len(self.files) >= self.max_files:
                raise RequestTooLargeError(
                    f"the form has more than {self.max_files} files, the limit per request (setting {MAX_TILES_SETTING}). "
                    "Split the tiles into smaller batches.",
                    limit=self.max_files,
                    value=len(self.files) + 1,
                )
            self._in_file = True
            self._field_name = None
            return
        if name not in UPLOAD_FIELDS:
            raise InvalidRequestError(
                f"the form has an unknown field {name[:40]!r}, expected {FILE_FIELD!r} parts and optionally "
                f"{' and '.join(repr(field) for field in UPLOAD_FIELDS)}.",
                limit=[FILE_FIELD, *UPLOAD_FIELDS],
                value=name[:40],
            )
        if name in self.fields:
            raise InvalidRequestError(f"the form field {name!r} occurs twice. Send it once.", value=name)
        self._in_file = False
        self._field_name = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if not self._in_file and len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequestError(
                f"the form field {self._field_name!r} is longer than {MAX_FIELD_BYTES} bytes.",
                limit=MAX_FIELD_BYTES,
                value=len(self._value),
            )

    def _on_part_end(self) -> None:
        if self._in_file:
            self.files.append(bytes(self._value))
        elif self._field_name is not None:
            self.fields[self._field_name] = self._value.decode("utf-8", errors="replace")
        self._in_file = False
        self._field_name = None
        self._value = bytearray()

    def _on_end(self) -> None:
        self.finished = True
