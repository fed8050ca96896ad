"""Loader-only throughput of the training data path against the throughput of training steps, in the same run.

Real tiles are embedded by the reference teacher and written as training shards in a temporary folder.
The baseline is the training step alone: forward, default loss, backward and AdamW step of the student
under bf16 autocast on batches already in memory. Then the training loader (ShardDataset with the
default augmentations, EpochSampler, ResumableLoader) is timed over one epoch for each worker count,
without the model. A ratio well above 1 means the loader outpaces training, so the model is the bottleneck.

    python benchmarks/loader.py --tiles ../shared/data/tiles/lc25000_lung_dedup
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distiller.augment import DEFAULT_AUGMENTATIONS, build_augmentation
from distiller.data import ShardDataset
from distiller.loader import EpochSampler, ResumableLoader, loader_options
from distiller.loss import build_loss
from distiller.module import DistillModule
from shared.imaging import prepare_tile, to_model_input
from shared.models.student import build_student, embedding_dim
from shared.shards import list_shards, shard_name, write_shard


def load_tiles(folder: Path, count: int) -> np.ndarray:
    """Load the first ``count`` JPEG tiles of ``folder`` (recursively, in name order) as prepared 224 px RGB tiles."""
    paths = sorted(folder.rglob("*.jp*g"))[:count]
    if len(paths) < count:
        raise SystemExit(f"{folder} contains {len(paths)} JPEG tiles, expected at least {count}. Pass a larger folder or a smaller --count.")
    return np.stack([prepare_tile(np.asarray(Image.open(path).convert("RGB"))) for path in paths])


def write_reference_shards(tiles: np.ndarray, folder: Path, shard_size: int) -> None:
    """Embed ``tiles`` with the reference teacher and write them as shards of ``shard_size`` tiles."""
    from teacher_gateway.teachers.reference import ReferenceTeacher

    teacher = ReferenceTeacher()
    embeddings = teacher.embed(tiles)
    for index, start in enumerate(range(0, len(tiles), shard_size)):
        rows = slice(start, start + shard_size)
        write_shard(folder / shard_name(index), tiles=tiles[rows], embeddings=embeddings[rows], teacher=teacher.identity, teacher_licence=teacher.licence)


def training_tiles_per_second(student_name: str, batch: tuple[torch.Tensor, torch.Tensor], steps: int, device: str) -> float:
    """Time ``steps`` training steps on one in-memory batch after one warm-up step; return tiles per second."""
    images, targets = (tensor.to(device) for tensor in batch)
    torch.manual_seed(0)
    student = build_student(student_name)
    loss = build_loss(student_dim=embedding_dim(student), teacher_dim=targets.shape[1])
    module = DistillModule(student, loss, warmup_steps=0, total_steps=steps + 1).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-4)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            value, _ = module.loss(module.embed(images), targets)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - started)


def loader_tiles_per_second(folder: Path, batch_size: int, workers: int, augmentations: list[str]) -> float:
    """Time one epoch of the training loader after its first batch (worker start-up excluded); return tiles per second."""
    shards = list_shards(folder)
    size = sum(info.length for info in shards)
    dataset = ShardDataset(shards, np.arange(size), augmentation=build_augmentation(augmentations))
    loader = ResumableLoader(dataset, sampler=EpochSampler(size, seed=0, shuffle=True), batch_size=batch_size, **loader_options(workers))
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    count = sum(len(images) for images, _ in iterator)
    elapsed = time.perf_counter() - started
    dataset.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, required=True, help="folder of 224 px JPEG tiles (.jpg or .jpeg, searched recursively)")
    parser.add_argument("--count", type=int, default=288, help="tiles written to the shards (default: 288)")
    parser.add_argument("--batch-size", type=int, default=32, help="tiles per batch, for the loader and the training step (default: 32)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (default: 3)")
    parser.add_argument("--workers", default="0,2", help="comma-separated loader worker counts to time (default: 0,2)")
    parser.add_argument("--student", default="unite", help="student of the training step (default: unite)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the training step: cpu or cuda (default: cuda if available)"
    )
    args = parser.parse_args()

    tiles = load_tiles(args.tiles, args.count)
    worker_counts = [int(value) for value in args.workers.split(",")]
    augmentations = list(DEFAULT_AUGMENTATIONS)
    with tempfile.TemporaryDirectory(prefix="unite-loader-") as folder:
        write_reference_shards(tiles, Path(folder), shard_size=128)
        shards = list_shards(Path(folder))
        dataset = ShardDataset(shards, np.arange(args.batch_size))
        batch = (torch.from_numpy(to_model_input(tiles[: args.batch_size])), torch.stack([dataset[item][1] for item in range(args.batch_size)]))
        dataset.close()

        training_rate = training_tiles_per_second(args.student, batch, args.steps, args.device)
        loader_rates = {workers: loader_tiles_per_second(Path(folder), args.batch_size, workers, augmentations) for workers in worker_counts}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {len(tiles)} tiles in {len(shards)} shards")
    print(f"training step ({args.student}, default loss, bf16 autocast, {args.device})  {training_rate:9.1f} tiles/s  1.0x (baseline)")
    for workers, rate in loader_rates.items():
        print(f"loader only, {workers} workers, augmentations {','.join(augmentations)}  {rate:9.1f} tiles/s  {rate / training_rate:.1f}x")


if __name__ == "__main__":
    main()
