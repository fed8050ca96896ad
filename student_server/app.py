"""The student server's HTTP API: 384-d embeddings of tiles and whole slides from an exported student.

Routes:

- ``POST /v1/embeddings``: the embeddings protocol the teacher gateway also speaks, so a client written
  for the teacher works unchanged. The response adds ``checkpoint_sha256``, the sha256 of the served
  ``model.safetensors``.
- ``POST /v1/slides/embed``: a multipart upload of one slide file (field ``file``, optional ``mpp`` and
  ``include_patches``), streamed to disk with a size limit, tiled over its tissue, and returned as patch
  embeddings with their level-0 coordinates and the mean-pooled slide embedding. The file is deleted
  when the request ends.
- ``GET /v1/models``: the served student, its checkpoint and its teacher.
- ``GET /healthz``: the process is alive. ``GET /readyz``: a student is loaded; otherwise 503 with the reason.

Errors have the protocol's one JSON shape; see :mod:`shared.http`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from shared.checkpoint import LoadedStudent
from shared.errors import NotReadyError
from shared.http import check_embedding_request, install_error_handling
from shared.imaging import decode_base64_image, prepare_tile
from shared.protocol import STUDENT_SERVICE, EmbeddingRequest, EmbeddingResponse, ErrorResponse
from student_server.model import StudentModel
from student_server.settings import StudentSettings, get_settings
from student_server.slides import SlideEmbedOptions, SlideEmbedResponse, embed_slide_file
from student_server.uploads import receive_slide_upload

logger = logging.getLogger(__name__)

SLIDE_EMBED_PATH = "/v1/slides/embed"


class StudentEmbeddingResponse(EmbeddingResponse):
    """The protocol's embeddings response plus the identity of the served checkpoint."""

    checkpoint_sha256: str


def create_app(settings: StudentSettings | None = None) -> FastAPI:
    """Build the student server, which loads the checkpoint in the app's lifespan.

    A missing or unreadable checkpoint does not stop the server. ``/healthz`` stays 200, ``/readyz`` and
    the embedding routes return 503 with the reason, and the load is retried while it is missing.
    """
    settings = settings if settings is not None else get_settings()
    student = StudentModel(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = await run_in_threadpool(student.ensure_loaded)
        if loaded is None:
            logger.warning("student server started without a student: %s", student.reason)
        else:
            logger.info("student server started: %s, checkpoint %s", loaded.name, loaded.folder)
        yield
        logger.info("student server stopped")

    app = FastAPI(
        title="UNITE student server",
        summary="384-d embeddings of pathology tiles and slides from a distilled student.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.student = student
    install_error_handling(
        app,
        max_request_bytes=settings.max_request_bytes,
        max_request_bytes_setting="UNITE_STUDENT_MAX_REQUEST_BYTES",
        internal_error_message="internal error in the student server (request id {request_id}). The server log has the cause.",
        logger=logger,
        # Clients see why no student is loaded, as StudentModel.public_reason words it without server paths.
        public_errors=(NotReadyError,),
        streamed_paths=frozenset({SLIDE_EMBED_PATH}),
    )
    _add_routes(app)
    return app


def get_student_settings(request: Request) -> StudentSettings:
    return request.app.state.settings


def get_student_model(request: Request) -> StudentModel:
    return request.app.state.student


def require_student(request: Request) -> LoadedStudent:
    """Return the loaded student, or raise :class:`NotReadyError` (503) with the reason there is none.

    The message gives the public reason, which names settings but no server path.
    """
    model: StudentModel = request.app.state.student
    loaded = model.ensure_loaded()
    if loaded is None:
        raise NotReadyError(f"the student server is not ready: {model.public_reason.rstrip('.')}.")
    return loaded


SettingsDep = Annotated[StudentSettings, Depends(get_student_settings)]
ModelDep = Annotated[StudentModel, Depends(get_student_model)]
StudentDep = Annotated[LoadedStudent, Depends(require_student)]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (404, 413, 422, 500, 503)
}


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/embeddings", response_model=StudentEmbeddingResponse, responses=_ERROR_RESPONSES)
    def create_embeddings(body: EmbeddingRequest, student: StudentDep, model: ModelDep, settings: SettingsDep) -> JSONResponse:
        """Embed base64 PNG or JPEG RGB tiles with the student, resizing and centre-cropping tiles that are not 224 x 224."""
        served_names = [student.name, student.config["architecture"]]
        check_embedding_request(
            model=body.model,
            tile_count=len(body.input),
            served_names=served_names,
            max_tiles=settings.max_tiles_per_request,
            max_tiles_setting="UNITE_STUDENT_MAX_TILES_PER_REQUEST",
            service="student server",
        )

        prepared = []
        for index, item in enumerate(body.input):
            name = f"input[{index}].image"
            prepared.append(prepare_tile(decode_base64_image(item.image, name=name), name=name))
        tiles = np.stack(prepared)
        embeddings = model.embed(tiles)
        batches = -(-len(tiles) // settings.batch_size)
        # Built by hand rather than through the pydantic model: validating 256 x 384 floats again would
        # only cost time. tolist() gives the exact float32 values as Python floats.
        content = {
            "object": "list",
            "model": student.name,
            "data": [{"object": "embedding", "index": index, "embedding": row} for index, row in enumerate(embeddings.tolist())],
            "usage": {"tiles": len(tiles), "cache_hits": 0, "model_calls": batches, "checkpoint_sha256": student.sha256},
            "checkpoint_sha256": student.sha256,
        }
        return JSONResponse(content)

    @app.post(
        SLIDE_EMBED_PATH,
        response_model=SlideEmbedResponse,
        responses=_ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {"type": "string", "format": "binary", "description": "The slide file."},
                                "mpp": {"type": "number", "description": "Resolution override in µm per level-0 pixel."},
                                "include_patches": {"type": "boolean", "default": True},
                            },
                        }
                    }
                },
            }
        },
    )
    async def embed_slide(request: Request, student: StudentDep, model: ModelDep, settings: SettingsDep) -> JSONResponse:
        """Embed an uploaded slide: its tissue patches at 0.5 µm/px and their mean as the slide embedding."""
        started = time.perf_counter()
        upload = await receive_slide_upload(request, upload_dir=settings.upload_dir, max_bytes=settings.max_upload_bytes)
        try:
            options = _parse_slide_options(upload.fields)
            received_at = time.perf_counter()
            result = await run_in_threadpool(
                embed_slide_file, upload.path, model, mpp=options.mpp, max_patches=settings.max_patches_per_slide
            )
        finally:
            upload.path.unlink(missing_ok=True)

        timings = {"upload_s": received_at - started, **result.timings, "total_s": time.perf_counter() - started}
        logger.info(
            "embedded slide %s: %d patches, %d bytes, %s",
            result.slide_id,
            len(result.coords),
            upload.size,
            ", ".join(f"{step} {seconds:.2f}" for step, seconds in timings.items()),
        )
        content = {
            "object": "slide.embedding",
            "model": student.name,
            "checkpoint_sha256": student.sha256,
            "slide_id": result.slide_id,
            "num_patches": len(result.coords),
            "embedding_dim": int(result.slide_embedding.shape[0]),
            **result.metadata,
            "coords": result.coords.tolist(),
            "patch_embeddings": result.patch_embeddings.tolist() if options.include_patches else None,
            "slide_embedding": result.slide_embedding.tolist(),
            "upload_bytes": upload.size,
            "timings": timings,
        }
        return JSONResponse(content)

    @app.get("/v1/models")
    def list_models(model: ModelDep) -> dict[str, Any]:
        """List the served student: its name, embedding dimension, checkpoint sha256 and teacher."""
        loaded = model.ensure_loaded()
        data = []
        if loaded is not None:
            data.append(
                {
                    "id": loaded.name,
                    "object": "model",
                    "names": [loaded.name, loaded.config["architecture"]],
                    "dim": loaded.embed_dim,
                    "checkpoint_sha256": loaded.sha256,
                    "teacher": loaded.config.get("teacher"),
                    "licence": loaded.config.get("teacher_licence"),
                }
            )
        # "service" lets clients such as `unite teach` check which UNITE service they reached.
        return {"object": "list", "service": STUDENT_SERVICE, "data": data}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Report that the process is alive, with or without a student."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    def readyz(student: StudentDep) -> dict[str, str]:
        """Report ready once a student is loaded, and 503 with the reason until then."""
        return {"status": "ready", "model": student.name, "checkpoint_sha256": student.sha256}


def _parse_slide_options(fields: dict[str, str]) -> SlideEmbedOptions:
    # An empty form field means "not given", as browsers send empty inputs.
    values = {name: value for name, value in fields.items() if value.strip() != ""}
    try:
        return SlideEmbedOptions.model_validate(values)
    except ValidationError as error:
        problems = [{**problem, "loc": ("body", *problem["loc"])} for problem in error.errors(include_url=False)]
        raise RequestValidationError(problems) from error
