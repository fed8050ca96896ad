"""API keys of the gateway: a keys file of sha256 digests, names and per-key quotas.

Any client that reaches the gateway can spend the lab's teacher budget, so a gateway given a keys file
(``UNITE_GATEWAY_KEYS_FILE``) serves only requests with a listed key. The file is TOML, one ``[[keys]]``
table per key::

    [[keys]]
    name = "lab-a"                    # shown in /v1/usage and the metrics, never the key
    sha256 = "<64 lowercase hex digits>"  # printf %s "$KEY" | sha256sum
    requests_per_minute = 600         # optional; no limit when left out
    teacher_tiles_per_minute = 20000  # optional; tiles this key may have sent to the teacher per minute

A request sends its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The gateway keeps and
compares only digests, so the file holds no key, and no key is ever logged or put in an error message.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import tomllib
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from shared.errors import ConfigError
from teacher_gateway.errors import UnauthorizedError
from teacher_gateway.usage import RESERVED_CALLERS, Caller, Quota

KEYS_FILE_SETTING = "UNITE_GATEWAY_KEYS_FILE"
HOW_TO_SEND = "Send the key as `Authorization: Bearer <key>` or `X-API-Key: <key>`."


class KeyEntry(BaseModel):
    """One ``[[keys]]`` table of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    requests_per_minute: PositiveInt | None = None
    teacher_tiles_per_minute: PositiveInt | None = None


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)


def hash_key(key: str) -> str:
    """Return the sha256 hex digest of ``key``'s UTF-8 bytes, the form the keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The keys of one keys file, by digest."""

    def __init__(self, callers: dict[str, Caller], path: Path) -> None:
        self._callers = callers
        self.path = path

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read and check the keys file at ``path``; raise :class:`ConfigError` naming the file, the entry and the fix."""
        path = Path(path)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ConfigError(
                f"keys file {path} ({KEYS_FILE_SETTING}) not found. Create it (see docs/gateway.md) or unset the setting "
                "to run without API keys.",
                value=str(path),
            ) from error
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"keys file {path} ({KEYS_FILE_SETTING}) cannot be read ({error}).", value=str(path)) from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"keys file {path} ({KEYS_FILE_SETTING}) is not valid TOML: {error}.", value=str(path)) from error

        try:
            parsed = KeysFile.model_validate(document)
        except ValidationError as error:
            # Only the field and pydantic's message: the input could be a key pasted in the wrong field.
            problems = "; ".join(_field_name(item["loc"]) + ": " + item["msg"] for item in error.errors())
            raise ConfigError(
                f"keys file {path} ({KEYS_FILE_SETTING}) is invalid: {problems}. Each [[keys]] table needs a name "
                "(letters, digits, '.', '_', '@', '-') and the sha256 hex digest of the key, never the key itself.",
                value=str(path),
            ) from error

        callers: dict[str, Caller] = {}
        names: set[str] = set()
        for index, entry in enumerate(parsed.keys):
            if entry.name in RESERVED_CALLERS or entry.name in names:
                reason = "is reserved by the gateway" if entry.name in RESERVED_CALLERS else "is used by an earlier key"
                raise ConfigError(
                    f"keys file {path}: keys[{index}].name {entry.name!r} {reason}. Give each key its own name.",
                    value=entry.name,
                )
            if entry.sha256 in callers:
                raise ConfigError(
                    f"keys file {path}: keys[{index}] ({entry.name!r}) has the same sha256 as key "
                    f"{callers[entry.sha256].name!r}. Give each user a key of their own.",
                    value=entry.name,
                )
            names.add(entry.name)
            quota = Quota(requests_per_minute=entry.requests_per_minute, teacher_tiles_per_minute=entry.teacher_tiles_per_minute)
            callers[entry.sha256] = Caller(name=entry.name, quota=quota)
        return cls(callers, path)

    def __len__(self) -> int:
        return len(self._callers)

    def authenticate(self, *, authorization: str | None, api_key: str | None) -> Caller:
        """Return the caller of the key in the ``Authorization`` or ``X-API-Key`` header, or raise :class:`UnauthorizedError`."""
        key = _presented_key(authorization, api_key)
        # A dict lookup by digest: its timing depends on the digest of the guess, which reveals nothing about a stored key.
        caller = self._callers.get(hash_key(key))
        if caller is None:
            raise UnauthorizedError(
                "invalid API key: it matches no key of this gateway's keys file. Check the key, or ask the "
                "gateway's operator for one."
            )
        return caller


def _presented_key(authorization: str | None, api_key: str | None) -> str:
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            # The scheme is not echoed: a client that forgot "Bearer " sent the key in its place.
            raise UnauthorizedError(
                f"the Authorization header does not use the Bearer scheme. {HOW_TO_SEND}", limit="Bearer"
            )
        if token.strip():
            return token.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    raise UnauthorizedError(f"missing API key: this gateway requires one. {HOW_TO_SEND}")


def _field_name(location: tuple[object, ...]) -> str:
    name = ""
    for part in location:
        if isinstance(part, int):
            name += f"[{part}]"
        elif name:
            name += f".{part}"
        else:
            name = str(part)
    return name or "the file"
