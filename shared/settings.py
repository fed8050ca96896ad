"""Reading a service's settings from the environment, with errors that name the environment variable."""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from shared.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_class: type[SettingsT], *, env_prefix: str, service: str) -> SettingsT:
    """Read ``settings_class`` from the environment, raising :class:`ConfigError` that names each invalid variable."""
    try:
        return settings_class()
    except ValidationError as error:
        problems = "; ".join(
            f"{env_prefix}{'__'.join(str(part) for part in item['loc']).upper()}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"invalid {service} settings: {problems}. Fix or unset these environment variables.") from error
