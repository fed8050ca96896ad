"""API keys of the gateway: a keys file of sha256 digests, names and per-key quotas.

Any client that reaches the gateway can spend the lab's teacher budget, so a gateway given a keys file
(``UNITE_GATEWAY_KEYS_FILE``) serves only requests with a listed key. The file format, and how a request
sends its key, are described in :mod:`shared.api_keys`, which the student server reads too. The gateway
also applies each key's optional ``requests_per_minute`` and ``teacher_tiles_per_minute`` quotas.

The gateway keeps and compares only digests, so the file contains no key, and no key is ever logged or put
in an error message.
"""

from __future__ import annotations

from pathlib import Path

from shared.api_keys import HOW_TO_SEND, hash_key, presented_key, read_keys_file
from teacher_gateway.errors import UnauthorizedError
from teacher_gateway.usage import RESERVED_CALLERS, Caller, Quota

__all__ = ["HOW_TO_SEND", "KEYS_FILE_SETTING", "KeyStore", "hash_key"]

KEYS_FILE_SETTING = "UNITE_GATEWAY_KEYS_FILE"


class KeyStore:
    """The keys of one keys file, by digest."""

    def __init__(self, callers: dict[str, Caller], path: Path) -> None:
        self._callers = callers
        self.path = path

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read and check the keys file at ``path``; raise :class:`ConfigError` naming the file, the entry and the fix."""
        entries = read_keys_file(path, setting=KEYS_FILE_SETTING, reserved_names=RESERVED_CALLERS)
        callers = {
            digest: Caller(
                name=entry.name,
                quota=Quota(requests_per_minute=entry.requests_per_minute, teacher_tiles_per_minute=entry.teacher_tiles_per_minute),
            )
            for digest, entry in entries.items()
        }
        return cls(callers, Path(path))

    def __len__(self) -> int:
        return len(self._callers)

    def authenticate(self, *, authorization: str | None, api_key: str | None) -> Caller:
        """Return the caller of the key in the ``Authorization`` or ``X-API-Key`` header, or raise :class:`UnauthorizedError`."""
        key = presented_key(authorization, api_key, unauthorized=UnauthorizedError, service="gateway")
        # A dict lookup by digest: its timing depends on the digest of the guess, which reveals nothing about a stored key.
        caller = self._callers.get(hash_key(key))
        if caller is None:
            raise UnauthorizedError(
                "invalid API key: it matches no key of this gateway's keys file. Check the key, or ask the "
                "gateway's operator for one."
            )
        return caller
