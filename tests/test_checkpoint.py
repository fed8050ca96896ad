"""Tests of the exported student checkpoint: round trip, projector, model card, atomic replacement and load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_slides import he_like

from distiller.loss import build_loss
from shared.checkpoint import (
    CHECKPOINT_CARD,
    CHECKPOINT_CONFIG,
    CHECKPOINT_WEIGHTS,
    MIMIC_PROJECTOR_WEIGHTS,
    file_sha256,
    is_restrictive_licence,
    load_mimic_projector,
    load_student,
    save_student,
)
from shared.errors import ModelError
from shared.models.student import UNITE_STUDENT_KWARGS, UNITE_STUDENT_NAME, build_student, build_unite_student
from student_server.model import StudentModel
from student_server.settings import StudentSettings

TEACHER = "reference-teacher@1"
TRAINING = {
    "epochs": 1,
    "steps": 3,
    "split": "by slide: 3 slides (30 tiles) train, 1 slides (10 tiles) validate",
    "train_tiles": 30,
    "val_tiles": 10,
    "losses": {"first_train": 2.09, "last_train": 1.83, "val": 1.88},
}
DATA = {"shards": 2, "tiles": 40, "slides": 4, "teacher_dim": 1536}
VALIDATION = {"val/loss": 1.88, "val/knn_overlap_at_10": 0.41, "val/linear_cka": 0.73}


def _export(model: torch.nn.Module, folder: Path, licence: str = "CC-BY-NC-ND-4.0") -> Path:
    return save_student(
        model,
        folder,
        architecture=UNITE_STUDENT_NAME,
        architecture_kwargs=UNITE_STUDENT_KWARGS,
        teacher=TEACHER,
        teacher_licence=licence,
        training=TRAINING,
        command="unite distill --shards shards/",
    )


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unite_student().eval()


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> Path:
    return _export(student, tmp_path_factory.mktemp("export") / "student")


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    """A private copy of the export that a test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "student"))


def _rewrite_config(folder: Path, **changes) -> None:
    path = folder / CHECKPOINT_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_round_trip_gives_same_embeddings(student, exported):
    loaded = load_student(exported)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected = student.forward_head(student.forward_features(images), pre_logits=True)
        actual = loaded.model.forward_head(loaded.model.forward_features(images), pre_logits=True)

    assert torch.equal(actual, expected)
    assert not loaded.model.training
    assert loaded.embed_dim == 384
    assert loaded.sha256 == file_sha256(exported / CHECKPOINT_WEIGHTS)
    assert loaded.name == f"{UNITE_STUDENT_NAME}@{loaded.sha256[:12]}"
    assert loaded.folder == exported


def test_config_records_format_and_teacher(exported):
    config = json.loads((exported / CHECKPOINT_CONFIG).read_text())

    assert config["format"] == "unite-student"
    assert config["format_version"] == 1
    assert config["architecture"] == UNITE_STUDENT_NAME
    assert config["architecture_kwargs"] == UNITE_STUDENT_KWARGS
    assert config["embed_dim"] == 384
    assert config["input_size"] == 224
    assert config["mean"] == [0.485, 0.456, 0.406]
    assert config["std"] == [0.229, 0.224, 0.225]
    assert config["target_mpp"] == 0.5
    assert config["teacher"] == TEACHER
    assert config["teacher_licence"] == "CC-BY-NC-ND-4.0"
    assert config["training"] == TRAINING
    assert config["weights_sha256"] == file_sha256(exported / CHECKPOINT_WEIGHTS)


def test_card_names_teacher_licence_and_warning(exported):
    card = (exported / CHECKPOINT_CARD).read_text()
    header = "\n".join(card.splitlines()[:6])

    assert TEACHER in header
    assert "CC-BY-NC-ND-4.0" in header
    assert "Derivative-work warning" in card
    assert "| train_tiles | 30 |" in card
    assert "by slide" in card
    assert "last_train" in card
    assert "unite distill --shards shards/" in card


def test_card_without_warning_for_permissive_licence(student, tmp_path):
    folder = _export(student, tmp_path / "student", licence="Apache-2.0")

    card = (folder / CHECKPOINT_CARD).read_text()
    assert "Apache-2.0" in card
    assert "Derivative-work warning" not in card


@pytest.mark.parametrize(
    ("licence", "restrictive"),
    [
        ("CC-BY-NC-ND-4.0", True),
        ("cc-by-nc-4.0", True),
        ("CC BY-ND 4.0", True),
        ("Creative Commons NonCommercial", True),
        ("Apache-2.0", False),
        ("CC-BY-4.0", False),
        ("MIT", False),
    ],
)
def test_restrictive_licence_detection(licence, restrictive):
    assert is_restrictive_licence(licence) is restrictive


def test_save_replaces_older_export(student, exported, tmp_path):
    folder = Path(shutil.copytree(exported, tmp_path / "student"))
    old_sha = file_sha256(folder / CHECKPOINT_WEIGHTS)
    torch.manual_seed(1)
    other = build_unite_student()

    _export(other, folder)

    assert load_student(folder).sha256 != old_sha
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"], "a temporary folder was left behind"
    assert sorted(path.name for path in folder.iterdir()) == sorted([CHECKPOINT_CARD, CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS])


def test_save_removes_partial_folders_of_killed_export(student, tmp_path):
    # A kill -9 during an export leaves its temporary folder, with whatever it had written, beside the target.
    stale = tmp_path / ".student.partial-0123abcd"
    stale.mkdir()
    (stale / CHECKPOINT_WEIGHTS).write_bytes(b"half-written weights")
    # Names that only look like a temporary folder of this export are kept.
    lookalikes = [
        ".student.partial-0123abc",
        ".student.partial-0123abcde",
        ".student.partial-0123ABCD",
        ".students.partial-0123abcd",
        "student.partial-0123abcd",
        ".student.old-0123abcd",
    ]
    for name in lookalikes:
        (tmp_path / name).mkdir()
    (tmp_path / ".student.partial-89abcdef").write_text("a file, not a temporary folder")
    lookalikes.append(".student.partial-89abcdef")

    _export(student, tmp_path / "student")

    assert not stale.exists(), "the temporary folder of the killed export was not removed"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["student", *lookalikes])
    assert load_student(tmp_path / "student").sha256 == file_sha256(tmp_path / "student" / CHECKPOINT_WEIGHTS)


def test_load_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(ModelError, match="unite distill") as error:
        load_student(missing)
    assert str(missing) in str(error.value)


def test_load_missing_weights(export_copy):
    (export_copy / CHECKPOINT_WEIGHTS).unlink()

    with pytest.raises(ModelError, match=CHECKPOINT_WEIGHTS):
        load_student(export_copy)


def test_load_corrupted_config(export_copy):
    (export_copy / CHECKPOINT_CONFIG).write_text('{"format": "unite-student", ')

    with pytest.raises(ModelError, match="not valid JSON"):
        load_student(export_copy)


def test_load_wrong_format(export_copy):
    _rewrite_config(export_copy, format="something-else")

    with pytest.raises(ModelError, match="expected 'unite-student' version 1"):
        load_student(export_copy)


def test_load_unknown_architecture(export_copy):
    _rewrite_config(export_copy, architecture="vit-huge-9000")

    with pytest.raises(ModelError, match="unknown architecture 'vit-huge-9000'") as error:
        load_student(export_copy)
    assert UNITE_STUDENT_NAME in str(error.value)


def test_load_changed_weights(export_copy):
    with open(export_copy / CHECKPOINT_WEIGHTS, "r+b") as file:
        file.seek(-4, 2)
        file.write(b"\x00\x01\x02\x03")

    with pytest.raises(ModelError, match="sha256"):
        load_student(export_copy)


def test_load_wrong_keys(export_copy):
    weights = export_copy / CHECKPOINT_WEIGHTS
    state = load_file(weights)
    state["head.extra"] = state.pop("fc_norm.weight")
    save_file(state, weights)
    _rewrite_config(export_copy, weights_sha256=file_sha256(weights))

    with pytest.raises(ModelError) as error:
        load_student(export_copy)
    message = str(error.value)
    assert "missing keys ['fc_norm.weight']" in message
    assert "unexpected keys ['head.extra']" in message


# The mimic projector, the loss record and timm students


@pytest.fixture(scope="module")
def mimic_loss():
    torch.manual_seed(2)
    return build_loss("mimic+infonce", student_dim=384, teacher_dim=1536)


@pytest.fixture(scope="module")
def exported_with_projector(student, mimic_loss, tmp_path_factory) -> Path:
    return save_student(
        student,
        tmp_path_factory.mktemp("export") / "student",
        teacher=TEACHER,
        teacher_licence="CC-BY-NC-ND-4.0",
        training=TRAINING,
        loss=mimic_loss.summary(),
        mimic_projector=mimic_loss.mimic_projector,
        validation_metrics=VALIDATION,
        data=DATA,
        command="unite distill --shards shards/ --loss mimic+infonce",
    )


def test_projector_round_trip_gives_same_embeddings(student, mimic_loss, exported_with_projector):
    loaded = load_student(exported_with_projector)
    projector = load_mimic_projector(exported_with_projector)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        expected = student.forward_head(student.forward_features(images), pre_logits=True)
        actual = loaded.model.forward_head(loaded.model.forward_features(images), pre_logits=True)
        expected_teacher_space = mimic_loss.mimic_projector(expected)
        actual_teacher_space = projector(actual)

    assert torch.equal(actual, expected)
    assert actual_teacher_space.shape == (2, 1536)
    assert torch.equal(actual_teacher_space, expected_teacher_space)
    assert not projector.training


def test_config_records_student_loss_and_projector(exported_with_projector, mimic_loss):
    config = json.loads((exported_with_projector / CHECKPOINT_CONFIG).read_text())

    assert config["student"] == "unite"
    assert config["architecture"] == UNITE_STUDENT_NAME
    assert config["loss"] == mimic_loss.summary()
    assert config["loss"]["name"] == "mimic+infonce"
    assert config["mimic_projector"] == {
        "file": MIMIC_PROJECTOR_WEIGHTS,
        "in_features": 384,
        "out_features": 1536,
        "sha256": file_sha256(exported_with_projector / MIMIC_PROJECTOR_WEIGHTS),
    }
    assert config["validation_metrics"] == VALIDATION
    assert config["data"] == DATA
    assert config["command"] == "unite distill --shards shards/ --loss mimic+infonce"


def test_card_shows_metrics_data_and_command(exported_with_projector):
    card = (exported_with_projector / CHECKPOINT_CARD).read_text()

    assert "## Validation metrics" in card
    assert "| val/linear_cka | 0.73 |" in card
    assert "## Training data" in card
    assert "| slides | 4 |" in card
    assert "| name | mimic+infonce |" in card
    assert f"`{MIMIC_PROJECTOR_WEIGHTS}`, 384 -> 1536" in card
    assert "unite distill --shards shards/ --loss mimic+infonce" in card
    assert "load_mimic_projector" in card


def test_export_without_projector_has_none(exported):
    config = json.loads((exported / CHECKPOINT_CONFIG).read_text())

    assert config["mimic_projector"] is None
    assert load_mimic_projector(exported) is None
    assert not (exported / MIMIC_PROJECTOR_WEIGHTS).exists()
    assert "Teacher-space projector: none" in (exported / CHECKPOINT_CARD).read_text()


def test_export_of_older_format_still_loads(student, exported, tmp_path):
    # Exports written before students, losses and projectors were recorded have none of these keys.
    folder = Path(shutil.copytree(exported, tmp_path / "student"))
    config = json.loads((folder / CHECKPOINT_CONFIG).read_text())
    for key in ("student", "loss", "mimic_projector", "data", "validation_metrics"):
        del config[key]
    (folder / CHECKPOINT_CONFIG).write_text(json.dumps(config))

    loaded = load_student(folder)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded.model(images), student(images))
    assert loaded.name.startswith(f"{UNITE_STUDENT_NAME}@")
    assert load_mimic_projector(folder) is None


def test_projector_missing_file(exported_with_projector, tmp_path):
    folder = Path(shutil.copytree(exported_with_projector, tmp_path / "student"))
    (folder / MIMIC_PROJECTOR_WEIGHTS).unlink()

    with pytest.raises(ModelError, match=f"records a mimic projector, but .*{MIMIC_PROJECTOR_WEIGHTS} not found"):
        load_mimic_projector(folder)


def test_projector_changed_file(exported_with_projector, tmp_path):
    folder = Path(shutil.copytree(exported_with_projector, tmp_path / "student"))
    state = load_file(folder / MIMIC_PROJECTOR_WEIGHTS)
    state["weight"] = state["weight"] * 2
    save_file(state, folder / MIMIC_PROJECTOR_WEIGHTS)

    with pytest.raises(ModelError, match="changed or damaged after export"):
        load_mimic_projector(folder)


def test_projector_of_wrong_width_rejected(student, tmp_path):
    with pytest.raises(ModelError, match=r"cannot export mimic_projector Linear 256 -> 1536: .* 384-d"):
        save_student(
            student,
            tmp_path / "student",
            teacher=TEACHER,
            teacher_licence="MIT",
            training=TRAINING,
            mimic_projector=torch.nn.Linear(256, 1536),
        )
    assert not (tmp_path / "student").exists()


def test_timm_student_round_trip(tmp_path):
    torch.manual_seed(5)
    model = build_student("resnet10t").eval()
    folder = save_student(model, tmp_path / "student", student="resnet10t", teacher=TEACHER, teacher_licence="MIT", training=TRAINING)

    loaded = load_student(folder)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))
    config = json.loads((folder / CHECKPOINT_CONFIG).read_text())
    assert (config["student"], config["architecture"], config["architecture_kwargs"]) == ("resnet10t", "timm", {"model_name": "resnet10t"})
    assert loaded.embed_dim == 512
    assert loaded.name == f"timm:resnet10t@{loaded.sha256[:12]}"


def test_student_and_architecture_must_agree(student, tmp_path):
    with pytest.raises(ModelError, match="student 'resnet10t' as architecture 'unite-vit-small-14'"):
        save_student(
            student,
            tmp_path / "student",
            student="resnet10t",
            architecture=UNITE_STUDENT_NAME,
            teacher=TEACHER,
            teacher_licence="MIT",
            training=TRAINING,
        )


def test_server_model_offers_teacher_space_output(exported_with_projector, exported, tmp_path):
    tiles = np.stack([he_like(224, 224, seed=seed) for seed in range(3)])
    model = StudentModel(StudentSettings(checkpoint_dir=exported_with_projector, upload_dir=tmp_path, batch_size=2))
    assert model.ensure_loaded() is not None

    embeddings = model.embed(tiles)
    teacher_space = model.embed(tiles, teacher_space=True)

    projector = load_mimic_projector(exported_with_projector)
    with torch.no_grad():
        expected = projector(torch.from_numpy(embeddings)).numpy()
    assert model.teacher_dim == 1536
    assert embeddings.shape == (3, 384)
    assert teacher_space.shape == (3, 1536)
    assert np.allclose(teacher_space, expected, atol=1e-5), f"max abs difference {np.abs(teacher_space - expected).max()}"
    assert model.embed(tiles[:0], teacher_space=True).shape == (0, 1536)

    without = StudentModel(StudentSettings(checkpoint_dir=exported, upload_dir=tmp_path))
    assert without.ensure_loaded() is not None
    assert without.teacher_dim is None
    with pytest.raises(ModelError, match="exported without a mimic projector"):
        without.embed(tiles, teacher_space=True)
