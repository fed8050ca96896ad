"""The student server's own errors, beside the HTTP errors it shares with the teacher gateway.

:mod:`shared.http` gives every failure the protocol's JSON shape. :class:`InvalidRequestError` and
:class:`RequestTooLargeError` live in :mod:`shared.errors` and are imported here for the modules that
raise them.
"""

from __future__ import annotations

from shared.errors import InvalidRequestError, RequestTooLargeError

__all__ = ["InvalidRequestError", "RequestTooLargeError", "TooManyPatchesError", "UploadTooLargeError"]


class UploadTooLargeError(RequestTooLargeError):
    """An uploaded slide file is larger than the configured limit."""

    code = "upload_too_large"


class TooManyPatchesError(RequestTooLargeError):
    """An uploaded slide has more tissue patches than the server embeds for one slide."""

    code = "too_many_patches"
