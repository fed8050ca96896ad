"""A gateway killed with SIGKILL while it fills the cache loses no acknowledged embedding and pays nothing twice.

The gateway runs as ``unite serve-gateway`` in a subprocess, with the remote teacher calling the fake paid
API on 127.0.0.1, which counts how often it embedded each tile.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter

import httpx
import numpy as np
from fake_teacher import FakeTeacher, fake_embedding, tile_digest
from gateway_helpers import block_tiles, gateway_process, remote_environment, wait_for

from shared.cache import DATABASE_NAME, EmbeddingCache
from shared.imaging import decode_image, encode_base64_png
from teacher_gateway.client import GatewayClient

DIM = 16
BATCH = 4


def _check_cache(cache_dir, identity: str) -> dict[str, np.ndarray]:
    """Assert that the cache is intact and each entry is the fake's embedding of its tile; return tile digest -> embedding."""
    with sqlite3.connect(cache_dir / DATABASE_NAME) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {}
    with EmbeddingCache(cache_dir) as cache:
        for entry in cache.iter_entries(identity):
            tile = decode_image(entry.tile_png)
            np.testing.assert_array_equal(entry.embedding, fake_embedding(tile[None], DIM)[0])
            stored[tile_digest(tile)] = entry.embedding
    return stored


def test_sigkill_mid_fill_then_restart(tmp_path):
    fake = FakeTeacher(dim=DIM, latency_s=0.15)
    tiles = block_tiles(48, seed=41)
    digests = [tile_digest(tile) for tile in tiles]
    cache_dir = tmp_path / "cache"
    acknowledged: dict[str, np.ndarray] = {}
    lock = threading.Lock()

    with fake.serve():
        identity = f"remote:{fake.url}#{fake.model}"
        environment = remote_environment(fake, remote__max_batch_size=str(BATCH))

        with gateway_process(cache_dir, tmp_path / "gateway-1.log", environment) as first:

            def fill(indices: list[int]) -> None:
                with httpx.Client(base_url=first.url, timeout=30) as http:
                    for start in range(0, len(indices), BATCH):
                        batch = indices[start : start + BATCH]
                        payload = {"input": [{"image": encode_base64_png(tiles[index])} for index in batch]}
                        try:
                            response = http.post("/v1/embeddings", json=payload)
                        except httpx.TransportError:
                            return
                        assert response.status_code == 200, response.text
                        with lock:
                            for index, item in zip(batch, response.json()["data"]):
                                acknowledged[digests[index]] = np.array(item["embedding"], dtype=np.float32)

            threads = [threading.Thread(target=fill, args=(list(range(offset, 48, 3)),)) for offset in range(3)]
            for thread in threads:
                thread.start()
            wait_for(lambda: len(acknowledged) >= 12, what="12 acknowledged embeddings")
            first.kill()
            for thread in threads:
                thread.join()

        assert 12 <= len(acknowledged) < 48, "the kill must come in the middle of the fill"
        stored = _check_cache(cache_dir, identity)
        for digest, embedding in acknowledged.items():
            np.testing.assert_array_equal(stored[digest], embedding)
        counts_before = Counter(fake.embed_counts)

        with gateway_process(cache_dir, tmp_path / "gateway-2.log", environment) as second:
            with GatewayClient(second.url, batch_size=BATCH) as client:
                embeddings = client.embed(tiles)

    np.testing.assert_array_equal(embeddings, fake_embedding(np.stack(tiles), DIM))
    asked_again = Counter(fake.embed_counts)
    asked_again.subtract(counts_before)
    assert all(asked_again[digest] == 0 for digest in stored), "a tile cached before the restart was sent again"
    assert sum(asked_again.values()) == 48 - len(stored)
    assert len(_check_cache(cache_dir, identity)) == 48
