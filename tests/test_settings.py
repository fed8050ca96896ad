"""Service settings read from the environment: invalid values name their environment variable."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from student_server.settings import get_settings as get_student_settings
from teacher_gateway.settings import get_settings as get_gateway_settings


@pytest.mark.parametrize(
    ("getter", "variable", "value"),
    [
        (get_gateway_settings, "UNITE_GATEWAY_PORT", "abc"),
        (get_gateway_settings, "UNITE_GATEWAY_MAX_TILES_PER_REQUEST", "0"),
        (get_student_settings, "UNITE_STUDENT_MAX_UPLOAD_BYTES", "abc"),
    ],
    ids=["gateway-port", "gateway-tile-limit", "student-upload-limit"],
)
def test_invalid_environment_names_variable(getter, variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    getter.cache_clear()
    try:
        with pytest.raises(ConfigError) as error:
            getter()
    finally:
        getter.cache_clear()

    assert variable in str(error.value)
    assert "Fix or unset these environment variables" in str(error.value)


def test_defaults_load_without_environment(monkeypatch):
    monkeypatch.delenv("UNITE_GATEWAY_HOST", raising=False)
    monkeypatch.delenv("UNITE_STUDENT_HOST", raising=False)
    for getter in (get_gateway_settings, get_student_settings):
        getter.cache_clear()
        try:
            settings = getter()
        finally:
            getter.cache_clear()
        assert settings.host == "127.0.0.1"
