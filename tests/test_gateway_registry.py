"""The gateway settings reach the teacher backends: local options, the nested remote settings, and their errors."""

from __future__ import annotations

import logging

import pytest

from shared.errors import ConfigError
from teacher_gateway.settings import GatewaySettings
from teacher_gateway.teachers.registry import build_configured_teacher, teacher_options


def test_unset_local_settings_are_left_out(tmp_path):
    settings = GatewaySettings(teacher="onnx", weights=tmp_path / "model.onnx", output_name="embedding", mean=(0.5, 0.5, 0.5))

    assert teacher_options(settings) == {"weights": tmp_path / "model.onnx", "output_name": "embedding", "mean": (0.5, 0.5, 0.5)}


def test_missing_weights_names_setting(tmp_path):
    settings = GatewaySettings(teacher="uni2-h", weights=tmp_path / "absent.safetensors", device="cpu")

    with pytest.raises(ConfigError) as raised:
        build_configured_teacher(settings)

    assert "UNITE_GATEWAY_WEIGHTS" in raised.value.message
    assert str(tmp_path / "absent.safetensors") in raised.value.message


def test_remote_without_settings_is_config_error():
    with pytest.raises(ConfigError) as raised:
        build_configured_teacher(GatewaySettings(teacher="remote"))

    assert "UNITE_GATEWAY_REMOTE__URL" in raised.value.message


def test_remote_settings_from_environment(monkeypatch):
    monkeypatch.setenv("UNITE_GATEWAY_TEACHER", "remote")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__URL", "http://127.0.0.1:9/v1/embeddings")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__MODEL", "vendor-model")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__DIM", "64")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__LICENCE", "vendor terms")
    monkeypatch.setenv("UNITE_GATEWAY_REMOTE__MAX_BATCH_SIZE", "8")

    options = teacher_options(GatewaySettings())

    assert options["url"] == "http://127.0.0.1:9/v1/embeddings"
    assert (options["model"], options["dim"], options["max_batch_size"]) == ("vendor-model", 64, 8)


def test_settings_of_other_backend_warn(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    settings = GatewaySettings(teacher="reference", weights=tmp_path / "model.safetensors", batch_size=8)

    teacher = build_configured_teacher(settings)

    assert teacher.identity.startswith("unite-reference-teacher/")
    assert "teacher 'reference' ignores the settings weights, batch_size" in caplog.text
