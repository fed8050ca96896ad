"""API keys of the gateway: the keys file, 401 without a valid key, per-key quotas, and keys kept out of logs."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from fake_teacher import FakeTeacher
from gateway_helpers import block_tiles, gateway, gateway_process, remote_environment

from shared.errors import ConfigError
from shared.imaging import encode_base64_png
from teacher_gateway.auth import KeyStore, hash_key
from teacher_gateway.client import GatewayClient, GatewayResponseError
from unite_cli.main import main

LAB_KEY = "sk-lab-a-4f1c9e2b7d"
OTHER_KEY = "sk-lab-b-8a3d5c1e9f"
WRONG_KEY = "sk-wrong-0b7e6a2c4d"


class _SmallTeacher:
    """A cheap real teacher: the mean colour of each tile, three values."""

    identity = "mean-colour-test-teacher/1"
    name = "mean-colour"
    dim = 3
    licence = "CC0-1.0"

    def embed(self, tiles):
        return tiles.reshape(len(tiles), -1, 3).mean(axis=1).astype("float32") / 255.0


def _write_keys(path, entries: list[dict]) -> None:
    lines = []
    for entry in entries:
        lines.append("[[keys]]")
        lines.extend(f"{name} = {value!r}" if isinstance(value, str) else f"{name} = {value}" for name, value in entry.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.toml"
    _write_keys(
        path,
        [
            {"name": "lab-a", "sha256": hash_key(LAB_KEY), "requests_per_minute": 3, "teacher_tiles_per_minute": 4},
            {"name": "lab-b", "sha256": hash_key(OTHER_KEY)},
        ],
    )
    return path


def _payload(tiles) -> dict:
    return {"input": [{"image": encode_base64_png(tile)} for tile in tiles]}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _start_of_minute() -> None:
    """Wait for a new minute when less than 15 s of this one are left, so a per-minute quota cannot reset mid-test."""
    if time.time() % 60 > 45:
        time.sleep(60.5 - time.time() % 60)


def test_routes_need_valid_key(tmp_path, keys_file):
    fake = FakeTeacher(dim=8)
    tile_payload = _payload(block_tiles(1))
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, keys_file=keys_file) as http:
        missing = http.post("/v1/embeddings", json=tile_payload)
        wrong = http.post("/v1/embeddings", json=tile_payload, headers=_bearer(WRONG_KEY))
        basic = http.post("/v1/embeddings", json=tile_payload, headers={"Authorization": f"Basic {LAB_KEY}"})
        bearer = http.post("/v1/embeddings", json=tile_payload, headers=_bearer(OTHER_KEY))
        header = http.post("/v1/embeddings", json=tile_payload, headers={"X-API-Key": OTHER_KEY})
        open_routes = [http.get(path).status_code for path in ("/healthz", "/readyz")]
        closed_routes = [http.get(path).status_code for path in ("/v1/models", "/v1/usage", "/v1/cache/stats", "/metrics")]
        closed_dry_run = http.post("/v1/embeddings/dry-run", json=tile_payload).status_code

    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "unauthorized"
    assert "missing API key" in missing.json()["error"]["message"]
    assert "`Authorization: Bearer <key>` or `X-API-Key: <key>`" in missing.json()["error"]["message"]
    assert wrong.status_code == 401
    assert "matches no key of this gateway's keys file" in wrong.json()["error"]["message"]
    assert basic.status_code == 401
    assert "does not use the Bearer scheme" in basic.json()["error"]["message"]
    assert (bearer.status_code, header.status_code) == (200, 200)
    assert open_routes == [200, 200]
    assert closed_routes == [401, 401, 401, 401]
    assert closed_dry_run == 401
    assert sum(fake.embed_counts.values()) == 1


@pytest.mark.parametrize("access, without_key, with_key", [("open", 200, 200), ("key", 401, 200), ("off", 404, 404)])
def test_metrics_access_setting(tmp_path, keys_file, access, without_key, with_key):
    with gateway(tmp_path / "cache", teacher=_SmallTeacher(), keys_file=keys_file, metrics=access) as http:
        anonymous = http.get("/metrics")
        keyed = http.get("/metrics", headers=_bearer(OTHER_KEY))

    assert anonymous.status_code == without_key
    assert keyed.status_code == with_key
    if with_key == 200:
        assert "unite_gateway_requests_total" in keyed.text


def test_request_quota_is_429_with_retry_after(tmp_path, keys_file):
    _start_of_minute()
    with gateway(tmp_path / "cache", teacher=_SmallTeacher(), keys_file=keys_file) as http:
        payload = _payload(block_tiles(1))
        first = [http.post("/v1/embeddings", json=payload, headers=_bearer(LAB_KEY)).status_code for _ in range(3)]
        over = http.post("/v1/embeddings", json=payload, headers=_bearer(LAB_KEY))
        other_key = http.post("/v1/embeddings", json=payload, headers=_bearer(OTHER_KEY))
        usage = http.get("/v1/usage", headers=_bearer(OTHER_KEY)).json()

    assert first == [200, 200, 200]
    assert over.status_code == 429
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "API key 'lab-a' has used its quota of 3 requests per minute (3 this minute)" in error["message"]
    assert "requests_per_minute" in error["message"]
    assert (error["limit"], error["value"]) == (3, 4)
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert other_key.status_code == 200
    keys = usage["teachers"][_SmallTeacher.identity]["keys"]
    assert (keys["lab-a"]["requests"], keys["lab-b"]["requests"]) == (3, 1)


def test_teacher_tiles_quota_sends_what_fits(tmp_path, keys_file):
    _start_of_minute()
    fake = FakeTeacher(dim=8)
    tiles = block_tiles(6, seed=2)
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, keys_file=keys_file) as http:
        over = http.post("/v1/embeddings", json=_payload(tiles), headers=_bearer(LAB_KEY))
        cached = http.post("/v1/embeddings", json=_payload(tiles[:4]), headers=_bearer(LAB_KEY))
        usage = http.get("/v1/usage", headers=_bearer(LAB_KEY)).json()

    assert over.status_code == 429
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "used 0 of its quota of 4 teacher tiles per minute" in error["message"]
    assert "so 4 were sent to the teacher and cached and 2 were not" in error["message"]
    assert "retry-after" in over.headers
    assert sum(fake.embed_counts.values()) == 4
    assert cached.status_code == 200
    assert cached.json()["usage"]["cache_hits"] == 4
    lab = next(iter(usage["teachers"].values()))["keys"]["lab-a"]
    assert (lab["teacher_tiles"], lab["requests"]) == (4, 2)


def test_keys_never_logged_or_returned(tmp_path, keys_file, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = []
    with gateway(tmp_path / "cache", teacher=_SmallTeacher(), keys_file=keys_file) as http:
        for headers in (
            _bearer(LAB_KEY),
            _bearer(WRONG_KEY),
            {"Authorization": WRONG_KEY},
            {"Authorization": f"Token {OTHER_KEY}"},
            {"X-API-Key": WRONG_KEY},
        ):
            bodies.append(http.post("/v1/embeddings", json=_payload(block_tiles(2)), headers=headers).text)
        bodies.append(http.get("/v1/usage", headers=_bearer(LAB_KEY)).text)
        bodies.append(http.get("/metrics", headers=_bearer(LAB_KEY)).text)
        bodies.append(http.get("/v1/models", headers=_bearer(LAB_KEY)).text)

    assert "lab-a" in bodies[-3]
    for key in (LAB_KEY, OTHER_KEY, WRONG_KEY):
        assert key not in caplog.text
        for body in bodies:
            assert key not in body


def test_client_sends_key(tmp_path, keys_file, monkeypatch):
    tiles = block_tiles(3, seed=4)
    with gateway(tmp_path / "cache", teacher=_SmallTeacher(), keys_file=keys_file) as http:
        url = str(http.base_url)
        with GatewayClient(url, api_key=OTHER_KEY) as client:
            explicit = client.embed(tiles)
        monkeypatch.setenv("UNITE_API_KEY", OTHER_KEY)
        with GatewayClient(url) as client:
            from_environment = client.embed(tiles)
        monkeypatch.delenv("UNITE_API_KEY")
        with GatewayClient(url) as client, pytest.raises(GatewayResponseError) as raised:
            client.embed(tiles)

    assert explicit.shape == (3, _SmallTeacher.dim)
    assert (from_environment == explicit).all()
    assert raised.value.server_code == "unauthorized"
    assert "HTTP 401" in raised.value.message
    assert "missing API key" in raised.value.message


# Each case: the keys file text, then a part of the expected message.
INVALID_KEYS_FILES = {
    "not-toml": ("[[keys]\nname = 'a'\n", "is not valid TOML"),
    "no-keys": ("", "keys: Field required"),
    "raw-key-as-digest": (f"[[keys]]\nname = 'a'\nsha256 = '{LAB_KEY}'\n", "keys[0].sha256: String should match pattern"),
    "unknown-field": (f"[[keys]]\nname = 'a'\nsha256 = '{hash_key(LAB_KEY)}'\nkey = 'x'\n", "keys[0].key: Extra inputs are not permitted"),
    "zero-quota": (f"[[keys]]\nname = 'a'\nsha256 = '{hash_key(LAB_KEY)}'\nrequests_per_minute = 0\n", "keys[0].requests_per_minute"),
    "reserved-name": (f"[[keys]]\nname = 'canary'\nsha256 = '{hash_key(LAB_KEY)}'\n", "keys[0].name 'canary' is reserved"),
    "duplicate-name": (
        f"[[keys]]\nname = 'a'\nsha256 = '{hash_key(LAB_KEY)}'\n[[keys]]\nname = 'a'\nsha256 = '{hash_key(OTHER_KEY)}'\n",
        "keys[1].name 'a' is used by an earlier key",
    ),
    "duplicate-digest": (
        f"[[keys]]\nname = 'a'\nsha256 = '{hash_key(LAB_KEY)}'\n[[keys]]\nname = 'b'\nsha256 = '{hash_key(LAB_KEY)}'\n",
        "keys[1] ('b') has the same sha256 as key 'a'",
    ),
}


@pytest.mark.parametrize("text, message", INVALID_KEYS_FILES.values(), ids=INVALID_KEYS_FILES.keys())
def test_invalid_keys_file_is_config_error(tmp_path, text, message):
    path = tmp_path / "keys.toml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        KeyStore.load(path)

    assert message in raised.value.message
    assert str(path) in raised.value.message
    assert LAB_KEY not in raised.value.message


def test_missing_keys_file_stops_serve_gateway(tmp_path, caplog):
    missing = tmp_path / "absent.toml"

    status = main(["serve-gateway", "--keys-file", str(missing), "--cache-dir", str(tmp_path / "cache")])

    assert status == 2
    assert f"keys file {missing} (UNITE_GATEWAY_KEYS_FILE) not found" in caplog.text
    assert not (tmp_path / "cache").exists()


DOCS_ROUTES = ("/docs", "/redoc", "/openapi.json")


def test_api_docs_need_key(tmp_path, keys_file):
    with gateway(tmp_path / "cache", teacher=_SmallTeacher(), keys_file=keys_file) as http:
        without_key = {path: http.get(path) for path in DOCS_ROUTES}
        with_key = {path: http.get(path, headers=_bearer(OTHER_KEY)) for path in DOCS_ROUTES}

    for path in DOCS_ROUTES:
        assert without_key[path].status_code == 401, path
        assert without_key[path].json()["error"]["code"] == "unauthorized"
        assert with_key[path].status_code == 200, path
    assert "/v1/embeddings" in with_key["/openapi.json"].json()["paths"]


def test_api_docs_off_or_open(tmp_path, keys_file):
    with gateway(tmp_path / "off", teacher=_SmallTeacher(), keys_file=keys_file, api_docs="off") as http:
        off = {path: http.get(path, headers=_bearer(OTHER_KEY)).status_code for path in DOCS_ROUTES}
    with gateway(tmp_path / "open", teacher=_SmallTeacher()) as http:
        no_keys_file = {path: http.get(path).status_code for path in DOCS_ROUTES}

    assert off == {path: 404 for path in DOCS_ROUTES}
    assert no_keys_file == {path: 200 for path in DOCS_ROUTES}


def test_non_ascii_key_matches_utf8_bytes(tmp_path):
    key = "sk-lab-é-5c2e"
    path = tmp_path / "keys.toml"
    _write_keys(path, [{"name": "lab-a", "sha256": hash_key(key)}])

    with gateway(tmp_path / "cache", teacher=_SmallTeacher(), keys_file=path) as http:
        as_utf8 = http.get("/v1/models", headers={"X-API-Key": key.encode("utf-8")})
        as_latin1 = http.get("/v1/models", headers={"X-API-Key": key.encode("latin-1")})

    assert as_utf8.status_code == 200, as_utf8.text
    assert as_latin1.status_code == 401, as_latin1.text


def test_access_log_drops_query_string(tmp_path, keys_file):
    fake = FakeTeacher(dim=4)
    with fake.serve():
        environment = {**remote_environment(fake), "UNITE_GATEWAY_KEYS_FILE": str(keys_file)}
        with gateway_process(tmp_path / "cache", tmp_path / "gateway.log", environment) as running:
            response = httpx.get(f"{running.url}/v1/models", params={"api_key": LAB_KEY}, headers=_bearer(LAB_KEY), timeout=30)
    log_text = running.log()

    assert response.status_code == 200, response.text
    assert '"GET /v1/models HTTP/1.1" 200' in log_text
    assert LAB_KEY not in log_text
