"""Tests of the students: timm's contract for every student, names, and initialisation from local weights files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from shared.errors import ModelError
from shared.models.student import (
    UNITE_STUDENT_KWARGS,
    UNITE_STUDENT_PARAMETERS,
    build_student,
    embedding_dim,
    student_architecture,
)

# A small timm model keeps the weights tests fast.
SMALL_TIMM_STUDENT = "resnet10t"


def _images(count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_unite_is_default_student():
    with torch.device("meta"):
        model = build_student()

    assert isinstance(model, VisionTransformer)
    assert sum(parameter.numel() for parameter in model.parameters()) == UNITE_STUDENT_PARAMETERS
    assert embedding_dim(model) == 384
    assert model.num_features == 384
    assert student_architecture("unite") == ("unite-vit-small-14", UNITE_STUDENT_KWARGS)


@pytest.mark.parametrize(
    ("name", "dim"),
    # mobilenetv3_small_050 pools 288 features and projects them to a 1024-d embedding.
    [("unite", 384), ("vit_small_patch16_224", 384), (SMALL_TIMM_STUDENT, 512), ("mobilenetv3_small_050", 1024)],
)
def test_student_follows_timm_contract(name, dim):
    torch.manual_seed(0)
    model = build_student(name).eval()
    images = _images()

    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        embedding = model(images)

    assert embedding_dim(model) == dim
    assert isinstance(model.num_features, int)
    assert pooled.shape == (2, dim)
    assert torch.equal(embedding, pooled), f"forward differs from forward_head(pre_logits=True) by {(embedding - pooled).abs().max()}"
    assert torch.isfinite(embedding).all()


def test_timm_student_records_its_name():
    assert student_architecture("vit_small_patch16_224") == ("timm", {"model_name": "vit_small_patch16_224"})


def test_unknown_student_lists_close_names():
    with pytest.raises(ModelError, match="neither 'unite' nor a model name") as error:
        build_student("vit_smal_patch16_224")
    assert "vit_small_patch16_224" in str(error.value)
    assert "timm.list_models()" in str(error.value)


def test_hub_student_name_rejected():
    # A hf-hub name would make timm fetch the model's configuration from the hub, even with pretrained=False.
    with pytest.raises(ModelError, match="hf-hub:MahmoodLab/UNI2-h"):
        build_student("hf-hub:MahmoodLab/UNI2-h")


def test_weights_from_safetensors_give_same_embeddings(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_student().eval()
    path = tmp_path / "unite.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in source.state_dict().items()}, path)

    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="shared.models.student"):
        loaded = build_student("unite", weights=path).eval()

    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))
    assert f"{len(source.state_dict())} tensors loaded, 0 missing, 0 unexpected" in caplog.text


def test_weights_from_lightning_state_dict_strip_prefix(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_student(SMALL_TIMM_STUDENT)
    state = {f"student.{name}": tensor for name, tensor in source.state_dict().items()}
    state["loss.mimic_projector.weight"] = torch.zeros(1536, 512)
    path = tmp_path / "last.pth"
    torch.save({"state_dict": state, "global_step": 3}, path)

    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="shared.models.student"):
        loaded = build_student(SMALL_TIMM_STUDENT, weights=path)

    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), f"{name} was not loaded"
    assert "key prefix 'student.' removed and 1 tensors outside it skipped" in caplog.text


def test_partial_weights_log_missing_and_unexpected(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_student(SMALL_TIMM_STUDENT)
    state = _parameters(source)
    dropped = state.pop("conv1.0.weight")
    state["head.extra.weight"] = torch.ones(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, path)

    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="shared.models.student"):
        loaded = build_student(SMALL_TIMM_STUDENT, weights=path)

    assert not torch.equal(loaded.state_dict()["conv1.0.weight"], dropped), "the missing tensor should keep its random value"
    assert torch.equal(loaded.state_dict()["bn1.weight"], state["bn1.weight"])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("missing" in message and "conv1.0.weight" in message for message in warnings), warnings
    assert any("does not have" in message and "head.extra.weight" in message for message in warnings), warnings
    assert "1 missing, 1 unexpected" in caplog.text


def test_weights_of_other_shape_rejected(tmp_path):
    torch.manual_seed(0)
    state = _parameters(build_student(SMALL_TIMM_STUDENT))
    state["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "other.safetensors"
    save_file(state, path)

    with pytest.raises(ModelError, match=r"conv1\.0\.weight: file \(8, 3, 3, 3\), model \(24, 3, 3, 3\)"):
        build_student(SMALL_TIMM_STUDENT, weights=path)


def test_weights_without_matching_key_rejected(tmp_path):
    path = tmp_path / "unrelated.safetensors"
    save_file({"encoder_layer.weight": torch.zeros(2, 2)}, path)

    with pytest.raises(ModelError, match="none has a key of student 'resnet10t'"):
        build_student(SMALL_TIMM_STUDENT, weights=path)


def test_weights_file_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        build_student(SMALL_TIMM_STUDENT, weights=tmp_path / "missing.safetensors")

    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ModelError, match=r"suffix '\.txt', expected one of"):
        build_student(SMALL_TIMM_STUDENT, weights=text)

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="cannot read student weights file"):
        build_student(SMALL_TIMM_STUDENT, weights=damaged)


def test_pickled_model_rejected(tmp_path):
    # A whole pickled model needs code to unpickle, so loading with weights_only=True rejects it.
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)

    with pytest.raises(ModelError, match="only tensors and plain containers"):
        build_student(SMALL_TIMM_STUDENT, weights=path)


def test_tensor_list_file_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)

    with pytest.raises(ModelError, match="contains a list, expected a state dict"):
        build_student(SMALL_TIMM_STUDENT, weights=Path(path))
