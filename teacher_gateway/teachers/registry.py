"""The registry of teacher backends: a name from the settings or the command line to a ready teacher."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shared.errors import ConfigError
from teacher_gateway.teachers.base import Teacher

logger = logging.getLogger(__name__)


def _build_reference(**options: Any) -> Teacher:
    if options:
        raise ConfigError(
            f"teacher 'reference' takes no options, got {sorted(options)}. "
            "Remove them, because the reference teacher has no weights or settings.",
            value=sorted(options),
        )
    # Imported here so that listing the backends does not load scipy.
    from teacher_gateway.teachers.reference import ReferenceTeacher

    return ReferenceTeacher()


# Each builder takes the backend's options as keyword arguments and raises ConfigError for invalid ones.
TEACHER_BUILDERS: dict[str, Callable[..., Teacher]] = {
    "reference": _build_reference,
}


def available_teachers() -> list[str]:
    """Return the registered teacher names, sorted."""
    return sorted(TEACHER_BUILDERS)


def build_teacher(name: str, **options: Any) -> Teacher:
    """Build the teacher backend registered as ``name`` with its backend-specific ``options``.

    Raises :class:`ConfigError` for an unknown name, listing the available names, and for options the
    backend does not accept.
    """
    builder = TEACHER_BUILDERS.get(name)
    if builder is None:
        raise ConfigError(
            f"unknown teacher {name!r}. Available teachers: {', '.join(available_teachers())}. "
            "Set the gateway's teacher setting (UNITE_GATEWAY_TEACHER or --teacher) to one of them.",
            value=name,
            limit=available_teachers(),
        )
    teacher = builder(**options)
    logger.info("teacher %r built: identity %s, dim %d", name, teacher.identity, teacher.dim)
    return teacher
