"""The canary drift check: a teacher that changed behind the same identity is stopped before it mixes the cache."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from gateway_helpers import block_tiles, gateway, metric, wait_for

from shared.errors import TeacherError
from shared.imaging import encode_base64_png
from teacher_gateway.usage import CanaryCheck, UsageLedger

IDENTITY = "grid-test-teacher/1"


class GridTeacher:
    """A real, cheap teacher: the mean colour of each cell of a 4 x 4 grid, centred on 0 (48 values).

    With ``drifted`` set it returns the same values rotated by one place, as a changed model behind an
    unchanged name would return other vectors. It records every batch of tiles it is given.
    """

    identity = IDENTITY
    name = "grid"
    dim = 48
    licence = "CC0-1.0"

    def __init__(self, *, drifted: bool = False, failing: bool = False, crashing: bool = False) -> None:
        self.drifted = drifted
        self.failing = failing
        self.crashing = crashing
        self.batches: list[np.ndarray] = []
        self._lock = threading.Lock()

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(tiles.copy())
        if self.failing:
            raise TeacherError("grid teacher is down (test fault)")
        if self.crashing:
            raise RuntimeError("weights missing at /secret/path/grid.safetensors")
        count = len(tiles)
        cells = tiles.reshape(count, 4, 56, 4, 56, 3).astype(np.float64).mean(axis=(2, 4)) / 255.0 - 0.5
        embeddings = cells.reshape(count, 48).astype(np.float32)
        return np.roll(embeddings, 1, axis=1) if self.drifted else embeddings


def _payload(tiles) -> dict:
    return {"input": [{"image": encode_base64_png(tile)} for tile in tiles]}


@pytest.fixture
def filled_cache(tmp_path):
    """A cache folder with the embeddings of 5 tiles by the unchanged teacher, stored in two requests."""
    tiles = block_tiles(5, seed=21)
    with gateway(tmp_path / "cache", teacher=GridTeacher()) as http:
        assert http.post("/v1/embeddings", json=_payload(tiles[:2])).status_code == 200
        assert http.post("/v1/embeddings", json=_payload(tiles[2:])).status_code == 200
    return tmp_path / "cache", tiles


def test_unchanged_teacher_passes_canary(filled_cache):
    cache_dir, tiles = filled_cache
    teacher = GridTeacher()
    with gateway(cache_dir, teacher=teacher, canary_tiles=3) as http:
        ready = http.get("/readyz")
        usage = http.get("/v1/usage").json()
        page = http.get("/metrics").text

    assert ready.status_code == 200
    assert len(teacher.batches) == 1
    np.testing.assert_array_equal(teacher.batches[0], np.stack(tiles[:3]))
    assert usage["canary"]["status"] == "ok"
    assert usage["canary"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert usage["teachers"][IDENTITY]["keys"]["canary"]["teacher_tiles"] == 3
    assert usage["budget"]["tiles"]["spent"] == 5 + 3
    assert metric(page, "unite_gateway_teacher_drift", teacher=IDENTITY) == 0
    assert metric(page, "unite_gateway_canary_min_cosine", teacher=IDENTITY) == pytest.approx(1.0, abs=1e-6)


def test_drift_at_start_blocks_teacher(filled_cache):
    cache_dir, tiles = filled_cache
    teacher = GridTeacher(drifted=True)
    new_tile = block_tiles(1, seed=99)
    with gateway(cache_dir, teacher=teacher, canary_tiles=3) as http:
        ready = http.get("/readyz")
        refused = http.post("/v1/embeddings", json=_payload(new_tile))
        served = http.post("/v1/embeddings", json=_payload(tiles))
        served_canary = http.post("/v1/embeddings", json=_payload(tiles[:3]))
        plan = http.post("/v1/embeddings/dry-run", json=_payload(new_tile)).json()
        page = http.get("/metrics").text

    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "teacher_drift"
    # /readyz needs no key, so it gives no details; a request that needs the teacher gets them.
    error = refused.json()["error"]
    assert f"teacher {IDENTITY} drifted" in error["message"]
    assert "below the threshold 0.98 (UNITE_GATEWAY_CANARY_MIN_COSINE)" in error["message"]
    assert "new identity" in error["message"]
    assert error["limit"] == 0.98
    assert error["value"] < 0.98
    assert refused.status_code == 503
    assert error["code"] == "teacher_drift"
    assert len(teacher.batches) == 1, "only the canary batch may reach a drifted teacher"
    # No canary check had passed before, so every cached entry but the canary tiles (the reference the drift
    # was measured against) is quarantined: the canary tiles are still served, the others need the blocked teacher.
    assert served.status_code == 503
    assert served.json()["error"]["code"] == "teacher_drift"
    assert served_canary.status_code == 200
    expected = GridTeacher().embed(np.stack(tiles[:3]))
    served_embeddings = np.array([item["embedding"] for item in served_canary.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(served_embeddings, expected)
    assert plan["teacher_blocked"] is True
    assert metric(page, "unite_gateway_teacher_drift", teacher=IDENTITY) == 1


def test_scheduled_check_catches_drift(tmp_path):
    teacher = GridTeacher()
    tiles = block_tiles(4, seed=31)
    with gateway(tmp_path / "cache", teacher=teacher, canary_tiles=2, canary_interval_minutes=0.01) as http:
        assert http.post("/v1/embeddings", json=_payload(tiles[:3])).status_code == 200
        wait_for(lambda: http.get("/v1/usage").json()["canary"]["status"] == "ok", what="a scheduled check that passes")
        teacher.drifted = True
        wait_for(lambda: http.get("/readyz").status_code == 503, what="the scheduled check to find the drift")
        refused = http.post("/v1/embeddings", json=_payload(tiles[3:]))

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "teacher_drift"


def test_canary_without_budget_is_skipped(filled_cache):
    cache_dir, _tiles = filled_cache
    teacher = GridTeacher(drifted=True)
    with gateway(cache_dir, teacher=teacher, canary_tiles=3, budget_tiles=7) as http:
        ready = http.get("/readyz")
        usage = http.get("/v1/usage").json()

    assert ready.status_code == 200
    assert teacher.batches == []
    assert usage["canary"]["status"] == "skipped"
    assert "budget does not cover 3 canary tiles" in usage["canary"]["detail"]
    assert "canary" not in usage["teachers"][IDENTITY]["keys"]


@pytest.mark.parametrize(
    "fault, detail",
    [("failing", "teacher_error: grid teacher is down"), ("crashing", "unexpected RuntimeError; the gateway log has the cause")],
    ids=["teacher-error", "unexpected-error"],
)
def test_failed_canary_call_does_not_block(filled_cache, fault, detail):
    cache_dir, _tiles = filled_cache
    with gateway(cache_dir, teacher=GridTeacher(**{fault: True}), canary_tiles=3) as http:
        ready = http.get("/readyz")
        usage = http.get("/v1/usage")

    assert ready.status_code == 200
    canary = usage.json()["canary"]
    assert canary["status"] == "failed"
    assert detail in canary["detail"]
    assert usage.json()["teacher_blocked"] is False
    assert "/secret/path" not in usage.text


def test_restart_within_interval_skips_canary(filled_cache):
    cache_dir, _tiles = filled_cache
    first, second = GridTeacher(), GridTeacher()
    with gateway(cache_dir, teacher=first, canary_tiles=3, canary_interval_minutes=60) as http:
        assert http.get("/v1/usage").json()["canary"]["status"] == "ok"
    with gateway(cache_dir, teacher=second, canary_tiles=3, canary_interval_minutes=60) as http:
        usage = http.get("/v1/usage").json()
        page = http.get("/metrics").text

    assert len(first.batches) == 1
    assert second.batches == [], "a restart within the canary interval re-embedded the canary tiles"
    assert usage["canary"]["status"] == "ok"
    assert "not repeated at start, because the last check passed" in usage["canary"]["detail"]
    assert usage["canary"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert usage["budget"]["tiles"]["spent"] == 5 + 3
    assert usage["teachers"][IDENTITY]["keys"]["canary"]["teacher_calls"] == 1
    assert metric(page, "unite_gateway_canary_checked_timestamp_seconds", teacher=IDENTITY) == usage["canary"]["checked_at"]


@pytest.mark.parametrize(
    "first_teacher, second_settings",
    [
        (GridTeacher(), {"canary_interval_minutes": 0}),
        (GridTeacher(), {"canary_interval_minutes": 60, "canary_tiles": 4}),
        (GridTeacher(), {"canary_interval_minutes": 60, "canary_min_cosine": 1.0}),
        (GridTeacher(drifted=True), {"canary_interval_minutes": 60}),
    ],
    ids=["interval-0", "more-tiles", "higher-threshold", "after-drift"],
)
def test_restart_checks_again(filled_cache, first_teacher, second_settings):
    cache_dir, _tiles = filled_cache
    second = GridTeacher()
    settings = {"canary_tiles": 3, **second_settings}
    with gateway(cache_dir, teacher=first_teacher, canary_tiles=3, canary_interval_minutes=60):
        pass
    with gateway(cache_dir, teacher=second, **settings) as http:
        usage = http.get("/v1/usage").json()

    assert len(second.batches) == 1
    assert len(second.batches[0]) == settings["canary_tiles"]
    assert "not repeated" not in usage["canary"]["detail"]


def test_stored_check_older_than_interval(filled_cache):
    cache_dir, _tiles = filled_cache
    with UsageLedger(cache_dir) as ledger:
        ledger.record_canary_check(IDENTITY, CanaryCheck(checked_at=time.time() - 61 * 60, tiles=3, min_cosine=1.0))
        assert ledger.last_canary_check(IDENTITY).tiles == 3
    teacher = GridTeacher()
    with gateway(cache_dir, teacher=teacher, canary_tiles=3, canary_interval_minutes=60) as http:
        usage = http.get("/v1/usage").json()
    with UsageLedger(cache_dir) as ledger:
        stored = ledger.last_canary_check(IDENTITY)

    assert len(teacher.batches) == 1
    assert usage["canary"]["status"] == "ok"
    assert stored.checked_at == pytest.approx(usage["canary"]["checked_at"])
    assert stored.checked_at > time.time() - 60
