"""The registry of teacher backends: a name from the settings or the command line to a ready teacher.

Backends: ``reference`` (built in, the default), ``remote`` (an embeddings API, settings under
``UNITE_GATEWAY_REMOTE__*``), and the local models ``uni2-h``, ``timm`` and ``onnx`` (weights file and
model settings such as ``UNITE_GATEWAY_WEIGHTS``). Each backend module is imported only when it is
built, so listing the backends or serving the reference teacher loads no torch, timm or onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError
from teacher_gateway.teachers.base import Teacher

if TYPE_CHECKING:
    from teacher_gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# The settings fields each local backend takes, as keyword options of the same name.
LOCAL_OPTIONS: dict[str, tuple[str, ...]] = {
    "uni2-h": ("weights", "device", "batch_size", "precision"),
    "timm": (
        "model_name", "weights", "model_kwargs", "device", "batch_size", "precision",
        "input_size", "resize_size", "interpolation", "mean", "std", "licence",
    ),
    "onnx": (
        "weights", "output_name", "input_name", "device", "batch_size",
        "input_size", "resize_size", "interpolation", "mean", "std", "licence",
    ),
}
# The options a local backend cannot do without; checked before its module (and torch) is imported.
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "uni2-h": ("weights",),
    "timm": ("model_name", "weights"),
    "onnx": ("weights",),
}
ALL_LOCAL_OPTIONS = tuple(dict.fromkeys(option for options in LOCAL_OPTIONS.values() for option in options))


def _build_reference(**options: Any) -> Teacher:
    if options:
        raise ConfigError(
            f"teacher 'reference' takes no options, got {sorted(options)}. "
            "Remove them, because the reference teacher has no weights or settings.",
            value=sorted(options),
        )
    from teacher_gateway.teachers.reference import ReferenceTeacher

    return ReferenceTeacher()


def _build_remote(**options: Any) -> Teacher:
    from teacher_gateway.teachers.remote import build_remote_teacher

    return build_remote_teacher(**options)


def _build_uni2h(**options: Any) -> Teacher:
    from teacher_gateway.teachers.uni2 import build_uni2h_teacher

    return build_uni2h_teacher(**options)


def _build_timm(**options: Any) -> Teacher:
    from teacher_gateway.teachers.timm_model import build_timm_teacher

    return build_timm_teacher(**options)


def _build_onnx(**options: Any) -> Teacher:
    from teacher_gateway.teachers.onnx_model import build_onnx_teacher

    return build_onnx_teacher(**options)


# Each builder takes the backend's options as keyword arguments and raises ConfigError for invalid ones.
TEACHER_BUILDERS: dict[str, Callable[..., Teacher]] = {
    "reference": _build_reference,
    "remote": _build_remote,
    "uni2-h": _build_uni2h,
    "timm": _build_timm,
    "onnx": _build_onnx,
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
    _check_required(name, options)
    teacher = builder(**options)
    logger.info("teacher %r built: identity %s, dim %d", name, teacher.identity, teacher.dim)
    return teacher


def _check_required(name: str, options: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the setting of each required option of teacher ``name`` that is unset."""
    missing = [option for option in REQUIRED_OPTIONS.get(name, ()) if options.get(option) is None]
    if not missing:
        return
    from teacher_gateway.teachers.options import setting

    examples = {"weights": "the path of the model's weights file", "model_name": "a timm model name such as vit_small_patch16_224"}
    needed = "; ".join(f"{option} ({setting(option)}): {examples.get(option, 'a value')}" for option in missing)
    raise ConfigError(
        f"teacher {name!r} needs settings that are not set: {needed}. Set each environment variable or pass its option.",
        value=missing,
    )


def teacher_options(settings: GatewaySettings) -> dict[str, Any]:
    """Return the builder options of ``settings.teacher`` taken from the gateway settings.

    Local settings left unset are not passed, so each builder's own default applies. Settings that
    belong to another backend are ignored with a warning. Raises :class:`ConfigError` for the remote
    teacher without its ``UNITE_GATEWAY_REMOTE__*`` settings.
    """
    name = settings.teacher
    if name == "remote":
        if settings.remote is None:
            raise ConfigError(
                "teacher 'remote' needs its settings: set at least UNITE_GATEWAY_REMOTE__URL, UNITE_GATEWAY_REMOTE__MODEL, "
                "UNITE_GATEWAY_REMOTE__DIM and UNITE_GATEWAY_REMOTE__LICENCE (see docs/remote-teachers.md).",
                value=None,
            )
        options = settings.remote.model_dump()
    else:
        wanted = LOCAL_OPTIONS.get(name, ())
        options = {option: getattr(settings, option) for option in wanted if getattr(settings, option) is not None}

    ignored = [option for option in ALL_LOCAL_OPTIONS if option not in options and getattr(settings, option) is not None]
    if name != "remote" and settings.remote is not None:
        ignored.append("remote")
    if ignored:
        logger.warning("teacher %r ignores the settings %s, which belong to other backends", name, ", ".join(ignored))
    return options


def build_configured_teacher(settings: GatewaySettings) -> Teacher:
    """Build the teacher that ``settings.teacher`` names, with its options from ``settings``."""
    return build_teacher(settings.teacher, **teacher_options(settings))
