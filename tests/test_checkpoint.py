"""Tests of the exported student checkpoint: round trip, model card, atomic replacement and load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.checkpoint import (
    CHECKPOINT_CARD,
    CHECKPOINT_CONFIG,
    CHECKPOINT_WEIGHTS,
    file_sha256,
    is_restrictive_licence,
    load_student,
    save_student,
)
from shared.errors import ModelError
from shared.models.student import UNITE_STUDENT_KWARGS, UNITE_STUDENT_NAME, build_unite_student

TEACHER = "reference-teacher@1"
TRAINING = {
    "epochs": 1,
    "steps": 3,
    "split": "by slide: 3 slides (30 tiles) train, 1 slides (10 tiles) validate",
    "train_tiles": 30,
    "val_tiles": 10,
    "losses": {"first_train": 2.09, "last_train": 1.83, "val": 1.88},
}


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
