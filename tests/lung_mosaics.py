"""Labelled slides made of real lung tiles: mosaics of one class's LC25000 tiles written as pyramidal TIFFs.

Each mosaic lays ``rows`` x ``cols`` tiles of 224 px edge to edge, at 0.5 µm/px, inside a border of
blank glass one tile wide. The default patch grid (224 px at 0.5 µm/px from the corner) then cuts
exactly the original tiles. The TIFF is lossless (zlib), so a patch read back has the tile's pixels.

Run as a script to write the mosaics of the 90 tiles held out from distillation by benchmarks/recipes.py:
``python tests/lung_mosaics.py --held-out --out runs/lung_mosaics``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from synthetic_slides import GLASS, write_tiff_slide

TILE = 224
MPP = 0.5


def read_tile_rows(tiles_dir: Path) -> list[dict[str, str]]:
    """Return the rows of ``tiles_dir/labels.csv`` (columns path and label) in file order."""
    with (Path(tiles_dir) / "labels.csv").open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def held_out_rows(rows: list[dict[str, str]], *, test_size: float = 0.3, seed: int = 0) -> list[dict[str, str]]:
    """Return the rows that benchmarks/recipes.py holds out from training: the test side of its stratified split."""
    from sklearn.model_selection import train_test_split

    labels = [row["label"] for row in rows]
    _, held_out = train_test_split(np.arange(len(rows)), test_size=test_size, stratify=labels, random_state=seed)
    return [rows[index] for index in np.sort(held_out)]


def write_lung_mosaics(
    tiles_dir: Path, rows: list[dict[str, str]], out_dir: Path, *, rows_per_slide: int, cols_per_slide: int, slides_per_case: int = 1
) -> Path:
    """Write one mosaic TIFF per group of ``rows_per_slide * cols_per_slide`` same-class tiles and return the labels CSV.

    Tiles of each class are taken in the order of ``rows``, and a class's remaining tiles that do not
    fill a mosaic are left out. Consecutive mosaics of a class share a case, ``slides_per_case`` at a
    time. The CSV ``out_dir/labels.csv`` has columns slide_id, case_id and label, and
    ``out_dir/tiles.csv`` maps each tile to its slide and level-0 corner.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_slide = rows_per_slide * cols_per_slide
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row["path"])

    labels, tiles = [], []
    for label, paths in sorted(by_class.items()):
        for slide_index in range(len(paths) // per_slide):
            slide_id = f"{label}-{slide_index:02d}"
            case_id = f"{label}-case{slide_index // slides_per_case:02d}"
            image = np.empty(((rows_per_slide + 2) * TILE, (cols_per_slide + 2) * TILE, 3), dtype=np.uint8)
            image[:] = GLASS
            for position, path in enumerate(paths[slide_index * per_slide : (slide_index + 1) * per_slide]):
                row, col = divmod(position, cols_per_slide)
                x, y = (col + 1) * TILE, (row + 1) * TILE
                tile = np.asarray(Image.open(Path(tiles_dir) / path).convert("RGB"))
                if tile.shape != (TILE, TILE, 3):
                    raise ValueError(f"tile {path} has shape {tile.shape}, expected ({TILE}, {TILE}, 3).")
                image[y : y + TILE, x : x + TILE] = tile
                tiles.append({"path": path, "slide_id": slide_id, "x": x, "y": y, "label": label})
            write_tiff_slide(out_dir / f"{slide_id}.tiff", image, mpp=MPP, tile=256, levels=2, compression="zlib")
            labels.append({"slide_id": slide_id, "case_id": case_id, "label": label})

    for name, table in (("labels.csv", labels), ("tiles.csv", tiles)):
        with (out_dir / name).open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return out_dir / "labels.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description="Write labelled mosaic slides of LC25000 lung tiles, with labels.csv and tiles.csv.")
    parser.add_argument("--tiles", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles" / "lc25000_lung_dedup")
    parser.add_argument("--out", type=Path, required=True, help="folder for the TIFF slides and the CSV files")
    parser.add_argument("--held-out", action="store_true", help="use only the 30%% of tiles that benchmarks/recipes.py holds out (seed 0)")
    parser.add_argument("--rows", type=int, default=1, help="tile rows per mosaic (default: 1)")
    parser.add_argument("--cols", type=int, default=3, help="tile columns per mosaic (default: 3)")
    args = parser.parse_args()

    rows = read_tile_rows(args.tiles)
    if args.held_out:
        rows = held_out_rows(rows)
    print(write_lung_mosaics(args.tiles, rows, args.out, rows_per_slide=args.rows, cols_per_slide=args.cols))


if __name__ == "__main__":
    main()
