"""Hot reload of the student server: a newly published checkpoint replaces the served one without a restart.

The server points at a publish root (``shared.publish``). Requests keep arriving from several threads
while a second student is published, and every response must come from exactly the checkpoint it names.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from servers import run_app
from student_helpers import direct_embeddings, lung_tiles, post_embeddings, response_embeddings, save_tiny_student, scrape

from shared.checkpoint import CHECKPOINT_WEIGHTS
from shared.publish import publish_student
from student_server.app import create_app
from student_server.settings import StudentSettings

ATOL = 0.05
CLIENT_THREADS = 4


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    return save_tiny_student(folder / "first", seed=1), save_tiny_student(folder / "second", seed=2)


@pytest.fixture(scope="module")
def tiles(shared_data):
    return lung_tiles(shared_data, 3)


def serve(root, tmp_path, **overrides):
    settings = StudentSettings(
        checkpoint_dir=root,
        jobs_dir=tmp_path / "jobs",
        upload_dir=tmp_path / "uploads",
        reload_interval_s=0.2,
        batch_size=4,
        max_batch_wait_ms=2,
        **overrides,
    )
    return create_app(settings)


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_publish_under_load_serves_consistent_answers(exports, tiles, tmp_path):
    first, second = exports
    expected = dict([direct_embeddings(first, tiles), direct_embeddings(second, tiles)])
    old_sha, new_sha = (direct_embeddings(path, tiles[:1])[0] for path in exports)
    # The two students must differ far beyond the tolerance, or a mixed response could pass.
    assert np.abs(expected[old_sha] - expected[new_sha]).max() > 10 * ATOL

    root = tmp_path / "published"
    publish_student(first, root)
    app = serve(root, tmp_path)
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def send_until_stopped(client: httpx.Client) -> None:
        while not stop.is_set():
            answers.append(post_embeddings(client, tiles))

    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        threads = [threading.Thread(target=send_until_stopped, args=(client,)) for _ in range(CLIENT_THREADS)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(answers) >= 8)
        publish_student(second, root)
        wait_for(lambda: sum(answer.json().get("checkpoint_sha256") == new_sha for answer in list(answers)) >= 8)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        later = post_embeddings(client, tiles)
        samples = scrape(client)

    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers if answer.status_code != 200][:1]
    hashes = [answer.json()["checkpoint_sha256"] for answer in answers]
    assert set(hashes) == {old_sha, new_sha}
    for answer, sha256 in zip(answers, hashes):
        np.testing.assert_allclose(response_embeddings(answer), expected[sha256], atol=ATOL, err_msg=f"answer of checkpoint {sha256}")
    # Once the new student responded, no request sent later is computed by the old one.
    assert later.json()["checkpoint_sha256"] == new_sha
    np.testing.assert_allclose(response_embeddings(later), expected[new_sha], atol=ATOL)
    assert samples['unite_student_reloads_total{outcome="success"}'] == 2
    assert samples[f'unite_student_checkpoint_info{{model="{app.state.student.loaded.name}",sha256="{new_sha}"}}'] == 1


def test_damaged_export_keeps_old_student(exports, tiles, tmp_path):
    first, second = exports
    old_sha, old_embeddings = direct_embeddings(first, tiles)
    # A plain export folder, as `unite distill` writes it, rather than a publish root.
    served = tmp_path / "served"
    shutil.copytree(first, served)

    app = serve(served, tmp_path)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        # Weights that match no config.json record, as a copy interrupted halfway leaves them.
        damaged = bytearray((second / CHECKPOINT_WEIGHTS).read_bytes())
        damaged[-16:] = b"\x00" * 16
        (served / CHECKPOINT_WEIGHTS).write_bytes(bytes(damaged))
        wait_for(lambda: scrape(client)['unite_student_reloads_total{outcome="failed"}'] >= 1)
        response = post_embeddings(client, tiles)
        ready = client.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json()["checkpoint_sha256"] == old_sha
    np.testing.assert_allclose(response_embeddings(response), old_embeddings, atol=ATOL)
    assert ready.status_code == 200
    assert ready.json()["checkpoint_sha256"] == old_sha


def test_server_becomes_ready_when_first_student_published(exports, tiles, tmp_path):
    root = tmp_path / "published"
    root.mkdir()
    app = serve(root, tmp_path)
    with run_app(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        before = client.get("/readyz")
        refused = post_embeddings(client, tiles)
        publish_student(exports[0], root)
        wait_for(lambda: client.get("/readyz").status_code == 200)
        after = post_embeddings(client, tiles)

    assert before.status_code == 503
    assert before.json()["error"]["code"] == "not_ready"
    assert "UNITE_STUDENT_CHECKPOINT_DIR" in before.json()["error"]["message"]
    assert str(root) not in before.text
    assert refused.status_code == 503
    assert after.status_code == 200, after.text


def test_version_without_weights_keeps_student(exports, tiles, tmp_path, caplog):
    first, second = exports
    old_sha, old_embeddings = direct_embeddings(first, tiles)
    new_sha, _ = direct_embeddings(second, tiles[:1])
    root = tmp_path / "published"
    publish_student(first, root)
    # `unite publish add` rejects such a version, but a copy by hand into versions/ can still leave one.
    version = root / "versions" / "20261205T010203123456Z-no-weights"
    shutil.copytree(second, version)
    (version / CHECKPOINT_WEIGHTS).unlink()
    app = serve(root, tmp_path)

    with caplog.at_level(logging.WARNING, logger="student_server.model"), run_app(app) as base_url:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200)
            point_current(root, version)
            wait_for(lambda: scrape(client)['unite_student_reloads_total{outcome="failed"}'] >= 1)
            # More checks of the same folder neither log nor count the missing file again.
            app.state.student.check_for_update()
            app.state.student.check_for_update()
            response = post_embeddings(client, tiles)
            ready = client.get("/readyz").json()
            samples = scrape(client)
            warnings = [record.getMessage() for record in caplog.records if record.name == "student_server.model" and record.levelno >= logging.WARNING]

            # Once the weights arrive, the next check serves them.
            shutil.copy(second / CHECKPOINT_WEIGHTS, version / CHECKPOINT_WEIGHTS)
            wait_for(lambda: client.get("/readyz").json().get("checkpoint_sha256") == new_sha)

    assert response.status_code == 200, response.text
    assert response.json()["checkpoint_sha256"] == old_sha
    np.testing.assert_allclose(response_embeddings(response), old_embeddings, atol=ATOL)
    assert ready["checkpoint_sha256"] == old_sha
    assert samples['unite_student_reloads_total{outcome="failed"}'] == 1
    assert samples['unite_student_reloads_total{outcome="success"}'] == 1
    assert len(warnings) == 1, warnings
    assert str(version.resolve()) in warnings[0]
    assert f"has no {CHECKPOINT_WEIGHTS}" in warnings[0]
    assert f"unite publish rollback {root}" in warnings[0]
    assert f"Still serving {ready['model']} (sha256 {old_sha})" in warnings[0]


def point_current(root, version) -> None:
    """Switch ``root/current`` to ``version`` with one rename of a new link, as a publish does."""
    link = root / "current.next"
    link.symlink_to(version.relative_to(root), target_is_directory=True)
    os.replace(link, root / "current")
