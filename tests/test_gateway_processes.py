"""Two gateway processes on one cache folder: both fill it at once, and they share one budget.

Each gateway runs as ``unite serve-gateway`` in its own subprocess, with the remote teacher calling the
fake paid API on 127.0.0.1.
"""

from __future__ import annotations

import sqlite3
import threading

import httpx
import numpy as np
from fake_teacher import FakeTeacher, fake_embedding, tile_digest
from gateway_helpers import block_tiles, gateway_process, remote_environment

from shared.cache import DATABASE_NAME, EmbeddingCache
from shared.imaging import decode_image, encode_base64_png
from teacher_gateway.usage import UsageLedger

DIM = 16


def _send_all(url: str, tiles: list[np.ndarray], batch: int, results: dict[str, list], statuses: list[int]) -> None:
    """POST ``tiles`` in batches to the gateway at ``url``, keeping each returned embedding by tile digest."""
    with httpx.Client(base_url=url, timeout=60) as http:
        for start in range(0, len(tiles), batch):
            part = tiles[start : start + batch]
            response = http.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(tile)} for tile in part]})
            statuses.append(response.status_code)
            if response.status_code != 200:
                continue
            for tile, item in zip(part, response.json()["data"]):
                results.setdefault(tile_digest(tile), []).append(np.array(item["embedding"], dtype=np.float32))


def _run_side_by_side(jobs) -> None:
    threads = [threading.Thread(target=_send_all, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_two_processes_fill_one_cache(tmp_path):
    fake = FakeTeacher(dim=DIM, latency_s=0.02)
    tiles = block_tiles(40, seed=51)
    cache_dir = tmp_path / "cache"
    results: dict[str, list] = {}
    statuses: list[int] = []
    with fake.serve():
        identity = f"remote:{fake.url}#{fake.model}"
        environment = remote_environment(fake)
        with gateway_process(cache_dir, tmp_path / "a.log", environment) as first, gateway_process(cache_dir, tmp_path / "b.log", environment) as second:
            # Tiles 10 to 29 go to both gateways, in opposite orders, so both processes race to store them.
            _run_side_by_side([(first.url, tiles[:30], 3, results, statuses), (second.url, tiles[10:][::-1], 3, results, statuses)])

    assert set(statuses) == {200}
    with sqlite3.connect(cache_dir / DATABASE_NAME) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with EmbeddingCache(cache_dir) as cache:
        entries = list(cache.iter_entries(identity))
    assert len(entries) == 40
    stored = {}
    for entry in entries:
        tile = decode_image(entry.tile_png)
        np.testing.assert_array_equal(entry.embedding, fake_embedding(tile[None], DIM)[0])
        stored[tile_digest(tile)] = entry.embedding
    for digest, returned in results.items():
        for embedding in returned:
            np.testing.assert_array_equal(embedding, stored[digest])
    for tile in tiles[:10] + tiles[30:]:
        assert fake.embed_counts[tile_digest(tile)] == 1


def test_two_processes_share_one_budget(tmp_path):
    fake = FakeTeacher(dim=DIM, latency_s=0.02)
    tiles = block_tiles(40, seed=61)
    cache_dir = tmp_path / "cache"
    statuses: list[int] = []
    with fake.serve():
        identity = f"remote:{fake.url}#{fake.model}"
        environment = remote_environment(fake, budget_tiles="9")
        with gateway_process(cache_dir, tmp_path / "a.log", environment) as first, gateway_process(cache_dir, tmp_path / "b.log", environment) as second:
            _run_side_by_side([(first.url, tiles[:20], 2, {}, statuses), (second.url, tiles[20:], 2, {}, statuses)])

    assert sum(fake.embed_counts.values()) == 9
    assert set(statuses) == {200, 402}
    with EmbeddingCache(cache_dir) as cache:
        assert cache.count(identity) == 9
    with UsageLedger(cache_dir) as ledger:
        assert ledger.spent(identity).tiles == 9
