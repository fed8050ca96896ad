"""The preprocessing a local teacher applies to the gateway's 224 px tiles, and its tag in the teacher's identity.

The gateway hands every teacher tiles already resized and centre-cropped to 224 x 224 px. A local model
then applies its own evaluation transform, the one timm builds for it: resize to ``resize_size`` (PIL,
the given interpolation), centre crop ``input_size``, scale to [0, 1], subtract ``mean`` and divide by
``std`` per channel. The tag of these values is part of the teacher's identity, because the same weights
behind two preprocessings give two different embeddings, which must never share cache entries.
No torch here, so the ONNX backend can use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from shared.errors import ConfigError, ImageError
from shared.imaging import IMAGENET_MEAN, IMAGENET_STD, MODEL_INPUT_SIZE
from teacher_gateway.teachers.options import setting

TILE_SHAPE = (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3)
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
# timm's crop modes that give the same result on a square tile. Its third mode, "border", crops a fixed margin.
SQUARE_CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class TilePreprocessing:
    """Resize, centre crop and normalisation of one model: sizes in pixels, mean and std on the [0, 1] scale."""

    input_size: int = MODEL_INPUT_SIZE
    resize_size: int = MODEL_INPUT_SIZE
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = tuple(float(value) for value in IMAGENET_MEAN)
    std: tuple[float, float, float] = tuple(float(value) for value in IMAGENET_STD)

    @classmethod
    def create(
        cls,
        *,
        teacher: str,
        input_size: int = MODEL_INPUT_SIZE,
        resize_size: int | None = None,
        interpolation: str = "bicubic",
        mean: Sequence[float] = tuple(IMAGENET_MEAN),
        std: Sequence[float] = tuple(IMAGENET_STD),
    ) -> TilePreprocessing:
        """Validate the values and build the preprocessing. ``resize_size`` defaults to ``input_size``, so no crop.

        Raises :class:`ConfigError` naming the setting of the first invalid value.
        """
        input_size = _check_size(input_size, option="input_size", teacher=teacher)
        resize_size = input_size if resize_size is None else _check_size(resize_size, option="resize_size", teacher=teacher)
        if resize_size < input_size:
            raise ConfigError(
                f"teacher {teacher}: resize size {resize_size} px is smaller than the input size {input_size} px, "
                f"so the centre crop would not fit. Set {setting('resize_size')} to at least {input_size}.",
                value=resize_size,
                limit=input_size,
            )
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"teacher {teacher}: interpolation is {interpolation!r}, expected one of {', '.join(INTERPOLATIONS)}. "
                f"Set {setting('interpolation')}.",
                value=interpolation,
                limit=list(INTERPOLATIONS),
            )
        return cls(
            input_size=input_size,
            resize_size=resize_size,
            interpolation=interpolation,
            mean=_check_channels(mean, option="mean", teacher=teacher, positive=False),
            std=_check_channels(std, option="std", teacher=teacher, positive=True),
        )

    @classmethod
    def from_timm_config(cls, config: dict[str, Any], *, teacher: str, **overrides: Any) -> TilePreprocessing:
        """Build the preprocessing of timm's ``resolve_data_config`` output, with ``overrides`` taking precedence.

        timm resizes to ``floor(input_size / crop_pct)`` and then centre crops ``input_size``, so a
        crop_pct of 0.9 at 224 px resizes the tile to 248 px and keeps its central 224 px.
        """
        _, height, width = config["input_size"]
        if height != width:
            raise ConfigError(
                f"teacher {teacher}: timm's input size is {height} x {width} px, but tiles are square. "
                f"Set {setting('input_size')} to a square size the model accepts.",
                value=[height, width],
            )
        crop_mode = config.get("crop_mode") or "center"
        if crop_mode not in SQUARE_CROP_MODES:
            raise ConfigError(
                f"teacher {teacher}: timm's crop mode is {crop_mode!r}, expected one of {', '.join(SQUARE_CROP_MODES)}. "
                f"Set {setting('resize_size')} and {setting('input_size')} to state the crop explicitly.",
                value=crop_mode,
                limit=list(SQUARE_CROP_MODES),
            )
        input_size = overrides.get("input_size") or height
        crop_pct = config.get("crop_pct") or 1.0
        values = {
            "input_size": input_size,
            "resize_size": math.floor(input_size / crop_pct),
            "interpolation": config.get("interpolation") or "bicubic",
            "mean": config["mean"],
            "std": config["std"],
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls.create(teacher=teacher, **values)

    @property
    def tag(self) -> str:
        """The preprocessing as a short string for identities, e.g. ``resize248-crop224-bicubic-mean0.5,0.5,0.5-std0.5,0.5,0.5``."""
        mean = ",".join(f"{value:.6g}" for value in self.mean)
        std = ",".join(f"{value:.6g}" for value in self.std)
        return f"resize{self.resize_size}-crop{self.input_size}-{self.interpolation}-mean{mean}-std{std}"

    def describe(self) -> dict[str, Any]:
        """Return the values as a JSON-ready dict."""
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def to_model_input(self, tiles: np.ndarray) -> np.ndarray:
        """Turn (N, 224, 224, 3) uint8 tiles into an (N, 3, input_size, input_size) float32 model input."""
        if self.resize_size != MODEL_INPUT_SIZE or self.input_size != MODEL_INPUT_SIZE:
            tiles = np.stack([self._resize_and_crop(tile) for tile in tiles])
        scaled = tiles.astype(np.float32) / np.float32(255.0)
        normalised = (scaled - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))

    def _resize_and_crop(self, tile: np.ndarray) -> np.ndarray:
        resized = Image.fromarray(tile).resize(
            (self.resize_size, self.resize_size), INTERPOLATIONS[self.interpolation]
        )
        # torchvision's CenterCrop, which timm's transform uses, rounds the offset this way.
        offset = round((self.resize_size - self.input_size) / 2.0)
        return np.asarray(resized)[offset : offset + self.input_size, offset : offset + self.input_size]


def check_tiles(tiles: object, *, teacher: str) -> None:
    """Raise :class:`ImageError` unless ``tiles`` is an (N, 224, 224, 3) uint8 numpy array."""
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[1:] != TILE_SHAPE or tiles.dtype != np.uint8:
        shape = list(tiles.shape) if isinstance(tiles, np.ndarray) else type(tiles).__name__
        dtype = str(tiles.dtype) if isinstance(tiles, np.ndarray) else None
        raise ImageError(
            f"teacher {teacher}: tiles have shape {shape} and dtype {dtype}, expected an (N, 224, 224, 3) uint8 "
            "RGB array. Prepare each tile with shared.imaging.prepare_tile and stack them with numpy.stack.",
            value=shape,
            limit=[None, *TILE_SHAPE],
        )


def _check_size(size: object, *, option: str, teacher: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"teacher {teacher}: {option} is {size!r}, expected a positive number of pixels. Set {setting(option)}.",
            value=size,
            limit=1,
        )
    return size


def _check_channels(values: Sequence[float], *, option: str, teacher: str, positive: bool) -> tuple[float, float, float]:
    try:
        channels = tuple(float(value) for value in values)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"teacher {teacher}: {option} is {values!r}, expected three numbers for R, G and B. Set {setting(option)}.",
            value=repr(values),
        ) from error
    if len(channels) != 3 or not all(math.isfinite(value) for value in channels):
        raise ConfigError(
            f"teacher {teacher}: {option} is {list(channels)}, expected three finite numbers for R, G and B "
            f"on the [0, 1] pixel scale, such as ImageNet's. Set {setting(option)}.",
            value=list(channels),
        )
    if positive and min(channels) <= 0:
        raise ConfigError(
            f"teacher {teacher}: {option} is {list(channels)}, expected three positive numbers, because tiles are "
            f"divided by them. Set {setting(option)}.",
            value=list(channels),
        )
    return channels  # type: ignore[return-value]
