"""Slide-level steps shared by ``unite tile``, ``unite teach`` and ``unite demo``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shared.cache import EmbeddingCache
from shared.errors import ConfigError
from shared.protocol import GATEWAY_SERVICE
from shared.slides.reader import open_slide
from shared.slides.tiling import TiledSlide, iter_tiles, tile_slide, write_patch_file
from teacher_gateway.client import GatewayClient
from teacher_gateway.export import export_shards

logger = logging.getLogger(__name__)


def tile_to_patch_files(
    slides: list[Path], out_dir: Path, *, mpp: float | None, patch_size: int, target_mpp: float
) -> list[Path]:
    """Tile each slide and write its TRIDENT-layout patch file to ``out_dir/patches/NAME_patches.h5``."""
    paths = []
    for slide in slides:
        tiled = tile_slide(slide, mpp=mpp, patch_size=patch_size, target_mpp=target_mpp)
        paths.append(write_patch_file(Path(out_dir) / "patches" / f"{tiled.info.name}_patches.h5", tiled))
    return paths


@dataclass
class TeachResult:
    """Summary of a ``teach_slides`` run: tiles sent, tiles the teacher embedded, and the shards written."""

    tiled: list[TiledSlide] = field(default_factory=list)
    tiles: int = 0
    cache_hits: int = 0
    teacher_tiles: int = 0
    shards: list[Path] = field(default_factory=list)
    teacher: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        """Describe the run in one line for the console."""
        return (
            f"{len(self.tiled)} slide(s), {self.tiles} tiles sent to the gateway: {self.cache_hits} from its cache, "
            f"{self.teacher_tiles} embedded by {self.teacher}; {len(self.shards)} training shard(s) written "
            f"in {self.seconds:.1f} s"
        )


def check_is_gateway(client: GatewayClient) -> None:
    """Raise :class:`ConfigError` unless ``GET /v1/models`` at ``client.base_url`` names the teacher-gateway service.

    The student server speaks the same embeddings protocol, so without this check ``unite teach`` would
    send every tile to it and fail only at the export, because the student fills no cache.
    """
    service = client.service()
    if service == GATEWAY_SERVICE:
        return
    found = f"names the service {service!r}" if service is not None else "names no service"
    raise ConfigError(
        f"--gateway {client.base_url} is not a UNITE teacher gateway: its GET /v1/models response {found}, "
        f"expected {GATEWAY_SERVICE!r}. Point --gateway at the URL of `unite serve-gateway` "
        "(by default http://127.0.0.1:8100), not at the student server.",
        limit=GATEWAY_SERVICE,
        value=service,
    )


def teach_slides(
    slides: list[Path],
    *,
    gateway_url: str,
    cache_dir: Path,
    shard_dir: Path,
    mpp: float | None = None,
    patch_size: int = 224,
    target_mpp: float = 0.5,
    batch_size: int = 64,
) -> TeachResult:
    """Send every tissue tile of ``slides`` through the gateway's HTTP API, then export training shards.

    Tiles travel with their pseudonymous slide id, level-0 coordinates and resolution, never the file
    name, so the cache and the shards can be split by slide. The shards are exported from the
    gateway's cache folder, which this process opens read-mostly beside the running gateway.
    Raises :class:`ConfigError` before any slide is tiled when ``gateway_url`` is not a teacher gateway.
    """
    started = time.perf_counter()
    result = TeachResult()
    with GatewayClient(gateway_url) as client:
        check_is_gateway(client)
        model = client.model_info()
        result.teacher = model["identity"]

        for path in slides:
            tiled = tile_slide(path, mpp=mpp, patch_size=patch_size, target_mpp=target_mpp)
            result.tiled.append(tiled)
            with open_slide(path, mpp=mpp) as slide, tqdm(
                total=len(tiled.grid.coords), desc=f"teacher {tiled.info.slide_id}", unit="tile"
            ) as bar:
                for coords, tiles in iter_tiles(slide, tiled.grid, batch_size=batch_size):
                    usage = client.embed_with_usage(
                        list(tiles), slide_id=tiled.info.slide_id, coords=coords.tolist(), mpp=tiled.grid.target_mpp
                    )[1]
                    result.tiles += len(tiles)
                    result.cache_hits += int(usage.get("cache_hits", 0))
                    bar.update(len(tiles))
    result.teacher_tiles = result.tiles - result.cache_hits

    with EmbeddingCache(cache_dir) as cache:
        result.shards = export_shards(cache, model["identity"], model["licence"], shard_dir)
    result.seconds = time.perf_counter() - started
    logger.info("%s", result.summary())
    return result
