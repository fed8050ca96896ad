"""The student server's own errors, beside the HTTP errors it shares with the teacher gateway.

:mod:`shared.http` gives every failure the protocol's JSON shape. :class:`InvalidRequestError` and
:class:`RequestTooLargeError` live in :mod:`shared.errors` and are imported here for the modules that
raise them.
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidRequestError, ModelError, RequestTooLargeError, UniteError

__all__ = [
    "InvalidRequestError",
    "JobNotFinishedError",
    "JobNotFoundError",
    "JobQueueFullError",
    "QueueFullError",
    "RequestTooLargeError",
    "SlidePathForbiddenError",
    "TeacherSpaceUnavailable",
    "TooManyPatchesError",
    "UnauthorizedError",
    "UploadTooLargeError",
]


class UploadTooLargeError(RequestTooLargeError):
    """An uploaded slide file is larger than the configured limit."""

    code = "upload_too_large"


class TooManyPatchesError(RequestTooLargeError):
    """An uploaded slide has more tissue patches than the server embeds for one slide."""

    code = "too_many_patches"


class QueueFullError(UniteError):
    """The engine's queue has no room for the request's tiles; the client retries after ``retry_after_s``."""

    code = "queue_full"
    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int, limit: Any = None, value: Any = None) -> None:
        super().__init__(message, limit=limit, value=value)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class TeacherSpaceUnavailable(ModelError):
    """Teacher-space output was requested, but the served export has no mimic projector."""

    code = "teacher_space_unavailable"
    status_code = 422


class UnauthorizedError(UniteError):
    """No API key, or a key that is not in the server's keys file."""

    code = "unauthorized"
    status_code = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="unite-student"'}


class JobNotFoundError(UniteError):
    """No slide job has the requested id: it never existed, or it was deleted or expired."""

    code = "job_not_found"
    status_code = 404


class JobNotFinishedError(UniteError):
    """The slide job has no result to return, or cannot be deleted, in its current state."""

    code = "job_not_finished"
    status_code = 409


class SlidePathForbiddenError(UniteError):
    """A slide path points outside the data root, or slides may not be submitted by path at all."""

    code = "path_forbidden"
    status_code = 403


class JobQueueFullError(QueueFullError):
    """As many slide jobs as the server queues already wait; the client retries after ``retry_after_s``."""

    code = "job_queue_full"
