"""Local teachers (UNI2-h, timm, ONNX) loaded from weights files written in the test's folder and served over real HTTP.

Every weights file is made here from a seeded, randomly initialised model, because real weights are
never downloaded. Embeddings are compared with an independent computation: timm's own transform and
model for the timm backend, the torch model an ONNX file was exported from for the ONNX backend.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from servers import run_app
from timm.data import create_transform, resolve_data_config

from shared.errors import ConfigError, ModelError, TeacherError
from shared.imaging import encode_base64_png
from shared.models.uni2 import UNI2H_EMBED_DIM, UNI2H_PARAMETERS, build_uni2h
from teacher_gateway.app import create_app
from teacher_gateway.settings import GatewaySettings
from teacher_gateway.teachers.onnx_model import build_onnx_teacher
from teacher_gateway.teachers.preprocessing import TilePreprocessing
from teacher_gateway.teachers.timm_model import build_timm_teacher
from teacher_gateway.teachers.uni2 import UNI2H_LICENCE, build_uni2h_teacher

TIMM_MODEL = "vit_tiny_patch16_224"
TIMM_DIM = 192
# timm's pretrained configuration of vit_tiny_patch16_224: crop_pct 0.9, bicubic, mean and std 0.5.
TIMM_TAG = "resize248-crop224-bicubic-mean0.5,0.5,0.5-std0.5,0.5,0.5"
LICENCE = "Apache-2.0 (test weights)"
ONNX_DIM = 24


def make_tiles(count: int, seed: int = 0) -> np.ndarray:
    """Return ``count`` different 224 px RGB tiles: smooth colour gradients with noise, so resizing changes them."""
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    tiles = []
    for _ in range(count):
        weights = generator.uniform(-1, 1, size=(3, 3))
        base = 128 + 100 * (weights[:, 0] * rows[..., None] + weights[:, 1] * columns[..., None] + weights[:, 2] * rows[..., None] * columns[..., None])
        noise = generator.normal(0, 20, size=(224, 224, 3))
        tiles.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return np.stack(tiles)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cosine(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return (first * second).sum(axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


@contextmanager
def serve(tmp_path: Path, teacher):
    settings = GatewaySettings(cache_dir=tmp_path / "cache")
    with run_app(create_app(settings, teacher=teacher)) as base_url, httpx.Client(base_url=base_url, timeout=120) as http:
        yield http


def post_tiles(http: httpx.Client, tiles: np.ndarray, model: str) -> dict:
    response = http.post("/v1/embeddings", json={"model": model, "input": [{"image": encode_base64_png(tile)} for tile in tiles]})
    assert response.status_code == 200, response.text
    return response.json()


def embeddings_of(body: dict) -> np.ndarray:
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


# timm


@pytest.fixture(scope="module")
def timm_source() -> torch.nn.Module:
    """A seeded, randomly initialised vit_tiny_patch16_224 with its classifier head, as timm builds it."""
    torch.manual_seed(0)
    return timm.create_model(TIMM_MODEL, pretrained=False).eval()


@pytest.fixture
def timm_weights(tmp_path: Path, timm_source: torch.nn.Module) -> Path:
    path = tmp_path / "vit_tiny.safetensors"
    save_file({key: value.contiguous() for key, value in timm_source.state_dict().items()}, path)
    return path


def timm_reference(weights: Path, tiles: np.ndarray) -> np.ndarray:
    """Embed ``tiles`` in float32 with a separately built timm model and timm's own evaluation transform."""
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0).eval()
    with safe_open(str(weights), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith("head.")}
    model.load_state_dict(state, strict=True)
    transform = create_transform(**resolve_data_config(model=model))
    batch = torch.stack([transform(Image.fromarray(tile)) for tile in tiles])
    with torch.no_grad():
        return model(batch).numpy()


def build_tiny(weights: Path, **options) -> object:
    options = {"device": "cpu", "licence": LICENCE, **options}
    return build_timm_teacher(model_name=TIMM_MODEL, weights=weights, **options)


def test_timm_teacher_served_over_http(tmp_path: Path, timm_weights: Path) -> None:
    teacher = build_tiny(timm_weights)
    tiles = make_tiles(3)

    assert teacher.identity == f"timm:{TIMM_MODEL}@sha256:{sha256_of(timm_weights)[:16]}/{TIMM_TAG}"
    assert teacher.dim == TIMM_DIM
    with serve(tmp_path, teacher) as http:
        body = post_tiles(http, tiles, teacher.identity)
        again = post_tiles(http, tiles, teacher.identity)
        models = http.get("/v1/models").json()

    served = embeddings_of(body)
    reference = timm_reference(timm_weights, tiles)
    assert body["model"] == teacher.identity
    assert body["usage"]["tiles_sent_to_teacher"] == 3
    assert again["usage"]["cache_hits"] == 3
    assert np.array_equal(embeddings_of(again), served)
    assert served.shape == (3, TIMM_DIM)
    assert np.isfinite(served).all()
    # bf16 autocast against timm in float32: the same vectors up to rounding.
    assert cosine(served, reference).min() > 0.99, cosine(served, reference)
    assert cosine(served[:1], served[1:2])[0] < 0.999
    assert models["data"][0]["id"] == teacher.identity
    assert models["data"][0]["licence"] == LICENCE
    assert models["data"][0]["settings"]["preprocessing"]["resize_size"] == 248
    assert models["data"][0]["settings"]["weights_sha256"] == sha256_of(timm_weights)


def test_timm_fp32_matches_timm_exactly(timm_weights: Path) -> None:
    tiles = make_tiles(5, seed=1)
    teacher = build_tiny(timm_weights, precision="fp32", batch_size=2)

    embeddings = teacher.embed(tiles)

    np.testing.assert_allclose(embeddings, timm_reference(timm_weights, tiles), rtol=1e-4, atol=1e-5)
    assert embeddings.dtype == np.float32


def test_timm_batches_give_same_embeddings(timm_weights: Path) -> None:
    tiles = make_tiles(5, seed=2)

    in_pairs = build_tiny(timm_weights, precision="fp32", batch_size=2).embed(tiles)
    at_once = build_tiny(timm_weights, precision="fp32", batch_size=8).embed(tiles)

    np.testing.assert_allclose(in_pairs, at_once, rtol=1e-5, atol=1e-6)


def test_timm_torch_file_matches_safetensors(tmp_path: Path, timm_weights: Path, timm_source: torch.nn.Module) -> None:
    torch_path = tmp_path / "vit_tiny.pth"
    torch.save(timm_source.state_dict(), torch_path)
    tiles = make_tiles(2, seed=3)

    from_torch = build_tiny(torch_path, precision="fp32")
    from_safetensors = build_tiny(timm_weights, precision="fp32")

    assert from_torch.identity == f"timm:{TIMM_MODEL}@sha256:{sha256_of(torch_path)[:16]}/{TIMM_TAG}"
    np.testing.assert_array_equal(from_torch.embed(tiles), from_safetensors.embed(tiles))


def test_preprocessing_is_part_of_identity(tmp_path: Path, timm_weights: Path) -> None:
    default = build_tiny(timm_weights)
    imagenet = build_tiny(timm_weights, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_size=224)
    tiles = make_tiles(2, seed=4)

    assert imagenet.identity.endswith("/resize224-crop224-bicubic-mean0.485,0.456,0.406-std0.229,0.224,0.225")
    assert imagenet.identity != default.identity
    # One cache, two preprocessings: the second teacher finds nothing of the first.
    with serve(tmp_path, default) as http:
        first = post_tiles(http, tiles, default.identity)
    with serve(tmp_path, imagenet) as http:
        second = post_tiles(http, tiles, imagenet.identity)
    assert first["usage"]["tiles_sent_to_teacher"] == 2
    assert second["usage"]["cache_hits"] == 0
    assert second["usage"]["tiles_sent_to_teacher"] == 2
    assert not np.allclose(embeddings_of(first), embeddings_of(second))


def test_timm_model_kwargs_in_identity(timm_weights: Path) -> None:
    tiles = make_tiles(2, seed=5)

    token = build_tiny(timm_weights, precision="fp32")
    # fc_norm=False keeps the final norm where the weights file has it, so only the pooling changes.
    averaged = build_tiny(timm_weights, precision="fp32", model_kwargs={"global_pool": "avg", "fc_norm": False})

    assert averaged.identity.startswith(f"timm:{TIMM_MODEL}(fc_norm=false,global_pool=avg)@sha256:")
    assert not np.allclose(token.embed(tiles), averaged.embed(tiles))


@pytest.mark.parametrize(
    ("config", "tag"),
    [
        (None, TIMM_TAG),
        (
            {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
            "resize256-crop224-bilinear-mean0.485,0.456,0.406-std0.229,0.224,0.225",
        ),
        (
            {"input_size": (3, 256, 256), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
             "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
            "resize256-crop256-bicubic-mean0.5,0.5,0.5-std0.25,0.25,0.25",
        ),
    ],
    ids=["vit_tiny", "crop_0.875_bilinear", "upscale_256"],
)
def test_preprocessing_matches_timm_transform(config: dict | None, tag: str) -> None:
    if config is None:
        config = resolve_data_config(model=timm.create_model(TIMM_MODEL, pretrained=False))
    tiles = make_tiles(3, seed=6)

    preprocessing = TilePreprocessing.from_timm_config(config, teacher="test")
    transform = create_transform(**config)
    expected = torch.stack([transform(Image.fromarray(tile)) for tile in tiles]).numpy()

    assert preprocessing.tag == tag
    np.testing.assert_allclose(preprocessing.to_model_input(tiles), expected, rtol=0, atol=1e-5)


def test_timm_unknown_name_lists_close_matches(timm_weights: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_timm_teacher(model_name="vit_tiny_patch16_22", weights=timm_weights)

    assert "vit_tiny_patch16_224" in caught.value.limit
    assert "UNITE_GATEWAY_MODEL_NAME" in caught.value.message


def test_timm_wrong_keys_and_shapes_named(tmp_path: Path, timm_source: torch.nn.Module) -> None:
    state = {key: value.contiguous() for key, value in timm_source.state_dict().items()}
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    state["norm.weight"] = torch.ones(100)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)

    with pytest.raises(ModelError) as caught:
        build_tiny(path)

    assert caught.value.value == {
        "missing": ["blocks.0.attn.qkv.weight"],
        "unexpected": ["blocks.0.attn.qkv_renamed.weight"],
        "wrong_shape": ["norm.weight"],
    }
    assert "norm.weight 100 in the file but 192 in the model" in caught.value.message
    assert str(path) in caught.value.message


def test_prefixed_keys_get_a_hint(tmp_path: Path, timm_source: torch.nn.Module) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({f"module.{key}": value for key, value in timm_source.state_dict().items() if not key.startswith("head.")}, path)

    with pytest.raises(ModelError) as caught:
        build_tiny(path)

    assert "prefix 'module.'" in caught.value.message


def test_training_checkpoint_rejected_with_fix(tmp_path: Path, timm_source: torch.nn.Module) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": timm_source.state_dict(), "epoch": 3}, path)

    with pytest.raises(ModelError) as caught:
        build_tiny(path)

    assert caught.value.value == ["epoch", "state_dict"]
    assert "torch.save(checkpoint['state_dict'], path)" in caught.value.message


def test_damaged_safetensors_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(b"not a safetensors file" * 10)

    with pytest.raises(ModelError) as caught:
        build_tiny(path)

    assert str(path) in caught.value.message
    assert "safetensors" in caught.value.message


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"batch_size": 0}, "UNITE_GATEWAY_BATCH_SIZE"),
        ({"precision": "fp16"}, "UNITE_GATEWAY_PRECISION"),
        ({"device": "tpu"}, "UNITE_GATEWAY_DEVICE"),
        ({"mean": (0.5, 0.5)}, "UNITE_GATEWAY_MEAN"),
        ({"std": (0.5, 0.0, 0.5)}, "UNITE_GATEWAY_STD"),
        ({"resize_size": 200}, "UNITE_GATEWAY_RESIZE_SIZE"),
        ({"interpolation": "cubic"}, "UNITE_GATEWAY_INTERPOLATION"),
        ({"model_kwargs": {"num_classes": 10}}, "UNITE_GATEWAY_MODEL_KWARGS"),
        ({"input_size": 256}, "UNITE_GATEWAY_INPUT_SIZE"),
    ],
    ids=["batch_size", "precision", "device", "mean", "std", "resize", "interpolation", "reserved_kwarg", "input_size"],
)
def test_invalid_timm_option_names_setting(timm_weights: Path, options: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_tiny(timm_weights, **options)

    assert setting in caught.value.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so device cuda is valid")
def test_cuda_without_gpu_names_setting(timm_weights: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_timm_teacher(model_name=TIMM_MODEL, weights=timm_weights, device="cuda")

    assert "UNITE_GATEWAY_DEVICE" in caught.value.message
    assert caught.value.limit == 0


def test_closed_teacher_raises(timm_weights: Path) -> None:
    teacher = build_tiny(timm_weights)
    teacher.close()

    with pytest.raises(TeacherError):
        teacher.embed(make_tiles(1))


# Missing weights, for every backend


@pytest.mark.parametrize("backend", ["uni2-h", "timm", "onnx"])
@pytest.mark.parametrize("weights", ["missing", None], ids=["missing_file", "not_set"])
def test_missing_weights_names_setting(tmp_path: Path, backend: str, weights: str | None) -> None:
    path = tmp_path / "absent" / "model.safetensors" if weights else None
    builders = {
        "uni2-h": lambda: build_uni2h_teacher(weights=path, device="cpu"),
        "timm": lambda: build_timm_teacher(model_name=TIMM_MODEL, weights=path, device="cpu"),
        "onnx": lambda: build_onnx_teacher(weights=path, device="cpu"),
    }

    with pytest.raises(ConfigError) as caught:
        builders[backend]()

    assert "UNITE_GATEWAY_WEIGHTS" in caught.value.message
    assert "--weights" in caught.value.message
    if path is not None:
        assert str(path) in caught.value.message


def test_weights_with_unknown_suffix_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    path.write_bytes(b"\0" * 16)

    with pytest.raises(ConfigError) as caught:
        build_uni2h_teacher(weights=path, device="cpu")

    assert caught.value.value == ".npz"
    assert ".safetensors" in caught.value.message


# UNI2-h


def test_uni2h_rejects_other_architecture_naming_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0)
    path = tmp_path / "not_uni2h.safetensors"
    save_file({key: value.contiguous() for key, value in small.state_dict().items()}, path)

    with pytest.raises(ModelError) as caught:
        build_uni2h_teacher(weights=path, device="cpu")

    problems = caught.value.value
    assert "reg_token" in problems["missing"]
    assert "blocks.23.mlp.fc2.weight" in problems["missing"]
    assert "pos_embed" in problems["wrong_shape"]
    assert problems["unexpected"] == []
    assert "pos_embed 1x197x192 in the file but 1x256x1536 in the model" in caught.value.message
    assert caught.value.message.startswith(f"teacher uni2-h@sha256:{sha256_of(path)[:16]}")


def write_random_uni2h(path: Path) -> None:
    """Save UNI2-h's state dict with seeded random bf16 values, made tensor by tensor from the meta-device shapes.

    Linear and embedding weights are N(0, 0.02), norms start as identity maps, and the layer scales are
    0.1 rather than UNI2-h's initial 1e-5, so every block changes the CLS token and two tiles get
    clearly different embeddings.
    """
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in build_uni2h().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".gamma"):
            state[key] = torch.full(shape, 0.1, dtype=torch.bfloat16)
        elif len(shape) == 1 and "norm" in key and key.endswith(".weight"):
            state[key] = torch.ones(shape, dtype=torch.bfloat16)
        elif len(shape) == 1:
            state[key] = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            state[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(state, path)


@pytest.fixture
def uni2h_weights(tmp_path: Path):
    """A random-weights UNI2-h file of the real shape (about 1.4 GB), deleted after the test."""
    path = tmp_path / "uni2h.safetensors"
    write_random_uni2h(path)
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.slow
def test_uni2h_served_over_http(tmp_path: Path, uni2h_weights: Path) -> None:
    tiles = make_tiles(2, seed=7)

    teacher = build_uni2h_teacher(weights=uni2h_weights, device="cpu", batch_size=2)
    try:
        assert teacher.identity == f"uni2-h@sha256:{sha256_of(uni2h_weights)[:16]}"
        assert teacher.licence == UNI2H_LICENCE
        assert sum(parameter.numel() for parameter in teacher.model.parameters()) == UNI2H_PARAMETERS
        loaded = teacher.model.state_dict()
        with safe_open(str(uni2h_weights), framework="pt") as handle:
            assert set(handle.keys()) == set(loaded)
            for key in handle.keys():
                assert torch.equal(loaded[key], handle.get_tensor(key).float()), key

        with serve(tmp_path, teacher) as http:
            body = post_tiles(http, tiles, "uni2-h")
            again = post_tiles(http, tiles, teacher.identity)
            models = http.get("/v1/models").json()
        direct = teacher.embed(tiles)
    finally:
        teacher.close()

    served = embeddings_of(body)
    assert body["model"] == teacher.identity
    assert served.shape == (2, UNI2H_EMBED_DIM)
    assert np.isfinite(served).all()
    assert cosine(served[:1], served[1:])[0] < 0.999
    np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-6)
    assert body["usage"]["model_calls"] == 1
    assert again["usage"]["cache_hits"] == 2
    assert models["data"][0]["licence"] == UNI2H_LICENCE


# ONNX


class TwoOutputEncoder(torch.nn.Module):
    """A small convolutional encoder with two outputs: a pooled embedding and its feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.stage = torch.nn.Conv2d(16, 32, kernel_size=2, stride=2)
        self.projection = torch.nn.Linear(32, ONNX_DIM)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.stage(torch.nn.functional.gelu(self.stem(pixels)))
        return self.projection(feature_map.mean(dim=(2, 3))), feature_map


@pytest.fixture(scope="module")
def onnx_source() -> torch.nn.Module:
    torch.manual_seed(0)
    return TwoOutputEncoder().eval()


def export_onnx(model: torch.nn.Module, path: Path, *, batch: int = 2, dynamic_batch: bool = True) -> Path:
    pytest.importorskip("onnx", reason="exporting the test model needs the onnx package (pip install onnx)")
    dynamic_axes = {"pixels": {0: "batch"}, "embedding": {0: "batch"}, "feature_map": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo exporter, which needs onnxscript too.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(batch, 3, 224, 224),),
            str(path),
            input_names=["pixels"],
            output_names=["embedding", "feature_map"],
            dynamic_axes=dynamic_axes,
            dynamo=False,
        )
    return path


@pytest.fixture
def onnx_file(tmp_path: Path, onnx_source: torch.nn.Module) -> Path:
    pytest.importorskip("onnxruntime", reason="the onnx teacher needs onnxruntime (pip install onnxruntime)")
    return export_onnx(onnx_source, tmp_path / "encoder.onnx")


def torch_embeddings(model: torch.nn.Module, preprocessing: TilePreprocessing, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(preprocessing.to_model_input(tiles)))[0].numpy()


def test_onnx_teacher_served_over_http(tmp_path: Path, onnx_file: Path, onnx_source: torch.nn.Module) -> None:
    teacher = build_onnx_teacher(weights=onnx_file, output_name="embedding", device="cpu", licence=LICENCE)
    tiles = make_tiles(3, seed=8)

    with serve(tmp_path, teacher) as http:
        body = post_tiles(http, tiles, teacher.identity)

    expected_tag = "resize224-crop224-bicubic-mean0.485,0.456,0.406-std0.229,0.224,0.225"
    assert teacher.identity == f"onnx:encoder.onnx@sha256:{sha256_of(onnx_file)[:16]}:embedding/{expected_tag}"
    assert teacher.dim == ONNX_DIM
    served = embeddings_of(body)
    assert body["model"] == teacher.identity
    np.testing.assert_allclose(served, torch_embeddings(onnx_source, teacher.preprocessing, tiles), rtol=1e-4, atol=1e-5)
    assert not np.allclose(served[0], served[1])


def test_onnx_fixed_batch_pads_last_batch(tmp_path: Path, onnx_source: torch.nn.Module) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx teacher needs onnxruntime (pip install onnxruntime)")
    path = export_onnx(onnx_source, tmp_path / "fixed.onnx", batch=2, dynamic_batch=False)
    tiles = make_tiles(3, seed=9)

    teacher = build_onnx_teacher(weights=path, output_name="embedding", device="cpu", batch_size=16, resize_size=256)

    assert teacher.batch_size == 2
    assert "/resize256-crop224-" in teacher.identity
    np.testing.assert_allclose(teacher.embed(tiles), torch_embeddings(onnx_source, teacher.preprocessing, tiles), rtol=1e-4, atol=1e-5)


def test_onnx_output_name_required_with_two_outputs(onnx_file: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_onnx_teacher(weights=onnx_file, device="cpu")

    assert caught.value.limit == ["embedding", "feature_map"]
    assert "UNITE_GATEWAY_OUTPUT_NAME" in caught.value.message


def test_onnx_unknown_output_name_lists_outputs(onnx_file: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_onnx_teacher(weights=onnx_file, output_name="pooled", device="cpu")

    assert caught.value.value == "pooled"
    assert caught.value.limit == ["embedding", "feature_map"]


def test_onnx_unpooled_output_rejected(onnx_file: Path) -> None:
    with pytest.raises(ModelError) as caught:
        build_onnx_teacher(weights=onnx_file, output_name="feature_map", device="cpu")

    assert caught.value.value == [1, 32, 28, 28]
    assert "UNITE_GATEWAY_OUTPUT_NAME" in caught.value.message


def test_onnx_damaged_file_rejected(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx teacher needs onnxruntime (pip install onnxruntime)")
    path = tmp_path / "damaged.onnx"
    path.write_bytes(b"not an onnx model")

    with pytest.raises(ModelError) as caught:
        build_onnx_teacher(weights=path, device="cpu")

    assert str(path) in caught.value.message


def test_onnx_cuda_without_provider_names_setting(onnx_file: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider, so device cuda is valid")
    with pytest.raises(ConfigError) as caught:
        build_onnx_teacher(weights=onnx_file, output_name="embedding", device="cuda")

    assert "onnxruntime-gpu" in caught.value.message
    assert "UNITE_GATEWAY_DEVICE" in caught.value.message
