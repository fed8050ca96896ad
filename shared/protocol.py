"""The embeddings protocol that the teacher gateway and the student server both speak.

``POST /v1/embeddings`` takes ``{"model": ..., "input": [{"image": "<base64 PNG or JPEG>", "slide_id": ...,
"coords": [x, y], "mpp": ...}, ...]}`` and returns ``{"model": ..., "data": [{"index": i, "embedding":
[...]}], "usage": {...}}``. Only ``image`` is required. Every error has the shape of
:class:`ErrorResponse`. ``GET /v1/models`` returns ``{"object": "list", "service": ..., "data": [...]}``,
where ``service`` is :data:`GATEWAY_SERVICE` or :data:`STUDENT_SERVICE`.

The gateway stores provenance in SQLite and exports it to HDF5, so the fields are checked here, before any
tile is decoded or sent to a teacher. ``slide_id`` and ``model`` are printable text of bounded length,
``coords`` are non-negative int64 values, and ``mpp`` is finite and within a brightfield range.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# The "service" field of each service's GET /v1/models response, so a client can tell which service it reached.
GATEWAY_SERVICE = "teacher-gateway"
STUDENT_SERVICE = "student-server"

MAX_SLIDE_ID_LENGTH = 128
MAX_MODEL_NAME_LENGTH = 256
# Level-0 pixel coordinates are stored as SQLite INTEGER and HDF5 int64, so they must fit a signed 64-bit integer.
MAX_COORDINATE = 2**63 - 1
# The plausible resolutions of a brightfield scan, equal to shared.slides.reader.MIN_MPP and MAX_MPP
# (a test checks that they stay equal). They are repeated here so that the protocol does not import openslide.
MIN_TILE_MPP = 0.05
MAX_TILE_MPP = 20.0


def describe_text_problem(text: str, *, max_length: int) -> str | None:
    """Return why ``text`` is not a usable id (empty, too long, or with a non-printable character), or None.

    Control characters, lone surrogates and the other characters that ``str.isprintable`` rejects are
    invalid. The training-shard export writes slide ids as HDF5 variable-length strings, which cannot
    contain NUL, and SQLite and JSON responses need text that encodes as UTF-8, which a lone surrogate
    does not. The description names a character by its code point and never contains it.
    """
    if not text:
        return "is empty"
    if len(text) > max_length:
        return f"has {len(text)} characters, more than the maximum of {max_length}"
    for position, character in enumerate(text):
        if character.isprintable():
            continue
        category = unicodedata.category(character)
        if category == "Cc":
            kind = "control character"
        elif category == "Cs":
            kind = "lone surrogate"
        else:
            kind = "non-printable character"
        return f"contains the {kind} U+{ord(character):04X} at position {position}"
    return None


def _validate_text(value: str | None, *, field: str, max_length: int, example: str) -> str | None:
    if value is None:
        return None
    problem = describe_text_problem(value, max_length=max_length)
    if problem is not None:
        raise PydanticCustomError(
            f"invalid_{field}",
            "{field} {problem}. Expected 1 to {max_length} printable characters without control characters, "
            "such as {example}. Fix the {field} or leave it out.",
            {"field": field, "problem": problem, "max_length": max_length, "example": repr(example)},
        )
    return value


class EmbeddingInput(BaseModel):
    """One tile: a base64-encoded PNG or JPEG and, optionally, where it came from."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Base64-encoded PNG or JPEG bytes of an RGB tile.")
    slide_id: str | None = Field(
        default=None,
        description=f"Pseudonymous id of the source slide: 1 to {MAX_SLIDE_ID_LENGTH} printable characters.",
    )
    coords: tuple[int, int] | None = Field(
        default=None,
        description="Level-0 top-left corner (x, y) in pixels, each from 0 to 2**63 - 1.",
    )
    mpp: float | None = Field(
        default=None,
        description=f"Resolution of the tile in µm per pixel, from {MIN_TILE_MPP} to {MAX_TILE_MPP}.",
    )

    @field_validator("slide_id")
    @classmethod
    def _check_slide_id(cls, value: str | None) -> str | None:
        return _validate_text(value, field="slide_id", max_length=MAX_SLIDE_ID_LENGTH, example="slide-0042")

    @field_validator("coords")
    @classmethod
    def _check_coords(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is None:
            return None
        for axis, coordinate in zip("xy", value):
            if not 0 <= coordinate <= MAX_COORDINATE:
                raise PydanticCustomError(
                    "invalid_coords",
                    "coords {axis} is {coordinate}, expected a level-0 pixel coordinate from 0 to 2**63 - 1 "
                    "(a non-negative int64). Send the tile's top-left corner in level-0 pixels, or leave coords out.",
                    {"axis": axis, "coordinate": coordinate},
                )
        return value

    @field_validator("mpp")
    @classmethod
    def _check_mpp(cls, value: float | None) -> float | None:
        if value is None:
            return None
        if not (math.isfinite(value) and MIN_TILE_MPP <= value <= MAX_TILE_MPP):
            raise PydanticCustomError(
                "invalid_mpp",
                "mpp is {mpp}, expected a finite resolution from {minimum} to {maximum} µm/px. "
                "Send the tile's resolution, for example 0.5 for tiles at 20x, or leave mpp out.",
                {"mpp": value, "minimum": MIN_TILE_MPP, "maximum": MAX_TILE_MPP},
            )
        return value


class EmbeddingRequest(BaseModel):
    """A batch of tiles to embed; ``model`` may name the model, or be omitted for the default."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: list[EmbeddingInput] = Field(min_length=1)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        return _validate_text(value, field="model", max_length=MAX_MODEL_NAME_LENGTH, example="reference")


class EmbeddingData(BaseModel):
    """The embedding of the tile at ``index`` in the request."""

    object: str = "embedding"
    index: int
    embedding: list[float]


class Usage(BaseModel):
    """Counts for one request: tiles received, tiles found in the cache, and calls to the model."""

    model_config = ConfigDict(extra="allow")

    tiles: int
    cache_hits: int = 0
    model_calls: int = 0


class EmbeddingResponse(BaseModel):
    """Response to an :class:`EmbeddingRequest`, with embeddings in request order."""

    object: str = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage


class ErrorBody(BaseModel):
    code: str
    message: str
    limit: Any = None
    value: Any = None


class ErrorResponse(BaseModel):
    """The one error shape of every UNITE service."""

    error: ErrorBody
