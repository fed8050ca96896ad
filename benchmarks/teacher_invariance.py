"""The teacher's invariance to each candidate augmentation, measured against the cosine between different tiles.

For every real tile, the teacher embeds the tile and each transform of it: the flips, the three rotations
by 90, 180 and 270 degrees, and ``--draws`` random draws of each jitter. The figure per candidate is the
mean cosine between the tile's embedding and its transforms' embeddings. The baseline, measured on the
same embeddings, is the mean cosine between the embeddings of two different tiles, so ``1 - cosine`` of a
transform reads as a fraction of the typical distance between tiles.

A candidate qualifies for the default augmentations when its mean cosine distance to the original is at
most ``--max-relative-distance`` (default 0.1) of the between-tile distance:
``1 - cos(t, T t) <= 0.1 * (1 - mean cos(t_i, t_j))``. The threshold was fixed before the first run.

    python benchmarks/teacher_invariance.py --tiles ../shared/data/tiles/lc25000_lung_dedup

The reference teacher (the built-in teacher of the demo and the tests) needs no weights. ``--gateway URL``
measures the teacher of a running gateway instead; every transformed tile is then a new teacher request.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distiller.augment import AUGMENTATIONS, colour_jitter, hed_jitter, hflip, rot90, vflip
from shared.imaging import prepare_tile


def load_tiles(folder: Path, count: int | None) -> np.ndarray:
    """Load the JPEG tiles of ``folder`` (recursively, in name order) as prepared 224 px RGB tiles."""
    paths = sorted(folder.rglob("*.jp*g"))
    if count is not None:
        paths = paths[:count]
    if len(paths) < 2:
        raise SystemExit(f"{folder} contains {len(paths)} JPEG tiles, expected at least 2. Pass a folder of 224 px tiles.")
    return np.stack([prepare_tile(np.asarray(Image.open(path).convert("RGB"))) for path in paths])


def transform_variants(tiles: np.ndarray, draws: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Return, per candidate name, a list of transformed copies of ``tiles`` (each an (N, 224, 224, 3) array)."""
    generator = np.random.default_rng(seed)
    variants = {
        "hflip": [np.stack([hflip(tile) for tile in tiles])],
        "vflip": [np.stack([vflip(tile) for tile in tiles])],
        "rot90": [np.stack([rot90(tile, turns) for tile in tiles]) for turns in (1, 2, 3)],
        "hed_jitter": [np.stack([hed_jitter(tile, generator) for tile in tiles]) for _ in range(draws)],
        "colour_jitter": [np.stack([colour_jitter(tile, generator) for tile in tiles]) for _ in range(draws)],
    }
    missing = set(AUGMENTATIONS) - set(variants)
    if missing:
        raise SystemExit(f"no variants are defined for the candidates {sorted(missing)}. Add them to transform_variants.")
    return variants


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the cosine between row i of ``a`` and row i of ``b``, for every i."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def between_tile_cosines(embeddings: np.ndarray) -> np.ndarray:
    """Return the cosines of every pair of different tiles (upper triangle of the cosine matrix)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    return similarity[np.triu_indices(len(unit), k=1)]


def nearest_other_cosines(embeddings: np.ndarray) -> np.ndarray:
    """Return, for each tile, the cosine to its most similar other tile."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.max(axis=1)


def build_embedder(gateway: str | None):
    """Return a function that embeds an (N, 224, 224, 3) uint8 batch, and the teacher's name."""
    if gateway is None:
        from teacher_gateway.teachers.reference import ReferenceTeacher

        teacher = ReferenceTeacher()
        return teacher.embed, teacher.identity
    from teacher_gateway.client import GatewayClient

    client = GatewayClient(gateway)
    model = client.model_info().get("id", gateway)
    return (lambda tiles: client.embed(list(tiles))), f"{model} at {gateway}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, required=True, help="folder of 224 px JPEG tiles (.jpg or .jpeg, searched recursively)")
    parser.add_argument("--count", type=int, default=None, help="use the first COUNT tiles in name order (default: all)")
    parser.add_argument("--draws", type=int, default=3, help="random draws of each jitter per tile (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitters' random draws (default: 0)")
    parser.add_argument(
        "--max-relative-distance",
        type=float,
        default=0.1,
        help="largest mean cosine distance of a transform, as a fraction of the between-tile distance, "
        "for a candidate to qualify (default: 0.1)",
    )
    parser.add_argument("--gateway", default=None, help="base URL of a running gateway whose teacher to measure (default: the reference teacher, in process)")
    args = parser.parse_args()

    tiles = load_tiles(args.tiles, args.count)
    embed, teacher_name = build_embedder(args.gateway)
    started = time.perf_counter()
    original = embed(tiles)

    between = between_tile_cosines(original)
    nearest = nearest_other_cosines(original)
    baseline_distance = 1.0 - between.mean()
    threshold = 1.0 - args.max_relative_distance * baseline_distance

    rows = []
    for name, copies in transform_variants(tiles, args.draws, args.seed).items():
        cosines = np.concatenate([row_cosines(original, embed(copy)) for copy in copies])
        rows.append((name, cosines))
    elapsed = time.perf_counter() - started

    print(f"teacher {teacher_name}; {len(tiles)} tiles from {args.tiles}; {args.draws} draws per jitter; {elapsed:.0f} s")
    print(
        f"baseline: cosine between different tiles, mean {between.mean():.4f} "
        f"(5th-95th percentile {np.quantile(between, 0.05):.4f}-{np.quantile(between, 0.95):.4f})"
    )
    print(f"          cosine to each tile's most similar other tile, median {np.median(nearest):.4f}")
    print(
        f"threshold: mean cosine >= {threshold:.4f}, a distance of at most {args.max_relative_distance:g} x the between-tile distance {baseline_distance:.4f}"
    )
    print()
    print(f"{'candidate':<14} {'mean cos':>9} {'5th pct':>9} {'min':>9} {'distance / baseline':>20}  verdict")
    qualified = []
    for name, cosines in rows:
        relative = (1.0 - cosines.mean()) / baseline_distance
        passed = cosines.mean() >= threshold
        if passed:
            qualified.append(name)
        verdict = "qualifies" if passed else "rejected"
        print(f"{name:<14} {cosines.mean():9.4f} {np.quantile(cosines, 0.05):9.4f} {cosines.min():9.4f} {relative:20.3f}  {verdict}")
    print()
    print(f"default augmentations for this teacher: {qualified}")


if __name__ == "__main__":
    main()
