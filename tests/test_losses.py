"""Tests of the distillation losses and the Lightning module: formulas, temperature, gradients and real steps.

The gradient and training tests read real LC25000 lung tiles from the shared data folder and skip when it
is absent. Their teacher embeddings are a fixed random projection of 16 x 16 average-pooled pixels to
1536-d, a deterministic function of each tile that needs no teacher weights.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from distiller.loss import (
    LOSSES,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    MimicInfoNCELoss,
    MimicLoss,
    UniteDistillationLoss,
    build_loss,
    symmetric_info_nce,
)
from distiller.module import DistillModule
from shared.errors import ConfigError, ModelError
from shared.imaging import to_model_input
from shared.models.student import build_student, embedding_dim

STUDENT_DIM = 384
TEACHER_DIM = 1536


def _batch(size: int = 6, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, STUDENT_DIM, generator=generator), torch.randn(size, TEACHER_DIM, generator=generator)


def _direct_info_nce(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.normalize(u, dim=1) @ F.normalize(v, dim=1).T / temperature
    return (-torch.log_softmax(logits, dim=1).diagonal().mean() - torch.log_softmax(logits, dim=0).diagonal().mean()) / 2


def _lung_tiles(shared_data: Path, count: int) -> np.ndarray:
    folder = shared_data / "tiles" / "lc25000_lung_dedup"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"real lung tiles not found at {folder}")
    with open(folder / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row["path"])
    interleaved = [path for group in zip(*by_class.values()) for path in group]
    return np.stack([np.asarray(Image.open(folder / path).convert("RGB")) for path in interleaved[:count]])


def _teacher_embeddings(tiles: np.ndarray) -> torch.Tensor:
    count = len(tiles)
    pooled = tiles.reshape(count, 16, 14, 16, 14, 3).mean(axis=(2, 4)).reshape(count, -1) / 255.0
    projection = np.random.default_rng(1234).standard_normal((pooled.shape[1], TEACHER_DIM))
    return torch.from_numpy(((pooled - 0.5) @ projection).astype(np.float32))


# Formulas


def test_unite_loss_matches_direct_computation():
    torch.manual_seed(0)
    loss = build_loss("unite", student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _batch()

    value, logs = loss(student, teacher)

    linear, norm = loss.projector
    projected = F.layer_norm(teacher @ linear.weight.T + linear.bias, (STUDENT_DIM,), norm.weight, norm.bias)
    expected = _direct_info_nce(student, projected, 0.07)
    assert isinstance(loss, UniteDistillationLoss)
    assert torch.allclose(value, expected, atol=1e-5), f"loss {value.item()} != direct {expected.item()}"
    assert loss.mimic_projector is None
    assert float(logs["temperature"]) == pytest.approx(0.07)
    assert set(logs) == {"infonce", "temperature", "positive_cosine"}
    assert "log_temperature" not in dict(loss.named_parameters()), "the original temperature is fixed"
    assert "log_temperature" not in loss.state_dict()


@pytest.mark.parametrize("mimic", ["cosine", "smooth_l1"])
def test_mimic_loss_matches_direct_computation(mimic):
    torch.manual_seed(0)
    loss = build_loss("mimic", student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM, mimic=mimic)
    student, teacher = _batch()

    value, logs = loss(student, teacher)

    projected = student @ loss.mimic_projector.weight.T + loss.mimic_projector.bias
    if mimic == "cosine":
        expected = (1 - (projected * teacher).sum(1) / (projected.norm(dim=1) * teacher.norm(dim=1))).mean()
    else:
        difference = (projected - teacher).abs()
        expected = torch.where(difference < 1.0, 0.5 * difference**2, difference - 0.5).mean()
    assert isinstance(loss, MimicLoss)
    assert torch.allclose(value, expected, atol=1e-5), f"loss {value.item()} != direct {expected.item()}"
    assert (loss.mimic_projector.in_features, loss.mimic_projector.out_features) == (STUDENT_DIM, TEACHER_DIM)
    assert loss.temperature is None
    assert set(logs) == {"mimic", "positive_cosine"}


def test_mimic_infonce_matches_direct_computation():
    torch.manual_seed(0)
    loss = build_loss(student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM, temperature=0.1)
    student, teacher = _batch()

    value, logs = loss(student, teacher)

    projected = student @ loss.mimic_projector.weight.T + loss.mimic_projector.bias
    mimic = (1 - F.cosine_similarity(projected, teacher)).mean()
    expected = mimic + _direct_info_nce(projected, teacher, 0.1)
    assert isinstance(loss, MimicInfoNCELoss)
    assert torch.allclose(value, expected, atol=1e-5), f"loss {value.item()} != direct {expected.item()}"
    assert torch.allclose(logs["mimic"], mimic, atol=1e-6)
    assert isinstance(loss.log_temperature, torch.nn.Parameter)
    assert float(loss.log_temperature.detach()) == pytest.approx(math.log(0.1))
    assert set(logs) == {"mimic", "infonce", "temperature", "positive_cosine"}


def test_learnable_temperature_clamped():
    loss = build_loss(student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)

    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-4))
    assert float(loss.temperature.detach()) == pytest.approx(TEMPERATURE_MIN)
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(10.0))
    assert float(loss.temperature.detach()) == pytest.approx(TEMPERATURE_MAX)


def test_fixed_temperature_for_mimic_infonce():
    loss = build_loss(student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM, learnable_temperature=False)

    assert "log_temperature" not in dict(loss.named_parameters())
    assert float(loss.temperature.detach()) == pytest.approx(0.07)


def test_losses_float32_under_bf16_autocast():
    student, teacher = _batch(8)
    for name in LOSSES:
        torch.manual_seed(0)
        loss = build_loss(name, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            autocast_value, _ = loss(student.bfloat16(), teacher)
        plain_value, _ = loss(student.bfloat16().float(), teacher)
        assert autocast_value.dtype == torch.float32, name
        assert torch.allclose(autocast_value, plain_value, atol=1e-6), f"{name}: {autocast_value.item()} != {plain_value.item()}"


def test_info_nce_aligned_lower_than_shuffled():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(16, STUDENT_DIM, generator=generator)
    shuffled = embeddings[torch.roll(torch.arange(16), 1)]

    assert symmetric_info_nce(embeddings, embeddings) < 0.1
    assert symmetric_info_nce(embeddings, shuffled) > math.log(16)


@pytest.mark.parametrize(("name", "mimic"), [("mimic", "cosine"), ("mimic", "smooth_l1"), ("mimic+infonce", "cosine")])
def test_mimic_projector_learns_linear_teacher(name, mimic):
    """Fixed 32-d student embeddings and a teacher that is a linear map of them: the projector alone can match it."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(64, 32, generator=generator)
    teacher = student @ torch.randn(32, 48, generator=generator) + 0.5
    torch.manual_seed(0)
    loss = build_loss(name, student_dim=32, teacher_dim=48, mimic=mimic)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.03)

    first = float(loss(student, teacher)[0].detach())
    for _ in range(300):
        value, logs = loss(student, teacher)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    assert float(logs["mimic"]) < 0.02 * first, f"mimic term {float(logs['mimic']):.4f} from a total of {first:.4f}"
    assert float(logs["positive_cosine"]) > 0.99
    if name == "mimic+infonce":
        assert float(logs["infonce"]) < 0.1 * math.log(64), f"InfoNCE {float(logs['infonce']):.4f}, chance is log(64)"


# Gradients


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    loss = build_loss(name, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _batch()
    student.requires_grad_(True)

    value, _ = loss(student, teacher)
    value.backward()

    assert student.grad is not None and student.grad.abs().sum() > 0, "no gradient reaches the student"
    without = [parameter for parameter, tensor in loss.named_parameters() if tensor.grad is None or not tensor.grad.abs().sum() > 0]
    assert not without, f"{name}: parameters without a gradient: {without}"


@pytest.mark.parametrize("student_name", ["unite", "vit_small_patch16_224"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_every_parameter_gets_a_gradient(shared_data, student_name, loss_name):
    tiles = _lung_tiles(shared_data, 2)
    torch.manual_seed(0)
    student = build_student(student_name)
    module = DistillModule(student, build_loss(loss_name, student_dim=embedding_dim(student), teacher_dim=TEACHER_DIM), total_steps=1)

    value, _ = module.loss(module.embed(torch.from_numpy(to_model_input(tiles))), _teacher_embeddings(tiles))
    value.backward()

    assert torch.isfinite(value)
    without = [name for name, parameter in module.named_parameters() if parameter.grad is None]
    assert not without, f"{student_name} with {loss_name}: parameters without a gradient: {without}"
    non_finite = [name for name, parameter in module.named_parameters() if not torch.isfinite(parameter.grad).all()]
    assert not non_finite, f"{student_name} with {loss_name}: non-finite gradients: {non_finite}"


# The Lightning module


def test_module_trains_student_and_loss(shared_data):
    """Two bf16 optimiser steps on four real tiles change the student, the projector and the temperature."""
    tiles = _lung_tiles(shared_data, 4)
    images = torch.from_numpy(to_model_input(tiles))
    loader = DataLoader(TensorDataset(images, _teacher_embeddings(tiles)), batch_size=4)
    lightning.seed_everything(0, verbose=False)
    student = build_student()
    module = DistillModule(student, build_loss(student_dim=384, teacher_dim=TEACHER_DIM), lr=1e-3, warmup_steps=1, total_steps=2)
    before = {name: tensor.detach().clone() for name, tensor in module.named_parameters()}
    trainer = lightning.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    trainer.fit(module, train_dataloaders=loader)

    unchanged = [name for name, tensor in module.named_parameters() if torch.equal(tensor.detach(), before[name])]
    assert not unchanged, f"parameters the optimiser did not change: {unchanged}"
    assert trainer.global_step == 2
    for key in ("train/loss", "train/mimic", "train/infonce", "train/temperature", "train/positive_cosine"):
        assert key in trainer.callback_metrics, f"{key} not logged: {sorted(trainer.callback_metrics)}"
    with torch.no_grad():
        assert torch.equal(module(images[:2]), student.forward_head(student.forward_features(images[:2]), pre_logits=True))


def test_module_weight_decay_groups():
    student = build_student("resnet10t")
    module = DistillModule(student, build_loss(student_dim=512, teacher_dim=64), weight_decay=0.1, total_steps=10)

    decay, no_decay = module._parameter_groups()
    decayed = {id(parameter) for parameter in decay["params"]}
    names = {id(parameter): name for name, parameter in module.named_parameters()}

    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert id(module.loss.mimic_projector.weight) in decayed
    assert id(module.loss.log_temperature) not in decayed
    assert id(module.loss.mimic_projector.bias) not in decayed
    assert all(module.get_parameter(names[key]).ndim > 1 for key in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr is 0.0"),
        ({"weight_decay": -1.0}, "weight_decay is -1.0"),
        ({"warmup_steps": -1}, "warmup_steps is -1"),
        ({"warmup_steps": 5, "total_steps": 4}, "spans 4 optimiser steps"),
    ],
)
def test_module_rejects_invalid_schedule(kwargs, message):
    student = build_student("resnet10t")

    with pytest.raises(ConfigError, match=message):
        DistillModule(student, build_loss(student_dim=512, teacher_dim=64), **kwargs)


# Settings and shapes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mse"}, r"loss is 'mse', expected one of \['unite', 'mimic', 'mimic\+infonce'\]"),
        ({"mimic": "l2"}, r"mimic is 'l2', expected one of \['cosine', 'smooth_l1'\]"),
        ({"temperature": 0.0}, r"temperature is 0.0, expected a number in \[0.01, 1.0\]"),
        ({"temperature": 2.0}, r"temperature is 2.0"),
        ({"student_dim": 0}, "student_dim is 0, expected a positive integer"),
        ({"name": "mimic", "learnable_temperature": True}, "no InfoNCE term"),
    ],
)
def test_build_loss_rejects_invalid_settings(kwargs, message):
    arguments = {"student_dim": STUDENT_DIM, "teacher_dim": TEACHER_DIM, **kwargs}

    with pytest.raises(ConfigError, match=message):
        build_loss(**arguments)


def test_loss_rejects_wrong_shapes():
    loss = build_loss(student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _batch(4)

    with pytest.raises(ModelError, match=r"shape \(4, 384\) and teacher embeddings of shape \(4, 768\)"):
        loss(student, teacher[:, :768])
    with pytest.raises(ModelError, match=r"B >= 2"):
        loss(student[:1], teacher[:1])


def test_loss_summary_is_json():
    summary = build_loss(student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM, mimic="smooth_l1").summary()

    assert json.loads(json.dumps(summary)) == {
        "name": "mimic+infonce",
        "mimic": "smooth_l1",
        "temperature": 0.07,
        "learnable_temperature": True,
        "mimic_projector": {"in_features": STUDENT_DIM, "out_features": TEACHER_DIM},
    }
    assert build_loss("unite", student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM).summary()["mimic_projector"] is None
