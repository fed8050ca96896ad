"""Settings of the student server, read from ``UNITE_STUDENT_*`` environment variables."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import load_settings

ENV_PREFIX = "UNITE_STUDENT_"
MIB = 1 << 20
GIB = 1 << 30
# The largest integer that a JavaScript number represents exactly (Number.MAX_SAFE_INTEGER), the limit of settings that the web page reads.
MAX_SAFE_INTEGER = 2**53 - 1


class StudentSettings(BaseSettings):
    """Settings of the student server: the checkpoint folder, the address, and the limits on each request.

    Every field can be set from the environment with the ``UNITE_STUDENT_`` prefix, for example
    ``UNITE_STUDENT_CHECKPOINT_DIR=/checkpoints/student``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    checkpoint_dir: Path = Field(
        default=Path("runs/student"),
        description="Folder of the exported student (model.safetensors, config.json, README.md), as `unite distill` writes it, "
        "or a publish root whose `current` link names one. The onnx runtime reads model.onnx and config.json from it instead.",
    )
    runtime: Literal["torch", "onnx"] = Field(
        default="torch",
        description="How the student runs: 'torch' loads model.safetensors with torch and timm. 'onnx' runs model.onnx "
        "(written by `unite export-onnx CHECKPOINT --out CHECKPOINT/model.onnx`) with onnxruntime and imports no torch, "
        "and teacher-space output then reads mimic_projector.safetensors with numpy.",
    )
    host: str = Field(default="127.0.0.1", description="Address to bind. Use 0.0.0.0 only inside a container.")
    port: int = Field(default=8200, ge=1, le=65535, description="TCP port to bind.")
    max_tiles_per_request: int = Field(default=256, ge=1, description="Maximum number of tiles in one POST /v1/embeddings request.")
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Maximum size of a JSON request body in bytes. 64 MiB fits 256 base64 PNG tiles of 224 px "
        "with room to spare (H&E tiles measured about 125 KB each).",
    )
    max_upload_bytes: int = Field(default=2 * GIB, ge=1, description="Maximum size of an uploaded slide file, in bytes.")
    page_tiff_slide_min_bytes: int = Field(
        default=8 * MIB,
        description="Size in bytes from which the web page sends a TIFF file as a slide (POST /v1/slides) instead of "
        "as a tile (POST /v1/embeddings/upload). PNG and JPEG files are always sent as tiles. The page's "
        "'Send files as' option overrides this. At most 9007199254740991 (2**53 - 1), the largest integer that a JavaScript number represents exactly.",
    )
    max_patches_per_slide: int = Field(
        default=100_000,
        ge=1,
        description="Maximum number of tissue patches embedded for one uploaded slide.",
    )
    upload_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "unite-student-uploads",
        description="Folder where uploaded slides are written while they arrive. A complete upload moves into its job's folder, "
        "and partial uploads older than retention_s are removed.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        description="Largest batch of tiles in one forward pass. Tiles of concurrent requests are gathered into one batch up to this size.",
    )
    max_batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="Milliseconds the batcher waits for more tiles after the first one arrives, when the batch is not full. "
        "A lone request waits at most this long.",
    )
    max_queued_tiles: int = Field(
        default=4096,
        ge=1,
        description="Tiles that may wait for the model. A request that would pass this gets 503 with Retry-After instead of queueing.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Seconds sent in the Retry-After header of a 503 when the queue is full.")
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=224 * 224,
        description="Largest tile accepted, in pixels (width x height), read from the image header before decoding.",
    )
    max_concurrent_decodes: int = Field(
        default=2,
        ge=1,
        description="Tile requests whose tiles are decoded at once; later ones wait. Each request decodes one tile "
        "at a time, and a 4096 x 4096 16-bit RGBA tile takes about 230 MB to decode.",
    )
    max_concurrent_slide_jobs: int = Field(default=1, ge=1, description="Slide jobs that run at once; later jobs wait in order.")
    max_queued_slide_jobs: int = Field(
        default=16,
        ge=0,
        description="Slide jobs that may wait to run. A submission beyond this gets 503 with Retry-After.",
    )
    data_root: Path | None = Field(
        default=None,
        description="Folder whose slides may be submitted by path (POST /v1/slides with a JSON body). Paths that resolve "
        "outside it are rejected. Unset: only uploads are accepted.",
    )
    jobs_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "unite-student-jobs",
        description="Folder of slide jobs: each job's state, upload and results. Jobs found here at start are resumed. "
        "Each server needs its own folder, because a running server locks it (server.lock) and a second server on it stops at start.",
    )
    retention_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="Seconds a finished job's upload and results are kept before they are removed.",
    )
    disk_budget_bytes: int = Field(
        default=20 * GIB,
        ge=0,
        description="Bytes the jobs folder may use. Past it, the oldest finished jobs are removed first.",
    )
    housekeeping_interval_s: float = Field(default=60.0, gt=0, description="Seconds between two housekeeping passes over the jobs folder.")
    read_workers: int = Field(default=2, ge=1, description="Threads reading a slide's tiles while the model embeds the previous batch.")
    keys_file: Path | None = Field(
        default=None,
        description="TOML file of API keys (sha256 digests, as the gateway's keys file). Unset: no key is needed.",
    )
    api_docs: Literal["open", "key", "off"] = Field(
        default="key",
        description=(
            "Access to GET /docs, /redoc and /openapi.json: 'open' to anyone, 'key' with an API key when a keys file "
            "is set (open otherwise), 'off' to serve none of them."
        ),
    )
    log_format: str = Field(default="text", pattern="^(text|json)$", description="Log lines as plain 'text' or one 'json' object per line.")
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a stopping server waits for running slide jobs to stop (they stop between batches of tiles) "
        "before it marks them to resume at the next start.",
    )
    device: str = Field(
        default="cpu",
        description="Device of the student: 'cpu', 'cuda' or 'cuda:N'. The onnx runtime maps 'cuda' to onnxruntime's "
        "CUDAExecutionProvider, which the onnxruntime-gpu package provides.",
    )
    reload_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between two checks of the checkpoint folder. A server started before `unite distill` "
        "finished becomes ready once the export appears, and a newly published export replaces the served one.",
    )

    @field_validator("page_tiff_slide_min_bytes")
    @classmethod
    def _check_page_tiff_slide_min_bytes(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                f"page_tiff_slide_min_bytes is {value}, expected a positive number of bytes. "
                f"Set UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES to 1 or more, or unset it for the default {8 * MIB} (8 MiB)."
            )
        if value > MAX_SAFE_INTEGER:
            raise ValueError(
                f"page_tiff_slide_min_bytes is {value}, expected at most {MAX_SAFE_INTEGER} bytes (2**53 - 1), because the web page "
                f"reads it as a JavaScript number and rejects larger values. Set UNITE_STUDENT_PAGE_TIFF_SLIDE_MIN_BYTES to "
                f"{MAX_SAFE_INTEGER} or less, or unset it for the default {8 * MIB} (8 MiB)."
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"device is {value!r}, expected 'cpu', 'cuda' or 'cuda:N' (N a GPU index).")
        return value


@functools.lru_cache(maxsize=1)
def get_settings() -> StudentSettings:
    """Return the student server settings read from the environment, once per process.

    Raises :class:`ConfigError` naming the environment variable of each invalid value.
    """
    return load_settings(StudentSettings, env_prefix=ENV_PREFIX, service="student server")
