"""Tests of the distiller's data side: split, dataset, sampling, resumable loading, settings and the licence check.

Tests that need tiles read real LC25000 lung tiles from the shared data folder and skip when it is absent.
Their teacher embeddings are a fixed random projection of 16 x 16 downsampled pixels to 1536-d: a
real, deterministic function of each tile that a student can learn, with no teacher weights needed.
The training runs are in test_distill_training.py.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distiller.config import DistillConfig
from distiller.data import ShardDataset
from distiller.licence import licence_restrictions
from distiller.loader import EpochSampler, ResumableLoader
from distiller.module import warmup_cosine_factor
from distiller.split import BLOCK_PATCHES, split_by_slide
from distiller.train import _clamp_batch_size, distill
from shared.errors import ConfigError
from shared.imaging import to_model_input
from shared.shards import list_shards, read_metadata, write_shard
from unite_cli.distill import CONFIG_OPTIONS, config_from_args
from unite_cli.main import build_parser

TEACHER = "pixel-projection-1536@test"
# Permissive by default, so runs need no licence acknowledgement; tests of the check pass a restrictive one.
TEACHER_LICENCE = "CC-BY-4.0"
RESTRICTIVE_LICENCE = "CC-BY-NC-ND-4.0"
TEACHER_DIM = 1536


def _lung_tiles(shared_data: Path, count: int) -> np.ndarray:
    """Read ``count`` real 224 px lung tiles, taking the three classes in turn."""
    folder = shared_data / "tiles" / "lc25000_lung_dedup"
    labels = folder / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"real lung tiles not found at {folder}")
    with open(labels, newline="") as file:
        rows = list(csv.DictReader(file))
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row["path"])
    interleaved = [path for group in zip(*by_class.values()) for path in group]
    tiles = [np.asarray(Image.open(folder / path).convert("RGB")) for path in interleaved[:count]]
    return np.stack(tiles)


def _teacher_embeddings(tiles: np.ndarray) -> np.ndarray:
    """Project 16 x 16 average-pooled pixels through a fixed Gaussian matrix to 1536-d float32."""
    count = len(tiles)
    pooled = tiles.reshape(count, 16, 14, 16, 14, 3).mean(axis=(2, 4)).reshape(count, -1) / 255.0
    projection = np.random.default_rng(1234).standard_normal((pooled.shape[1], TEACHER_DIM))
    return ((pooled - 0.5) @ projection).astype(np.float32)


def _write_shards(
    folder: Path, tiles: np.ndarray, *, slides_per_shard: int, tiles_per_slide: int, licence: str = TEACHER_LICENCE
) -> list[str]:
    """Write tiles as shards of whole pseudo-slides laid out on a 448 px level-0 grid; return the slide ids."""
    embeddings = _teacher_embeddings(tiles)
    slide_ids = [f"slide-{index // tiles_per_slide}" for index in range(len(tiles))]
    coords = np.array([[(index % tiles_per_slide) * 448, 0] for index in range(len(tiles))], dtype=np.int64)
    per_shard = slides_per_shard * tiles_per_slide
    for shard, start in enumerate(range(0, len(tiles), per_shard)):
        rows = slice(start, start + per_shard)
        write_shard(
            folder / f"shard-{shard:05d}.h5",
            tiles=tiles[rows],
            embeddings=embeddings[rows],
            teacher=TEACHER,
            teacher_licence=licence,
            slide_ids=slide_ids[rows],
            coords=coords[rows],
        )
    return slide_ids


# Split


def test_split_keeps_slides_on_one_side():
    slide_ids = [f"slide-{index % 7}" for index in range(70)] + [""] * 5
    coords = np.full((75, 2), -1)

    split = split_by_slide(slide_ids, coords, val_fraction=0.3, seed=3)

    train_slides = {slide_ids[index] for index in split.train}
    val_slides = {slide_ids[index] for index in split.val}
    assert not train_slides & val_slides, f"slides on both sides: {train_slides & val_slides}"
    assert sorted(np.concatenate([split.train, split.val]).tolist()) == list(range(75))
    assert split.unit == "slide"
    assert split.description.startswith("by slide")
    assert 10 <= len(split.val) <= 35, f"{len(split.val)} validation tiles for val_fraction 0.3 of 75"


def test_split_is_seeded():
    slide_ids = [f"slide-{index % 10}" for index in range(100)]
    coords = np.full((100, 2), -1)

    first = split_by_slide(slide_ids, coords, seed=5)
    again = split_by_slide(slide_ids, coords, seed=5)
    assert np.array_equal(first.val, again.val)


@pytest.mark.parametrize(
    ("slide_id", "reason"),
    [("slide-a", "only one slide ('slide-a')"), ("", "no tile has a slide id")],
    ids=["one-slide", "no-slide-ids"],
)
def test_split_single_slide_by_blocks(slide_id, reason):
    patch = 448
    xs, ys = np.meshgrid(np.arange(20), np.arange(12))
    coords = np.stack([xs.ravel() * patch, ys.ravel() * patch], axis=1).astype(np.int64)
    slide_ids = [slide_id] * len(coords)

    split = split_by_slide(slide_ids, coords, val_fraction=0.25, seed=0)

    block = patch * BLOCK_PATCHES
    blocks = [tuple(row) for row in coords // block]
    train_blocks = {blocks[index] for index in split.train}
    val_blocks = {blocks[index] for index in split.val}
    assert not train_blocks & val_blocks, f"blocks on both sides: {train_blocks & val_blocks}"
    assert len(split.train) + len(split.val) == len(coords)
    assert len(split.val) > 0
    assert split.unit == "block"
    assert "spatial blocks" in split.description
    assert reason in split.description


def test_split_without_ids_or_coords_is_random():
    split = split_by_slide([""] * 10, np.full((10, 2), -1), val_fraction=0.2)

    assert split.unit == "random"
    assert "at random" in split.description
    assert len(split.val) == 2


def test_split_rejects_invalid_fraction():
    with pytest.raises(ConfigError, match="val_fraction"):
        split_by_slide(["a", "b"], np.zeros((2, 2)), val_fraction=1.0)


# Schedule and batch size


def test_schedule_warms_up_then_decays_once():
    factors = [warmup_cosine_factor(step, warmup_steps=10, total_steps=100) for step in range(120)]

    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(earlier < later for earlier, later in zip(factors[:10], factors[1:10]))
    decay = factors[10:101]
    assert all(earlier >= later for earlier, later in zip(decay, decay[1:])), "the cosine restarts"
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert max(factors[100:]) == pytest.approx(0.0, abs=1e-12)


def test_batch_size_clamped_to_train_set(caplog):
    with caplog.at_level(logging.WARNING, logger="distiller.train"):
        assert _clamp_batch_size(32, 10) == 10
    assert "batch size 10 is used" in caplog.text
    assert _clamp_batch_size(8, 10) == 8
    with pytest.raises(ConfigError, match="at least 2"):
        _clamp_batch_size(8, 1)


def test_config_rejects_unknown_precision(tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, precision="fp8")


# Dataset


def test_dataset_reads_rows_across_shards(shared_data, tmp_path):
    tiles = _lung_tiles(shared_data, 6)
    _write_shards(tmp_path, tiles, slides_per_shard=1, tiles_per_slide=3)
    embeddings = _teacher_embeddings(tiles)
    shards = list_shards(tmp_path)
    assert len(shards) == 2

    dataset = ShardDataset(shards, np.array([4, 0, 3]))
    for item, row in enumerate([4, 0, 3]):
        image, target = dataset[item]
        assert image.dtype == torch.float32
        assert torch.equal(image, torch.from_numpy(to_model_input(tiles[row : row + 1])[0]))
        assert torch.equal(target, torch.from_numpy(embeddings[row]))

    # A worker process opens its own file handles.
    loader = DataLoader(dataset, batch_size=3, num_workers=1)
    images, targets = next(iter(loader))
    assert torch.equal(targets, torch.from_numpy(embeddings[[4, 0, 3]]))
    dataset.close()


def test_dataset_rejects_rows_out_of_range(shared_data, tmp_path):
    _write_shards(tmp_path, _lung_tiles(shared_data, 3), slides_per_shard=1, tiles_per_slide=3)

    with pytest.raises(ConfigError, match="expected values in"):
        ShardDataset(list_shards(tmp_path), np.array([0, 3]))




@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("val_fraction", [0.1, 0.3, 0.5])
def test_split_never_shares_a_slide(seed, val_fraction):
    generator = np.random.default_rng(seed)
    slide_ids = [f"slide-{number}" for number in generator.integers(0, 9, size=120)] + [""] * 7
    coords = generator.integers(0, 20_000, size=(127, 2))

    split = split_by_slide(slide_ids, coords, val_fraction=val_fraction, seed=seed)

    train_slides = {slide_ids[index] for index in split.train}
    val_slides = {slide_ids[index] for index in split.val}
    assert not train_slides & val_slides, f"slides on both sides: {train_slides & val_slides}"
    assert len(split.train) + len(split.val) == 127
    assert len(split.val) > 0
    assert len(split.train) > 0


def test_split_of_real_shards_by_slide(shared_data, tmp_path):
    tiles = _lung_tiles(shared_data, 15)
    written = _write_shards(tmp_path, tiles, slides_per_shard=2, tiles_per_slide=3)
    slide_ids, coords = [], []
    for info in list_shards(tmp_path):
        shard_slides, shard_coords = read_metadata(info)
        slide_ids += shard_slides
        coords.append(shard_coords)

    split = split_by_slide(slide_ids, np.concatenate(coords), val_fraction=0.4, seed=1)

    assert slide_ids == written
    train_slides = {slide_ids[index] for index in split.train}
    val_slides = {slide_ids[index] for index in split.val}
    assert not train_slides & val_slides
    assert len(train_slides | val_slides) == 5


def test_dataset_reopens_files_after_fork(shared_data, tmp_path):
    tiles = _lung_tiles(shared_data, 4)
    _write_shards(tmp_path, tiles, slides_per_shard=2, tiles_per_slide=2)
    embeddings = _teacher_embeddings(tiles)
    dataset = ShardDataset(list_shards(tmp_path), np.arange(4))
    dataset[0]  # The parent opens its handle before the workers fork.

    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork", persistent_workers=True)
    for _ in range(2):
        targets = torch.cat([batch_targets for _, batch_targets in loader])
        assert torch.equal(targets, torch.from_numpy(embeddings))
    dataset.close()


# Sampling and resumable loading


class KeyDataset(torch.utils.data.Dataset):
    """Returns each key it is asked for, so a loader's batches show the sampler's keys."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        return torch.tensor(key)


def _batches(loader) -> list[list]:
    return [batch.tolist() for batch in loader]


def test_sampler_splits_epoch_across_ranks():
    single = list(EpochSampler(10, seed=3, shuffle=True))
    shares = [list(EpochSampler(10, seed=3, shuffle=True, rank=rank, world_size=3)) for rank in range(3)]

    assert [len(share) for share in shares] == [3, 3, 3]
    items = [item for share in shares for item, _ in share]
    assert len(set(items)) == 9, f"ranks share items: {shares}"
    # Rank r takes positions r, r + 3 and r + 6 of the same epoch order.
    assert shares[1] == [single[1], single[4], single[7]]


def test_sampler_order_depends_on_seed_and_epoch():
    sampler = EpochSampler(20, seed=5, shuffle=True)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    fresh = EpochSampler(20, seed=5, shuffle=True)
    fresh.set_epoch(1)

    assert list(fresh) == epoch1, "an epoch's keys depend on earlier epochs"
    assert [item for item, _ in epoch0] != [item for item, _ in epoch1]
    assert sorted(item for item, _ in epoch1) == list(range(20))
    assert list(EpochSampler(20, seed=6, shuffle=True)) != epoch0


def test_sampler_without_shuffle_yields_items_in_order():
    sampler = EpochSampler(7, seed=0, shuffle=False, rank=1, world_size=2)

    assert list(sampler) == [1, 3, 5]


def test_loader_resumes_mid_epoch():
    first = ResumableLoader(KeyDataset(16), sampler=EpochSampler(16, seed=2, shuffle=True), batch_size=3)
    epoch0 = _batches(first)
    first.sampler.set_epoch(1)
    iterator = iter(first)
    consumed = [next(iterator).tolist() for _ in range(2)]
    state = first.state_dict()
    rest_of_epoch1 = [batch.tolist() for batch in iterator]

    resumed = ResumableLoader(KeyDataset(16), sampler=EpochSampler(16, seed=2, shuffle=True), batch_size=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch again before iterating.

    assert state == {"epoch": 1, "batches": 2}
    assert len(epoch0) == len(first) == 5
    assert _batches(resumed) == rest_of_epoch1
    assert resumed.state_dict() == {"epoch": 1, "batches": 5}
    assert len(consumed + rest_of_epoch1) == 5


def test_loader_resumes_after_epoch_end():
    first = ResumableLoader(KeyDataset(8), sampler=EpochSampler(8, seed=4, shuffle=True), batch_size=4)
    _batches(first)
    state = first.state_dict()
    first.sampler.set_epoch(1)
    epoch1 = _batches(first)

    resumed = ResumableLoader(KeyDataset(8), sampler=EpochSampler(8, seed=4, shuffle=True), batch_size=4)
    resumed.load_state_dict(state)

    assert state == {"epoch": 0, "batches": 2}
    assert _batches(resumed) == epoch1


def test_loader_with_workers_matches_main_process():
    def loader(workers: int) -> ResumableLoader:
        return ResumableLoader(KeyDataset(12), sampler=EpochSampler(12, seed=8, shuffle=True), batch_size=4, num_workers=workers)

    assert _batches(loader(2)) == _batches(loader(0))


# Settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp8"}, "precision is 'fp8'"),
        ({"strategy": "horovod"}, "strategy is 'horovod'"),
        ({"devices": "two"}, "devices is 'two'"),
        ({"devices": 0}, "devices is 0"),
        ({"loss": "l2"}, "loss is 'l2'"),
        ({"mimic": "mse"}, "mimic is 'mse'"),
        ({"temperature": 2.0}, "temperature is 2.0"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches is 0"),
        ({"num_nodes": 0}, "num_nodes is 0"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val is -1.0"),
        ({"warmup_fraction": 1.0}, "warmup_fraction is 1.0"),
        ({"augmentations": ["hflip", "blur"]}, "'blur'"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_config_rejects_invalid_settings(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, **kwargs)


def test_config_defaults(tmp_path):
    config = DistillConfig(shard_dir=tmp_path, out_dir=tmp_path / "run")

    assert (config.student, config.loss, config.mimic, config.temperature) == ("unite", "mimic+infonce", "cosine", 0.07)
    assert (config.batch_size, config.accumulate_grad_batches, config.gradient_clip_val) == (64, 1, 1.0)
    assert (config.strategy, config.devices, config.num_nodes, config.num_workers) == ("auto", "auto", 1, 2)
    assert config.log_dir == tmp_path / "run" / "logs"
    assert config.accept_teacher_licence is False
    assert DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, devices="2").devices == 2
    assert DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, devices="0, 1").devices == "0,1"


def test_cli_defaults_come_from_config(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["distill", "--shards", str(tmp_path), "--out", str(tmp_path / "run")])

    assert config_from_args(args) == DistillConfig(shard_dir=tmp_path, out_dir=tmp_path / "run")
    for field, option in CONFIG_OPTIONS.items():
        if field not in ("shard_dir", "out_dir"):
            assert getattr(args, option.lstrip("-").replace("-", "_")) is None, f"{option} has a default of its own"


def test_cli_options_set_config(tmp_path):
    argv = ["distill", "--shards", str(tmp_path), "--out", str(tmp_path / "run"), "--student", "vit_small_patch16_224"]
    argv += ["--loss", "mimic", "--mimic", "smooth_l1", "--batch-size", "16", "--accumulate-grad-batches", "4"]
    argv += ["--augment", "none", "--gradient-clip-val", "0", "--strategy", "ddp", "--devices", "2", "--num-nodes", "3"]
    argv += ["--accept-teacher-licence", "--log-dir", str(tmp_path / "logs"), "--num-workers", "0"]

    config = config_from_args(build_parser().parse_args(argv))

    assert (config.student, config.loss, config.mimic) == ("vit_small_patch16_224", "mimic", "smooth_l1")
    assert (config.batch_size, config.accumulate_grad_batches) == (16, 4)
    assert config.augmentations == []
    assert config.gradient_clip_val is None
    assert (config.strategy, config.devices, config.num_nodes, config.num_workers) == ("ddp", 2, 3, 0)
    assert config.accept_teacher_licence is True
    assert config.log_dir == tmp_path / "logs"


def test_cli_augment_list():
    args = build_parser().parse_args(["distill", "--shards", "s", "--out", "o", "--augment", "hflip, rot90"])

    assert args.augment == ["hflip", "rot90"]


# Teacher licence


@pytest.mark.parametrize(
    ("licence", "restrictions"),
    [
        ("CC-BY-NC-ND-4.0", ["no derivatives (ND)", "non-commercial (NC)"]),
        ("CC BY-NC-SA 4.0", ["non-commercial (NC)"]),
        ("research use only, non-commercial", ["non-commercial", "research use only"]),
        ("gated access, see vendor terms", ["gated access"]),
        ("Apache-2.0 (built-in reference teacher)", []),
        ("CC-BY-4.0", []),
        ("MIT", []),
    ],
)
def test_licence_restrictions(licence, restrictions):
    assert licence_restrictions(licence) == restrictions


def test_distill_stops_on_restrictive_licence(shared_data, tmp_path):
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 4), slides_per_shard=2, tiles_per_slide=2, licence=RESTRICTIVE_LICENCE)
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "run", batch_size=2)

    with pytest.raises(ConfigError, match=r"licensed under 'CC-BY-NC-ND-4.0'.*--accept-teacher-licence") as raised:
        distill(config, progress=False)

    assert "no derivatives (ND), non-commercial (NC)" in raised.value.message
    assert TEACHER in raised.value.message
    assert not (tmp_path / "run").exists(), "the run started before the licence check"
