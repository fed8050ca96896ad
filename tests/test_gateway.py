"""The teacher gateway over real HTTP: a uvicorn server on 127.0.0.1, a real SQLite cache and real tiles."""

from __future__ import annotations

import base64
import io
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servers import run_app

from shared import protocol
from shared.cache import CacheEntry, EmbeddingCache
from shared.errors import TeacherError
from shared.imaging import decode_image, encode_base64_png, encode_png, prepare_tile
from shared.shards import list_shards
from shared.slides import reader
from teacher_gateway.app import create_app
from teacher_gateway.client import GatewayClient
from teacher_gateway.export import export_shards
from teacher_gateway.settings import GatewaySettings
from teacher_gateway.teachers.preprocessing import TilePreprocessing
from teacher_gateway.teachers.reference import DESCRIPTOR_DIM, ReferenceTeacher
from teacher_gateway.teachers.remote import RemoteTeacher
from teacher_gateway.teachers.remote_config import RemoteTeacherConfig
from teacher_gateway.teachers.torch_teacher import TorchTeacher

MAX_TILES = 8


class CountingTeacher:
    """A real, cheap teacher: the mean colour of each cell of a 4 x 4 grid (48 values), scaled to [0, 1].

    It records the size of every batch it embeds, so tests can assert what the gateway sent it.
    """

    identity = "counting-test-teacher/1"
    name = "counting"
    dim = 48
    licence = "CC0-1.0"

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    @property
    def tiles_embedded(self) -> int:
        return sum(self.batch_sizes)

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batch_sizes.append(len(tiles))
        return self.compute(tiles)

    @staticmethod
    def compute(tiles: np.ndarray) -> np.ndarray:
        count, height, width, _ = tiles.shape
        cells = tiles.reshape(count, 4, height // 4, 4, width // 4, 3).astype(np.float64)
        return (cells.mean(axis=(2, 4)) / 255.0).reshape(count, 48).astype(np.float32)


class NaNTeacher(CountingTeacher):
    identity = "nan-test-teacher/1"

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        embeddings = super().embed(tiles)
        embeddings[-1, 5] = np.nan
        return embeddings


class WrongDimTeacher(CountingTeacher):
    identity = "wrong-dim-test-teacher/1"

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        return super().embed(tiles)[:, :32]


class CrashingTeacher(CountingTeacher):
    identity = "crashing-test-teacher/1"

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        raise RuntimeError("weights missing at /secret/path/model.safetensors")


class RacingTeacher(CountingTeacher):
    """Stores a different embedding for each tile from another connection while it runs, as a second
    gateway process that embedded the same tiles a moment earlier would."""

    identity = "racing-test-teacher/1"

    def __init__(self, cache_dir: Path) -> None:
        super().__init__()
        self.cache_dir = cache_dir

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        embeddings = super().embed(tiles)
        winners = [
            CacheEntry(
                key=EmbeddingCache.tile_key(tile, self.identity),
                teacher=self.identity,
                embedding=embedding + 1.0,
                tile_png=encode_png(tile),
            )
            for tile, embedding in zip(tiles, embeddings)
        ]
        with EmbeddingCache(self.cache_dir) as other_process_cache:
            other_process_cache.put_many(winners)
        return embeddings


@pytest.fixture(scope="module")
def lung_jpegs(shared_data) -> list[bytes]:
    """The JPEG bytes of real 224 px lung tiles of all three classes, as a client would send them."""
    paths = sorted((shared_data / "tiles" / "lc25000_lung_dedup").glob("*/*.jpeg"))[::30][:MAX_TILES]
    assert len(paths) == MAX_TILES
    return [path.read_bytes() for path in paths]


@pytest.fixture(scope="module")
def lung_tiles(lung_jpegs) -> list[np.ndarray]:
    return [decode_image(data) for data in lung_jpegs]


def _image_input(data: bytes, **provenance) -> dict:
    return {"image": base64.b64encode(data).decode("ascii"), **provenance}


@contextmanager
def _gateway(tmp_path: Path, teacher, **settings):
    app = create_app(GatewaySettings(cache_dir=tmp_path / "cache", max_tiles_per_request=MAX_TILES, **settings), teacher=teacher)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


@pytest.fixture
def teacher() -> CountingTeacher:
    return CountingTeacher()


@pytest.fixture
def http(tmp_path, teacher):
    with _gateway(tmp_path, teacher) as client:
        yield client


def _embeddings(response: httpx.Response) -> np.ndarray:
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    return np.array([item["embedding"] for item in data], dtype=np.float32)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "limit", "value"}
    return body["error"]


def test_embeddings_in_request_order(http, teacher, lung_jpegs, lung_tiles):
    response = http.post("/v1/embeddings", json={"input": [_image_input(data) for data in lung_jpegs[:5]]})

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == CountingTeacher.identity
    assert body["usage"] == {"tiles": 5, "cache_hits": 0, "coalesced": 0, "model_calls": 1, "tiles_sent_to_teacher": 5}
    embeddings = _embeddings(response)
    assert embeddings.shape == (5, 48)
    expected = CountingTeacher.compute(np.stack([prepare_tile(tile) for tile in lung_tiles[:5]]))
    assert np.array_equal(embeddings, expected)
    assert teacher.batch_sizes == [5]


def test_repeat_request_hits_cache(http, teacher, lung_jpegs):
    payload = {"input": [_image_input(data) for data in lung_jpegs[:4]]}
    first = http.post("/v1/embeddings", json=payload)

    second = http.post("/v1/embeddings", json=payload)

    assert second.status_code == 200
    assert second.json()["usage"] == {"tiles": 4, "cache_hits": 4, "coalesced": 0, "model_calls": 0, "tiles_sent_to_teacher": 0}
    assert teacher.calls == 1
    assert np.array_equal(_embeddings(second), _embeddings(first))


def test_png_of_same_pixels_hits_cache(http, teacher, lung_jpegs, lung_tiles):
    http.post("/v1/embeddings", json={"input": [_image_input(lung_jpegs[0])]})

    response = http.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(lung_tiles[0])}]})

    assert response.json()["usage"]["cache_hits"] == 1
    assert teacher.calls == 1


def test_duplicate_tile_sent_once(http, teacher, lung_jpegs):
    inputs = [_image_input(lung_jpegs[0]), _image_input(lung_jpegs[1]), _image_input(lung_jpegs[0])]

    response = http.post("/v1/embeddings", json={"input": inputs})

    assert response.status_code == 200
    assert response.json()["usage"]["tiles_sent_to_teacher"] == 2
    assert teacher.batch_sizes == [2]
    embeddings = _embeddings(response)
    assert np.array_equal(embeddings[0], embeddings[2])
    assert not np.array_equal(embeddings[0], embeddings[1])


def test_partial_hits_send_only_misses(http, teacher, lung_jpegs):
    http.post("/v1/embeddings", json={"input": [_image_input(data) for data in lung_jpegs[:2]]})

    response = http.post("/v1/embeddings", json={"input": [_image_input(data) for data in lung_jpegs[:5]]})

    assert response.json()["usage"] == {"tiles": 5, "cache_hits": 2, "coalesced": 0, "model_calls": 1, "tiles_sent_to_teacher": 3}
    assert teacher.batch_sizes == [2, 3]


def test_bad_base64_names_index(http, teacher, lung_jpegs):
    inputs = [_image_input(lung_jpegs[0]), {"image": "not base64 at all!"}]

    response = http.post("/v1/embeddings", json={"input": inputs})

    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_image"
    assert "input[1].image" in error["message"]
    assert "base64" in error["message"]
    assert teacher.calls == 0


def test_greyscale_png_names_mode(http, lung_tiles):
    buffer = io.BytesIO()
    Image.fromarray(lung_tiles[0]).convert("L").save(buffer, format="PNG")

    response = http.post("/v1/embeddings", json={"input": [_image_input(buffer.getvalue())]})

    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_image"
    assert "input[0].image" in error["message"]
    assert "'L'" in error["message"]
    assert error["value"] == "L"


def test_larger_tile_is_prepared(http, lung_tiles):
    tile = np.asarray(Image.fromarray(lung_tiles[0]).resize((300, 256)))

    response = http.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(tile)}]})

    assert response.status_code == 200
    assert np.array_equal(_embeddings(response)[0], CountingTeacher.compute(prepare_tile(tile)[None])[0])


def test_strip_image_is_rejected(http, teacher, lung_tiles):
    strip = np.ascontiguousarray(lung_tiles[0][:20])

    response = http.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(strip)}]})

    assert response.status_code == 422
    error = _error(response)
    assert "input[0]" in error["message"]
    assert "aspect ratio 11.2" in error["message"]
    assert error["limit"] == 4.0
    assert teacher.calls == 0


# Each case is a JSON fragment added to the second input, the message part expected, and the expected
# error value. Raw JSON, because NUL, lone surrogates and Infinity cannot all be sent through httpx's json=.
INVALID_PROVENANCE = {
    "nul-slide-id": ('"slide_id": "a\\u0000b"', "input[1].slide_id: slide_id contains the control character U+0000 at position 1", "a\x00b"),
    "surrogate-slide-id": ('"slide_id": "\\ud800"', "input[1].slide_id: slide_id contains the lone surrogate U+D800", "\\ud800"),
    "long-slide-id": ('"slide_id": "' + "s" * 129 + '"', "input[1].slide_id: slide_id has 129 characters, more than the maximum of 128", "s" * 100 + "..."),
    "empty-slide-id": ('"slide_id": ""', "input[1].slide_id: slide_id is empty", ""),
    "huge-coords": (
        '"coords": [1000000000000000000000000000000, 1]',
        "input[1].coords: coords x is 1000000000000000000000000000000",
        "[1000000000000000000000000000000, 1]",
    ),
    "int64-overflow-coords": ('"coords": [9223372036854775808, 1]', "input[1].coords: coords x is 9223372036854775808", "[9223372036854775808, 1]"),
    "negative-coords": ('"coords": [0, -5]', "input[1].coords: coords y is -5, expected a level-0 pixel coordinate", "[0, -5]"),
    "infinite-mpp": ('"mpp": Infinity', "input[1].mpp: mpp is inf, expected a finite resolution from 0.05 to 20.0", "inf"),
    "inf-text-mpp": ('"mpp": "inf"', "input[1].mpp: mpp is inf", "inf"),
    "nan-mpp": ('"mpp": NaN', "input[1].mpp: mpp is nan", "nan"),
    "huge-mpp": ('"mpp": 1e300', "input[1].mpp: mpp is 1e+300", 1e300),
    "tiny-mpp": ('"mpp": 0.01', "input[1].mpp: mpp is 0.01", 0.01),
}


@pytest.mark.parametrize("fragment, message, value", INVALID_PROVENANCE.values(), ids=INVALID_PROVENANCE.keys())
def test_invalid_provenance_is_422_before_teacher(http, teacher, lung_jpegs, fragment, message, value):
    image = base64.b64encode(lung_jpegs[0]).decode("ascii")
    body = f'{{"input": [{{"image": "{image}"}}, {{"image": "{image}", {fragment}}}]}}'

    response = http.post("/v1/embeddings", content=body.encode("ascii"), headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == "invalid_request"
    assert message in error["message"]
    assert error["value"] == value
    assert teacher.calls == 0
    assert http.get("/v1/cache/stats").json()["total"] == 0


def test_invalid_model_name_is_422(http, teacher, lung_jpegs):
    image = base64.b64encode(lung_jpegs[0]).decode("ascii")
    body = f'{{"model": "\\udfff", "input": [{{"image": "{image}"}}]}}'

    response = http.post("/v1/embeddings", content=body.encode("ascii"), headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == "invalid_request"
    assert "model: model contains the lone surrogate U+DFFF" in error["message"]
    assert teacher.calls == 0


def test_edge_provenance_is_stored_and_exported(tmp_path, teacher, lung_jpegs):
    longest_slide_id = "é" * protocol.MAX_SLIDE_ID_LENGTH
    inputs = [
        _image_input(lung_jpegs[0], slide_id=longest_slide_id, coords=[0, protocol.MAX_COORDINATE], mpp=protocol.MIN_TILE_MPP),
        _image_input(lung_jpegs[1], slide_id="slide 7 (HE)", coords=[protocol.MAX_COORDINATE, 0], mpp=protocol.MAX_TILE_MPP),
    ]
    with _gateway(tmp_path, teacher) as http:
        response = http.post("/v1/embeddings", json={"input": inputs})

    assert response.status_code == 200, response.text
    with EmbeddingCache(tmp_path / "cache") as cache:
        shards = export_shards(cache, CountingTeacher.identity, CountingTeacher.licence, tmp_path / "shards")
    assert [info.path for info in list_shards(tmp_path / "shards")] == shards
    with h5py.File(shards[0], "r") as file:
        assert list(file["slide_ids"].asstr()[:]) == [longest_slide_id, "slide 7 (HE)"]
        assert file["coords"][:].tolist() == [[0, protocol.MAX_COORDINATE], [protocol.MAX_COORDINATE, 0]]
        np.testing.assert_allclose(file["mpp"][:], [protocol.MIN_TILE_MPP, protocol.MAX_TILE_MPP], rtol=1e-6)


def test_protocol_mpp_range_matches_slide_reader():
    assert (protocol.MIN_TILE_MPP, protocol.MAX_TILE_MPP) == (reader.MIN_MPP, reader.MAX_MPP)


def test_too_many_tiles_is_413(http, teacher, lung_jpegs):
    inputs = [_image_input(lung_jpegs[index % len(lung_jpegs)]) for index in range(MAX_TILES + 1)]

    response = http.post("/v1/embeddings", json={"input": inputs})

    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "request_too_large"
    assert error["limit"] == MAX_TILES
    assert error["value"] == MAX_TILES + 1
    assert f"{MAX_TILES + 1} tiles" in error["message"]
    assert teacher.calls == 0


def test_body_over_byte_limit_is_413(tmp_path, teacher, lung_jpegs):
    with _gateway(tmp_path, teacher, max_request_bytes=4096) as http:
        response = http.post("/v1/embeddings", json={"input": [_image_input(lung_jpegs[0])]})

    assert response.status_code == 413
    error = _error(response)
    assert error["limit"] == 4096
    assert error["value"] > 4096
    assert "UNITE_GATEWAY_MAX_REQUEST_BYTES" in error["message"]
    assert teacher.calls == 0


def test_unknown_model_lists_served_model(http, lung_jpegs):
    response = http.post("/v1/embeddings", json={"model": "uni2-h", "input": [_image_input(lung_jpegs[0])]})

    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "model_not_found"
    assert error["value"] == "uni2-h"
    assert CountingTeacher.identity in error["limit"]
    assert CountingTeacher.identity in error["message"]


@pytest.mark.parametrize("model", [CountingTeacher.identity, CountingTeacher.name])
def test_model_by_identity_or_name(http, model, lung_jpegs):
    response = http.post("/v1/embeddings", json={"model": model, "input": [_image_input(lung_jpegs[0])]})

    assert response.status_code == 200


def test_missing_field_is_invalid_request(http):
    response = http.post("/v1/embeddings", json={"input": [{"slide_id": "s1"}]})

    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_request"
    assert "input[0].image" in error["message"]


def test_invalid_json_is_invalid_request(http):
    response = http.post("/v1/embeddings", content=b'{"input": [', headers={"content-type": "application/json"})

    assert response.status_code == 422
    assert _error(response)["code"] == "invalid_request"
    assert "not valid JSON" in _error(response)["message"]


@pytest.mark.parametrize("bad_teacher", [NaNTeacher(), WrongDimTeacher()], ids=["nan", "wrong-dim"])
def test_bad_teacher_answer_is_502(tmp_path, bad_teacher, lung_jpegs):
    with _gateway(tmp_path, bad_teacher) as http:
        response = http.post("/v1/embeddings", json={"input": [_image_input(data) for data in lung_jpegs[:3]]})
        stats = http.get("/v1/cache/stats").json()

    assert response.status_code == 502
    error = _error(response)
    assert error["code"] == "teacher_error"
    assert bad_teacher.identity in error["message"]
    assert stats == {"entries": {}, "total": 0}
    with EmbeddingCache(tmp_path / "cache") as cache:
        assert cache.count() == 0


def test_first_stored_embedding_wins(tmp_path, lung_jpegs, lung_tiles):
    teacher = RacingTeacher(tmp_path / "cache")
    with _gateway(tmp_path, teacher) as http:
        response = http.post("/v1/embeddings", json={"input": [_image_input(data) for data in lung_jpegs[:2]]})

    assert response.status_code == 200
    winners = CountingTeacher.compute(np.stack([prepare_tile(tile) for tile in lung_tiles[:2]])) + 1.0
    assert np.array_equal(_embeddings(response), winners)


def test_unexpected_error_hides_details(tmp_path, lung_jpegs):
    with _gateway(tmp_path, CrashingTeacher()) as http:
        response = http.post("/v1/embeddings", json={"input": [_image_input(lung_jpegs[0])]})

    assert response.status_code == 500
    error = _error(response)
    assert error["code"] == "internal_error"
    assert response.headers["x-request-id"] in error["message"]
    assert "/secret/path" not in response.text
    assert "Traceback" not in response.text


def test_provenance_lands_in_cache(tmp_path, teacher, lung_jpegs):
    inputs = [
        _image_input(lung_jpegs[0], slide_id="slide-a", coords=[1024, 2048], mpp=0.5),
        _image_input(lung_jpegs[1]),
    ]
    with _gateway(tmp_path, teacher) as http:
        response = http.post("/v1/embeddings", json={"input": inputs})

    assert response.status_code == 200
    with EmbeddingCache(tmp_path / "cache") as cache:
        entries = list(cache.iter_entries(CountingTeacher.identity))
    assert len(entries) == 2
    assert entries[0].slide_id == "slide-a"
    assert entries[0].coords == (1024, 2048)
    assert entries[0].mpp == 0.5
    assert (entries[1].slide_id, entries[1].coords, entries[1].mpp) == (None, None, None)
    assert np.array_equal(entries[0].embedding, _embeddings(response)[0])


def test_service_routes(http, lung_jpegs):
    http.post("/v1/embeddings", json={"input": [_image_input(data) for data in lung_jpegs[:3]]})

    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    models = http.get("/v1/models").json()
    assert models["service"] == "teacher-gateway"
    model = models["data"][0]
    assert (model["id"], model["dim"], model["licence"]) == (CountingTeacher.identity, 48, "CC0-1.0")
    assert http.get("/v1/cache/stats").json() == {"entries": {CountingTeacher.identity: 3}, "total": 3}


def _tiny_torch_teacher() -> TorchTeacher:
    # Mean colour, then 3 x 8 weights and 8 biases: 32 parameters.
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 8))
    preprocessing = TilePreprocessing.create(teacher="tiny-torch-test-teacher/1")
    return TorchTeacher(model, name="tiny", identity="tiny-torch-test-teacher/1", dim=8, licence="CC0-1.0", preprocessing=preprocessing, device="cpu")


def _unreachable_remote_teacher() -> RemoteTeacher:
    # Listing the models sends nothing to the provider, so no server needs to listen on this port.
    return RemoteTeacher(RemoteTeacherConfig(url="http://127.0.0.1:9/v1/embeddings", model="remote-test", dim=16, licence="test"))


@pytest.mark.parametrize(
    ("make_teacher", "parameters"),
    [
        (ReferenceTeacher, DESCRIPTOR_DIM * 1536),
        (_tiny_torch_teacher, 32),
        (_unreachable_remote_teacher, None),
        (CountingTeacher, None),
    ],
    ids=["reference", "torch", "remote", "without-attribute"],
)
def test_models_list_parameters(tmp_path, make_teacher, parameters):
    teacher = make_teacher()
    try:
        with _gateway(tmp_path, teacher, canary_tiles=0) as http:
            listing = http.get("/v1/models").json()
    finally:
        close = getattr(teacher, "close", None)
        if callable(close):
            close()

    assert len(listing["data"]) == 1
    model = listing["data"][0]
    assert "parameters" in model
    assert model["parameters"] == parameters


def test_unknown_route_uses_error_shape(http):
    response = http.get("/v1/nothing-here")

    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_client_round_trip(tmp_path, teacher, lung_tiles):
    app = create_app(GatewaySettings(cache_dir=tmp_path / "cache"), teacher=teacher)
    with run_app(app) as base_url, GatewayClient(base_url, batch_size=3) as client:
        embeddings = client.embed(lung_tiles[:7], slide_id="slide-b", coords=[(index, 0) for index in range(7)], mpp=0.5)
        again, usage = client.embed_with_usage(lung_tiles[:7])
        model = client.model_info()

    assert model == {"identity": CountingTeacher.identity, "dim": 48, "licence": "CC0-1.0", "names": [CountingTeacher.identity, "counting"]}
    assert usage == {"tiles": 7, "cache_hits": 7, "coalesced": 0, "model_calls": 0, "tiles_sent_to_teacher": 0}
    assert embeddings.shape == (7, 48)
    assert np.array_equal(embeddings, CountingTeacher.compute(np.stack([prepare_tile(tile) for tile in lung_tiles[:7]])))
    assert np.array_equal(again, embeddings)
    assert teacher.batch_sizes == [3, 3, 1]
    with EmbeddingCache(tmp_path / "cache") as cache:
        assert [entry.coords for entry in cache.iter_entries(CountingTeacher.identity)] == [(index, 0) for index in range(7)]


def test_client_raises_server_message(tmp_path, teacher, lung_tiles):
    app = create_app(GatewaySettings(cache_dir=tmp_path / "cache"), teacher=teacher)
    with run_app(app) as base_url, GatewayClient(base_url, model="uni2-h") as client:
        with pytest.raises(TeacherError, match="HTTP 404: model 'uni2-h' is not served here") as error:
            client.embed(lung_tiles[:1])

    assert error.value.value == "uni2-h"


def test_client_retries_then_raises_on_refused(lung_tiles):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with GatewayClient(f"http://127.0.0.1:{port}", timeout=2, max_attempts=2, retry_wait_s=0.01) as client:
        with pytest.raises(TeacherError, match="after 2 attempts"):
            client.embed(lung_tiles[:1])


def test_reference_teacher_from_settings(tmp_path, lung_jpegs, lung_tiles):
    app = create_app(GatewaySettings(cache_dir=tmp_path / "cache", teacher="reference"))
    payload = {"model": "reference", "input": [_image_input(data) for data in lung_jpegs[:2]]}
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
        first = http.post("/v1/embeddings", json=payload)
        second = http.post("/v1/embeddings", json=payload)
        model = http.get("/v1/models").json()["data"][0]

    assert first.status_code == 200
    assert first.json()["model"] == ReferenceTeacher.identity
    assert (model["id"], model["dim"]) == (ReferenceTeacher.identity, 1536)
    assert second.json()["usage"]["cache_hits"] == 2
    expected = ReferenceTeacher().embed(np.stack([prepare_tile(tile) for tile in lung_tiles[:2]]))
    assert np.array_equal(_embeddings(first), expected)
    assert np.array_equal(_embeddings(second), expected)
