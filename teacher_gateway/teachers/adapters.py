"""Request and response shapes of remote embedding APIs, set by configuration rather than code.

The default :class:`AdapterConfig` speaks UNITE's embeddings protocol: the request is
``{"model": ..., "input": [{"image": "<base64 PNG>"}, ...]}`` and the vectors are read from
``data[*].embedding``, put in order by ``data[*].index``. Another vendor's shape is a different
configuration. For instance, a vendor that takes ``{"instances": [{"image": {"b64": "data:image/jpeg;base64,..."}}]}``
and returns ``{"output": {"predictions": [{"vector": [...]}]}}`` needs::

    AdapterConfig(input_field="instances", image_field="image.b64", image_encoding="jpeg", data_url=True,
                  model_field=None, embeddings_path="output.predictions[*].vector", index_path=None, model_path=None)

Paths into a response are dotted field names, where ``[*]`` takes every element of a list and ``[2]`` one
element, for example ``output.predictions[*].vector`` or ``embeddings``. When the path has no ``[*]``,
its value must itself be the list of vectors. Field names in requests are dotted too
(``image.b64`` nests the image in an object) but take no brackets.

:class:`EmbeddingsAdapter` only turns tiles into a request body and a response body into checked vectors.
It raises :class:`InvalidResponseError` for a body that is not JSON or lacks a field, for the wrong number of
vectors or of values in one, for a value that is not a number, and for NaN or infinite values. A rejected
response is never returned, so it can never be cached.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import TeacherError
from shared.imaging import encode_png

# One segment of a path: an optional field name, then any number of [*] or [n] subscripts.
_SEGMENT = re.compile(r"^(?P<name>[^.\[\]]*)(?P<subscripts>(\[(\*|\d+)\])*)$")
_SUBSCRIPT = re.compile(r"\[(\*|\d+)\]")
_FIELD_NAME = re.compile(r"^[^.\[\]]+$")
# A wildcard step in a parsed path.
EACH = None
# How many field names of an object an error message lists before it stops.
MAX_LISTED_FIELDS = 10

# Kinds of invalid response, as counted by the remote teacher's stats.
INVALID_RESPONSE_KINDS = ("invalid_json", "invalid_shape", "wrong_count", "wrong_dim", "non_finite")


class InvalidResponseError(TeacherError):
    """A provider's response that cannot be used; ``kind`` is one of :data:`INVALID_RESPONSE_KINDS`."""

    def __init__(self, kind: str, message: str, *, limit: Any = None, value: Any = None) -> None:
        super().__init__(message, limit=limit, value=value)
        self.kind = kind


@dataclass(frozen=True)
class JsonPath:
    """A parsed path into a JSON document: field names (str), list indices (int) and wildcards (None)."""

    text: str
    steps: tuple[str | int | None, ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        """Parse ``text`` such as ``output.predictions[*].vector``; raise ValueError naming the bad segment."""
        if not text:
            raise ValueError("the path is empty; expected dotted field names such as 'data[*].embedding'")
        steps: list[str | int | None] = []
        for position, segment in enumerate(text.split(".")):
            match = _SEGMENT.match(segment)
            if match is None or (not match["name"] and position > 0) or not segment:
                raise ValueError(
                    f"path {text!r} has an invalid segment {segment!r}; expected dotted field names, each "
                    "followed by optional [*] (every element of a list) or [n] (element n), "
                    "such as 'output.predictions[*].vector'"
                )
            if match["name"]:
                steps.append(match["name"])
            for subscript in _SUBSCRIPT.findall(match["subscripts"]):
                steps.append(EACH if subscript == "*" else int(subscript))
        return cls(text=text, steps=tuple(steps))

    @property
    def wildcards(self) -> int:
        return sum(1 for step in self.steps if step is EACH)

    def resolve(self, document: Any) -> Any:
        """Return the value at this path; with a ``[*]``, the list of values for every element.

        Raises :class:`InvalidResponseError` (kind ``invalid_shape``) naming the first part of the path that
        the document lacks and what it found there.
        """
        return self._walk(document, 0, "")

    def _walk(self, value: Any, first_step: int, where: str) -> Any:
        for position in range(first_step, len(self.steps)):
            step = self.steps[position]
            if step is EACH:
                if not isinstance(value, list):
                    raise self._mismatch(where, value, "a list")
                return [self._walk(item, position + 1, f"{where}[{index}]") for index, item in enumerate(value)]
            if isinstance(step, int):
                if not isinstance(value, list):
                    raise self._mismatch(where, value, "a list")
                if step >= len(value):
                    raise InvalidResponseError(
                        "invalid_shape",
                        f"response field {where or '(root)'!r} has {len(value)} elements, so it has no element "
                        f"{step}, which path {self.text!r} expects",
                    )
                value = value[step]
                where = f"{where}[{step}]"
                continue
            if not isinstance(value, dict):
                raise self._mismatch(where, value, "an object")
            if step not in value:
                fields = sorted(value)[:MAX_LISTED_FIELDS]
                raise InvalidResponseError(
                    "invalid_shape",
                    f"response {('field ' + repr(where)) if where else 'object'} has no field {step!r}, which "
                    f"path {self.text!r} expects; its fields are {fields}",
                )
            value = value[step]
            where = f"{where}.{step}" if where else step
        return value

    def _mismatch(self, where: str, value: Any, expected: str) -> InvalidResponseError:
        return InvalidResponseError(
            "invalid_shape",
            f"response field {where or '(root)'!r} is {_json_type(value)}, expected {expected} for path {self.text!r}",
        )


class AdapterConfig(BaseModel):
    """Request field names, image encoding and response paths of one provider's embeddings API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_field: str = Field(
        default="input", description="Dotted request field that contains the list of tiles, e.g. 'instances'."
    )
    image_field: str | None = Field(
        default="image",
        description="Dotted field of each tile's object that contains the encoded image; None sends bare strings.",
    )
    model_field: str | None = Field(
        default="model", description="Dotted request field for the model name; None sends no model name."
    )
    image_encoding: Literal["png", "jpeg"] = Field(
        default="png", description="Image format sent: 'png' (lossless) or 'jpeg' (smaller, lossy)."
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG quality from 1 to 100, with image_encoding 'jpeg'.")
    data_url: bool = Field(
        default=False, description="Prefix each image with 'data:image/png;base64,' (or image/jpeg) as data URLs do."
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Constant fields added to every request body, e.g. {'encoding_format': 'float'}."
    )
    embeddings_path: str = Field(
        default="data[*].embedding", description="Path to the vectors in the response, e.g. 'predictions[*].vector'."
    )
    index_path: str | None = Field(
        default="data[*].index",
        description="Path to each vector's input position in the response; None takes the vectors in order.",
    )
    model_path: str | None = Field(
        default="model", description="Path to the model name the provider declares in its response; None for none."
    )

    @field_validator("input_field", "image_field", "model_field")
    @classmethod
    def _check_field_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for part in value.split("."):
            if not _FIELD_NAME.match(part):
                raise ValueError(
                    f"request field {value!r} has an invalid part {part!r}; expected dotted field names "
                    "without brackets, such as 'instances' or 'image.b64'"
                )
        return value

    @field_validator("embeddings_path", "index_path", "model_path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is not None:
            JsonPath.parse(value)
        return value

    @model_validator(mode="after")
    def _check_paths_agree(self) -> AdapterConfig:
        embeddings = JsonPath.parse(self.embeddings_path)
        if embeddings.wildcards > 1:
            raise ValueError(
                f"embeddings_path {self.embeddings_path!r} has {embeddings.wildcards} [*] wildcards, expected at "
                "most one: the path must lead to one list of vectors"
            )
        if self.index_path is not None and JsonPath.parse(self.index_path).wildcards != 1:
            raise ValueError(
                f"index_path {self.index_path!r} must have exactly one [*] wildcard, as in 'data[*].index', "
                "so that it yields one index per vector; set it to None when the vectors come in input order"
            )
        if self.model_path is not None and JsonPath.parse(self.model_path).wildcards:
            raise ValueError(f"model_path {self.model_path!r} must lead to one string, so it takes no [*] wildcard")

        set_fields = [name for name in (self.input_field, self.model_field) if name is not None]
        clashes = sorted({name.split(".")[0] for name in set_fields} & set(self.extra_body))
        if clashes:
            raise ValueError(
                f"extra_body sets {clashes}, which the adapter fills from input_field and model_field; "
                "remove them from extra_body"
            )
        return self


@dataclass(frozen=True)
class DecodedResponse:
    """The checked vectors of one response, as (N, dim) float32 in input order, and the model it declares."""

    embeddings: np.ndarray
    model: str | None


class EmbeddingsAdapter:
    """Encodes tiles into a request body and decodes a response body into checked embeddings."""

    def __init__(self, config: AdapterConfig | None = None) -> None:
        self.config = config or AdapterConfig()
        self._embeddings_path = JsonPath.parse(self.config.embeddings_path)
        self._index_path = JsonPath.parse(self.config.index_path) if self.config.index_path else None
        self._model_path = JsonPath.parse(self.config.model_path) if self.config.model_path else None

    def encode_request(self, tiles: np.ndarray, model: str) -> bytes:
        """Return the JSON request body for the embeddings of (N, H, W, 3) uint8 ``tiles``."""
        items: list[Any] = []
        for tile in tiles:
            image = self.encode_image(tile)
            items.append(image if self.config.image_field is None else _nested(self.config.image_field, image))

        body = copy.deepcopy(self.config.extra_body)
        if self.config.model_field is not None:
            _set_dotted(body, self.config.model_field, model)
        _set_dotted(body, self.config.input_field, items)
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    def encode_image(self, tile: np.ndarray) -> str:
        """Encode one RGB tile as base64 PNG or JPEG text, with a data URL prefix when configured."""
        if self.config.image_encoding == "png":
            data = encode_png(tile)
        else:
            buffer = io.BytesIO()
            # 4:4:4 chroma (subsampling=0) keeps the stain colours of H&E at full resolution.
            Image.fromarray(np.ascontiguousarray(tile), mode="RGB").save(
                buffer, format="JPEG", quality=self.config.jpeg_quality, subsampling=0
            )
            data = buffer.getvalue()
        text = base64.b64encode(data).decode("ascii")
        if self.config.data_url:
            return f"data:image/{self.config.image_encoding};base64,{text}"
        return text

    def decode_response(self, content: bytes, *, count: int, dim: int) -> DecodedResponse:
        """Return the ``count`` vectors of ``dim`` values in a response body, checked and in input order.

        Raises :class:`InvalidResponseError` for a body that is not JSON or lacks the configured fields,
        and for a count or length other than expected. It also raises it for a value that is not a number
        and for NaN or infinite values, including numbers too large for float32.
        """
        try:
            document = json.loads(content)
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidResponseError(
                "invalid_json",
                f"response body of {len(content)} bytes is not valid JSON ({error}); it may have been cut short",
                value=len(content),
            ) from error

        vectors = self._embeddings_path.resolve(document)
        if not isinstance(vectors, list):
            raise InvalidResponseError(
                "invalid_shape",
                f"embeddings_path {self._embeddings_path.text!r} leads to {_json_type(vectors)}, expected a list of vectors",
            )
        if len(vectors) != count:
            raise InvalidResponseError(
                "wrong_count",
                f"response has {len(vectors)} vectors at {self._embeddings_path.text!r} for {count} tiles, "
                "expected one per tile",
                limit=count,
                value=len(vectors),
            )
        if self._index_path is not None:
            vectors = self._order_by_index(document, vectors)

        embeddings = _vectors_to_array(vectors, dim)
        model = None if self._model_path is None else self._declared_model(document)
        return DecodedResponse(embeddings=embeddings, model=model)

    def describe(self) -> dict[str, Any]:
        """Return the adapter settings, for the gateway's model listing."""
        return self.config.model_dump()

    def _order_by_index(self, document: Any, vectors: list[Any]) -> list[Any]:
        path = self._index_path
        indices = path.resolve(document)
        count = len(vectors)
        valid = (
            isinstance(indices, list)
            and len(indices) == count
            and all(isinstance(index, int) and not isinstance(index, bool) for index in indices)
            and sorted(indices) == list(range(count))
        )
        if not valid:
            shown = indices[:20] if isinstance(indices, list) else indices
            raise InvalidResponseError(
                "invalid_shape",
                f"response indices at {path.text!r} are {shown!r}, expected each integer from 0 to {count - 1} once",
            )
        ordered: list[Any] = [None] * count
        for index, vector in zip(indices, vectors):
            ordered[index] = vector
        return ordered

    def _declared_model(self, document: Any) -> str | None:
        try:
            model = self._model_path.resolve(document)
        except InvalidResponseError:
            # Many providers leave the model name out of some responses; the teacher then keeps its configured one.
            return None
        if model is not None and not isinstance(model, str):
            raise InvalidResponseError(
                "invalid_shape",
                f"response field {self._model_path.text!r} is {_json_type(model)}, expected the model name as a string",
            )
        return model


def _vectors_to_array(vectors: list[Any], dim: int) -> np.ndarray:
    """Check that every vector is a list of ``dim`` finite numbers and return them as float32."""
    for index, vector in enumerate(vectors):
        if not isinstance(vector, list):
            raise InvalidResponseError(
                "invalid_shape", f"vector {index} of the response is {_json_type(vector)}, expected a list of numbers"
            )
        if len(vector) != dim:
            raise InvalidResponseError(
                "wrong_dim",
                f"vector {index} of the response has {len(vector)} values, expected dim = {dim}",
                limit=dim,
                value=len(vector),
            )

    try:
        array = np.array(vectors) if vectors else np.zeros((0, dim))
    except ValueError as error:
        # numpy raises for values nested to different depths, such as [1.0, [2.0, 3.0]].
        raise InvalidResponseError(
            "invalid_shape", f"response vectors are not flat lists of numbers ({error}), expected lists of JSON numbers"
        ) from error
    # numpy gives a non-numeric dtype to a list with a string, null or boolean in it, and more than two
    # dimensions to vectors of nested lists.
    if array.dtype.kind not in "iuf" or array.ndim != 2:
        raise InvalidResponseError(
            "invalid_shape",
            f"response vectors contain values that are not numbers (numpy dtype {array.dtype}, {array.ndim} "
            "dimensions), expected flat lists of JSON numbers",
        )
    # Numbers beyond the float32 range become infinite here and are rejected just below.
    with np.errstate(over="ignore"):
        embeddings = array.astype(np.float32)
    finite = np.isfinite(embeddings)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise InvalidResponseError(
            "non_finite",
            f"response vectors {bad_rows[:10].tolist()} ({len(bad_rows)} of {len(vectors)}) contain NaN or infinite "
            "values, or numbers beyond the float32 range",
            value=len(bad_rows),
        )
    return embeddings


def _nested(dotted: str, value: Any) -> Any:
    """Return ``value`` wrapped in one object per part of ``dotted``: 'image.b64' -> {'image': {'b64': value}}."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[parts[-1]] = value


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, for error messages: 'an object', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "a number"
