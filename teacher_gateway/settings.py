"""Settings of the teacher gateway, read from ``UNITE_GATEWAY_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import load_settings
from teacher_gateway.teachers.remote_config import RemoteTeacherConfig

ENV_PREFIX = "UNITE_GATEWAY_"


class GatewaySettings(BaseSettings):
    """Gateway settings: the cache folder, the served teacher, the listening address, the request limits,
    the teacher's budget, API keys, metrics and the canary drift check.

    Nested settings use ``__``, for example ``UNITE_GATEWAY_REMOTE__URL``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", env_nested_delimiter="__")

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
    max_teacher_requests: int = Field(
        default=32,
        ge=1,
        le=1024,
        description=(
            "Maximum number of embedding requests that may wait on the teacher at once, calling it or waiting for "
            "another request's call. One more gets 503 gateway_busy with Retry-After, so requests served from the "
            "cache, health checks and metrics keep working while the teacher is slow."
        ),
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description=(
            "Seconds that a stopping gateway (SIGTERM or SIGINT) waits for requests in progress before it cancels them "
            "and the teacher calls they wait on."
        ),
    )
    api_docs: Literal["open", "key", "off"] = Field(
        default="key",
        description=(
            "Access to GET /docs, /redoc and /openapi.json: 'open' to anyone, 'key' with an API key when a keys file "
            "is set (open otherwise), 'off' to serve none of them."
        ),
    )
    remote: RemoteTeacherConfig | None = Field(
        default=None,
        description="Settings of the remote teacher (teacher 'remote'), nested: UNITE_GATEWAY_REMOTE__URL and so on.",
    )
    weights: Path | None = Field(
        default=None, description="Weights file of a local teacher (uni2-h, timm, onnx): safetensors, .bin/.pth or .onnx."
    )
    model_name: str | None = Field(default=None, description="timm model name of the 'timm' teacher, such as vit_small_patch16_224.")
    model_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra keyword arguments of timm.create_model for the 'timm' teacher, as a JSON object."
    )
    device: str | None = Field(default=None, description="Device of a local teacher: auto, cpu, cuda or cuda:N (backend default: auto).")
    batch_size: int | None = Field(
        default=None, ge=1, description="Tiles per forward pass of a local teacher (backend default: 32)."
    )
    precision: str | None = Field(default=None, description="Precision of a torch teacher: bf16 (autocast) or fp32 (backend default: bf16).")
    input_name: str | None = Field(default=None, description="Input name of the 'onnx' teacher's model, when it has several.")
    output_name: str | None = Field(default=None, description="Output name of the 'onnx' teacher's model that contains the embedding.")
    input_size: int | None = Field(default=None, ge=1, description="Side in pixels of the model input of a timm or ONNX teacher.")
    resize_size: int | None = Field(
        default=None, ge=1, description="Side in pixels that tiles are resized to before the centre crop, for a timm or ONNX teacher."
    )
    interpolation: str | None = Field(default=None, description="Resize interpolation of a timm or ONNX teacher, such as bicubic.")
    mean: tuple[float, float, float] | None = Field(
        default=None, description="Per-channel RGB mean of a timm or ONNX teacher's normalisation, in [0, 1], as a JSON list."
    )
    std: tuple[float, float, float] | None = Field(
        default=None, description="Per-channel RGB standard deviation of a timm or ONNX teacher's normalisation, as a JSON list."
    )
    licence: str | None = Field(
        default=None, description="Licence and terms of a timm or ONNX teacher's weights, recorded in shards and model cards."
    )
    budget_tiles: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Maximum number of tiles the served teacher identity may ever be sent, counted over every gateway "
            "process sharing the cache folder and across restarts; unset means no limit."
        ),
    )
    budget_calls: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Maximum number of teacher calls (one per batch of the teacher's maximum batch size) the served teacher "
            "identity may ever be sent, counted like budget_tiles; unset means no limit."
        ),
    )
    keys_file: Path | None = Field(
        default=None,
        description="TOML file of API keys (sha256 digests, names, per-key quotas); unset means no keys are required.",
    )
    metrics: Literal["open", "key", "off"] = Field(
        default="key",
        description=(
            "Access to GET /metrics: 'open' to anyone, 'key' with an API key when a keys file is set "
            "(open otherwise), 'off' to serve no metrics."
        ),
    )
    canary_tiles: int = Field(
        default=8,
        ge=0,
        description="Number of cached tiles the drift check re-embeds at start and on schedule; 0 turns the check off.",
    )
    canary_interval_minutes: float = Field(
        default=60.0,
        ge=0,
        description="Minutes between drift checks after the one at start; 0 checks at start only.",
    )
    canary_min_cosine: float = Field(
        default=0.98,
        ge=-1.0,
        le=1.0,
        description=(
            "Smallest cosine similarity between a canary tile's new and cached embedding before the teacher "
            "counts as changed and the gateway stops calling it."
        ),
    )


@lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    """Return the gateway settings read from the environment, once per process.

    Raises :class:`ConfigError` naming the environment variable of each invalid value.
    """
    return load_settings(GatewaySettings, env_prefix=ENV_PREFIX, service="gateway")
