"""HTTP routes of slide jobs: submit a slide, poll its job, download its results, delete it.

- ``POST /v1/slides``: a ``multipart/form-data`` upload (field ``file``, streamed to disk with the limit
  ``max_upload_bytes``) or a JSON body ``{"path": ...}`` naming a slide under ``data_root``. Both take
  the options ``mpp``, ``pooling``, ``include_patches`` and ``allow_fluorescence`` (as form fields or
  JSON keys). Returns 202
  with the job and a ``Location`` header, or 503 with Retry-After when ``max_queued_slide_jobs`` wait.
- ``GET /v1/jobs``: the caller's jobs, newest first, at most ``limit`` of them.
- ``GET /v1/jobs/{id}``: status, progress and links.
- ``GET /v1/jobs/{id}/result``: the slide embedding and metadata as JSON, with the patch embeddings and
  their coords when ``include_patches`` is true (the query parameter, else the job's option).
- ``GET /v1/jobs/{id}/features.h5``: the patch features in TRIDENT's HDF5 layout.
- ``GET /v1/jobs/{id}/overlay.jpg`` and ``/thumbnail.jpg``: the tissue and patch grid over the
  thumbnail, and the thumbnail alone.
- ``GET /v1/jobs/{id}/map``: the patches laid out by the first two principal components of their
  embeddings, with their k-means cluster.
- ``DELETE /v1/jobs/{id}``: removes a succeeded or failed job and its files.

Unknown ids are 404. Results of a job that has not succeeded are 409. A job belongs to the name, in the
keys file, of the API key that submitted it (see :mod:`student_server.jobs`). Every route here shows a job
only to its owner, and a key of another name gets the same 404 as for an unknown id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidRequestError, NotReadyError
from shared.features import read_features
from shared.protocol import ErrorResponse
from shared.slides.reader import MAX_MPP, MIN_MPP
from student_server.auth import CallerDep
from student_server.errors import JobNotFoundError
from student_server.jobs import JobManager, JobRecord
from student_server.settings import StudentSettings
from student_server.slide_pipeline import OUTPUT_FILES, POOLINGS
from student_server.uploads import receive_slide_upload

logger = logging.getLogger(__name__)

SLIDES_PATH = "/v1/slides"
# The largest JSON body of POST /v1/slides. A path and four options fit many times over.
MAX_JSON_BYTES = 64 * 1024
# Jobs returned by GET /v1/jobs by default and at most.
DEFAULT_JOB_LIST_LIMIT = 100
MAX_JOB_LIST_LIMIT = 1000

router = APIRouter()


class SlideJobOptions(BaseModel):
    """Options of a slide job, sent as form fields beside an upload or as keys of the JSON body."""

    model_config = ConfigDict(extra="forbid")

    mpp: float | None = Field(
        default=None, ge=MIN_MPP, le=MAX_MPP, description="Resolution of the slide in µm per level-0 pixel, overriding its metadata."
    )
    pooling: Literal[POOLINGS] = Field(default="mean", description="How the patch embeddings are pooled into the slide embedding.")
    include_patches: bool = Field(default=False, description="Default of GET /v1/jobs/{id}/result?include_patches.")
    allow_fluorescence: bool = Field(
        default=False,
        description="Embed a fluorescence (dark-field) slide, taking signal above the dark background as tissue. "
        "False: such a slide fails with reason not_brightfield.",
    )


class SlidePathRequest(SlideJobOptions):
    """JSON body of ``POST /v1/slides`` for a slide already on the server, under ``data_root``."""

    path: str = Field(min_length=1, max_length=4096, description="Path of the slide, relative to the data root or absolute inside it.")


def get_jobs(request: Request) -> JobManager:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise NotReadyError("the student server is starting and its slide jobs are not loaded yet. Retry in a few seconds.")
    return jobs


def get_settings_of(request: Request) -> StudentSettings:
    return request.app.state.settings


JobsDep = Annotated[JobManager, Depends(get_jobs)]
SettingsDep = Annotated[StudentSettings, Depends(get_settings_of)]

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (403, 404, 409, 413, 422, 503)}

_SUBMIT_BODY = {
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
                        "pooling": {"type": "string", "enum": list(POOLINGS), "default": "mean"},
                        "include_patches": {"type": "boolean", "default": False},
                        "allow_fluorescence": {"type": "boolean", "default": False},
                    },
                }
            },
            "application/json": {"schema": SlidePathRequest.model_json_schema()},
        },
    }
}


@router.post(SLIDES_PATH, status_code=202, responses=_ERRORS, openapi_extra=_SUBMIT_BODY)
async def submit_slide(request: Request, jobs: JobsDep, settings: SettingsDep, caller: CallerDep) -> JSONResponse:
    """Queue a slide job for an uploaded slide or a slide under the data root, and return it with 202."""
    _require_student(request)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        record = await _submit_upload(request, jobs, settings, caller)
    elif media_type == "application/json":
        record = await _submit_path(request, jobs, caller)
    else:
        raise InvalidRequestError(
            f"Content-Type is {media_type or 'missing'!r}, expected multipart/form-data (a slide upload in the field "
            "'file') or application/json (a body {\"path\": ...} naming a slide under the data root).",
            value=media_type or None,
            limit=["multipart/form-data", "application/json"],
        )
    return JSONResponse(record.public(), status_code=202, headers={"Location": f"/v1/jobs/{record.id}"})


@router.get("/v1/jobs", responses=_ERRORS)
def list_jobs(
    jobs: JobsDep,
    caller: CallerDep,
    limit: Annotated[
        int,
        # The range is checked below rather than with ge and le, so the error names it in "limit" as other errors do.
        Query(description="Maximum number of jobs returned.", json_schema_extra={"minimum": 1, "maximum": MAX_JOB_LIST_LIMIT}),
    ] = DEFAULT_JOB_LIST_LIMIT,
) -> dict[str, Any]:
    """List the caller's slide jobs, newest first, each as GET /v1/jobs/{id} shows it. ``has_more`` is true when ``limit`` cut the list."""
    if not 1 <= limit <= MAX_JOB_LIST_LIMIT:
        raise InvalidRequestError(
            f"the query parameter limit is {limit}, expected 1 to {MAX_JOB_LIST_LIMIT} jobs. "
            f"Send a limit in that range, or leave it out for {DEFAULT_JOB_LIST_LIMIT}.",
            limit=[1, MAX_JOB_LIST_LIMIT],
            value=limit,
        )
    owned = jobs.jobs_of(caller)
    return {"object": "list", "data": [record.public() for record in owned[:limit]], "has_more": len(owned) > limit}


@router.get("/v1/jobs/{job_id}", responses=_ERRORS)
def get_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    """Return the job's status, progress, error and links."""
    return jobs.get(job_id, caller=caller).public()


@router.get("/v1/jobs/{job_id}/result", responses=_ERRORS)
def get_result(job_id: str, jobs: JobsDep, caller: CallerDep, include_patches: bool | None = None) -> JSONResponse:
    """Return the slide embedding, pooling and metadata, and with ``include_patches`` every patch's embedding and coords."""
    record = jobs.require_succeeded(job_id, caller=caller)
    result = json.loads(_output_file(jobs, record, "result").read_text(encoding="utf-8"))
    content = {"object": "slide.embedding", "id": record.id, **result}
    if record.options.get("include_patches", False) if include_patches is None else include_patches:
        features = read_features(_output_file(jobs, record, "features"))
        content["coords"] = features.coords.tolist()
        content["patch_embeddings"] = features.features.tolist()
    return JSONResponse(content)


@router.get("/v1/jobs/{job_id}/features.h5", responses=_ERRORS)
def get_features(job_id: str, jobs: JobsDep, caller: CallerDep) -> FileResponse:
    """Download the patch features in TRIDENT's HDF5 layout: ``coords`` (N, 2) int64 and ``features`` (N, D) float32."""
    record = jobs.require_succeeded(job_id, caller=caller)
    path = _output_file(jobs, record, "features")
    return FileResponse(path, media_type="application/x-hdf5", filename=f"{record.slide_id}.h5")


@router.get("/v1/jobs/{job_id}/overlay.jpg", responses=_ERRORS)
def get_overlay(job_id: str, jobs: JobsDep, caller: CallerDep) -> FileResponse:
    """Return the thumbnail with the detected tissue and the patch grid drawn over it."""
    record = jobs.require_succeeded(job_id, caller=caller)
    return FileResponse(_output_file(jobs, record, "overlay"), media_type="image/jpeg")


@router.get("/v1/jobs/{job_id}/thumbnail.jpg", responses=_ERRORS)
def get_thumbnail(job_id: str, jobs: JobsDep, caller: CallerDep) -> FileResponse:
    """Return the slide's thumbnail."""
    record = jobs.require_succeeded(job_id, caller=caller)
    return FileResponse(_output_file(jobs, record, "thumbnail"), media_type="image/jpeg")


@router.get("/v1/jobs/{job_id}/map", responses=_ERRORS)
def get_map(job_id: str, jobs: JobsDep, caller: CallerDep) -> JSONResponse:
    """Return the embedding map: per patch the first two principal components, the level-0 centre and the cluster."""
    record = jobs.require_succeeded(job_id, caller=caller)
    return JSONResponse(json.loads(_output_file(jobs, record, "map").read_text(encoding="utf-8")))


@router.delete("/v1/jobs/{job_id}", status_code=204, responses=_ERRORS)
def delete_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> Response:
    """Remove a succeeded or failed job and its files."""
    jobs.delete(job_id, caller=caller)
    logger.info("slide job %s deleted by %s", job_id, caller)
    return Response(status_code=204)


async def _submit_upload(request: Request, jobs: JobManager, settings: StudentSettings, owner: str) -> JobRecord:
    # Checked before the upload too, so a full queue does not make the client send a whole slide first.
    jobs.check_capacity()
    upload = await receive_slide_upload(request, upload_dir=settings.upload_dir, max_bytes=settings.max_upload_bytes)
    try:
        options = _validate(SlideJobOptions, {name: value for name, value in upload.fields.items() if value.strip() != ""})
        if upload.size == 0:
            raise InvalidRequestError(
                "the uploaded slide file is empty (0 bytes). Send the slide file's content in the field 'file'.",
                value=0,
                limit=1,
            )
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    return await run_in_threadpool(jobs.submit_upload, upload.path, size=upload.size, options=options.model_dump(), owner=owner)


async def _submit_path(request: Request, jobs: JobManager, owner: str) -> JobRecord:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise InvalidRequestError(
                f"the JSON body is larger than {MAX_JSON_BYTES} bytes. Send only the path and the options.",
                limit=MAX_JSON_BYTES,
                value=len(body),
            )
    try:
        data = json.loads(body)
    except ValueError as error:
        raise InvalidRequestError(f"the body is not valid JSON ({error}). Send {{\"path\": ...}} with the slide's path.") from error
    if not isinstance(data, dict):
        raise InvalidRequestError("the JSON body must be an object such as {\"path\": \"slides/a.svs\"}.", value=type(data).__name__)

    submitted = _validate(SlidePathRequest, data)
    options = submitted.model_dump(exclude={"path"})
    return await run_in_threadpool(jobs.submit_path, submitted.path, options=options, owner=owner)


def _validate(model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = [{**problem, "loc": ("body", *problem["loc"])} for problem in error.errors(include_url=False)]
        raise RequestValidationError(problems) from error


def _require_student(request: Request) -> None:
    # A job submitted while no student is loaded would only fail, so the client gets the reason now.
    model = request.app.state.student
    if model.ensure_loaded() is None:
        raise NotReadyError(f"the student server is not ready: {model.public_reason.rstrip('.')}.")


def _output_file(jobs: JobManager, record: JobRecord, kind: str) -> Path:
    path = jobs.outputs_dir(record.id) / OUTPUT_FILES[kind]
    if not path.is_file():
        # Housekeeping or a DELETE removed the job between the status check and this read.
        raise JobNotFoundError(f"slide job {record.id} was removed while its {kind} was requested.", value=record.id)
    return path
