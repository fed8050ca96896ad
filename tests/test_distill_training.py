"""Tests of real distillation runs on real tiles: the loss falls, exports reload, resume is exact, DDP runs on two CPUs.

Shards hold real LC25000 lung tiles and the pixel-projection teacher of test_distiller.py, and the tests
skip when the shared data folder is absent. Most runs use timm's test_vit (0.3 M parameters, a model timm
keeps for its own tests) as the student to stay fast on a 2-core CPU. The loss test uses the default
UNITE student.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from test_distiller import RESTRICTIVE_LICENCE, TEACHER, TEACHER_DIM, _lung_tiles, _teacher_embeddings, _write_shards
from torch.utils.data import DataLoader

from distiller.callbacks import LAST_CHECKPOINT, LossHistory
from distiller.config import DistillConfig
from distiller.data import ShardDataset
from distiller.loss import build_loss
from distiller.module import DistillModule
from distiller.split import split_by_slide
from distiller.train import LIGHTNING_SUBDIR, distill
from shared.agreement import knn_overlap, linear_cka
from shared.checkpoint import CHECKPOINT_CARD, load_student
from shared.errors import ConfigError
from shared.imaging import to_model_input
from shared.models.student import build_student
from shared.shards import list_shards

SMALL_STUDENT = "test_vit"


class CrashAtStep(Callback):
    """Raises when a batch starts at global step ``step``, as a killed process would stop there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at global step {self.step}")


def _embed(model: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    images = torch.from_numpy(to_model_input(tiles))
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True).numpy()


@pytest.mark.slow
def test_loss_falls_on_real_tiles(shared_data, tmp_path):
    """Thirty seeded bf16 steps of the UNITE student and the default loss on one fixed batch of 8 real tiles.

    The loss is mimicry (1 - cosine, 1 for an untrained projector) plus InfoNCE (log 8 = 2.08 for a student
    that cannot tell tiles apart). The test requires less than half the first loss after 30 steps, a margin
    that a broken optimiser, schedule or loss cannot meet.
    """
    batch, steps = 8, 30
    tiles = _lung_tiles(shared_data, batch)
    _write_shards(tmp_path / "shards", tiles, slides_per_shard=1, tiles_per_slide=batch)
    # The same rows repeated give one fixed batch per step.
    dataset = ShardDataset(list_shards(tmp_path / "shards"), np.tile(np.arange(batch), steps))
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True)

    lightning.seed_everything(0, verbose=False)
    student = build_student()
    module = DistillModule(student, build_loss(student_dim=384, teacher_dim=TEACHER_DIM), warmup_steps=3, total_steps=steps)
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
    trainer.fit(module, train_dataloaders=loader)

    assert len(history.train) == steps
    first, last = history.train[0], history.train[-1]
    assert abs(first - (1.0 + math.log(batch))) < 0.5, f"first loss {first:.3f} should be near 1 + log({batch}) = {1 + math.log(batch):.3f}"
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f}, expected below {0.5 * first:.3f}: {history.train}"


@pytest.mark.slow
def test_resume_reproduces_next_step(shared_data, tmp_path):
    """A run that crashes after step 6 and resumes from last.ckpt continues exactly as a run never interrupted.

    3 slides of 8 tiles: 1 slide validates and 16 tiles train, so batch 4 gives 4 steps per epoch and the
    checkpoint of step 6 is in the middle of epoch 2. Loader workers, augmentations and the learnable
    temperature all run, so each of them must resume exactly for the losses and weights to match.
    """
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 24), slides_per_shard=3, tiles_per_slide=8)

    def config(out: str, **overrides) -> DistillConfig:
        return DistillConfig(
            shard_dir=tmp_path / "shards", out_dir=tmp_path / out, student=SMALL_STUDENT, batch_size=4, epochs=2,
            val_fraction=0.3, checkpoint_every_n_steps=3, num_workers=1, **overrides,
        )

    uninterrupted = distill(config("whole"), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash at global step 6"):
        distill(config("crashed"), progress=False, callbacks=[CrashAtStep(6)])
    saved = torch.load(tmp_path / "crashed" / LIGHTNING_SUBDIR / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    resumed = distill(config("crashed", resume_from="last"), progress=False)

    assert uninterrupted.steps == 8
    assert saved["global_step"] == 6
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert resumed.steps == 8
    assert resumed.history[0] == uninterrupted.history[6], f"next step's loss {resumed.history[0]} != {uninterrupted.history[6]}"
    assert resumed.history == uninterrupted.history[6:]
    whole = load_file(uninterrupted.checkpoint_dir / "model.safetensors")
    again = load_file(resumed.checkpoint_dir / "model.safetensors")
    different = [name for name in whole if not torch.equal(whole[name], again[name])]
    assert not different, f"weights differ after resume: {different[:5]}"
    assert load_file(uninterrupted.checkpoint_dir / "mimic_projector.safetensors")["weight"].equal(
        load_file(resumed.checkpoint_dir / "mimic_projector.safetensors")["weight"]
    )


@pytest.mark.slow
def test_distill_exports_validates_and_logs(shared_data, tmp_path):
    """One fp32 run: export, card, logs, and validation metrics equal to those computed from the export."""
    tiles = _lung_tiles(shared_data, 40)
    slide_ids = _write_shards(tmp_path / "shards", tiles, slides_per_shard=2, tiles_per_slide=10, licence=RESTRICTIVE_LICENCE)
    out_dir = tmp_path / "run"
    config = DistillConfig(
        shard_dir=tmp_path / "shards", out_dir=out_dir, student=SMALL_STUDENT, batch_size=8, epochs=2, precision="32-true",
        accept_teacher_licence=True, num_workers=0,
    )

    result = distill(config, progress=False, command="unite distill --test")

    # Split: 4 slides of 10 tiles, one to validation; 30 training tiles make 3 full batches of 8.
    assert (result.train_tiles, result.val_tiles) == (30, 10)
    assert result.steps == 6
    assert len(result.history) == 6
    assert all(math.isfinite(value) for value in result.history)
    assert [record["epoch"] for record in result.validation] == [0.0, 1.0]
    assert result.val_loss == result.validation[-1]["loss"]

    # The export contains the weights the Trainer ended with.
    loaded = load_student(result.checkpoint_dir)
    state = torch.load(out_dir / LIGHTNING_SUBDIR / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]
    exported = loaded.model.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, state[f"student.{name}"]), f"exported {name} differs from the Lightning checkpoint"

    # Validation metrics: 8 of the 10 validation tiles (one full batch), compared with the exported student directly.
    split = split_by_slide(slide_ids, np.zeros((40, 2)) - 1, val_fraction=0.2, seed=0)
    validated = split.val[:8]
    teacher = _teacher_embeddings(tiles)[validated]
    student = _embed(loaded.model, tiles[validated])
    metrics = result.validation[-1]
    assert metrics["tiles"] == 8
    assert metrics["knn_k"] == 7
    assert metrics["cka"] == pytest.approx(linear_cka(teacher, student), abs=1e-4)
    assert metrics["knn_overlap"] == pytest.approx(knn_overlap(teacher, student, k=7), abs=1e-9)

    config_json = json.loads((result.checkpoint_dir / "config.json").read_text())
    assert (config_json["teacher"], config_json["teacher_licence"]) == (TEACHER, RESTRICTIVE_LICENCE)
    assert config_json["student"] == SMALL_STUDENT
    assert config_json["loss"]["name"] == "mimic+infonce"
    assert config_json["data"]["train_slides"] == 3
    assert config_json["data"]["val_slides"] == 1
    assert config_json["data"]["teacher_licence_restrictions"] == ["no derivatives (ND)", "non-commercial (NC)"]
    assert config_json["training"]["augmentations"] == ["hflip", "vflip", "rot90"]
    assert config_json["training"]["losses"]["last_train"] == pytest.approx(result.last_loss)
    assert config_json["validation_metrics"]["cka"] == pytest.approx(metrics["cka"])
    assert config_json["command"] == "unite distill --test"
    card = (result.checkpoint_dir / CHECKPOINT_CARD).read_text()
    assert RESTRICTIVE_LICENCE in card
    assert "knn_overlap" in card

    csv_files = list((out_dir / "logs" / "csv").glob("version_*/metrics.csv"))
    assert len(csv_files) == 1
    header = csv_files[0].read_text().splitlines()[0].split(",")
    for column in ("train/loss_step", "val/loss", "val/knn_overlap", "val/cka", "lr-AdamW/pg1"):
        assert column in header, f"{column} not in the CSV log: {header}"
    assert list((out_dir / "logs" / "tensorboard").glob("version_*/events.out.tfevents.*")), "no TensorBoard events"


@pytest.mark.slow
def test_distributed_run_on_two_cpu_processes(shared_data, tmp_path):
    """`unite distill --strategy ddp --devices 2` on the CPU runs two processes that rendezvous on 127.0.0.1 with gloo.

    24 tiles of 3 slides: 16 train, 8 validate. Each process takes 8 training tiles, so batch 4 gives 2 steps
    per epoch (one process alone would take 4), and 4 validation tiles, gathered to 8 for the metrics.
    """
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 24), slides_per_shard=3, tiles_per_slide=8)
    out_dir = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "unite_cli.main", "distill", "--shards", str(tmp_path / "shards"), "--out", str(out_dir)]
    command += ["--student", SMALL_STUDENT, "--batch-size", "4", "--val-fraction", "0.3", "--num-workers", "0"]
    command += ["--accelerator", "cpu", "--strategy", "ddp", "--devices", "2"]

    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert len(completed.stdout.splitlines()) == 1, f"both processes printed a result: {completed.stdout!r}"
    saved = torch.load(out_dir / LIGHTNING_SUBDIR / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2, f"global step {saved['global_step']}, expected 2 with 2 processes (4 with one)"
    config_json = json.loads((out_dir / "student" / "config.json").read_text())
    assert config_json["training"]["processes"] == 2
    assert config_json["training"]["tiles_per_step"] == 8
    assert config_json["validation_metrics"]["tiles"] == 8


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
    command += ["--epochs", "2", "--batch-size", "4", "--student", SMALL_STUDENT]
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
        DistillConfig(shard_dir=tmp_path / "shards", out_dir=out_dir, student=SMALL_STUDENT, batch_size=4, epochs=2, resume_from="last"),
        progress=False,
    )

    assert resumed.steps == 4, f"resumed run ended at global step {resumed.steps}, expected 2 + 2"
    assert len(resumed.history) == 2, f"resumed run trained {len(resumed.history)} steps, expected only epoch 2's 2"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4


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


def test_distill_progress_bar_on_stderr(shared_data, tmp_path, capsys):
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 4), slides_per_shard=2, tiles_per_slide=2)
    config = DistillConfig(
        shard_dir=tmp_path / "shards", out_dir=tmp_path / "run", student=SMALL_STUDENT, batch_size=2, max_steps=1, val_fraction=0.0, num_workers=0
    )

    distill(config, progress=True)

    captured = capsys.readouterr()
    assert "Epoch 0" in captured.err, f"no progress bar on stderr: {captured.err[-2000:]!r}"
    assert captured.out == "", f"stdout should stay empty, got {captured.out[-2000:]!r}"


def test_distill_rejects_missing_resume_checkpoint(shared_data, tmp_path):
    _write_shards(tmp_path / "shards", _lung_tiles(shared_data, 4), slides_per_shard=2, tiles_per_slide=2)
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "run", batch_size=2, resume_from="last")

    with pytest.raises(ConfigError, match="last.ckpt"):
        distill(config, progress=False)


def test_distill_gpu_without_gpu_is_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so accelerator 'gpu' is valid here")
    config = DistillConfig(shard_dir=tmp_path, out_dir=tmp_path / "run", accelerator="gpu")

    with pytest.raises(ConfigError, match=r"no GPU is visible.*--accelerator cpu or auto"):
        distill(config, progress=False)


def test_config_rejects_unknown_accelerator(tmp_path):
    with pytest.raises(ConfigError, match="accelerator is 'tpux'"):
        DistillConfig(shard_dir=tmp_path, out_dir=tmp_path, accelerator="tpux")
