"""Optional API keys of the student server, read from the keys file the gateway uses.

With ``UNITE_STUDENT_KEYS_FILE`` set, every route except ``/healthz``, ``/readyz`` and the page's static
files needs a listed key, sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The API docs
(``/docs``, ``/redoc``, ``/openapi.json``) follow ``UNITE_STUDENT_API_DOCS`` (see :mod:`shared.api_docs`).
The file format is described in :mod:`shared.api_keys`. The student server ignores the gateway's quota
fields, because embedding with the student costs no teacher budget. Without the setting no key is needed.

A slide job belongs to the name of the key that submitted it, and other keys cannot see it (see
:mod:`student_server.jobs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, Request

from shared.api_keys import KeyEntry, hash_key, presented_key, read_keys_file
from student_server.errors import UnauthorizedError

KEYS_FILE_SETTING = "UNITE_STUDENT_KEYS_FILE"
ANONYMOUS = "anonymous"


class StudentKeys:
    """The keys of one keys file, by sha256 digest."""

    def __init__(self, entries: dict[str, KeyEntry], path: Path) -> None:
        self._entries = entries
        self.path = path

    @classmethod
    def load(cls, path: Path) -> StudentKeys:
        """Read and check the keys file; raise :class:`ConfigError` naming the file, the entry and the fix."""
        return cls(read_keys_file(path, setting=KEYS_FILE_SETTING, reserved_names=frozenset({ANONYMOUS})), Path(path))

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, *, authorization: str | None, api_key: str | None) -> str:
        """Return the name of the key sent in the request's headers, or raise :class:`UnauthorizedError` (401)."""
        key = presented_key(authorization, api_key, unauthorized=UnauthorizedError, service="student server")
        entry = self._entries.get(hash_key(key))
        if entry is None:
            raise UnauthorizedError(
                "invalid API key: it matches no key of this student server's keys file "
                f"({KEYS_FILE_SETTING}). Check the key, or ask the server's operator for one."
            )
        return entry.name


async def require_api_key(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str:
    """Return the caller's key name, or "anonymous" when the server has no keys file.

    Async, so it runs on the event loop and takes no worker thread.
    """
    return caller_of(request, authorization, x_api_key)


def caller_of(request: Request, authorization: str | None, x_api_key: str | None) -> str:
    """Return the name of the key in the given headers, or "anonymous" when the server has no keys file.

    Raises :class:`UnauthorizedError` (401) when the server has a keys file and the headers carry no listed key.
    """
    keys: StudentKeys | None = request.app.state.keys
    if keys is None:
        return ANONYMOUS
    return keys.authenticate(authorization=authorization, api_key=x_api_key)


CallerDep = Annotated[str, Depends(require_api_key)]
