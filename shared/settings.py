"""Reading a service's settings from the environment, with errors that name the environment variable."""

from __future__ import annotations

import json
import os
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from shared.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_class: type[SettingsT], *, env_prefix: str, service: str) -> SettingsT:
    """Read ``settings_class`` from the environment, raising :class:`ConfigError` that names each invalid variable."""
    try:
        return settings_class()
    except SettingsError as error:
        raise settings_source_error(error, env_prefix=env_prefix, service=service) from error
    except ValidationError as error:
        problems = "; ".join(
            f"{env_prefix}{'__'.join(str(part) for part in item['loc']).upper()}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"invalid {service} settings: {problems}. Fix or unset these environment variables.") from error


def settings_source_error(error: SettingsError, *, env_prefix: str, service: str) -> ConfigError:
    """Convert pydantic-settings' error for a value it cannot parse (bad JSON in a nested setting) into a ConfigError.

    pydantic-settings names only the field, so the variables are found again here: those under the prefix
    whose value starts like JSON (``{`` or ``[``) and does not parse. Values are never repeated, because
    a nested setting can hold a URL or header.
    """
    prefix = env_prefix.upper()
    broken = []
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(prefix) or not value.lstrip().startswith(("{", "[")):
            continue
        try:
            json.loads(value)
        except ValueError as parse_error:
            broken.append(f"{name} is not valid JSON ({parse_error})")
    if not broken:
        broken.append(f"a {prefix}* variable cannot be parsed ({error})")
    return ConfigError(
        f"invalid {service} settings: {'; '.join(broken)}. A nested setting takes a JSON object, such as "
        f'{{"embeddings_path": "data"}}, or one variable per field joined by "__". Fix or unset these environment variables.',
        value=None,
    )
