"""The remote teacher against a fake embeddings API on 127.0.0.1 that misbehaves on purpose.

Retry waits are kept to hundredths of a second through the configuration, and time-based checks compare
the fake's recorded arrival times against the configured limits, never against a speed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import socket
import threading
import time
from collections import defaultdict
from email.utils import formatdate

import numpy as np
import pytest
from fake_teacher import FakeTeacher, Fault, tile_digest
from PIL import Image

from shared.cache import EmbeddingCache
from shared.errors import ConfigError, TeacherError
from teacher_gateway.teachers.adapters import AdapterConfig, EmbeddingsAdapter, InvalidResponseError, JsonPath
from teacher_gateway.teachers.base import Teacher
from teacher_gateway.teachers.rate_limit import parse_retry_after
from teacher_gateway.teachers.remote import FAILURE_KINDS, PartialEmbeddingError, RemoteTeacher, build_remote_teacher
from teacher_gateway.teachers.remote_config import RemoteTeacherConfig

DIM = 16
KEY_VARIABLE = "UNITE_TEST_REMOTE_TEACHER_KEY"
API_KEY = "sk-test-6f1d2c9a8b7e4f30"
# Backoff of at most 0.05 s keeps the retry tests fast; no test depends on how long a backoff is.
FAST_RETRIES = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "max_attempts": 5}
# Slack for the time between a client's send and the fake's recorded arrival.
ARRIVAL_SLACK_S = 0.15

# A vendor whose shape differs from UNITE's in every configurable way: the fake's /vendor/predict route.
VENDOR_ADAPTER = {
    "input_field": "instances",
    "image_field": "image.b64",
    "model_field": None,
    "image_encoding": "jpeg",
    "jpeg_quality": 95,
    "data_url": True,
    "embeddings_path": "output.predictions[*].vector",
    "index_path": None,
    "model_path": "deployed_model",
}


def smooth_tiles(count: int, seed: int = 0) -> np.ndarray:
    """Return ``count`` distinct 224 px RGB tiles of 8 x 8 flat blocks, which JPEG keeps close to their means."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(30, 226, size=(count, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 28, axis=1), 28, axis=2)


@pytest.fixture
def fake():
    with FakeTeacher(dim=DIM).serve() as server:
        yield server
        server.wait_idle()


def remote(fake: FakeTeacher, **settings) -> RemoteTeacher:
    options = {"url": fake.url, "model": fake.model, "dim": fake.dim, "licence": "test licence", **FAST_RETRIES}
    options.update(settings)
    return RemoteTeacher(RemoteTeacherConfig(**options))


def embed_expecting_failure(teacher: RemoteTeacher, tiles: np.ndarray) -> PartialEmbeddingError:
    with pytest.raises(PartialEmbeddingError) as caught:
        teacher.embed(tiles)
    return caught.value


def calls_by_key(fake: FakeTeacher) -> dict[str, list]:
    grouped = defaultdict(list)
    for call in sorted(fake.calls, key=lambda call: call.started):
        grouped[call.idempotency_key].append(call)
    return grouped


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Return the largest number of (start, end) intervals that contain one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def most_in_any_window(times: list[float], weights: list[int], window_s: float) -> int:
    """Return the largest sum of ``weights`` whose ``times`` fall in one half-open window [t, t + window_s)."""
    order = sorted(range(len(times)), key=lambda index: times[index])
    peak = 0
    for position, first in enumerate(order):
        total = sum(weights[index] for index in order[position:] if times[index] < times[first] + window_s)
        peak = max(peak, total)
    return peak


# --- Responses, batching and concurrency ---------------------------------------------------------------


def test_embeddings_equal_fake_output(fake):
    tiles = smooth_tiles(5)

    with remote(fake) as teacher:
        embeddings = teacher.embed(tiles)

    assert embeddings.dtype == np.float32
    assert np.array_equal(embeddings, fake.expected(tiles))
    assert teacher.identity == f"remote:{fake.url}#{fake.model}"
    assert isinstance(teacher, Teacher)
    calls = fake.calls
    assert len(calls) == 1
    assert calls[0].batch_size == 5
    assert calls[0].headers["content-type"] == "application/json"
    assert calls[0].idempotency_key


def test_empty_input_sends_nothing(fake):
    with remote(fake) as teacher:
        embeddings = teacher.embed(np.zeros((0, 224, 224, 3), np.uint8))

    assert embeddings.shape == (0, DIM)
    assert fake.calls == []


def test_batches_split_to_max_batch_size():
    tiles = smooth_tiles(10)

    with FakeTeacher(dim=DIM, max_batch_size=3).serve() as fake, remote(fake, max_batch_size=3) as teacher:
        embeddings = teacher.embed(tiles)

    assert sorted(call.batch_size for call in fake.calls) == [1, 3, 3, 3]
    assert all(call.status == 200 for call in fake.calls)
    assert np.array_equal(embeddings, fake.expected(tiles))
    assert teacher.stats()["batches"] == 4


def test_concurrency_cap_held():
    tiles = smooth_tiles(9)

    with FakeTeacher(dim=DIM, latency_s=0.4).serve() as fake, remote(fake, max_batch_size=1, max_concurrency=3) as teacher:
        teacher.embed(tiles)

    calls = fake.calls
    assert len(calls) == 9
    assert fake.max_in_flight == 3
    assert max_overlap([(call.started, call.finished) for call in calls]) <= 3


# --- Rate limits -------------------------------------------------------------------------------------


def open_connections(teacher: RemoteTeacher, batches: int, window_s: float) -> None:
    """Send ``batches`` full batches at once, then wait until the rate window has forgotten them.

    The burst that follows reuses the open connections, so a slow TCP handshake on a loaded machine cannot
    delay some arrivals more than others.
    """
    teacher.embed(smooth_tiles(batches * teacher.max_batch_size, seed=99))
    time.sleep(window_s + 0.05)


def test_request_rate_held_over_burst_from_two_threads(fake):
    # 1200 requests per minute over windows of 0.5 s: at most 10 requests in any half second.
    teacher = remote(fake, max_batch_size=1, max_concurrency=8, requests_per_minute=1200, rate_window_s=0.5)
    tiles = smooth_tiles(30)
    errors: list[BaseException] = []

    def embed_half(part: np.ndarray) -> None:
        try:
            teacher.embed(part)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread's assert
            errors.append(error)

    with teacher:
        open_connections(teacher, batches=8, window_s=0.5)
        warm_up_calls = len(fake.calls)
        threads = [threading.Thread(target=embed_half, args=(part,)) for part in (tiles[:15], tiles[15:])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert errors == []
    starts = sorted(call.started for call in fake.calls[warm_up_calls:])
    assert len(starts) == 30
    assert most_in_any_window(starts, [1] * 30, 0.5 - ARRIVAL_SLACK_S) <= 10
    # The 21st request needs two windows to have passed since the first.
    assert starts[20] - starts[0] >= 1.0 - ARRIVAL_SLACK_S


def test_tile_rate_held_over_burst(fake):
    # 1440 tiles per minute over windows of 0.5 s: at most 12 tiles in any half second.
    tiles = smooth_tiles(40)

    with remote(fake, max_batch_size=4, max_concurrency=3, tiles_per_minute=1440, rate_window_s=0.5) as teacher:
        open_connections(teacher, batches=3, window_s=0.5)
        warm_up_calls = len(fake.calls)
        embeddings = teacher.embed(tiles)

    calls = fake.calls[warm_up_calls:]
    assert np.array_equal(embeddings, fake.expected(tiles))
    assert sum(call.batch_size for call in calls) == 40
    starts = [call.started for call in calls]
    assert most_in_any_window(starts, [call.batch_size for call in calls], 0.5 - ARRIVAL_SLACK_S) <= 12


# --- Retries, Retry-After and idempotency ------------------------------------------------------------


def test_server_error_burst_retried_to_success(fake):
    tiles = smooth_tiles(4)
    fake.script(Fault.error(503), Fault.error(500), Fault.error(502), Fault.error(504))

    with remote(fake, max_attempts=5) as teacher:
        embeddings = teacher.embed(tiles)

    assert np.array_equal(embeddings, fake.expected(tiles))
    assert [call.status for call in fake.calls] == [503, 500, 502, 504, 200]
    assert len({call.idempotency_key for call in fake.calls}) == 1
    assert all(fake.embed_counts[tile_digest(tile)] == 1 for tile in tiles)
    stats = teacher.stats()
    assert stats["retries"] == 4
    assert stats["failures"]["server_error"] == 4


def test_server_errors_exhaust_attempts(fake):
    tiles = smooth_tiles(3)
    fake.script(*[Fault.error(503, message="upstream overloaded")] * 3)

    with remote(fake, max_attempts=3) as teacher:
        error = embed_expecting_failure(teacher, tiles)

    assert isinstance(error, TeacherError)
    assert error.status_code == 502
    [failure] = error.failures
    assert failure.kind == "server_error"
    assert failure.status == 503
    assert failure.attempts == 3
    assert "HTTP 503: upstream overloaded" in error.message
    assert "max_attempts" in error.message
    assert not error.outcome.succeeded.any()
    assert np.isnan(error.outcome.embeddings).all()
    assert len(fake.calls) == 3
    assert len({call.idempotency_key for call in fake.calls}) == 1
    assert sum(fake.embed_counts.values()) == 0


def test_idempotency_key_reused_across_retries_distinct_between_batches(fake):
    fake.script(Fault.error(503), Fault.error(429, retry_after="0"), Fault.error(500))

    with remote(fake, max_batch_size=2, max_concurrency=3) as teacher:
        teacher.embed(smooth_tiles(6, seed=1))
        first_keys = {call.idempotency_key for call in fake.calls}
        teacher.embed(smooth_tiles(6, seed=2))

    grouped = calls_by_key(fake)
    assert len(first_keys) == 3
    assert len(grouped) == 6
    assert sum(len(calls) for calls in grouped.values()) == 9
    for calls in grouped.values():
        assert [call.status for call in calls][-1] == 200
        assert all(call.status != 200 for call in calls[:-1])
        assert len({call.batch_size for call in calls}) == 1


def test_retry_after_seconds_pauses_every_batch():
    tiles = smooth_tiles(6)

    with FakeTeacher(dim=DIM, latency_s=0.2).serve() as fake:
        fake.script(Fault.error(429, retry_after="1"))
        with remote(fake, max_batch_size=1, max_concurrency=2) as teacher:
            embeddings = teacher.embed(tiles)

    assert np.array_equal(embeddings, fake.expected(tiles))
    [limited] = [call for call in fake.calls if call.status == 429]
    retry = [call for call in calls_by_key(fake)[limited.idempotency_key] if call.status == 200]
    assert retry[0].started >= limited.finished + 1.0 - ARRIVAL_SLACK_S
    # Only the request already on its way in the other slot may arrive during the pause.
    during_pause = [call for call in fake.calls if limited.finished < call.started < limited.finished + 0.9]
    assert len(during_pause) <= 1


def test_retry_after_http_date_honoured(fake):
    retry_at = math.ceil(time.time()) + 1
    fake.script(Fault.error(503, retry_after=formatdate(retry_at, usegmt=True)))

    with remote(fake) as teacher:
        teacher.embed(smooth_tiles(1))

    first, second = sorted(fake.calls, key=lambda call: call.started)
    assert first.status == 503
    assert second.status == 200
    assert second.wall_started >= retry_at - 0.01


def test_retry_after_beyond_maximum_ends_batch(fake):
    fake.script(Fault.error(429, retry_after="3600"))

    with remote(fake, max_retry_after_s=5) as teacher:
        error = embed_expecting_failure(teacher, smooth_tiles(2))

    assert len(fake.calls) == 1
    assert error.failures[0].kind == "rate_limited"
    assert "retry after 3600 s" in error.message
    assert "max_retry_after_s = 5 s" in error.message


def test_read_timeout_retry_gets_stored_response(fake):
    tiles = smooth_tiles(3)
    fake.script(Fault.delay(1.0))

    with remote(fake, read_timeout_s=0.3) as teacher:
        embeddings = teacher.embed(tiles)
    fake.wait_idle()

    assert np.array_equal(embeddings, fake.expected(tiles))
    [calls] = calls_by_key(fake).values()
    assert [call.replayed for call in calls] == [False, True]
    assert all(fake.embed_counts[tile_digest(tile)] == 1 for tile in tiles)
    assert teacher.stats()["failures"]["timeout"] == 1


def test_connection_refused_fails_after_max_attempts():
    # A bound socket that never listens refuses connections, and nothing else can take its port meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1/embeddings"
        config = RemoteTeacherConfig(url=url, model="m", dim=DIM, licence="test", **{**FAST_RETRIES, "max_attempts": 3})
        with RemoteTeacher(config) as teacher:
            error = embed_expecting_failure(teacher, smooth_tiles(2))

    [failure] = error.failures
    assert failure.kind == "connection_error"
    assert failure.attempts == 3
    assert url in error.message
    stats = teacher.stats()
    assert stats["calls"] == 3
    assert stats["responses"] == 0


@pytest.mark.parametrize(
    ("fault", "kind", "explanation"),
    [
        (Fault.truncated(), "invalid_json", "not valid JSON"),
        (Fault.wrong_dim(), "wrong_dim", f"expected dim = {DIM}"),
        (Fault.nan(), "non_finite", "NaN or infinite"),
        (Fault.wrong_count(), "wrong_count", "expected one per tile"),
        (Fault.invalid_shape(), "invalid_shape", "has no field 'data'"),
        (Fault.other_model("fake-teacher-2"), "model_mismatch", "declares model 'fake-teacher-2'"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_response_rejected_without_retry(fake, fault, kind, explanation):
    fake.script(fault)

    with remote(fake) as teacher:
        error = embed_expecting_failure(teacher, smooth_tiles(3))

    assert len(fake.calls) == 1
    [failure] = error.failures
    assert failure.kind == kind
    assert explanation in error.message
    assert not error.outcome.succeeded.any()
    assert np.isnan(error.outcome.embeddings).all()
    assert teacher.stats()["failures"][kind] == 1


def test_non_retryable_status_fails_at_once():
    with FakeTeacher(dim=DIM, max_batch_size=2).serve() as fake, remote(fake, max_batch_size=4) as teacher:
        error = embed_expecting_failure(teacher, smooth_tiles(4))

    assert len(fake.calls) == 1
    assert error.failures[0].kind == "http_error"
    assert error.failures[0].status == 413
    assert "Lower max_batch_size (now 4)" in error.message


def test_mixed_faults_embed_once_or_fail(fake):
    tiles = smooth_tiles(16)
    fake.script(
        Fault.error(429, retry_after="0.05"),
        Fault.error(503),
        Fault.truncated(),
        Fault.delay(0.8),
        Fault.nan(),
        Fault.error(500),
        Fault.wrong_count(),
        Fault.error(502),
    )

    with remote(fake, max_batch_size=2, max_concurrency=4, read_timeout_s=0.3, max_attempts=10) as teacher:
        outcome = teacher.embed_partial(tiles)
    fake.wait_idle()

    # Each of the three bad responses ends a different batch, because a batch ends at its first bad response.
    assert len(outcome.failures) == 3
    assert {failure.kind for failure in outcome.failures} == {"invalid_json", "non_finite", "wrong_count"}
    failed = np.zeros(len(tiles), dtype=bool)
    for failure in outcome.failures:
        failed[failure.start : failure.stop] = True
    assert np.array_equal(outcome.succeeded, ~failed)
    assert np.array_equal(outcome.embeddings[outcome.succeeded], fake.expected(tiles[outcome.succeeded]))
    assert np.isnan(outcome.embeddings[failed]).all()
    for tile, succeeded in zip(tiles, outcome.succeeded):
        if succeeded:
            assert fake.embed_counts[tile_digest(tile)] == 1


def test_bad_response_never_cached_by_gateway(fake, tmp_path):
    from teacher_gateway.service import EmbeddingService, TileInput
    from teacher_gateway.usage import UsageLedger

    tiles = smooth_tiles(3)
    inputs = [TileInput(tile=tile) for tile in tiles]
    fake.script(Fault.nan())

    with remote(fake) as teacher, EmbeddingCache(tmp_path / "cache") as cache:
        service = EmbeddingService(teacher, cache, UsageLedger(tmp_path / "usage"))
        with pytest.raises(TeacherError):
            service.embed_tiles(inputs)
        cached_after_bad_response = cache.count(teacher.identity)
        embeddings, _ = service.embed_tiles(inputs)
        cached_after_good_response = cache.count(teacher.identity)

    assert cached_after_bad_response == 0
    assert cached_after_good_response == 3
    assert np.array_equal(embeddings, fake.expected(tiles))


# --- Secrets -----------------------------------------------------------------------------------------


def test_api_key_sent_but_never_logged_or_shown(monkeypatch, caplog):
    monkeypatch.setenv(KEY_VARIABLE, API_KEY)
    caplog.set_level(logging.DEBUG)

    with FakeTeacher(dim=DIM, api_key=API_KEY).serve() as fake:
        fake.script(Fault.error(503), Fault.error(400, message=f"rejected request made with key {API_KEY}"))
        with remote(fake, api_key_env=KEY_VARIABLE) as teacher:
            error = embed_expecting_failure(teacher, smooth_tiles(2))
            shown = [repr(teacher), repr(teacher.config), json.dumps(teacher.describe()), json.dumps(teacher.stats())]

    assert {call.headers["authorization"] for call in fake.calls} == {f"Bearer {API_KEY}"}
    assert "[redacted]" in error.message
    assert API_KEY not in error.message
    assert API_KEY not in repr(error.failures)
    assert API_KEY not in caplog.text
    assert "retrying" in caplog.text
    for text in shown:
        assert API_KEY not in text


def test_wrong_api_key_fails_at_once_naming_variable(monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, "sk-wrong")

    with FakeTeacher(dim=DIM, api_key=API_KEY).serve() as fake, remote(fake, api_key_env=KEY_VARIABLE) as teacher:
        error = embed_expecting_failure(teacher, smooth_tiles(1))

    assert len(fake.calls) == 1
    assert error.failures[0].status == 401
    assert KEY_VARIABLE in error.message


def test_missing_key_variable_is_config_error(fake, monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)

    with pytest.raises(ConfigError) as caught:
        remote(fake, api_key_env=KEY_VARIABLE)

    assert KEY_VARIABLE in caught.value.message
    assert "is not set or is empty" in caught.value.message


# --- Configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"url": "http://user:hunter2@127.0.0.1:9/v1/embeddings"}, "user name or password"),
        ({"url": "ftp://127.0.0.1/v1/embeddings"}, "not an absolute http:// or https:// URL"),
        ({"url": "http://127.0.0.1:9/v1/embeddings#v2"}, "contains '#'"),
        ({"url": "http://embeddings.example.org/v1", "api_key_env": KEY_VARIABLE}, "would travel unencrypted"),
        ({"tiles_per_minute": 60, "rate_window_s": 1}, "fewer than max_batch_size = 64"),
        ({"rate_window_s": 7}, "divides 60 s"),
        ({"backoff_base_s": 2, "backoff_cap_s": 1}, "backoff_cap_s (1 s) is smaller"),
        ({"auth_header": "X Api Key"}, "not a valid HTTP field name"),
        ({"adapter": {"embeddings_path": "data[x].embedding"}}, "invalid segment 'data[x]'"),
        ({"adapter": {"embeddings_path": "a[*].b[*]"}}, "at most one"),
        ({"adapter": {"extra_body": {"input": []}}}, "extra_body sets ['input']"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"retries": 3}, "retries"),
    ],
)
def test_invalid_settings_rejected(settings, expected):
    options = {"url": "http://127.0.0.1:9/v1/embeddings", "model": "m", "dim": DIM, "licence": "test", **settings}

    with pytest.raises(ConfigError) as caught:
        build_remote_teacher(**options)

    assert expected in caught.value.message
    assert "hunter2" not in caught.value.message


# --- Adapters ----------------------------------------------------------------------------------------


def test_vendor_shape_needs_only_configuration(fake):
    tiles = smooth_tiles(5)

    with remote(fake, url=fake.vendor_url, adapter=VENDOR_ADAPTER, max_batch_size=2) as teacher:
        embeddings = teacher.embed(tiles)

    assert {call.route for call in fake.calls} == {"/vendor/predict"}
    assert all(call.status == 200 for call in fake.calls)
    # JPEG is lossy, so the fake embedded slightly different pixels.
    assert np.allclose(embeddings, fake.expected(tiles), atol=0.02)


def test_protocol_adapter_orders_vectors_by_index():
    adapter = EmbeddingsAdapter()
    body = {"model": "m", "data": [{"index": 2, "embedding": [2.0]}, {"index": 0, "embedding": [0.0]}, {"index": 1, "embedding": [1.0]}]}

    decoded = adapter.decode_response(json.dumps(body).encode(), count=3, dim=1)

    assert decoded.embeddings.tolist() == [[0.0], [1.0], [2.0]]
    assert decoded.model == "m"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"data": [{"index": 0, "embedding": [0.0]}, {"index": 0, "embedding": [1.0]}]}, "invalid_shape"),
        ({"data": [{"index": 0, "embedding": [0.0]}, {"index": 1, "embedding": ["1.0"]}]}, "invalid_shape"),
        ({"data": [{"index": 0, "embedding": [None]}, {"index": 1, "embedding": [1.0]}]}, "invalid_shape"),
        ({"data": [{"index": 0, "embedding": [True]}, {"index": 1, "embedding": [False]}]}, "invalid_shape"),
        ({"data": [{"index": 0, "embedding": [[0.0]]}, {"index": 1, "embedding": [[1.0]]}]}, "invalid_shape"),
        ({"data": [{"index": 0, "embedding": [1e39]}, {"index": 1, "embedding": [1.0]}]}, "non_finite"),
        ({"data": {"index": 0, "embedding": [1.0]}}, "invalid_shape"),
        ({"model": 7, "data": [{"index": 0, "embedding": [0.0]}, {"index": 1, "embedding": [1.0]}]}, "invalid_shape"),
    ],
    ids=["duplicate-index", "string", "null", "boolean", "nested", "beyond-float32", "object-not-list", "model-not-string"],
)
def test_protocol_adapter_rejects_malformed_vectors(body, kind):
    with pytest.raises(InvalidResponseError) as caught:
        EmbeddingsAdapter().decode_response(json.dumps(body).encode(), count=2, dim=1)

    assert caught.value.kind == kind


def test_adapter_reads_bare_list_of_vectors():
    adapter = EmbeddingsAdapter(AdapterConfig(embeddings_path="result.embeddings", index_path=None, model_path=None))

    decoded = adapter.decode_response(b'{"result": {"embeddings": [[1, 2], [3, 4]]}}', count=2, dim=2)

    assert decoded.embeddings.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert decoded.model is None


def test_adapter_encodes_configured_request_shape():
    tiles = smooth_tiles(2)
    config = AdapterConfig(
        input_field="payload.images", image_field=None, model_field=None, data_url=True, extra_body={"encoding": "float"}
    )

    body = json.loads(EmbeddingsAdapter(config).encode_request(tiles, "m"))

    assert set(body) == {"payload", "encoding"}
    assert body["encoding"] == "float"
    images = body["payload"]["images"]
    assert all(image.startswith("data:image/png;base64,") for image in images)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[1].split(",", 1)[1]))))
    assert np.array_equal(decoded, tiles[1])


def test_adapter_names_missing_field():
    adapter = EmbeddingsAdapter(AdapterConfig(embeddings_path="output.predictions[*].vector", index_path=None))

    with pytest.raises(InvalidResponseError) as caught:
        adapter.decode_response(b'{"output": {"predictions": [{"vec": [1.0]}]}}', count=1, dim=1)

    assert "'output.predictions[0]' has no field 'vector'" in caught.value.message
    assert "['vec']" in caught.value.message


@pytest.mark.parametrize("text", ["", "a..b", "a[x]", "a.[0]", "a[*"])
def test_json_path_rejects_invalid_syntax(text):
    with pytest.raises(ValueError):
        JsonPath.parse(text)


# --- Retry-After parsing, stats and lifecycle ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0.5 ", 0.5),
        ("-1", None),
        ("soon", None),
        (None, None),
        ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0),
        ("Thu, 01 Jan 2026 00:00:00 GMT", 0.0),
        ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0),
    ],
)
def test_retry_after_parsed(header, seconds):
    new_year_2026 = 1_767_225_600.0

    assert parse_retry_after(header, now=new_year_2026) == seconds


def test_stats_equal_fake_record(fake):
    fake.script(Fault.error(503), Fault.error(429, retry_after="0"), Fault.nan())

    with remote(fake, max_batch_size=3, max_concurrency=2) as teacher:
        outcome = teacher.embed_partial(smooth_tiles(9))
    stats = teacher.stats()

    calls = fake.calls
    # Three batches, two of them retried once; the response with NaN is not retried.
    assert stats["calls"] == len(calls) == 5
    assert stats["responses"] == len(calls)
    assert stats["tiles_sent"] == sum(call.batch_size for call in calls)
    assert stats["retries"] == sum(1 for call in calls if call.status != 200)
    assert stats["tiles_embedded"] == int(outcome.succeeded.sum()) == 6
    assert stats["failed_batches"] == 1
    assert stats["failed_tiles"] == 3
    assert set(stats["failures"]) == set(FAILURE_KINDS)
    assert sum(stats["failures"].values()) == 3


def test_embed_after_close_raises(fake):
    teacher = remote(fake)
    teacher.close()
    teacher.close()

    with pytest.raises(TeacherError) as caught:
        teacher.embed(smooth_tiles(1))

    assert "is closed" in caught.value.message
    assert fake.calls == []


def test_close_during_embed_cancels_it():
    with FakeTeacher(dim=DIM, latency_s=2.0).serve() as fake:
        teacher = remote(fake)
        errors: list[BaseException] = []

        def embed() -> None:
            try:
                teacher.embed(smooth_tiles(2))
            except TeacherError as error:
                errors.append(error)

        thread = threading.Thread(target=embed)
        thread.start()
        while not fake.max_in_flight:
            time.sleep(0.01)
        teacher.close()
        thread.join()
        fake.wait_idle()

    [error] = errors
    assert "was closed while embedding 2 tiles" in error.message
