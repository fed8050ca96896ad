"""Tests of the distiller: loss, split, dataset, schedule, real training steps and a whole run to an export.

Training tests read real LC25000 lung tiles from the shared data folder and skip when it is absent.
Their teacher embeddings are a fixed random projection of 16 x 16 downsampled pixels to 1536-d: a
real, deterministic function of each tile that a student can learn, with no teacher weights needed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from distiller.data import ShardDataset
from distiller.loss import UNITE_TEMPERATURE, UniteDistillationLoss, symmetric_info_nce
from distiller.module import DistillModule, warmup_cosine_factor
from distiller.split import BLOCK_PATCHES, split_by_slide
from distiller.train import LAST_CHECKPOINT, LIGHTNING_SUBDIR, DistillConfig, LossHistory, _clamp_batch_size, distill
from shared.checkpoint import CHECKPOINT_CARD, load_student
from shared.errors import ConfigError
from shared.imaging import to_model_input
from shared.shards import list_shards, write_shard

TEACHER = "pixel-projection-1536@test"
TEACHER_LICENCE = "CC-BY-NC-ND-4.0"
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


def _write_shards(folder: Path, tiles: np.ndarray, *, slides_per_shard: int, tiles_per_slide: int) -> list[str]:
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
            teacher_licence=TEACHER_LICENCE,
            slide_ids=slide_ids[rows],
            coords=coords[rows],
        )
    return slide_ids


# Loss


def test_info_nce_matches_direct_computation():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 384, generator=generator)
    teacher = torch.randn(6, 384, generator=generator)

    u = student / student.norm(dim=1, keepdim=True)
    v = teacher / teacher.norm(dim=1, keepdim=True)
    logits = u @ v.T / UNITE_TEMPERATURE
    student_to_teacher = -torch.log_softmax(logits, dim=1).diagonal().mean()
    teacher_to_student = -torch.log_softmax(logits, dim=0).diagonal().mean()
    expected = (student_to_teacher + teacher_to_student) / 2

    actual = symmetric_info_nce(student, teacher)
    assert torch.allclose(actual, expected, atol=1e-6), f"loss {actual.item()} != direct {expected.item()}"


def test_distillation_loss_projects_teacher():
    torch.manual_seed(0)
    loss = UniteDistillationLoss(TEACHER_DIM, 384)
    student = torch.randn(5, 384)
    teacher = torch.randn(5, TEACHER_DIM)

    linear, norm = loss.projector
    projected = F.layer_norm(teacher @ linear.weight.T + linear.bias, (384,), norm.weight, norm.bias)
    expected = symmetric_info_nce(student, projected)
    assert torch.allclose(loss(student, teacher), expected, atol=1e-6)
    assert loss.temperature == 0.07


def test_info_nce_aligned_lower_than_shuffled():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(16, 384, generator=generator)
    shuffled = embeddings[torch.roll(torch.arange(16), 1)]

    aligned_loss = symmetric_info_nce(embeddings, embeddings)
    shuffled_loss = symmetric_info_nce(embeddings, shuffled)
    assert aligned_loss < 0.1, f"aligned loss {aligned_loss.item()} should be near 0"
    assert shuffled_loss > math.log(16), f"shuffled loss {shuffled_loss.item()} should exceed chance, log(16)"


def test_info_nce_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(8, 384, generator=generator)
    teacher = torch.randn(8, 384, generator=generator)

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast_loss = symmetric_info_nce(student, teacher)
    assert autocast_loss.dtype == torch.float32
    assert torch.allclose(autocast_loss, symmetric_info_nce(student, teacher), atol=1e-6)


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
    assert "using batch size 10" in caplog.text
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


# Training


def test_every_parameter_gets_a_gradient(shared_data):
    tiles = _lung_tiles(shared_data, 2)
    torch.manual_seed(0)
    module = DistillModule(teacher_dim=TEACHER_DIM, total_steps=1)
    images = torch.from_numpy(to_model_input(tiles))
    targets = torch.from_numpy(_teacher_embeddings(tiles))

    loss = module.loss(module(images), targets)
    loss.backward()

    assert torch.isfinite(loss)
    without_gradient = [name for name, parameter in module.named_parameters() if parameter.grad is None]
    assert not without_gradient, f"parameters without a gradient: {without_gradient}"


@pytest.mark.slow
def test_thirty_steps_lower_the_loss(shared_data, tmp_path):
    """Thirty seeded bf16 steps on one fixed batch of 8 real tiles go through DistillModule and a Trainer.

    Measured on a 2-core CPU: the loss falls from about 2.10 (log 8 = 2.08, an untrained student) to
    about 0.14 in 30 steps at about 5 img/s. The test requires less than half the first loss, a margin
    that a broken optimiser, schedule or loss cannot meet and a slower machine still can.
    """
    batch, steps = 8, 30
    tiles = _lung_tiles(shared_data, batch)
    _write_shards(tmp_path / "shards", tiles, slides_per_shard=1, tiles_per_slide=batch)
    # The same rows repeated give one fixed batch per step.
    dataset = ShardDataset(list_shards(tmp_path / "shards"), np.tile(np.arange(batch), steps))
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True)

    lightning.seed_everything(0, verbose=False)
    module = DistillModule(teacher_dim=TEACHER_DIM, total_steps=steps)
    history = LossHistory()
    trainer = lightning.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=steps,
        gradient_clip_val=1.0,
        callbacks=[history],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    elapsed = time.perf_counter() - started
    logging.getLogger(__name__).info("%d steps of %d tiles in %.1f s (%.2f img/s)", steps, batch, elapsed, steps * batch / elapsed)

    assert len(history.train) == steps
    first, last = history.train[0], history.train[-1]
    assert abs(first - math.log(batch)) < 0.3, f"first loss {first:.3f} should be near chance, log({batch}) = {math.log(batch):.3f}"
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f}, expected below {0.5 * first:.3f}: {history.train}"


@pytest.mark.slow
def test_distill_exports_and_resumes(shared_data, tmp_path):
    tiles = _lung_tiles(shared_data, 40)
    slide_ids = _write_shards(tmp_path / "shards", tiles, slides_per_shard=2, tiles_per_slide=10)
    out_dir = tmp_path / "run"
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=out_dir, batch_size=8, epochs=1)

    result = distill(config, progress=False, command="unite distill --test")

    # Split: 4 slides of 10 tiles, one to validation; 30 training tiles make 3 full batches of 8.
    assert (result.train_tiles, result.val_tiles) == (30, 10)
    assert result.split_description.startswith("by slide")
    assert result.steps == 3
    assert len(result.history) == 3
    assert result.first_loss == result.history[0]
    assert result.last_loss == result.history[-1]
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert all(math.isfinite(value) for value in result.history)

    # The export contains the weights the Trainer ended with.
    loaded = load_student(result.checkpoint_dir)
    trained = DistillModule.load_from_checkpoint(out_dir / "lightning" / "last.ckpt", map_location="cpu").eval()
    images = torch.from_numpy(to_model_input(tiles[:4]))
    with torch.no_grad():
        expected = trained(images)
        actual = loaded.model.forward_head(loaded.model.forward_features(images), pre_logits=True)
    assert actual.shape == (4, 384)
    assert torch.allclose(actual, expected, atol=1e-5), f"max difference {(actual - expected).abs().max().item()}"

    config_json = json.loads((result.checkpoint_dir / "config.json").read_text())
    assert config_json["teacher"] == TEACHER
    assert config_json["teacher_licence"] == TEACHER_LICENCE
    assert config_json["training"]["train_tiles"] == 30
    assert config_json["training"]["train_slides"] == 3
    assert config_json["training"]["val_slides"] == 1
    assert config_json["training"]["losses"]["last_train"] == pytest.approx(result.last_loss)
    assert config_json["command"] == "unite distill --test"
    card = (result.checkpoint_dir / CHECKPOINT_CARD).read_text()
    assert TEACHER in card
    assert TEACHER_LICENCE in card
    assert "Derivative-work warning" in card
    assert len(set(slide_ids)) == 4

    # Resume for a second epoch from the Lightning checkpoint the first run left.
    resumed = distill(
        DistillConfig(shard_dir=tmp_path / "shards", out_dir=out_dir, batch_size=8, epochs=2, resume_from="last"),
        progress=False,
    )
    assert resumed.steps == 6
    assert len(resumed.history) == 3
    assert load_student(resumed.checkpoint_dir).sha256 != loaded.sha256


def test_distill_rejects_missing_resume_checkpoint(shared_data, tmp_path):
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 4), slides_per_shard=2, tiles_per_slide=2)
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "run", batch_size=2, resume_from="last")

    with pytest.raises(ConfigError, match="last.ckpt"):
        distill(config, progress=False)


def _wait_for_replaced_file(path: Path, old_inode: int, process: subprocess.Popen, timeout: float) -> bool:
    """Poll until ``path`` is a new file (another inode) or ``process`` exits; return whether it was replaced."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_ino != old_inode:
            return True
        if process.poll() is not None:
            return path.exists() and path.stat().st_ino != old_inode
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_killed_run_resumes_from_last_epoch(shared_data, tmp_path):
    """A run killed with SIGKILL after epoch 1 of 2 leaves last.ckpt at that epoch, and resume finishes the run.

    4 slides of 3 tiles: 1 slide validates, 9 tiles train, so batch 4 gives 2 steps per epoch. The folder
    starts with a stale last.ckpt from an older run, which the new run must replace, not version aside.
    """
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 12), slides_per_shard=2, tiles_per_slide=3)
    out_dir = tmp_path / "run"
    last = out_dir / LIGHTNING_SUBDIR / LAST_CHECKPOINT
    last.parent.mkdir(parents=True)
    last.write_bytes(b"stale checkpoint of an older run")
    stale_inode = last.stat().st_ino

    command = [sys.executable, "-m", "unite_cli.main", "distill", "--shards", str(tmp_path / "shards"), "--out", str(out_dir)]
    command += ["--epochs", "2", "--batch-size", "4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        replaced = _wait_for_replaced_file(last, stale_inode, process, timeout=600)
        still_running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert replaced, f"last.ckpt was never replaced; the run printed:\n{output[-3000:]}"
    assert still_running, f"the run finished before last.ckpt was replaced, so no checkpoint is written per epoch:\n{output[-3000:]}"
    assert not list(last.parent.glob("last-v*.ckpt")), f"versioned copies beside last.ckpt: {os.listdir(last.parent)}"

    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2, f"last.ckpt at global step {saved['global_step']}, expected 2 (end of epoch 1)"
    assert saved["epoch"] == 0

    resumed = distill(
        DistillConfig(shard_dir=tmp_path / "shards", out_dir=out_dir, batch_size=4, epochs=2, resume_from="last"),
        progress=False,
    )

    assert resumed.steps == 4, f"resumed run ended at global step {resumed.steps}, expected 2 + 2"
    assert len(resumed.history) == 2, f"resumed run trained {len(resumed.history)} steps, expected only epoch 2's 2"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4


def test_distill_progress_bar_on_stderr(shared_data, tmp_path, capsys):
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 4), slides_per_shard=2, tiles_per_slide=2)
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "run", batch_size=2, max_steps=1, val_fraction=0.0)

    distill(config, progress=True)

    captured = capsys.readouterr()
    assert "Epoch 0" in captured.err, f"no progress bar on stderr: {captured.err[-2000:]!r}"
    assert captured.out == "", f"stdout should stay empty, got {captured.out[-2000:]!r}"


def test_distill_gpu_without_gpu_is_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so accelerator 'gpu' is valid here")
    config = DistillConfig(shard_dir=tmp_path, out_dir=tmp_path / "run", accelerator="gpu")

    with pytest.raises(ConfigError, match=r"no GPU is visible.*--accelerator cpu or auto"):
        distill(config, progress=False)


def test_config_rejects_unknown_accelerator(tmp_path):
    with pytest.raises(ConfigError, match="accelerator is 'tpux'"):
        DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, accelerator="tpux")
