"""The exception tree of UNITE.

Every error the project raises derives from :class:`UniteError`, and errors from third-party libraries
(openslide, PIL, h5py, httpx, sqlite3) are converted where they enter and chained with ``from``::

    UniteError
    ├── ConfigError            a setting or option has an invalid value
    ├── SlideError             a slide cannot be opened, has no usable resolution, or has no tissue
    ├── ImageError             an uploaded or cached tile image cannot be used
    ├── CacheError             the embedding cache or a training shard is missing or damaged
    ├── TeacherError           the teacher failed or returned an invalid response
    ├── ModelError             a model or checkpoint cannot be built or loaded
    ├── InvalidRequestError    an HTTP request is malformed or is missing a field (422)
    ├── RequestTooLargeError   an HTTP request has more tiles or bytes than the service accepts (413)
    ├── ModelNotFoundError     an HTTP request names a model that the service does not serve (404)
    └── NotReadyError          a service cannot serve requests because its model or storage is not open (503)

Each error carries a machine-readable ``code`` and, where a limit was broken, the ``limit`` and the
``value`` found, so services can return them in the one JSON error shape of the embeddings protocol.
"""

from __future__ import annotations

from typing import Any


class UniteError(Exception):
    """Root of all UNITE errors; ``code`` names the kind for API clients."""

    code = "unite_error"
    status_code = 500

    def __init__(self, message: str, *, limit: Any = None, value: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.value = value

    def to_dict(self) -> dict[str, Any]:
        """Return the error in the protocol's JSON shape: ``{"error": {...}}``."""
        return {"error": {"code": self.code, "message": self.message, "limit": self.limit, "value": self.value}}


class ConfigError(UniteError):
    code = "invalid_config"
    status_code = 400


class SlideError(UniteError):
    """A slide cannot be used. ``reason`` is a short code that jobs record per slide, one of :data:`SLIDE_REASONS`."""

    code = "invalid_slide"
    status_code = 422

    def __init__(self, message: str, *, reason: str = "invalid_slide", limit: Any = None, value: Any = None) -> None:
        super().__init__(message, limit=limit, value=value)
        if reason not in SLIDE_REASONS:
            raise ValueError(f"unknown slide error reason {reason!r}; expected one of {sorted(SLIDE_REASONS)}")
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["error"]["reason"] = self.reason
        return body


# Reason codes for a rejected slide, recorded in a job's state file and returned by the services.
SLIDE_REASONS = {
    "invalid_slide": "any other problem with the slide",
    "not_found": "the path does not exist or is not a regular file",
    "permission_denied": "the user running unite may not read the file or reach its folder",
    "too_large": "the slide declares a size whose thumbnail or chunks would exhaust memory",
    "unreadable": "no reader recognises the file format",
    "damaged": "a reader recognised the file but failed to read it (truncated or corrupt)",
    "no_resolution": "no resolution in the metadata and no override",
    "implausible_resolution": "the metadata states a resolution outside the plausible range",
    "not_brightfield": "a fluorescence (dark-field) slide, refused unless the user opts in",
    "no_tissue": "tissue detection found no tissue",
    "no_patches": "no patch of the requested size has enough tissue",
}


class ImageError(UniteError):
    code = "invalid_image"
    status_code = 422


class CacheError(UniteError):
    code = "cache_error"
    status_code = 500


class TeacherError(UniteError):
    code = "teacher_error"
    status_code = 502


class ModelError(UniteError):
    code = "model_error"
    status_code = 500


class InvalidRequestError(UniteError):
    """The request is not shaped as the endpoint expects: a missing field or a malformed body."""

    code = "invalid_request"
    status_code = 422


class RequestTooLargeError(UniteError):
    """The request has more tiles or more bytes than the service accepts."""

    code = "request_too_large"
    status_code = 413


class ModelNotFoundError(UniteError):
    """The request names a model that this service does not serve."""

    code = "model_not_found"
    status_code = 404


class NotReadyError(UniteError):
    """The service cannot serve requests yet, or no longer, because its model or storage is not open.

    The message gives the reason.
    """

    code = "not_ready"
    status_code = 503
