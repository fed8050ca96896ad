"""Settings of the teacher gateway, read from ``UNITE_GATEWAY_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import load_settings

ENV_PREFIX = "UNITE_GATEWAY_"


class GatewaySettings(BaseSettings):
    """Gateway settings: the cache folder, the served teacher, the listening address and the request limits."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    cache_dir: Path = Field(
        default=Path("runs/cache"),
        description="Folder of the embedding cache (embeddings.sqlite3); must be on a local file system.",
    )
    teacher: str = Field(default="reference", min_length=1, description="Registry name of the teacher backend to serve.")
    host: str = Field(default="127.0.0.1", description="Address to listen on; 127.0.0.1 keeps the gateway local.")
    port: int = Field(default=8100, ge=1, le=65535, description="TCP port to listen on.")
    max_tiles_per_request: int = Field(
        default=256, ge=1, description="Maximum number of tiles in one POST /v1/embeddings request."
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description=(
            "Maximum size of a request body in bytes. The default fits 256 base64 PNG tiles of 224 px "
            "even when PNG cannot compress them (about 200 KB each)."
        ),
    )


@lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    """Return the gateway settings read from the environment, once per process.

    Raises :class:`ConfigError` naming the environment variable of each invalid value.
    """
    return load_settings(GatewaySettings, env_prefix=ENV_PREFIX, service="gateway")
