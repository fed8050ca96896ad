"""Tests of the ONNX export: onnxruntime against torch, the dynamic batch axis, metadata, the CLI and errors.

The tiles are synthetic H&E-like images: the export must reproduce the student on any input, so real
data is not the point here.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from synthetic_slides import he_like

from distiller.loss import build_loss
from distiller.onnx_export import EMBEDDING_OUTPUT, TEACHER_OUTPUT, export_onnx
from shared.checkpoint import load_mimic_projector, load_student, save_student
from shared.errors import ConfigError
from shared.imaging import to_model_input
from shared.models.student import build_student
from unite_cli.main import main

TEACHER = "reference-teacher@1"
LICENCE = "CC-BY-NC-ND-4.0"
TRAINING = {"steps": 0}


def _tiles(count: int) -> np.ndarray:
    return np.stack([he_like(224, 224, seed=seed, blobs=4) for seed in range(count)])


@pytest.fixture(scope="module")
def unite_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    student = build_student().eval()
    loss = build_loss(student_dim=384, teacher_dim=1536)
    return save_student(
        student,
        tmp_path_factory.mktemp("export") / "student",
        teacher=TEACHER,
        teacher_licence=LICENCE,
        training=TRAINING,
        loss=loss.summary(),
        mimic_projector=loss.mimic_projector,
    )


@pytest.fixture(scope="module")
def unite_onnx(unite_checkpoint, tmp_path_factory):
    return export_onnx(unite_checkpoint, tmp_path_factory.mktemp("onnx") / "student.onnx")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A timm student exported without a projector, as the 'unite' loss leaves it."""
    torch.manual_seed(1)
    return save_student(
        build_student("resnet10t").eval(),
        tmp_path_factory.mktemp("export") / "student",
        student="resnet10t",
        teacher=TEACHER,
        teacher_licence=LICENCE,
        training=TRAINING,
    )


def test_onnx_matches_torch_on_tiles(unite_checkpoint, unite_onnx):
    # Five tiles, while the graph was traced with two, so the batch axis must be dynamic.
    pixels = to_model_input(_tiles(5))
    student = load_student(unite_checkpoint).model
    projector = load_mimic_projector(unite_checkpoint)
    with torch.no_grad():
        expected = student(torch.from_numpy(pixels))
        expected_teacher_space = projector(expected)

    session = onnxruntime.InferenceSession(str(unite_onnx.path), providers=["CPUExecutionProvider"])
    embedding, teacher_embedding = session.run([EMBEDDING_OUTPUT, TEACHER_OUTPUT], {"pixels": pixels})

    assert embedding.shape == (5, 384)
    assert teacher_embedding.shape == (5, 1536)
    difference = np.abs(embedding - expected.numpy()).max()
    teacher_difference = np.abs(teacher_embedding - expected_teacher_space.numpy()).max()
    assert difference < 1e-4, f"embedding: max abs difference {difference:.3g} between onnxruntime and torch"
    assert teacher_difference < 1e-4, f"teacher_embedding: max abs difference {teacher_difference:.3g} between onnxruntime and torch"


def test_export_reports_outputs_and_differences(unite_onnx):
    assert unite_onnx.opset == 17
    assert unite_onnx.output_dims == {EMBEDDING_OUTPUT: 384, TEACHER_OUTPUT: 1536}
    assert all(0 <= value < 1e-4 for value in unite_onnx.max_abs_diff.values()), unite_onnx.max_abs_diff
    assert "teacher_embedding (1536-d, max abs difference to torch" in unite_onnx.summary()
    assert sorted(path.name for path in unite_onnx.path.parent.iterdir()) == ["student.onnx"], "a temporary file was left behind"


def test_onnx_metadata_names_teacher_and_licence(unite_checkpoint, unite_onnx):
    model = onnx.load(str(unite_onnx.path), load_external_data=False)
    properties = {entry.key: entry.value for entry in model.metadata_props}

    assert properties["unite.teacher"] == TEACHER
    assert properties["unite.teacher_licence"] == LICENCE
    assert properties["unite.student"] == "unite"
    assert properties["unite.weights_sha256"] == load_student(unite_checkpoint).sha256
    assert model.opset_import[0].version == 17


def test_export_without_projector_has_one_output(small_checkpoint, tmp_path):
    export = export_onnx(small_checkpoint, tmp_path / "small.onnx")
    pixels = to_model_input(_tiles(3))
    with torch.no_grad():
        expected = load_student(small_checkpoint).model(torch.from_numpy(pixels)).numpy()

    session = onnxruntime.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"pixels": pixels})

    assert [output.name for output in session.get_outputs()] == [EMBEDDING_OUTPUT]
    assert export.output_dims == {EMBEDDING_OUTPUT: 512}
    difference = np.abs(outputs[0] - expected).max()
    assert difference < 1e-4, f"max abs difference {difference:.3g} between onnxruntime and torch"


def test_cli_export_onnx(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx" / "small.onnx"

    status = main(["export-onnx", str(small_checkpoint), "--out", str(out), "--opset", "18"])

    printed = capsys.readouterr().out
    assert status == 0
    assert out.is_file()
    assert printed.startswith(f"wrote {out} (opset 18): embedding (512-d")
    assert onnx.load(str(out)).opset_import[0].version == 18


def test_cli_export_onnx_missing_checkpoint(tmp_path, caplog):
    status = main(["export-onnx", str(tmp_path / "nowhere"), "--out", str(tmp_path / "student.onnx")])

    assert status == 2
    assert f"CHECKPOINT {tmp_path / 'nowhere'} not found" in caplog.text
    assert not (tmp_path / "student.onnx").exists()


def test_export_rejects_old_opset(small_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="opset is 13, expected an integer >= 14"):
        export_onnx(small_checkpoint, tmp_path / "student.onnx", opset=13)


def test_export_rejects_folder_as_output(small_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="is a folder, expected a file path"):
        export_onnx(small_checkpoint, tmp_path)
