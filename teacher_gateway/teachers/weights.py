"""Local weights files of teacher models: finding, hashing, checking and loading them into a model.

Two formats are read: safetensors (``.safetensors``) and a torch state dict saved with ``torch.save``
(``.bin``, ``.pth``, ``.pt``). safetensors files are opened lazily, so their tensor names and shapes are
checked against the model before any tensor is read, and tensors are then read one at a time. torch
files are memory-mapped when they were saved in torch's zip format, the default since torch 1.6, and
unpickled with ``weights_only=True``, so a file cannot run code. The model is expected on the meta
device: loading assigns the file's tensors, converted to the model's dtypes, as its parameters, so no
random initialisation is computed and no second copy of the weights is made.

The check is strict. Every key the model expects must be in the file with the same shape, and the file
may hold no other keys except those the caller lists as ignorable (a classifier head, for example).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shared.checkpoint import file_sha256
from shared.errors import ConfigError, ModelError
from teacher_gateway.teachers.options import setting

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pth", ".pt")
IDENTITY_HASH_CHARS = 16
# Error messages list at most this many key names of each kind, then the count of the others.
MAX_LISTED_KEYS = 12


@dataclass(frozen=True)
class WeightsFile:
    """A weights file found on disk, with the sha256 of its bytes."""

    path: Path
    sha256: str

    @property
    def short_hash(self) -> str:
        """The first 16 hex digits of the sha256, as identities show them."""
        return self.sha256[:IDENTITY_HASH_CHARS]


def find_weights(weights: str | Path | None, *, teacher: str, suffixes: Iterable[str] | None = None) -> WeightsFile:
    """Return the weights file at ``weights`` with its sha256.

    Raises :class:`ConfigError` naming the weights setting when no path is set, when the path is not a
    file, or when its suffix is none of ``suffixes`` (by default the safetensors and torch suffixes).
    """
    accepted = tuple(suffixes) if suffixes is not None else SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
    if weights is None or not str(weights).strip():
        raise ConfigError(
            f"teacher {teacher}: no weights file is set. Set {setting('weights')} to the path of the model's "
            f"weights file ({', '.join(accepted)}). Weights are never downloaded.",
            value=None,
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"teacher {teacher}: weights file {path} {state}. Set {setting('weights')} to the path of the model's "
            f"weights file ({', '.join(accepted)}).",
            value=str(path),
        )
    if path.suffix.lower() not in accepted:
        raise ConfigError(
            f"teacher {teacher}: weights file {path} has suffix {path.suffix!r}, expected one of {', '.join(accepted)}. "
            f"Point {setting('weights')} at such a file, or rename the file if its format is one of these.",
            value=path.suffix,
            limit=list(accepted),
        )
    return WeightsFile(path=path, sha256=file_sha256(path))


def load_weights(
    model: torch.nn.Module,
    weights: WeightsFile,
    *,
    teacher: str,
    ignorable_keys: Callable[[str], bool] | None = None,
) -> None:
    """Load the file's tensors into ``model`` in place, converted to the dtypes of the model's tensors.

    ``model`` is normally on the meta device (see the module docstring), but a model on the CPU works too.
    Keys of the file for which ``ignorable_keys`` returns True are skipped and logged. Raises
    :class:`ModelError` naming the missing, unexpected and wrongly shaped keys, or the reason the file
    cannot be read.
    """
    expected = model.state_dict()
    with _open_tensors(weights.path, teacher=teacher) as (shapes, read_tensor):
        ignored = sorted(key for key in shapes if key not in expected and ignorable_keys is not None and ignorable_keys(key))
        _check_keys(expected, {key: shape for key, shape in shapes.items() if key not in ignored}, weights, teacher=teacher)

        state = {}
        for key, target in expected.items():
            # Converted one tensor at a time, so the peak memory is the model plus one tensor of the file.
            state[key] = read_tensor(key).to(dtype=target.dtype)

    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [name for name, tensor in _named_tensors(model) if tensor.is_meta]
    if left_on_meta:
        raise ModelError(
            f"teacher {teacher}: after loading {weights.path}, tensors {_list_keys(left_on_meta)} are still on the meta "
            "device because the state dict does not contain them. Build this architecture on the CPU instead.",
            value=left_on_meta[:MAX_LISTED_KEYS],
        )
    if ignored:
        logger.info("teacher %s: ignored %d keys of %s: %s", teacher, len(ignored), weights.path, _list_keys(ignored))
    logger.info(
        "teacher %s: loaded %d tensors from %s (sha256 %s)", teacher, len(state), weights.path, weights.sha256
    )


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model on the meta device, or on the CPU when that fails or the model has buffers outside its state dict.

    Such non-persistent buffers (relative position indices of some timm models, for example) are
    computed in the constructor and would stay empty on the meta device.
    """
    try:
        with torch.device("meta"):
            model = factory()
    except (NotImplementedError, RuntimeError) as error:
        logger.info("building the model on the CPU, because building it on the meta device failed: %s", error)
        return factory()
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        logger.info("building %s on the CPU, because it has non-persistent buffers", type(model).__name__)
        model = factory()
    return model


ShapeMap = dict[str, tuple[int, ...]]
TensorReader = Callable[[str], torch.Tensor]


@contextmanager
def _open_tensors(path: Path, *, teacher: str) -> Iterator[tuple[ShapeMap, TensorReader]]:
    """Yield the file's tensor shapes by key and a function reading one tensor, for either format."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                yield shapes, handle.get_tensor
        except SafetensorError as error:
            raise ModelError(
                f"teacher {teacher}: cannot read weights file {path} as safetensors ({error}). The file is damaged "
                "or in another format. Copy it again, or save the state dict with safetensors.torch.save_file.",
                value=str(path),
            ) from error
        return

    state = _load_torch_state_dict(path, teacher=teacher)
    yield {key: tuple(tensor.shape) for key, tensor in state.items()}, state.__getitem__


def _load_torch_state_dict(path: Path, *, teacher: str) -> Mapping[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Files in torch's legacy (pre-1.6) format cannot be memory-mapped and are read whole.
            if "mmap" not in str(error):
                raise
            logger.info("teacher %s: %s is not in torch's zip format, so it is read without mmap", teacher, path)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ModelError(
            f"teacher {teacher}: cannot read weights file {path} as a torch state dict ({error}). The file is "
            "damaged, or it contains more than tensors. Save the state dict alone with torch.save(model.state_dict(), path) "
            "or safetensors.torch.save_file.",
            value=str(path),
        ) from error

    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        found = sorted(state)[:MAX_LISTED_KEYS] if isinstance(state, Mapping) else type(state).__name__
        raise ModelError(
            f"teacher {teacher}: weights file {path} contains {found}, expected a state dict that maps parameter names "
            "to tensors. If it is a training checkpoint, save its inner state dict alone, for example "
            "torch.save(checkpoint['state_dict'], path).",
            value=found,
        )
    return state


def _check_keys(expected: Mapping[str, torch.Tensor], shapes: ShapeMap, weights: WeightsFile, *, teacher: str) -> None:
    missing = sorted(key for key in expected if key not in shapes)
    unexpected = sorted(key for key in shapes if key not in expected)
    mismatched = {
        key: (shapes[key], tuple(tensor.shape))
        for key, tensor in expected.items()
        if key in shapes and shapes[key] != tuple(tensor.shape)
    }
    if not (missing or unexpected or mismatched):
        return

    problems = []
    if missing:
        problems.append(f"missing keys {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_list_keys(unexpected)}")
    if mismatched:
        listed = [f"{key} {_shape(found)} in the file but {_shape(wanted)} in the model" for key, (found, wanted) in mismatched.items()]
        problems.append(f"wrong shapes: {_list_keys(listed)}")
    hint = _prefix_hint(missing, unexpected)
    raise ModelError(
        f"teacher {teacher}: weights file {weights.path} does not match the model: {'; '.join(problems)}. "
        f"{hint}Point {setting('weights')} at the weights of this exact architecture.",
        value={"missing": missing, "unexpected": unexpected, "wrong_shape": sorted(mismatched)},
    )


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Suggest stripping a prefix such as ``module.`` when the file's keys are the model's keys behind one."""
    if not missing or len(missing) != len(unexpected):
        return ""
    prefix = unexpected[0][: len(unexpected[0]) - len(missing[0])] if unexpected[0].endswith(missing[0]) else ""
    if prefix and all(key.startswith(prefix) for key in unexpected) and sorted(key[len(prefix) :] for key in unexpected) == missing:
        return f"Every key of the file carries the prefix {prefix!r}, so save the state dict with that prefix removed. "
    return ""


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        shown += f" and {len(keys) - MAX_LISTED_KEYS} more"
    return f"[{shown}]"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape) or "scalar"


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
