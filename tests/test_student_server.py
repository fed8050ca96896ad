"""The student server over real HTTP: tile embeddings, readiness, limits and error shapes.

Every test talks to a uvicorn server on 127.0.0.1 through httpx. The student has random weights and is
saved once per module as a real exported checkpoint. The tests check that the server embeds exactly as
``embed_tiles`` does and reports the checkpoint it serves.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servers import run_app

import student_server.engine
from shared.checkpoint import load_student, save_student
from shared.errors import ConfigError, ImageError
from shared.imaging import MAX_ASPECT_RATIO, MIN_TILE_SIDE, decode_image, encode_base64_png
from shared.models.inference import embed_tiles
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from student_server.app import create_app
from student_server.settings import StudentSettings, get_settings
from unite_cli.pipeline import teach_slides

MAX_TILES = 8
SLIDE_TIMEOUT_S = 300


def save_test_student(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_student(
        build_unite_student(),
        folder,
        architecture="unite-vit-small-14",
        architecture_kwargs=UNITE_STUDENT_KWARGS,
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={},
    )


def lung_tiles(shared_data: Path, count: int) -> list[bytes]:
    """Return the JPEG bytes of ``count`` real 224 x 224 lung tiles."""
    paths = sorted((shared_data / "tiles" / "lc25000_lung_dedup" / "lung_aca").glob("*.jpeg"))[:count]
    return [path.read_bytes() for path in paths]


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def assert_error_shape(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    # Slide errors also carry the reason code that jobs record.
    expected_fields = {"code", "message", "limit", "value"} | ({"reason"} if code == "invalid_slide" else set())
    assert set(error) == expected_fields
    assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_test_student(tmp_path_factory.mktemp("checkpoint") / "student")


@pytest.fixture(scope="module")
def student_model(checkpoint):
    return load_student(checkpoint).model


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(checkpoint, upload_dir):
    settings = StudentSettings(checkpoint_dir=checkpoint, upload_dir=upload_dir, max_tiles_per_request=MAX_TILES)
    app = create_app(settings)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=SLIDE_TIMEOUT_S) as client:
        yield client, app


@pytest.fixture()
def client(server) -> httpx.Client:
    return server[0]


# embed_tiles


def test_embed_tiles_shape_and_dtype(student_model, shared_data):
    tiles = np.stack([decode_image(data) for data in lung_tiles(shared_data, 2)])

    embeddings = embed_tiles(student_model, tiles)

    assert embeddings.shape == (2, 384)
    assert embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()


def test_embed_tiles_resizes_other_sizes(student_model, shared_data):
    tile = decode_image(lung_tiles(shared_data, 1)[0])
    larger = np.asarray(Image.fromarray(tile).resize((448, 448), Image.BICUBIC))

    embeddings = embed_tiles(student_model, larger[None])

    assert embeddings.shape == (1, 384)
    assert np.isfinite(embeddings).all()


def test_embed_tiles_empty_batch(student_model):
    embeddings = embed_tiles(student_model, np.zeros((0, 224, 224, 3), dtype=np.uint8))

    assert embeddings.shape == (0, 384)
    assert embeddings.dtype == np.float32


def test_embed_tiles_rejects_float_tiles(student_model):
    with pytest.raises(ImageError, match="uint8"):
        embed_tiles(student_model, np.zeros((1, 224, 224, 3), dtype=np.float32))


# POST /v1/embeddings


def test_embeddings_match_embed_tiles(client, student_model, shared_data):
    jpegs = lung_tiles(shared_data, 3)
    tiles = np.stack([decode_image(data) for data in jpegs])
    body = {"input": [{"image": base64.b64encode(data).decode("ascii"), "slide_id": "s1", "coords": [0, 224 * i]} for i, data in enumerate(jpegs)]}

    response = client.post("/v1/embeddings", json=body)

    assert response.status_code == 200, response.text
    served = np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    assert [item["index"] for item in response.json()["data"]] == [0, 1, 2]
    assert served.shape == (3, 384)
    np.testing.assert_allclose(served, embed_tiles(student_model, tiles), rtol=0, atol=1e-5)


def test_embeddings_resize_larger_tile(client, student_model, shared_data):
    tile = decode_image(lung_tiles(shared_data, 1)[0])
    larger = np.asarray(Image.fromarray(tile).resize((320, 256), Image.BICUBIC))

    response = client.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(larger)}]})

    assert response.status_code == 200, response.text
    served = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(served, embed_tiles(student_model, larger[None])[0], rtol=0, atol=1e-5)


def test_embeddings_name_checkpoint(client, checkpoint, shared_data):
    expected_sha256 = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    image = base64.b64encode(lung_tiles(shared_data, 1)[0]).decode("ascii")

    answer = client.post("/v1/embeddings", json={"input": [{"image": image}]}).json()

    assert answer["checkpoint_sha256"] == expected_sha256
    assert answer["usage"]["checkpoint_sha256"] == expected_sha256
    assert answer["usage"]["tiles"] == 1
    assert answer["object"] == "list"
    assert answer["model"] == f"unite-vit-small-14@{expected_sha256[:12]}"


def test_embeddings_accept_served_model_name(client, shared_data):
    models = client.get("/v1/models").json()["data"]
    image = base64.b64encode(lung_tiles(shared_data, 1)[0]).decode("ascii")

    response = client.post("/v1/embeddings", json={"model": models[0]["id"], "input": [{"image": image}]})

    assert response.status_code == 200, response.text
    assert response.json()["model"] == models[0]["id"]


def test_embeddings_unknown_model_404(client, shared_data):
    image = base64.b64encode(lung_tiles(shared_data, 1)[0]).decode("ascii")

    response = client.post("/v1/embeddings", json={"model": "uni2-h", "input": [{"image": image}]})

    error = assert_error_shape(response, 404, "model_not_found")
    assert error["value"] == "uni2-h"


# RGBA, greyscale and the other convertible modes are covered in test_student_tiles.py.
@pytest.mark.parametrize("mode", ["1"])
def test_embeddings_unconvertible_mode_422(client, shared_data, mode):
    rgb = base64.b64encode(lung_tiles(shared_data, 1)[0]).decode("ascii")
    other = png_base64(Image.new(mode, (224, 224)))

    response = client.post("/v1/embeddings", json={"input": [{"image": rgb}, {"image": other}]})

    error = assert_error_shape(response, 422, "invalid_image")
    assert f"'{mode}'" in error["message"]
    assert "input[1].image" in error["message"]
    assert error["value"] == mode


@pytest.mark.parametrize("size", [(10_000, 1), (2_000, 20)])
def test_embeddings_strip_image_422(client, size):
    # Resized to 224 px on its shorter side, a 10,000 x 1 strip would take 1.5 GB.
    strip = png_base64(Image.new("RGB", size))

    response = client.post("/v1/embeddings", json={"input": [{"image": strip}]})

    error = assert_error_shape(response, 422, "invalid_image")
    assert f"input[0].image is {size[0]} x {size[1]} px with aspect ratio" in error["message"]
    assert error["limit"] == MAX_ASPECT_RATIO
    assert error["value"] == max(size) / min(size)


def test_embeddings_tiny_tile_422(client):
    response = client.post("/v1/embeddings", json={"input": [{"image": png_base64(Image.new("RGB", (1, 1)))}]})

    error = assert_error_shape(response, 422, "invalid_image")
    assert f"input[0].image is 1 x 1 px, so its shorter side of 1 px is under the minimum of {MIN_TILE_SIDE} px" in error["message"]
    assert error["limit"] == MIN_TILE_SIDE
    assert error["value"] == 1


@pytest.mark.parametrize("image_format", ["WEBP", "BMP"])
def test_embeddings_other_format_422(client, image_format):
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 120, 160)).save(buffer, format=image_format)
    image = base64.b64encode(buffer.getvalue()).decode("ascii")

    response = client.post("/v1/embeddings", json={"input": [{"image": image}]})

    error = assert_error_shape(response, 422, "invalid_image")
    assert f"input[0].image: image format is {image_format!r}, expected PNG, JPEG or TIFF" in error["message"]
    assert error["value"] == image_format


def test_embeddings_nul_slide_id_422(client):
    tile = encode_base64_png(np.zeros((224, 224, 3), dtype=np.uint8))

    response = client.post("/v1/embeddings", json={"input": [{"image": tile, "slide_id": "a\x00b"}]})

    error = assert_error_shape(response, 422, "invalid_request")
    assert "input[0].slide_id: slide_id contains the control character U+0000" in error["message"]
    assert error["value"] == "a\x00b"


def test_embeddings_invalid_base64_422(client):
    response = client.post("/v1/embeddings", json={"input": [{"image": "not base64!"}]})

    error = assert_error_shape(response, 422, "invalid_image")
    assert "base64" in error["message"]


def test_embeddings_too_many_tiles_413(client):
    tile = encode_base64_png(np.zeros((224, 224, 3), dtype=np.uint8))

    response = client.post("/v1/embeddings", json={"input": [{"image": tile}] * (MAX_TILES + 1)})

    error = assert_error_shape(response, 413, "request_too_large")
    assert error["limit"] == MAX_TILES
    assert error["value"] == MAX_TILES + 1
    assert str(MAX_TILES) in error["message"]


def test_embeddings_missing_input_422(client):
    response = client.post("/v1/embeddings", json={"model": None})

    error = assert_error_shape(response, 422, "invalid_request")
    assert "input" in error["message"]


def test_embeddings_malformed_json_422(client):
    response = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})

    error = assert_error_shape(response, 422, "invalid_request")
    assert "not valid JSON" in error["message"]


def test_unexpected_error_is_generic_500(server, shared_data, caplog, monkeypatch):
    client, app = server
    image = base64.b64encode(lung_tiles(shared_data, 1)[0]).decode("ascii")

    def failing_forward(*args, **kwargs):
        raise RuntimeError("secret detail /srv/private/path")

    # The engine's batcher thread runs the forward pass; an error there must reach the client as a bare 500.
    monkeypatch.setattr(student_server.engine, "embed_with", failing_forward)
    with caplog.at_level(logging.ERROR, logger="student_server"):
        response = client.post("/v1/embeddings", json={"input": [{"image": image}]})

    error = assert_error_shape(response, 500, "internal_error")
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    assert "secret" not in response.text
    assert "/srv/private/path" not in response.text
    assert "Traceback" not in response.text
    assert request_id in caplog.text
    assert "secret detail" in caplog.text


def test_unknown_route_404_json(client):
    response = client.get("/v1/nothing-here")

    assert_error_shape(response, 404, "not_found")


# GET /v1/models, /healthz, /readyz


def test_models_lists_student(client, checkpoint):
    listing = client.get("/v1/models").json()
    assert listing["service"] == "student-server"
    models = listing["data"]

    assert len(models) == 1
    assert models[0]["dim"] == 384
    assert models[0]["teacher"] == "test-teacher/v1"
    assert models[0]["checkpoint_sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()


def test_models_list_parameters(tmp_path):
    torch.manual_seed(0)
    student = build_unite_student()
    projector = torch.nn.Linear(384, 96)
    save_student(
        student,
        tmp_path / "student",
        architecture="unite-vit-small-14",
        architecture_kwargs=UNITE_STUDENT_KWARGS,
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={},
        mimic_projector=projector,
    )
    settings = StudentSettings(checkpoint_dir=tmp_path / "student", upload_dir=tmp_path / "uploads", jobs_dir=tmp_path / "jobs")
    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=SLIDE_TIMEOUT_S) as client:
        models = client.get("/v1/models").json()["data"]

    student_parameters = sum(parameter.numel() for parameter in student.parameters())
    by_space = {model["space"]: model for model in models}
    assert set(by_space) == {"student", "teacher"}
    assert by_space["student"]["parameters"] == student_parameters
    assert by_space["teacher"]["parameters"] == student_parameters + 384 * 96 + 96
    assert by_space["teacher"]["dim"] == 96


def test_readyz_ready_with_checkpoint(client):
    assert client.get("/healthz").json() == {"status": "ok"}

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_readyz_503_without_checkpoint(tmp_path, caplog):
    missing = tmp_path / "no-student-here"
    app = create_app(StudentSettings(checkpoint_dir=missing, upload_dir=tmp_path / "uploads", reload_interval_s=0))

    with caplog.at_level(logging.WARNING, logger="student_server"), run_app(app) as base_url, httpx.Client(base_url=base_url) as client:
        health = client.get("/healthz")
        ready = client.get("/readyz")
        embeddings = client.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(np.zeros((224, 224, 3), np.uint8))}]})
        models = client.get("/v1/models").json()

        assert health.status_code == 200
        error = assert_error_shape(ready, 503, "not_ready")
        assert error["message"].startswith("the student server is not ready: no student checkpoint is loaded: ")
        assert "no model.safetensors" in error["message"]
        assert "unite distill" in error["message"]
        assert "UNITE_STUDENT_CHECKPOINT_DIR" in error["message"]
        assert str(tmp_path) not in ready.text
        assert f"no student checkpoint at {missing}" in caplog.text
        assert_error_shape(embeddings, 503, "not_ready")
        assert str(tmp_path) not in embeddings.text
        assert models["data"] == []

        save_test_student(missing)
        assert client.get("/readyz").status_code == 200


def test_readyz_503_damaged_checkpoint_hides_path(checkpoint, tmp_path, caplog):
    damaged = tmp_path / "damaged-student"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (damaged / "config.json").write_text("{not json", encoding="utf-8")
    app = create_app(StudentSettings(checkpoint_dir=damaged, upload_dir=tmp_path / "uploads"))

    with caplog.at_level(logging.WARNING, logger="student_server"), run_app(app) as base_url, httpx.Client(base_url=base_url) as client:
        ready = client.get("/readyz")

    error = assert_error_shape(ready, 503, "not_ready")
    assert "cannot be loaded" in error["message"]
    assert "UNITE_STUDENT_CHECKPOINT_DIR" in error["message"]
    assert "unite distill" in error["message"]
    assert error["message"].endswith("`unite distill`.")
    assert ".." not in error["message"]
    assert str(tmp_path) not in ready.text
    assert "config.json" not in ready.text
    assert str(damaged / "config.json") in caplog.text


# unite teach against the student server


def test_teach_rejects_student_server(server, shared_data, tmp_path):
    client, _ = server
    base_url = str(client.base_url).rstrip("/")

    with pytest.raises(ConfigError) as error:
        teach_slides(
            [shared_data / "slides" / "CMU-1-Small-Region.svs"],
            gateway_url=base_url,
            cache_dir=tmp_path / "cache",
            shard_dir=tmp_path / "shards",
        )

    assert f"--gateway {base_url} is not a UNITE teacher gateway" in error.value.message
    assert "names the service 'student-server', expected 'teacher-gateway'" in error.value.message
    assert "unite serve-gateway" in error.value.message
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "shards").exists()


# settings


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNITE_STUDENT_CHECKPOINT_DIR", str(tmp_path / "student"))
    monkeypatch.setenv("UNITE_STUDENT_PORT", "8311")
    monkeypatch.setenv("UNITE_STUDENT_MAX_UPLOAD_BYTES", "1048576")

    settings = StudentSettings()

    assert settings.checkpoint_dir == tmp_path / "student"
    assert settings.port == 8311
    assert settings.max_upload_bytes == 1048576
    assert settings.host == "127.0.0.1"


def test_settings_invalid_device_names_variable(monkeypatch):
    monkeypatch.setenv("UNITE_STUDENT_DEVICE", "gpu")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="UNITE_STUDENT_DEVICE"):
            get_settings()
    finally:
        get_settings.cache_clear()
