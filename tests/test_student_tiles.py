"""The student server's tile inputs over real HTTP: mode rules, the mpp rule, uploads and teacher-space output.

Every test talks to a uvicorn server on 127.0.0.1 through httpx. The student is a one-block UNITE student
with random weights and a random mimic projector, saved as a real export. Expected pixels are computed
here with numpy from the rules in docs/student-server.md, then sent as plain RGB tiles, so each rule is
checked by comparing two server responses. Embeddings of the same pixels may land in different batches,
so they are compared with a tolerance of 1e-5 rather than bit for bit.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servers import run_app

import student_server.tiles_api as tiles_api
from shared.checkpoint import load_mimic_projector, save_student
from shared.imaging import decode_image
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from student_server.app import create_app
from student_server.settings import StudentSettings

MAX_TILES = 4
MAX_REQUEST_BYTES = 1024 * 1024
TEACHER_DIM = 1536
TOLERANCE = 1e-5
# A file name that must never come back in a response.
SECRET_NAME = "patient-4711-jane-doe.png"


def save_tiles_student(folder: Path, *, projector: bool) -> Path:
    torch.manual_seed(3)
    mimic = torch.nn.Linear(384, TEACHER_DIM) if projector else None
    return save_student(
        build_unite_student(depth=1),
        folder,
        architecture="unite-vit-small-14",
        architecture_kwargs={**UNITE_STUDENT_KWARGS, "depth": 1},
        teacher="test-teacher/v1",
        teacher_licence="test",
        training={},
        mimic_projector=mimic,
    )


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def rgb_png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels))


def png_declaring(width: int, height: int) -> bytes:
    """Return a tiny PNG whose header declares ``width`` x ``height`` RGB pixels, with one short data chunk."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def upload(client: httpx.Client, files: list[bytes], **fields: str) -> httpx.Response:
    parts = [("file", (SECRET_NAME, data, "image/png")) for data in files]
    return client.post("/v1/embeddings/upload", files=parts, data=fields)


def embeddings_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def assert_same_embeddings(first: httpx.Response, second: httpx.Response) -> None:
    np.testing.assert_allclose(embeddings_of(first), embeddings_of(second), atol=TOLERANCE, rtol=0)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "limit", "value"}
    assert error["code"] == code
    assert SECRET_NAME not in response.text
    return error


@pytest.fixture(scope="module")
def tile(shared_data) -> np.ndarray:
    """A real 224 x 224 lung tile as RGB."""
    path = sorted((shared_data / "tiles" / "lc25000_lung_dedup" / "lung_aca").glob("*.jpeg"))[0]
    return decode_image(path.read_bytes())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiles_student(tmp_path_factory.mktemp("tiles-checkpoint") / "student", projector=True)


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    settings = StudentSettings(
        checkpoint_dir=checkpoint,
        max_tiles_per_request=MAX_TILES,
        max_request_bytes=MAX_REQUEST_BYTES,
        jobs_dir=tmp_path_factory.mktemp("jobs"),
        upload_dir=tmp_path_factory.mktemp("uploads"),
    )
    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=120) as http:
        yield http


# Modes


def test_rgba_composited_on_white(client, tile):
    height, width = tile.shape[:2]
    alpha = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    rgba = np.dstack([tile, alpha])
    weight = alpha[..., None].astype(np.int64)
    expected = ((tile * weight + 255 * (255 - weight)) / 255).round().astype(np.uint8)

    sent = upload(client, [encode(Image.fromarray(rgba))])
    direct = upload(client, [rgb_png(expected)])

    assert_same_embeddings(sent, direct)
    assert not np.allclose(embeddings_of(sent), embeddings_of(upload(client, [rgb_png(tile)])), atol=1e-3)


def test_json_route_converts_rgba(client, tile):
    rgba = np.dstack([tile, np.full(tile.shape[:2], 255, dtype=np.uint8)])
    body = {"input": [{"image": base64.b64encode(encode(Image.fromarray(rgba))).decode("ascii")}]}

    sent = client.post("/v1/embeddings", json=body)
    direct = upload(client, [rgb_png(tile)])

    assert_same_embeddings(sent, direct)


def test_greyscale_becomes_grey_rgb(client, tile):
    grey = np.asarray(Image.fromarray(tile).convert("L"))

    sent = upload(client, [encode(Image.fromarray(grey))])
    direct = upload(client, [rgb_png(np.dstack([grey, grey, grey]))])

    assert_same_embeddings(sent, direct)


def test_palette_with_and_without_transparency(client, tile):
    quantized = Image.fromarray(tile).quantize(colors=32)
    indices = np.asarray(quantized)
    palette = np.array(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)
    transparent_index = int(indices[0, 0])
    plain = palette[indices]
    composited = np.where((indices == transparent_index)[..., None], 255, plain).astype(np.uint8)
    opaque = Image.fromarray(indices)
    opaque.putpalette(palette.ravel().tolist())
    transparent = opaque.copy()
    transparent.info["transparency"] = transparent_index

    sent = upload(client, [encode(opaque), encode(transparent)])
    direct = upload(client, [rgb_png(plain), rgb_png(composited)])

    assert_same_embeddings(sent, direct)


def test_16_bit_grey_and_colour_scaled_by_257(client, tile):
    rng = np.random.default_rng(5)
    colour16 = tile.astype(np.uint16) * 257 + rng.integers(-128, 128, size=tile.shape).clip(0, None).astype(np.uint16)
    colour16 = np.where(tile == 255, 65535, colour16).astype(np.uint16)
    grey16 = colour16[:, :, 1].copy()
    ok, rgb48 = cv2.imencode(".png", colour16[:, :, ::-1])
    assert ok

    sent = upload(client, [encode(Image.fromarray(grey16)), rgb48.tobytes()])
    expected_colour = ((colour16.astype(np.int64) / 257).round()).astype(np.uint8)
    expected_grey = expected_colour[:, :, 1]
    direct = upload(client, [rgb_png(np.dstack([expected_grey] * 3)), rgb_png(expected_colour)])

    assert_same_embeddings(sent, direct)


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("1", "PNG"), ("F", "TIFF"), ("I", "TIFF")],
)
def test_unconvertible_mode_422(client, mode, image_format):
    data = encode(Image.new(mode, (224, 224)), image_format)

    response = upload(client, [rgb_png(np.zeros((224, 224, 3), np.uint8)), data])

    error = assert_error(response, 422, "invalid_image")
    assert f"file[1]: image mode is {mode!r}" in error["message"]
    assert error["value"] == mode
    assert "RGB" in error["limit"]


def test_tiff_tile_accepted(client, tile):
    assert_same_embeddings(upload(client, [encode(Image.fromarray(tile), "TIFF")]), upload(client, [rgb_png(tile)]))


# Resolution


def test_mpp_quarter_equals_downscale(client, tile):
    large = np.asarray(Image.fromarray(tile).resize((448, 448), Image.BICUBIC))
    downscaled = np.asarray(Image.fromarray(large).resize((224, 224), Image.BICUBIC))

    sent = upload(client, [rgb_png(large)], mpp="0.25")
    direct = upload(client, [rgb_png(downscaled)])

    assert_same_embeddings(sent, direct)


def test_mpp_half_keeps_centre_crop(client, tile):
    large = np.asarray(Image.fromarray(tile).resize((448, 448), Image.BICUBIC))
    body = {"input": [{"image": base64.b64encode(rgb_png(large)).decode("ascii"), "mpp": 0.5}]}

    sent = client.post("/v1/embeddings", json=body)
    cropped = upload(client, [rgb_png(np.ascontiguousarray(large[112:336, 112:336]))])
    without_mpp = upload(client, [rgb_png(large)])

    assert_same_embeddings(sent, cropped)
    assert not np.allclose(embeddings_of(sent), embeddings_of(without_mpp), atol=1e-3)


def test_invalid_mpp_field_422(client, tile):
    error = assert_error(upload(client, [rgb_png(tile)], mpp="fast"), 422, "invalid_request")

    assert "form field 'mpp' is 'fast'" in error["message"]


# Malformed uploads


def malformed_uploads(tile: np.ndarray) -> dict[str, tuple[dict, int, str, str]]:
    """Each case: httpx request arguments, the status, the error code and a phrase the message must contain."""
    png = rgb_png(tile)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("tile.png", png)
    boundary = "unite-test-boundary"
    multipart = f"multipart/form-data; boundary={boundary}"

    def files(*contents: bytes) -> dict:
        return {"files": [("file", (SECRET_NAME, content, "image/png")) for content in contents]}

    return {
        "truncated png": (files(png[: len(png) // 2]), 422, "invalid_image", "file[0]: cannot decode"),
        "declared 50000 px": (files(png_declaring(50_000, 50_000)), 422, "invalid_image", "more than the limit of 16777216"),
        "zip renamed png": (files(archive.getvalue()), 422, "invalid_image", "no PNG, JPEG or TIFF header"),
        "text file": (files(b"this is a note, not a tile"), 422, "invalid_image", "cannot decode 26 bytes"),
        "empty file": (files(b""), 422, "invalid_image", "cannot decode 0 bytes"),
        "empty body": ({"content": b"", "headers": {"content-type": multipart}}, 422, "invalid_request", "body is empty"),
        "cut multipart": (
            {"content": f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc".encode(), "headers": {"content-type": multipart}},
            422,
            "invalid_request",
            "without its closing boundary",
        ),
        "json content type": ({"json": {"input": []}}, 422, "invalid_request", "expected multipart/form-data"),
        "too many files": (files(*[png] * (MAX_TILES + 1)), 413, "request_too_large", f"more than {MAX_TILES} files"),
        "body too large": (files(b"\x00" * (MAX_REQUEST_BYTES + 1)), 413, "request_too_large", "UNITE_STUDENT_MAX_REQUEST_BYTES"),
        "no file part": ({"data": {"mpp": "0.5"}, "files": {"model": (None, "unite-student")}}, 422, "invalid_request", "no 'file' part"),
        "unknown field": ({**files(png), "data": {"colour": "pink"}}, 422, "invalid_request", "unknown field 'colour'"),
    }


def test_malformed_uploads_4xx_and_server_keeps_serving(client, tile):
    for case, (arguments, status, code, phrase) in malformed_uploads(tile).items():
        response = client.post("/v1/embeddings/upload", **arguments)

        error = assert_error(response, status, code)
        assert phrase in error["message"], f"{case}: {error['message']}"

    assert embeddings_of(upload(client, [rgb_png(tile)])).shape == (1, 384)


def test_declared_pixels_named_in_error(client):
    error = assert_error(upload(client, [png_declaring(50_000, 50_000)]), 422, "invalid_image")

    assert error["limit"] == 4096 * 4096
    assert error["value"] == 50_000 * 50_000


def test_too_many_files_names_limit(client, tile):
    error = assert_error(upload(client, [rgb_png(tile)] * (MAX_TILES + 1)), 413, "request_too_large")

    assert error["limit"] == MAX_TILES
    assert error["value"] == MAX_TILES + 1
    assert "UNITE_STUDENT_MAX_TILES_PER_REQUEST" in error["message"]


def test_upload_keeps_file_order_without_names(client, tile):
    flipped = np.ascontiguousarray(tile[::-1])

    response = upload(client, [rgb_png(tile), rgb_png(flipped)])
    single = [embeddings_of(upload(client, [rgb_png(pixels)]))[0] for pixels in (tile, flipped)]

    answer = response.json()
    assert SECRET_NAME not in response.text
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert all(set(item) == {"object", "index", "embedding"} for item in answer["data"])
    np.testing.assert_allclose(embeddings_of(response), np.stack(single), atol=TOLERANCE, rtol=0)
    assert answer["checkpoint_sha256"] == answer["usage"]["checkpoint_sha256"]


# Teacher space


@pytest.mark.parametrize("model_name", ["teacher-space", "unite-student:teacher-space"])
def test_teacher_space_is_projected_student(client, checkpoint, tile, model_name):
    flipped = np.ascontiguousarray(tile[:, ::-1])
    student_name = client.get("/v1/models").json()["data"][0]["id"]
    model_name = model_name.replace("unite-student", student_name)

    student = upload(client, [rgb_png(tile), rgb_png(flipped)])
    teacher = upload(client, [rgb_png(tile), rgb_png(flipped)], model=model_name)

    projector = load_mimic_projector(checkpoint)
    with torch.inference_mode():
        expected = projector(torch.from_numpy(embeddings_of(student))).numpy()
    assert embeddings_of(teacher).shape == (2, TEACHER_DIM)
    np.testing.assert_allclose(embeddings_of(teacher), expected, atol=1e-4, rtol=0)
    assert teacher.json()["model"] == f"{student_name}:teacher-space"
    assert student.json()["model"] == student_name


def test_models_list_teacher_space(client):
    models = client.get("/v1/models").json()["data"]

    assert [entry["dim"] for entry in models] == [384, TEACHER_DIM]
    assert [entry["space"] for entry in models] == ["student", "teacher"]
    assert "teacher-space" in models[1]["names"]
    assert models[1]["id"] == f"{models[0]['id']}:teacher-space"


def test_unknown_model_lists_served_names(client, tile):
    error = assert_error(upload(client, [rgb_png(tile)], model="uni2-h"), 404, "model_not_found")

    assert "teacher-space" in error["limit"]


def test_teacher_space_without_projector_422(tmp_path, tile):
    checkpoint = save_tiles_student(tmp_path / "student", projector=False)
    settings = StudentSettings(checkpoint_dir=checkpoint, jobs_dir=tmp_path / "jobs", upload_dir=tmp_path / "uploads")

    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=120) as http:
        response = upload(http, [rgb_png(tile)], model="teacher-space")
        models = http.get("/v1/models").json()["data"]

    error = assert_error(response, 422, "teacher_space_unavailable")
    assert "mimic projector" in error["message"]
    assert [entry["space"] for entry in models] == ["student"]


def test_short_jpeg_scan_422(client, tile):
    data = encode(Image.fromarray(tile), "JPEG")
    start = data.index(b"\xff\xc0")
    lying = data[: start + 5] + struct.pack(">HH", 2048, 2048) + data[start + 9 :]

    error = assert_error(upload(client, [lying]), 422, "invalid_image")

    assert "file[0]: the JPEG data ends before the 2048 x 2048 pixels" in error["message"]


def test_exif_orientation_applied(client, tile):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(tile, k=1))

    sent = upload(client, [_png_with_exif(stored, exif)])
    direct = upload(client, [rgb_png(tile)])

    assert_same_embeddings(sent, direct)


def _png_with_exif(pixels: np.ndarray, exif: Image.Exif) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_concurrent_decodes_bounded(checkpoint, tmp_path, tile, monkeypatch):
    lock = threading.Lock()
    in_flight = [0, 0]  # now, maximum
    real_decode = tiles_api.decode_tile

    def counting_decode(*args, **kwargs):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            time.sleep(0.2)
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(tiles_api, "decode_tile", counting_decode)
    settings = StudentSettings(
        checkpoint_dir=checkpoint, max_concurrent_decodes=2, jobs_dir=tmp_path / "jobs", upload_dir=tmp_path / "uploads"
    )
    data = rgb_png(tile)
    with run_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=120) as http:
        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(lambda _: upload(http, [data, data]), range(6)))

    assert [response.status_code for response in responses] == [200] * 6
    assert in_flight[1] == 2
