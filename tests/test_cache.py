"""The embedding cache: keys over pixels, bit-exact round trips, first embedding wins, and concurrent writers."""

from __future__ import annotations

import io
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.cache import CacheEntry, EmbeddingCache
from shared.errors import CacheError
from shared.imaging import decode_image, encode_png, prepare_tile

TEACHER = "test-teacher/1"


def _tile(seed: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _entry(seed: int, *, teacher: str = TEACHER, dim: int = 16, embedding: np.ndarray | None = None, **provenance) -> CacheEntry:
    tile = _tile(seed, size=8)
    if embedding is None:
        embedding = np.random.default_rng(seed + 10_000).standard_normal(dim).astype(np.float32)
    return CacheEntry(
        key=EmbeddingCache.tile_key(tile, teacher),
        teacher=teacher,
        embedding=embedding,
        tile_png=encode_png(tile),
        **provenance,
    )


@pytest.fixture
def cache(tmp_path):
    with EmbeddingCache(tmp_path / "cache") as opened:
        yield opened


@pytest.fixture
def lung_tile(shared_data) -> np.ndarray:
    path = sorted((shared_data / "tiles" / "lc25000_lung_dedup").glob("lung_aca/*.jpeg"))[0]
    return decode_image(path.read_bytes())


def test_round_trip_is_bit_exact(cache):
    extremes = np.array([0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38, 1 / 3, np.pi, -1e-38], dtype=np.float32)
    entries = [_entry(seed) for seed in range(5)] + [_entry(99, embedding=np.resize(extremes, 16).astype(np.float32))]

    cache.put_many(entries)
    found = cache.get_many([entry.key for entry in entries])

    assert set(found) == {entry.key for entry in entries}
    for entry in entries:
        assert found[entry.key].dtype == np.float32
        assert found[entry.key].tobytes() == entry.embedding.tobytes()


def test_get_many_leaves_out_missing_keys(cache):
    stored = _entry(1)
    cache.put_many([stored])

    found = cache.get_many([stored.key, "0" * 64, stored.key])

    assert list(found) == [stored.key]


def test_insert_or_ignore_keeps_first(cache):
    first = _entry(1)
    second = CacheEntry(key=first.key, teacher=TEACHER, embedding=first.embedding + 1.0, tile_png=first.tile_png, slide_id="later")

    cache.put_many([first])
    cache.put_many([second])

    assert cache.count() == 1
    assert np.array_equal(cache.get_many([first.key])[first.key], first.embedding)
    assert next(cache.iter_entries(TEACHER)).slide_id is None


def test_reopen_after_close_keeps_rows(tmp_path):
    entries = [_entry(seed, slide_id=f"slide-{seed}", coords=(seed, 2 * seed), mpp=0.5) for seed in range(3)]
    with EmbeddingCache(tmp_path) as cache:
        cache.put_many(entries)

    with EmbeddingCache(tmp_path) as reopened:
        assert reopened.count(TEACHER) == 3
        read = list(reopened.iter_entries(TEACHER))

    assert [entry.key for entry in read] == [entry.key for entry in entries]
    assert read[2].slide_id == "slide-2"
    assert read[2].coords == (2, 4)
    assert read[2].mpp == 0.5
    assert read[2].tile_png == entries[2].tile_png


def test_closed_cache_raises(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.close()

    with pytest.raises(CacheError, match="closed"):
        cache.count()


def test_database_uses_wal(cache):
    cache.put_many([_entry(1)])

    with sqlite3.connect(cache.path) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        columns = [row[1] for row in connection.execute("PRAGMA table_info(embeddings)")]

    assert mode == "wal"
    assert columns == ["key", "teacher", "embedding", "dim", "tile_png", "slide_id", "x", "y", "mpp", "created_at"]


def test_iter_entries_in_insertion_order(cache):
    entries = [_entry(seed) for seed in (7, 3, 9, 1, 5, 2, 8)]
    other_teacher = _entry(4, teacher="other-teacher/1")
    cache.put_many(entries[:4] + [other_teacher])
    cache.put_many(entries[4:])

    read = list(cache.iter_entries(TEACHER, batch=3))

    assert [entry.key for entry in read] == [entry.key for entry in entries]
    assert [entry.key for entry in cache.iter_entries("other-teacher/1")] == [other_teacher.key]


def test_count_per_teacher(cache):
    cache.put_many([_entry(seed) for seed in range(3)] + [_entry(seed, teacher="other-teacher/1") for seed in range(2)])

    assert cache.count() == 5
    assert cache.count(TEACHER) == 3
    assert cache.count("missing-teacher") == 0
    assert cache.count_by_teacher() == {"other-teacher/1": 2, TEACHER: 3}


def test_dimension_mismatch_raises(cache):
    cache.put_many([_entry(1, dim=16)])

    with pytest.raises(CacheError, match="16-d embeddings stored, got 8-d") as error:
        cache.put_many([_entry(2, dim=8)])

    assert error.value.limit == 16
    assert error.value.value == 8
    assert cache.count() == 1


def test_mixed_dimensions_in_batch_raise(cache):
    with pytest.raises(CacheError, match="earlier entries in the batch have 16"):
        cache.put_many([_entry(1, dim=16), _entry(2, dim=8)])

    assert cache.count() == 0


def test_non_finite_embedding_raises(cache):
    embedding = np.ones(16, dtype=np.float32)
    embedding[3] = np.nan

    with pytest.raises(CacheError, match="finite 1-D vector"):
        cache.put_many([_entry(1), _entry(2, embedding=embedding)])

    assert cache.count() == 0


def test_damaged_file_raises_with_path(tmp_path):
    (tmp_path / "embeddings.sqlite3").write_bytes(b"this is not an SQLite database" * 100)

    with pytest.raises(CacheError) as error:
        EmbeddingCache(tmp_path)

    assert str(tmp_path / "embeddings.sqlite3") in error.value.message
    assert "move it away" in error.value.message


def test_key_depends_on_teacher_and_pixels():
    tile = _tile(1)
    changed = tile.copy()
    changed[100, 57, 1] ^= 1

    key = EmbeddingCache.tile_key(tile, TEACHER)

    assert key == EmbeddingCache.tile_key(tile.copy(), TEACHER)
    assert len(key) == 64
    assert key != EmbeddingCache.tile_key(tile, "other-teacher/1")
    assert key != EmbeddingCache.tile_key(changed, TEACHER)


def test_key_depends_on_shape():
    pixels = _tile(1, size=8)

    assert EmbeddingCache.tile_key(pixels, TEACHER) != EmbeddingCache.tile_key(pixels.reshape(4, 16, 3), TEACHER)


def test_key_over_pixels_not_file_bytes(lung_tile):
    tile = prepare_tile(lung_tile)
    key = EmbeddingCache.tile_key(tile, TEACHER)

    png_fast = encode_png(tile)
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG", compress_level=9)
    png_small = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=95)
    jpeg_decoded = decode_image(buffer.getvalue())

    assert png_fast != png_small
    assert EmbeddingCache.tile_key(decode_image(png_fast), TEACHER) == key
    assert EmbeddingCache.tile_key(decode_image(png_small), TEACHER) == key
    assert not np.array_equal(jpeg_decoded, tile)
    assert EmbeddingCache.tile_key(jpeg_decoded, TEACHER) != key


def test_threads_share_one_cache(cache):
    def write(worker: int) -> None:
        for start in range(0, 40, 10):
            cache.put_many([_entry(worker * 1000 + seed) for seed in range(start, start + 10)])
            cache.count()

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert cache.count(TEACHER) == 160


def _write_from_process(root: str, worker: int, start_event, batches: int, batch_size: int) -> None:
    """Write ``batches`` transactions of entries; seeds overlap between workers on purpose."""
    start_event.wait(timeout=30)
    with EmbeddingCache(Path(root)) as cache:
        for batch in range(batches):
            first = worker * 100_000 + batch * batch_size
            seeds = range(first, first + batch_size)
            shared_seed = 1_000_000 + batch
            cache.put_many([_entry(seed) for seed in seeds] + [_entry(shared_seed)])


def test_two_processes_lose_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    start_event = context.Event()
    batches, batch_size = 100, 8
    workers = [
        context.Process(target=_write_from_process, args=(str(tmp_path), worker, start_event, batches, batch_size))
        for worker in range(2)
    ]
    for worker in workers:
        worker.start()
    start_event.set()
    for worker in workers:
        worker.join(timeout=60)

    assert [worker.exitcode for worker in workers] == [0, 0]
    with EmbeddingCache(tmp_path) as cache:
        assert cache.count(TEACHER) == 2 * batches * batch_size + batches
        expected_keys = [_entry(seed).key for seed in range(batch_size)] + [_entry(100_000 + batches * batch_size - 1).key, _entry(1_000_000).key]
        assert set(cache.get_many(expected_keys)) == set(expected_keys)


def _open_and_count(root: str, start_event, results) -> None:
    start_event.wait(timeout=30)
    try:
        with EmbeddingCache(Path(root)) as cache:
            cache.count()
        results.put("ok")
    except CacheError as error:
        results.put(str(error))


def test_processes_open_new_cache_together(tmp_path):
    # Without the lock around the first steps, about two rounds in five failed here with "database is
    # locked", because SQLite returns at once instead of waiting while a new database turns to WAL.
    context = multiprocessing.get_context("spawn")
    for round_index in range(5):
        root = tmp_path / f"round-{round_index}"
        start_event, results = context.Event(), context.Queue()
        workers = [context.Process(target=_open_and_count, args=(str(root), start_event, results)) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        start_event.set()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)

        assert outcomes == ["ok"] * 4, outcomes


def test_quarantine_moves_entries_since_time(cache):
    before = _entry(1)
    other_teacher = _entry(2, teacher="other-teacher/1")
    cache.put_many([before, other_teacher])
    since = time.time()
    # created_at comes from time.time(), so entries stored after this wait have created_at > since.
    while time.time() <= since:
        time.sleep(0.001)
    after = [_entry(3), _entry(4)]
    cache.put_many(after + [_entry(5, teacher="other-teacher/1")])

    moved = cache.quarantine(TEACHER, since)

    assert moved == 2
    found = cache.get_many([before.key] + [entry.key for entry in after])
    assert list(found) == [before.key]
    assert cache.count(TEACHER) == 1
    assert cache.count("other-teacher/1") == 2
    assert cache.count_quarantined(TEACHER) == 2
    assert cache.count_quarantined("other-teacher/1") == 0
    assert [entry.key for entry in cache.iter_entries(TEACHER)] == [before.key]


def test_quarantine_of_nothing_returns_zero(cache):
    cache.put_many([_entry(1)])

    assert cache.quarantine(TEACHER, time.time() + 3600) == 0
    assert cache.count(TEACHER) == 1
