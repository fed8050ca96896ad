"""A teacher from any timm architecture, named as timm names it, with weights from a local file.

The model is built with ``pretrained=False`` and ``num_classes=0``, so timm never downloads anything
and the forward pass returns the pooled embedding. Its preprocessing comes from timm's pretrained
configuration of that name (input size, crop fraction, interpolation, mean and std), and each value can
be overridden. Identity: ``timm:<name>[(<model kwargs>)]@sha256:<16 hex of the file>/<preprocessing>``,
for example ``timm:vit_small_patch16_224@sha256:0123456789abcdef/resize248-crop224-bicubic-mean0.5,0.5,0.5-std0.5,0.5,0.5``.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config

from shared.errors import ConfigError, ModelError
from teacher_gateway.teachers.options import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    check_precision,
    resolve_licence,
    setting,
)
from teacher_gateway.teachers.preprocessing import TilePreprocessing
from teacher_gateway.teachers.torch_teacher import TorchTeacher, resolve_torch_device
from teacher_gateway.teachers.weights import build_on_meta, find_weights, load_weights

logger = logging.getLogger(__name__)

# Arguments of timm.create_model that this backend sets itself.
_RESERVED_KWARGS = ("pretrained", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
_KWARG_TYPES = (str, int, float, bool, type(None), list)


def build_timm_teacher(
    *,
    model_name: str,
    weights: str | Path | None,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = "bf16",
    input_size: int | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    licence: str | None = None,
) -> TorchTeacher:
    """Build timm's ``model_name`` with ``model_kwargs``, load ``weights`` and return it as a teacher.

    Preprocessing values left as None come from timm's pretrained configuration of the model.
    Classifier weights in the file (timm's ``classifier`` keys, such as ``head``) are ignored, because
    the teacher returns the pooled embedding. Raises :class:`ConfigError` for an unknown model name
    (with close matches), invalid options or a missing file, and :class:`ModelError` for a file that
    does not match the architecture or a model that returns no pooled embedding.
    """
    label = f"timm:{model_name}"
    _check_model_name(model_name)
    kwargs = _check_model_kwargs(model_kwargs, teacher=label)
    check_batch_size(batch_size, teacher=label)
    check_precision(precision, teacher=label)
    torch_device = resolve_torch_device(device, teacher=label)
    weights_file = find_weights(weights, teacher=label)

    model = build_on_meta(_model_factory(model_name, kwargs, teacher=label))
    preprocessing = TilePreprocessing.from_timm_config(
        resolve_data_config(model=model),
        teacher=label,
        input_size=input_size,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
    dim = _embedding_dim(model, preprocessing.input_size, teacher=label)
    identity = f"timm:{model_name}{_kwargs_tag(kwargs)}@sha256:{weights_file.short_hash}/{preprocessing.tag}"

    load_weights(model, weights_file, teacher=identity, ignorable_keys=_classifier_keys(model))
    return TorchTeacher(
        model,
        name=label,
        identity=identity,
        dim=dim,
        licence=resolve_licence(licence, teacher=identity),
        preprocessing=preprocessing,
        device=str(torch_device),
        batch_size=batch_size,
        precision=precision,
        details={
            "backend": "timm",
            "model_name": model_name,
            "model_kwargs": kwargs,
            "weights": weights_file.path.name,
            "weights_sha256": weights_file.sha256,
        },
    )


def _check_model_name(model_name: str) -> None:
    if isinstance(model_name, str) and model_name and timm.is_model(model_name):
        return
    close = difflib.get_close_matches(str(model_name), timm.list_models(), n=5, cutoff=0.6)
    suggestion = f"Close matches: {', '.join(close)}. " if close else ""
    raise ConfigError(
        f"timm teacher: model name {model_name!r} is not a timm architecture (timm {timm.__version__}). {suggestion}"
        f"Set {setting('model_name')} to a name that timm.list_models() returns, such as vit_small_patch16_224.",
        value=model_name,
        limit=close,
    )


def _check_model_kwargs(model_kwargs: Mapping[str, Any] | None, *, teacher: str) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    reserved = sorted(key for key in kwargs if key in _RESERVED_KWARGS)
    if reserved:
        raise ConfigError(
            f"teacher {teacher}: model kwargs set {reserved}, which the timm backend sets itself (no download, "
            f"num_classes=0). Remove them from {setting('model_kwargs')}.",
            value=reserved,
        )
    invalid = sorted(key for key, value in kwargs.items() if not isinstance(value, _KWARG_TYPES))
    if invalid:
        raise ConfigError(
            f"teacher {teacher}: model kwargs {invalid} are not JSON values (string, number, boolean, null or list). "
            f"Set {setting('model_kwargs')} to a JSON object such as {{\"global_pool\": \"avg\"}}.",
            value=invalid,
        )
    return kwargs


def _model_factory(model_name: str, kwargs: dict[str, Any], *, teacher: str) -> Callable[[], torch.nn.Module]:
    def create() -> torch.nn.Module:
        try:
            return timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError) as error:
            raise ConfigError(
                f"teacher {teacher}: timm cannot build {model_name} with model kwargs {kwargs} ({error}). "
                f"Fix {setting('model_kwargs')}.",
                value=kwargs,
            ) from error

    return create


def _embedding_dim(model: torch.nn.Module, input_size: int, *, teacher: str) -> int:
    """Run one blank tile through the model (free on the meta device) and return its embedding width."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, 3, input_size, input_size, device=device))
    except AssertionError as error:
        raise ConfigError(
            f"teacher {teacher}: the model rejects input of {input_size} x {input_size} px ({error}). Set "
            f"{setting('input_size')} to the size the model was built for, or pass img_size in {setting('model_kwargs')}.",
            value=input_size,
        ) from error
    except (NotImplementedError, RuntimeError) as error:
        # Some operators have no meta implementation, so the pooled width comes from timm's attributes.
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        logger.info("teacher %s: probe forward failed on %s (%s), so the embedding width %d comes from timm", teacher, device, error, dim)
        return int(dim)
    if output.ndim != 2:
        raise ModelError(
            f"teacher {teacher}: the model returns shape {tuple(output.shape)} for one tile, expected (1, D): one "
            f"pooled embedding per tile. Set a pooling in {setting('model_kwargs')}, such as "
            '{"global_pool": "avg"}, or choose a model that pools.',
            value=list(output.shape),
        )
    return int(output.shape[1])


def _classifier_keys(model: torch.nn.Module) -> Callable[[str], bool]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier))
    return lambda key: key.startswith(prefixes) if prefixes else False


def _kwargs_tag(kwargs: dict[str, Any]) -> str:
    if not kwargs:
        return ""
    values = ",".join(
        f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
        for key, value in sorted(kwargs.items())
    )
    return f"({values})"
