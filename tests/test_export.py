"""Training shards exported from a filled cache: read back bit-exact, replaced safely, leftovers ignored."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from shared.cache import CacheEntry, EmbeddingCache
from shared.errors import CacheError
from shared.imaging import decode_image, encode_png, prepare_tile
from shared.shards import list_shards, read_metadata
from teacher_gateway.export import export_shards

TEACHER = "export-test-teacher/1"
LICENCE = "CC-BY-NC-ND-4.0"
DIM = 12


@pytest.fixture(scope="module")
def lung_tiles(shared_data) -> list[np.ndarray]:
    paths = sorted((shared_data / "tiles" / "lc25000_lung_dedup").glob("*/*.jpeg"))[::20][:12]
    assert len(paths) == 12
    return [prepare_tile(decode_image(path.read_bytes())) for path in paths]


def _entries(tiles: list[np.ndarray], *, first_index: int = 0) -> list[CacheEntry]:
    entries = []
    for offset, tile in enumerate(tiles):
        index = first_index + offset
        provenance = {"slide_id": f"slide-{index % 3}", "coords": (224 * index, 448), "mpp": 0.5} if index % 2 == 0 else {}
        entries.append(
            CacheEntry(
                key=EmbeddingCache.tile_key(tile, TEACHER),
                teacher=TEACHER,
                embedding=np.random.default_rng(index).standard_normal(DIM).astype(np.float32),
                tile_png=encode_png(tile),
                **provenance,
            )
        )
    return entries


@pytest.fixture
def cache(tmp_path):
    with EmbeddingCache(tmp_path / "cache") as opened:
        yield opened


def _read_shards(paths: list[Path]) -> dict[str, np.ndarray]:
    columns: dict[str, list] = {"tiles": [], "embeddings": [], "keys": [], "slide_ids": [], "coords": [], "mpp": []}
    for path in paths:
        with h5py.File(path, "r") as file:
            for name in ("tiles", "embeddings", "coords", "mpp"):
                columns[name].append(file[name][:])
            for name in ("keys", "slide_ids"):
                columns[name].append(file[name].asstr()[:])
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def test_shards_read_back_exact(cache, tmp_path, lung_tiles):
    entries = _entries(lung_tiles[:10])
    cache.put_many(entries)

    paths = export_shards(cache, TEACHER, LICENCE, tmp_path / "shards", shard_size=4)

    assert [path.name for path in paths] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert [info.length for info in list_shards(tmp_path / "shards")] == [4, 4, 2]
    read = _read_shards(paths)
    assert np.array_equal(read["tiles"], np.stack(lung_tiles[:10]))
    assert np.array_equal(read["embeddings"], np.stack([entry.embedding for entry in entries]))
    assert list(read["keys"]) == [entry.key for entry in entries]
    assert list(read["slide_ids"][:3]) == ["slide-0", "", "slide-2"]
    assert read["coords"][:2].tolist() == [[0, 448], [-1, -1]]
    assert read["mpp"][0] == np.float32(0.5)
    assert np.isnan(read["mpp"][1])


def test_shard_attributes(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:3]))

    export_shards(cache, TEACHER, LICENCE, tmp_path / "shards")

    info = list_shards(tmp_path / "shards")[0]
    assert (info.teacher, info.teacher_licence, info.embedding_dim, info.tile_size, info.length) == (TEACHER, LICENCE, DIM, 224, 3)
    slide_ids, coords = read_metadata(info)
    assert slide_ids == ["slide-0", "", "slide-2"]
    assert coords.dtype == np.int64


def test_export_only_the_named_teacher(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:3]))
    other = CacheEntry(
        key=EmbeddingCache.tile_key(lung_tiles[5], "other-teacher/1"),
        teacher="other-teacher/1",
        embedding=np.ones(4, dtype=np.float32),
        tile_png=encode_png(lung_tiles[5]),
    )
    cache.put_many([other])

    paths = export_shards(cache, TEACHER, LICENCE, tmp_path / "shards")

    assert len(_read_shards(paths)["keys"]) == 3


def test_unknown_teacher_lists_present(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:2]))

    with pytest.raises(CacheError, match="no embeddings of teacher 'missing/1'") as error:
        export_shards(cache, "missing/1", LICENCE, tmp_path / "shards")

    assert TEACHER in error.value.message
    assert not list((tmp_path / "shards").glob("shard-*.h5"))


def test_export_is_deterministic(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:6]))

    first = _read_shards(export_shards(cache, TEACHER, LICENCE, tmp_path / "first", shard_size=4))
    second = _read_shards(export_shards(cache, TEACHER, LICENCE, tmp_path / "second", shard_size=4))

    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_reexport_removes_stale_shards(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:10]))
    export_shards(cache, TEACHER, LICENCE, tmp_path / "shards", shard_size=4)
    cache.put_many(_entries(lung_tiles[10:12], first_index=10))

    paths = export_shards(cache, TEACHER, LICENCE, tmp_path / "shards", shard_size=8)

    assert sorted(path.name for path in (tmp_path / "shards").glob("shard-*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    assert [info.length for info in list_shards(tmp_path / "shards")] == [8, 4]
    assert np.array_equal(_read_shards(paths)["tiles"], np.stack(lung_tiles[:12]))


def test_partial_leftover_is_not_a_shard(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:5]))
    out_dir = tmp_path / "shards"
    export_shards(cache, TEACHER, LICENCE, out_dir, shard_size=4)
    (out_dir / "shard-00002.h5.partial").write_bytes(b"half-written HDF5 from a killed writer")
    (out_dir / ".export-123-abcd").mkdir()
    (out_dir / ".export-123-abcd" / "shard-00000.h5").write_bytes(b"staged shard of a killed export")

    assert [info.path.name for info in list_shards(out_dir)] == ["shard-00000.h5", "shard-00001.h5"]

    export_shards(cache, TEACHER, LICENCE, out_dir, shard_size=4)

    assert not (out_dir / "shard-00002.h5.partial").exists()
    assert not (out_dir / ".export-123-abcd").exists()


def test_failed_export_keeps_previous_shards(cache, tmp_path, lung_tiles):
    cache.put_many(_entries(lung_tiles[:6]))
    out_dir = tmp_path / "shards"
    export_shards(cache, TEACHER, LICENCE, out_dir, shard_size=4)
    before = {path.name: path.read_bytes() for path in out_dir.glob("shard-*.h5")}
    damaged = CacheEntry(
        key="f" * 64, teacher=TEACHER, embedding=np.zeros(DIM, dtype=np.float32), tile_png=b"\x89PNG damaged"
    )
    cache.put_many(_entries(lung_tiles[6:9], first_index=6) + [damaged])

    with pytest.raises(CacheError, match="cache row is damaged"):
        export_shards(cache, TEACHER, LICENCE, out_dir, shard_size=4)

    after = {path.name: path.read_bytes() for path in out_dir.glob("shard-*.h5")}
    assert after == before
    assert [path.name for path in out_dir.iterdir() if path.name.startswith(".export-")] == []


def test_nul_slide_id_row_names_key(cache, tmp_path, lung_tiles):
    # A gateway that validates slide_id rejects NUL, but a cache filled by an earlier one can contain it.
    entries = _entries(lung_tiles[:3])
    entries[1].slide_id = "a\x00b"
    cache.put_many(entries)
    out_dir = tmp_path / "shards"

    with pytest.raises(CacheError) as error:
        export_shards(cache, TEACHER, LICENCE, out_dir)

    assert f"cache row {entries[1].key} has slide_id 'a\\x00b'" in error.value.message
    assert "NUL character" in error.value.message
    assert f"DELETE FROM embeddings WHERE key = '{entries[1].key}'" in error.value.message
    assert error.value.value == entries[1].key
    assert list(out_dir.iterdir()) == [out_dir / ".export.lock"]


def test_unstorable_teacher_name_names_rows(tmp_path, lung_tiles):
    teacher = "nul\x00teacher/1"
    entries = [
        CacheEntry(key=EmbeddingCache.tile_key(tile, teacher), teacher=teacher, embedding=np.ones(DIM, dtype=np.float32), tile_png=encode_png(tile))
        for tile in lung_tiles[:2]
    ]
    with EmbeddingCache(tmp_path / "cache") as cache:
        cache.put_many(entries)

        with pytest.raises(CacheError) as error:
            export_shards(cache, teacher, LICENCE, tmp_path / "shards")

    assert f"keys {entries[0].key} to {entries[1].key}" in error.value.message
    assert "ValueError" in error.value.message
    assert "shard-00000.h5" in error.value.message
    assert not list((tmp_path / "shards").glob("shard-*.h5"))
