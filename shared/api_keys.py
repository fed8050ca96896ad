"""API keys files shared by the teacher gateway and the student server: sha256 digests, names and quotas.

A keys file is TOML, one ``[[keys]]`` table per key::

    [[keys]]
    name = "lab-a"                    # shown in logs and metrics, never the key
    sha256 = "<64 lowercase hex digits>"  # printf %s "$KEY" | sha256sum
    requests_per_minute = 600         # optional, read by the gateway only
    teacher_tiles_per_minute = 20000  # optional, read by the gateway only

The same file works for both services, so a lab can hand one key to a user for both. A request sends
its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The services keep and compare only
digests, so the file contains no key, and no key is ever logged or put in an error message.

The digest is over the bytes of the header value, so a key with non-ASCII characters matches when the
client sends it as UTF-8, as ``printf %s "$KEY" | sha256sum`` hashes it in a UTF-8 locale. Browsers send
header values as Latin-1 instead, so give keys ASCII characters only (``openssl rand -hex 32`` makes one).
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from shared.errors import ConfigError, UniteError

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
    """Return the sha256 hex digest of ``key``'s UTF-8 bytes, the form the keys file stores.

    Bytes that :func:`presented_key` kept as surrogate escapes are hashed as the bytes the client sent.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def read_keys_file(path: Path, *, setting: str, reserved_names: frozenset[str] = frozenset()) -> dict[str, KeyEntry]:
    """Read and check the keys file at ``path`` and return its entries by sha256 digest.

    ``setting`` is the environment variable that names the file, quoted in errors. Names in
    ``reserved_names`` are rejected. Raises :class:`ConfigError` naming the file, the entry and the fix.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(
            f"keys file {path} ({setting}) not found. Create it (see docs/gateway.md) or unset the setting "
            "to run without API keys.",
            value=str(path),
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"keys file {path} ({setting}) cannot be read ({error}).", value=str(path)) from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"keys file {path} ({setting}) is not valid TOML: {error}.", value=str(path)) from error

    try:
        parsed = KeysFile.model_validate(document)
    except ValidationError as error:
        # Only the field and pydantic's message: the input could be a key pasted in the wrong field.
        problems = "; ".join(_field_name(item["loc"]) + ": " + item["msg"] for item in error.errors())
        raise ConfigError(
            f"keys file {path} ({setting}) is invalid: {problems}. Each [[keys]] table needs a name "
            "(letters, digits, '.', '_', '@', '-') and the sha256 hex digest of the key, never the key itself.",
            value=str(path),
        ) from error

    entries: dict[str, KeyEntry] = {}
    names: set[str] = set()
    for index, entry in enumerate(parsed.keys):
        if entry.name in reserved_names or entry.name in names:
            reason = "is reserved by the service" if entry.name in reserved_names else "is used by an earlier key"
            raise ConfigError(
                f"keys file {path}: keys[{index}].name {entry.name!r} {reason}. Give each key its own name.",
                value=entry.name,
            )
        if entry.sha256 in entries:
            raise ConfigError(
                f"keys file {path}: keys[{index}] ({entry.name!r}) has the same sha256 as key "
                f"{entries[entry.sha256].name!r}. Give each user a key of their own.",
                value=entry.name,
            )
        names.add(entry.name)
        entries[entry.sha256] = entry
    return entries


def presented_key(authorization: str | None, api_key: str | None, *, unauthorized: type[UniteError], service: str) -> str:
    """Return the key sent in the ``Authorization`` (Bearer) or ``X-API-Key`` header.

    Raises ``unauthorized`` (the service's 401 error class) when no key was sent or the Authorization
    header uses another scheme. ``service`` names the service in the message, as in "this gateway".
    The key is returned as the UTF-8 text of the header's bytes (see :func:`_header_text`).
    """
    authorization = _header_text(authorization)
    api_key = _header_text(api_key)
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            # The scheme is not echoed: a client that forgot "Bearer " sent the key in its place.
            raise unauthorized(f"the Authorization header does not use the Bearer scheme. {HOW_TO_SEND}", limit="Bearer")
        if token.strip():
            return token.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    raise unauthorized(f"missing API key: this {service} requires one. {HOW_TO_SEND}")


def _header_text(value: str | None) -> str | None:
    """Return a header value as the UTF-8 text of the bytes the client sent.

    Starlette decodes header bytes as Latin-1, so encoding the value as Latin-1 restores the bytes.
    Bytes that are not UTF-8 become surrogate escapes, which :func:`hash_key` turns back into those bytes.
    A value with characters outside Latin-1 did not come from a header and is returned unchanged.
    """
    if value is None:
        return None
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return value
    return raw.decode("utf-8", "surrogateescape")


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
