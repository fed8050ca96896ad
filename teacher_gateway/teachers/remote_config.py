"""Settings of one remote teacher: :class:`RemoteTeacherConfig`, checked when it is built.

The validators reject settings that cannot work, such as a URL without a host or a rate limit smaller than
one full batch. They also reject settings that would leak the API key: credentials in the URL, or the key
sent over plain http to another host. Each message names the setting and how to fix it.
"""

from __future__ import annotations

import re

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teacher_gateway.teachers.adapters import AdapterConfig
from teacher_gateway.teachers.rate_limit import divides_minute, per_window_limit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# Upper bound of every timeout setting, in seconds: one hour. It also rejects inf, so every wait ends.
MAX_TIMEOUT_S = 3600.0
# An HTTP field name is a "token" (RFC 9110, section 5.1).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class RemoteTeacherConfig(BaseModel):
    """Settings of one remote teacher: endpoint, model, key, timeouts, batching, limits, retries and adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        description="Full URL of the provider's embeddings endpoint, for example https://embeddings.example.org/v1/embeddings."
    )
    model: str = Field(
        min_length=1,
        description="Model name sent in each request; a response that declares another model is rejected.",
    )
    dim: int = Field(ge=1, description="Length of the provider's embedding vectors.")
    licence: str = Field(
        min_length=1, description="Licence and terms of use of the provider's outputs, recorded in shards and model cards."
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key, read once at start; None sends no key.",
    )
    auth_header: str = Field(default="Authorization", description="HTTP header that carries the API key.")
    auth_scheme: str | None = Field(
        default="Bearer", description="Word before the key in the auth header; None or '' sends the bare key."
    )
    allow_insecure_http: bool = Field(
        default=False, description="Allow sending the API key over plain http:// to a host other than this machine."
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, le=MAX_TIMEOUT_S, description="Seconds to wait for a connection to the provider; finite."
    )
    read_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Seconds to wait for each read (and write) of the response or request; finite.",
    )
    total_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description=(
            "Seconds one attempt may take in all: connecting, sending the request and reading the whole response. "
            "A provider that sends its response slowly, a few bytes at a time, is cut off here."
        ),
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Maximum size in bytes of one response body; a larger response ends the batch without a retry.",
    )
    max_batch_size: int = Field(default=64, ge=1, description="Maximum number of tiles in one request.")
    max_concurrency: int = Field(default=4, ge=1, description="Maximum number of requests in flight at once.")
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Maximum requests per minute, retries included; None for no limit."
    )
    tiles_per_minute: int | None = Field(
        default=None, ge=1, description="Maximum tiles sent per minute, retries included; None for no limit."
    )
    rate_window_s: float = Field(
        default=60.0,
        gt=0,
        le=60,
        description="Window in seconds over which the per-minute limits, scaled down, are held; must divide 60.",
    )
    max_attempts: int = Field(default=5, ge=1, description="Attempts per batch, the first one included.")
    backoff_base_s: float = Field(default=0.5, gt=0, description="Seconds of the first backoff window before a retry.")
    backoff_cap_s: float = Field(default=30.0, gt=0, description="Maximum backoff in seconds between two attempts.")
    max_retry_after_s: float = Field(
        default=120.0, gt=0, description="Longest Retry-After in seconds that is waited for; a longer one ends the batch."
    )
    idempotency_header: str | None = Field(
        default="Idempotency-Key", description="Header that carries each batch's id on all its attempts; None sends none."
    )
    adapter: AdapterConfig = Field(
        default_factory=AdapterConfig, description="Request and response shape; the default is UNITE's protocol."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as error:
            raise ValueError(f"url is not a valid URL ({error}); expected an http:// or https:// URL") from error
        if url.userinfo:
            # The URL is not repeated here, because its user info may contain a password.
            raise ValueError(
                "url contains a user name or password, which would be logged as part of the teacher identity. "
                "Remove them and put the key in the environment variable named by api_key_env"
            )
        if url.query or "?" in value:
            # Not repeated either: vendors that take the key as ?key= or ?api_key= put it here.
            raise ValueError(
                "url contains a query string ('?...'), which would be logged and shown as part of the teacher "
                "identity, and may hold an API key. Remove it. For a provider that takes its key in the query, "
                "use its header form instead: put the key in the environment variable named by api_key_env and "
                "set auth_header (for example x-goog-api-key) with auth_scheme empty"
            )
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"url {value!r} is not an absolute http:// or https:// URL with a host; expected the full endpoint, "
                "such as https://embeddings.example.org/v1/embeddings"
            )
        if url.fragment or "#" in value:
            raise ValueError(f"url {value!r} contains '#', which the teacher identity uses as a separator; remove it")
        return value

    @field_validator("auth_header", "idempotency_header")
    @classmethod
    def _check_header_name(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_NAME.match(value):
            raise ValueError(f"header name {value!r} is not a valid HTTP field name; expected letters, digits and '-'")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> RemoteTeacherConfig:
        url = httpx.URL(self.url)
        sends_key_in_clear = self.api_key_env and url.scheme == "http" and url.host not in LOOPBACK_HOSTS
        if sends_key_in_clear and not self.allow_insecure_http:
            raise ValueError(
                f"url {self.url!r} uses plain http to {url.host}, so the API key from {self.api_key_env} would travel "
                "unencrypted. Use https, or set allow_insecure_http to true on a network you trust"
            )
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_cap_s ({self.backoff_cap_s:g} s) is smaller than backoff_base_s ({self.backoff_base_s:g} s); "
                "expected a cap at least as large as the first backoff"
            )
        if not divides_minute(self.rate_window_s):
            raise ValueError(
                f"rate_window_s is {self.rate_window_s:g} s, expected a window that divides 60 s "
                "(such as 60, 10, 1 or 0.5), so that holding the limits in every window holds them in every minute"
            )
        requests_per_window = per_window_limit(self.requests_per_minute, self.rate_window_s)
        if requests_per_window is not None and requests_per_window < 1:
            raise ValueError(
                f"requests_per_minute = {self.requests_per_minute} allows no request in a window of "
                f"{self.rate_window_s:g} s; raise rate_window_s to 60"
            )
        tiles_per_window = per_window_limit(self.tiles_per_minute, self.rate_window_s)
        if tiles_per_window is not None and tiles_per_window < self.max_batch_size:
            raise ValueError(
                f"tiles_per_minute = {self.tiles_per_minute} allows {tiles_per_window} tiles per window of "
                f"{self.rate_window_s:g} s, fewer than max_batch_size = {self.max_batch_size}, so a full batch could "
                "never be sent. Lower max_batch_size or raise rate_window_s"
            )
        return self

    @property
    def identity(self) -> str:
        """The cache identity of the teacher: ``remote:<url>#<model>``."""
        return f"remote:{self.url}#{self.model}"
