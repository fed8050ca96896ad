"""The dry run of ``unite teach``: tile the slides and ask the gateway what filling its cache would cost.

Nothing is sent to the teacher and nothing is charged: every distinct tile goes once to the gateway's
``POST /v1/embeddings/dry-run``, which looks it up in the cache. Tiles repeated across the slides are
counted once, because the cache keys them by their pixels and the teacher's identity, which this
module computes as the gateway does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.cache import EmbeddingCache
from shared.errors import SlideError
from shared.imaging import prepare_tile
from shared.slides.resolution import MppTable
from shared.slides.sources import SlideSource
from shared.slides.tile_job import TileOptions
from teacher_gateway.client import GatewayClient
from unite_cli.pipeline import (
    PatchFileError,
    SlideFailure,
    check_is_gateway,
    format_failures,
    iter_slide_tiles,
    plural,
    slide_patches,
    teach_sources,
)

logger = logging.getLogger(__name__)


@dataclass
class TeachPlan:
    """The cost of ``unite teach`` now, with the same slides, options and batch size.

    ``teacher_calls`` is summed per batch of ``batch_size`` tiles, as the gateway charges a real run.
    ``budget`` is the gateway's budget report: per unit (tiles, calls) its ``limit``, ``spent`` and ``left``.
    ``failed`` lists the slides that could not be tiled or read, which a real run would skip too.
    """

    teacher: str = ""
    slides: int = 0
    failed: list[SlideFailure] = field(default_factory=list)
    tiles: int = 0
    distinct_tiles: int = 0
    cache_hits: int = 0
    tiles_to_embed: int = 0
    teacher_calls: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    teacher_blocked: bool = False

    @property
    def within_budget(self) -> bool:
        """Whether the budget left covers the tiles and calls to pay for."""
        for unit, needed in (("tiles", self.tiles_to_embed), ("calls", self.teacher_calls)):
            left = self.budget.get(unit, {}).get("left")
            if left is not None and left < needed:
                return False
        return True

    @property
    def exit_status(self) -> int:
        """0 when every slide could be tiled, 1 when any failed."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """Describe the plan in a few lines for the console, then the failed slides."""
        lines = [
            f"dry run against teacher {self.teacher}: nothing was sent to the teacher or charged",
            f"  slides                 {self.slides} ({len(self.failed)} failed)",
            f"  tiles                  {self.tiles} ({self.distinct_tiles} distinct)",
            f"  in the cache           {plural(self.cache_hits, 'distinct tile')}",
            f"  to pay for             {plural(self.tiles_to_embed, 'tile')} in {plural(self.teacher_calls, 'teacher call')}",
        ]
        for unit in ("tiles", "calls"):
            status = self.budget.get(unit, {})
            if status.get("limit") is None:
                lines.append(f"  budget ({unit:5})        no limit ({status.get('spent', 0)} spent)")
            else:
                lines.append(f"  budget ({unit:5})        {status['left']} left of {status['limit']}")
        if self.teacher_blocked:
            lines.append("  the gateway has blocked this teacher after a failed canary check; GET /readyz says why")
        elif not self.within_budget:
            lines.append("  the budget left does not cover this run: it would stop when the budget runs out")
        lines.extend(format_failures(self.failed))
        return "\n".join(lines)


def plan_teach(
    slides: Iterable[SlideSource | str | Path],
    *,
    gateway_url: str,
    options: TileOptions | None = None,
    mpp: float | None = None,
    mpp_table: MppTable | None = None,
    patches_dir: Path | None = None,
    batch_size: int = 64,
) -> TeachPlan:
    """Tile ``slides`` and return what sending their tiles through the gateway at ``gateway_url`` would cost.

    The slides, ``options``, resolution overrides and ``patches_dir`` are those of
    :func:`unite_cli.pipeline.teach_slides`, and a slide that cannot be tiled or read is recorded in
    ``failed``. Raises :class:`ConfigError` before any slide is tiled when ``gateway_url`` is not a
    teacher gateway.
    """
    options = options if options is not None else TileOptions()
    sources = teach_sources(slides, options, mpp=mpp, mpp_table=mpp_table)
    plan = TeachPlan()
    seen: set[str] = set()
    with GatewayClient(gateway_url, batch_size=batch_size) as client:
        check_is_gateway(client)
        plan.teacher = client.model_info()["identity"]

        for source in sources:
            try:
                patches = slide_patches(source, options, patches_dir)
                for _slide_id, _coords, tiles in iter_slide_tiles(patches, batch_size):
                    plan.tiles += len(tiles)
                    distinct = []
                    for tile in tiles:
                        prepared = prepare_tile(tile)
                        key = EmbeddingCache.tile_key(prepared, plan.teacher)
                        if key not in seen:
                            seen.add(key)
                            distinct.append(prepared)
                    if not distinct:
                        continue
                    result = client.dry_run(distinct)
                    plan.cache_hits += result["cache_hits"]
                    plan.tiles_to_embed += result["tiles_to_embed"]
                    plan.teacher_calls += result["teacher_calls"]
                    plan.budget = result["budget"]
                    plan.teacher_blocked = result["teacher_blocked"]
            except (SlideError, PatchFileError) as error:
                logger.error("unite teach --dry-run: slide %s failed: %s", source.path, error.message)
                plan.failed.append(SlideFailure.from_error(source, error))
                continue
            plan.slides += 1
        plan.distinct_tiles = len(seen)
        if not plan.budget:
            # No distinct tile at all: the budget still comes from the gateway, for the report.
            plan.budget = client.usage()["budget"]
    logger.info("dry run: %s to pay for, %d cached", plural(plan.tiles_to_embed, "tile"), plan.cache_hits)
    return plan
