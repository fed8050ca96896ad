"""The embeddings protocol that the teacher gateway and the student server both speak.

``POST /v1/embeddings`` takes ``{"model": ..., "input": [{"image": "<base64 PNG or JPEG>", "slide_id": ...,
"coords": [x, y], "mpp": ...}, ...]}`` and returns ``{"model": ..., "data": [{"index": i, "embedding":
[...]}], "usage": {...}}``. Only ``image`` is required. Every error has the shape of
:class:`ErrorResponse`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingInput(BaseModel):
    """One tile: a base64-encoded PNG or JPEG and, optionally, where it came from."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Base64-encoded PNG or JPEG bytes of an RGB tile.")
    slide_id: str | None = Field(default=None, description="Pseudonymous id of the source slide.")
    coords: tuple[int, int] | None = Field(default=None, description="Level-0 top-left corner (x, y) in pixels.")
    mpp: float | None = Field(default=None, gt=0, description="Resolution of the tile in µm per pixel.")


class EmbeddingRequest(BaseModel):
    """A batch of tiles to embed; ``model`` may name the model, or be omitted for the default."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: list[EmbeddingInput] = Field(min_length=1)


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
