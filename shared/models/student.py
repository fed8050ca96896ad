"""Students: the original UNITE ViT-Small, or any timm model by name, built with random weights or from a local file.

The UNITE student's embedding is the ``fc_norm`` of the mean patch token, 384-d, from a model of
18,092,160 parameters (counted with timm 1.0.31), 37.7 times fewer than UNI2-h. ``mlp_ratio=4.0`` and
``no_embed_class=True`` both change that count, so they are fixed here rather than left to callers.

Every student follows timm's contract: ``forward_features(x)`` gives the unpooled features,
``forward_head(features, pre_logits=True)`` the pooled embedding, and ``forward(x)`` the same embedding,
because every student is built with ``num_classes=0``. timm models are always built with
``pretrained=False``: nothing is downloaded, and pretrained weights come only from a local file.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from shared.checkpoint_format import TIMM_ARCHITECTURE
from shared.errors import ModelError

logger = logging.getLogger(__name__)

# The student name that selects the original UNITE architecture; every other name is a timm model name.
UNITE_STUDENT = "unite"
# Architecture names recorded in an exported checkpoint's config.json.
UNITE_STUDENT_NAME = "unite-vit-small-14"
UNITE_STUDENT_PARAMETERS = 18_092_160
UNITE_STUDENT_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 14,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "mlp_ratio": 4.0,
    "init_values": 1e-5,
    "reg_tokens": 8,
    "no_embed_class": True,
    "dynamic_img_size": True,
    "class_token": False,
    "global_pool": "avg",
    "num_classes": 0,
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Key prefixes that training code adds to a backbone's state dict, such as a Lightning module's attribute or DataParallel's.
_KEY_PREFIXES = ("student.", "module.", "model.", "backbone.", "encoder.")
_LISTED_KEYS = 10


def build_unite_student(**overrides: Any) -> VisionTransformer:
    """Build the UNITE student with random weights; ``overrides`` replace entries of ``UNITE_STUDENT_KWARGS``."""
    kwargs = {**UNITE_STUDENT_KWARGS, **overrides}
    return VisionTransformer(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, **kwargs)


def build_timm_student(model_name: str) -> torch.nn.Module:
    """Build the timm model ``model_name`` with random weights and no classifier (``num_classes=0``).

    Only names in timm's registry are accepted, so a ``hf-hub:`` name, which would fetch its
    configuration from the Hugging Face hub, is rejected like any unknown name.
    """
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = difflib.get_close_matches(str(model_name), timm.list_models(), n=5)
        raise ModelError(
            f"student {model_name!r} is neither {UNITE_STUDENT!r} nor a model name in timm {timm.__version__}'s registry "
            f"(close names: {close or 'none'}). Pass {UNITE_STUDENT!r} or a name that timm.list_models() returns.",
            value=model_name,
        )
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    _check_contract(model, model_name)
    return model


def student_architecture(name: str) -> tuple[str, dict[str, Any]]:
    """Return the architecture name and keyword arguments that an export records to rebuild student ``name``."""
    if name == UNITE_STUDENT:
        return UNITE_STUDENT_NAME, dict(UNITE_STUDENT_KWARGS)
    return TIMM_ARCHITECTURE, {"model_name": name}


def build_student(name: str = UNITE_STUDENT, *, weights: Path | str | None = None) -> torch.nn.Module:
    """Build student ``name`` ("unite" or a timm model name), with random weights or those of a local file.

    ``weights`` is a ``.safetensors`` file or a torch file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) that
    contains a state dict, possibly under a ``state_dict`` or ``model`` entry and a prefix such as
    ``student.`` or ``module.``. The loaded, missing and unexpected keys are logged. Raises
    :class:`ModelError` for an unknown name, an unreadable file, a tensor whose shape does not match
    the architecture, or a file of which no tensor matches.
    """
    model = build_unite_student() if name == UNITE_STUDENT else build_timm_student(name)
    if weights is not None:
        load_student_weights(model, Path(weights), name=name)
    else:
        logger.info("built student %s with random weights (%d parameters)", name, sum(p.numel() for p in model.parameters()))
    return model


def embedding_dim(model: torch.nn.Module) -> int:
    """Return the width of ``forward_head(x, pre_logits=True)``: timm's ``head_hidden_size``, else ``num_features``.

    The two differ for models with a projection after pooling: timm 1.0.31's mobilenetv3_small_050 pools
    288 features and returns a 1024-d embedding.
    """
    for attribute in ("head_hidden_size", "num_features"):
        dim = getattr(model, attribute, None)
        if isinstance(dim, int) and dim > 0:
            return dim
    raise ModelError(
        f"cannot tell the embedding dimension of {type(model).__name__}: it has no positive integer head_hidden_size "
        "or num_features attribute. Use a timm model, which defines both.",
    )


def load_student_weights(model: torch.nn.Module, path: Path, *, name: str) -> None:
    """Copy the tensors of the weights file ``path`` into ``model`` and log what was loaded, missing and unexpected."""
    state = _read_state_dict(path)
    state, prefix, ignored = _strip_prefix(state, set(model.state_dict()))
    expected = model.state_dict()

    mismatched = [
        f"{key}: file {tuple(tensor.shape)}, model {tuple(expected[key].shape)}"
        for key, tensor in state.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    if mismatched:
        raise ModelError(
            f"weights file {path} does not fit student {name!r}: {len(mismatched)} tensors have another shape "
            f"({'; '.join(mismatched[:_LISTED_KEYS])}). Pass weights of the same architecture, or the student name they were trained as.",
            value=mismatched[:_LISTED_KEYS],
        )
    loaded = sorted(set(state) & set(expected))
    if not loaded:
        raise ModelError(
            f"weights file {path} contains {len(state)} tensors, but none has a key of student {name!r} "
            f"(file keys start {sorted(state)[:3]}, model keys start {sorted(expected)[:3]}). "
            "Pass weights of the same architecture, or the student name they were trained as.",
            value=str(path),
        )

    missing, unexpected = model.load_state_dict(state, strict=False)
    logger.info(
        "initialised student %s from %s: %d tensors loaded, %d missing, %d unexpected%s",
        name,
        path,
        len(loaded),
        len(missing),
        len(unexpected),
        f", key prefix {prefix!r} removed and {ignored} tensors outside it skipped" if prefix else "",
    )
    if missing:
        logger.warning("student %s: keys missing from %s, left at random values: %s", name, path, _first_keys(missing))
    if unexpected:
        logger.warning("student %s: keys of %s that the architecture does not have, ignored: %s", name, path, _first_keys(unexpected))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"student weights file {path} not found. Pass an existing .safetensors or .pth file.", value=str(path))
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(
            f"student weights file {path} has suffix {path.suffix!r}, expected one of {list(WEIGHT_SUFFIXES)}. "
            "Convert the weights to safetensors.",
            value=path.suffix,
            limit=list(WEIGHT_SUFFIXES),
        )
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        # weights_only=True unpickles tensors and plain containers only, never arbitrary code.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ModelError(
            f"cannot read student weights file {path} ({error}). Pass an undamaged .safetensors file, or a torch "
            "file that contains only tensors and plain containers.",
            value=str(path),
        ) from error
    return _unwrap_state_dict(content, path)


def _unwrap_state_dict(content: Any, path: Path) -> dict[str, torch.Tensor]:
    # Lightning checkpoints keep the weights under "state_dict"; many training scripts use "model".
    for key in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not content:
        raise ModelError(
            f"student weights file {path} contains a {type(content).__name__}, expected a state dict "
            "(a mapping of parameter names to tensors). Save model.state_dict() instead of the model.",
            value=type(content).__name__,
        )
    return {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], str, int]:
    """Return the state with the key prefix that matches the most model keys removed, that prefix and the tensors skipped."""
    best, best_matches = "", len(set(state) & model_keys)
    for prefix in _KEY_PREFIXES:
        matches = sum(1 for key in state if key.startswith(prefix) and key[len(prefix) :] in model_keys)
        if matches > best_matches:
            best, best_matches = prefix, matches
    if not best:
        return state, "", 0
    stripped = {key[len(best) :]: value for key, value in state.items() if key.startswith(best)}
    return stripped, best, len(state) - len(stripped)


def _first_keys(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
    return ", ".join(keys[:_LISTED_KEYS]) + more


def _check_contract(model: torch.nn.Module, model_name: str) -> None:
    missing = [attribute for attribute in ("forward_features", "forward_head") if not callable(getattr(model, attribute, None))]
    if missing or not isinstance(getattr(model, "num_features", None), int):
        raise ModelError(
            f"timm model {model_name!r} lacks {missing or ['num_features']}, which every student needs "
            "(forward_features, forward_head(x, pre_logits=True) and num_features). Pick another timm model.",
            value=model_name,
        )
