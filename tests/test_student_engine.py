"""The student server's batching engine over real HTTP: gathering, splitting, waiting and the full queue.

Each test starts a uvicorn server on 127.0.0.1 with a tiny exported student and sends real PNG tiles.
Batches are checked through the ``unite_student_batch_size`` histogram of ``GET /metrics``, never
through timing, except that a lone request must not wait for a batch that never fills.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from servers import run_app
from student_helpers import direct_embeddings, lung_tiles, post_embeddings, response_embeddings, save_tiny_student, scrape

from student_server.app import create_app
from student_server.settings import StudentSettings

# bfloat16 autocast: a tile's embedding moves by about 1e-3 with the batch it is computed in.
ATOL = 0.05


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("engine") / "student", seed=1)


@pytest.fixture(scope="module")
def tiles(shared_data):
    return lung_tiles(shared_data, 20)


@pytest.fixture(scope="module")
def expected(checkpoint, tiles):
    return direct_embeddings(checkpoint, tiles)


def serve(checkpoint, tmp_path, **overrides):
    settings = StudentSettings(checkpoint_dir=checkpoint, jobs_dir=tmp_path / "jobs", upload_dir=tmp_path / "uploads", **overrides)
    return create_app(settings)


def batch_histogram(client: httpx.Client) -> tuple[float, float]:
    samples = scrape(client)
    return samples["unite_student_batch_size_count"], samples["unite_student_batch_size_sum"]


def test_concurrent_requests_form_one_batch(checkpoint, tiles, expected, tmp_path):
    # The wait is far longer than the test: only a full batch lets the requests finish early.
    app = serve(checkpoint, tmp_path, batch_size=8, max_batch_wait_ms=60_000)
    sha256, direct = expected
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(lambda index: post_embeddings(client, tiles[index : index + 1]), range(8)))

        for index, response in enumerate(responses):
            assert response.status_code == 200, response.text
            assert response.json()["checkpoint_sha256"] == sha256
            np.testing.assert_allclose(response_embeddings(response)[0], direct[index], atol=ATOL)
        assert batch_histogram(client) == (1, 8)
        assert app.state.engine.batches_run == 1


def test_lone_request_runs_as_batch_of_one(checkpoint, tiles, expected, tmp_path):
    wait_ms = 300
    app = serve(checkpoint, tmp_path, batch_size=8, max_batch_wait_ms=wait_ms)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        started = time.monotonic()
        response = post_embeddings(client, tiles[:1])
        elapsed = time.monotonic() - started

        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response_embeddings(response), expected[1][:1], atol=ATOL)
        assert batch_histogram(client) == (1, 1)
        # Generous for a loaded 2-core machine; a batcher that waited for a full batch would never respond.
        assert elapsed < wait_ms / 1000 + 10


def test_large_request_split_in_order(checkpoint, tiles, expected, tmp_path):
    app = serve(checkpoint, tmp_path, batch_size=8, max_batch_wait_ms=1)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        response = post_embeddings(client, tiles)

        assert response.status_code == 200, response.text
        embeddings = response_embeddings(response)
        assert embeddings.shape == (20, 384)
        np.testing.assert_allclose(embeddings, expected[1], atol=ATOL)
        # 8 + 8 + 4 tiles.
        assert batch_histogram(client) == (3, 20)


def test_full_queue_returns_503_with_retry_after(checkpoint, tiles, tmp_path):
    # The first request waits for a batch of 64 that never fills, so its 4 tiles stay queued.
    app = serve(checkpoint, tmp_path, batch_size=64, max_batch_wait_ms=5_000, max_queued_tiles=6, retry_after_s=3)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        first: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: first.update(response=post_embeddings(client, tiles[:4])))
        thread.start()
        deadline = time.monotonic() + 30
        while app.state.engine.queued_tiles < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.engine.queued_tiles == 4

        rejected = post_embeddings(client, tiles[4:8])
        thread.join(timeout=60)

    assert rejected.status_code == 503, rejected.text
    assert rejected.headers["retry-after"] == "3"
    error = rejected.json()["error"]
    assert error["code"] == "queue_full"
    assert (error["limit"], error["value"]) == (6, 8)
    assert "UNITE_STUDENT_MAX_QUEUED_TILES" in error["message"]
    assert first["response"].status_code == 200, first["response"].text
