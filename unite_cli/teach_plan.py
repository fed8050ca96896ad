"""The dry run of ``unite teach``: tile the slides and ask the gateway what filling its cache would cost.

Nothing is sent to the teacher and nothing is charged: every distinct tile goes once to the gateway's
``POST /v1/embeddings/dry-run``, which looks it up in the cache. Tiles repeated across the slides are
counted once, because the cache keys them by their pixels and the teacher's identity, which this
module computes as the gateway does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.cache import EmbeddingCache
from shared.imaging import prepare_tile
from shared.slides.reader import open_slide
from shared.slides.tiling import iter_tiles, tile_slide
from teacher_gateway.client import GatewayClient
from unite_cli.pipeline import check_is_gateway

logger = logging.getLogger(__name__)


@dataclass
class TeachPlan:
    """The cost of ``unite teach`` now, with the same slides, options and batch size.

    ``teacher_calls`` is summed per batch of ``batch_size`` tiles, as the gateway charges a real run.
    ``budget`` is the gateway's budget report: per unit (tiles, calls) its ``limit``, ``spent`` and ``left``.
    """

    teacher: str = ""
    slides: int = 0
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

    def summary(self) -> str:
        """Describe the plan in a few lines for the console."""
        lines = [
            f"dry run against teacher {self.teacher}: nothing was sent to the teacher or charged",
            f"  slides                 {self.slides}",
            f"  tiles                  {self.tiles} ({self.distinct_tiles} distinct)",
            f"  in the cache           {self.cache_hits} distinct tiles",
            f"  to pay for             {self.tiles_to_embed} tiles in {self.teacher_calls} teacher calls",
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
        return "\n".join(lines)


def plan_teach(
    slides: list[Path],
    *,
    gateway_url: str,
    mpp: float | None = None,
    patch_size: int = 224,
    target_mpp: float = 0.5,
    batch_size: int = 64,
) -> TeachPlan:
    """Tile ``slides`` and return what sending their tiles through the gateway at ``gateway_url`` would cost.

    Raises :class:`ConfigError` before any slide is tiled when ``gateway_url`` is not a teacher gateway.
    """
    plan = TeachPlan()
    seen: set[str] = set()
    with GatewayClient(gateway_url, batch_size=batch_size) as client:
        check_is_gateway(client)
        plan.teacher = client.model_info()["identity"]

        for path in slides:
            tiled = tile_slide(path, mpp=mpp, patch_size=patch_size, target_mpp=target_mpp)
            plan.slides += 1
            with open_slide(path, mpp=mpp) as slide:
                for _coords, tiles in iter_tiles(slide, tiled.grid, batch_size=batch_size):
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
        plan.distinct_tiles = len(seen)
        if not plan.budget:
            # No distinct tile at all: the budget still comes from the gateway, for the report.
            plan.budget = client.usage()["budget"]
    logger.info("dry run: %d tiles to pay for, %d cached", plan.tiles_to_embed, plan.cache_hits)
    return plan
