"""Tests of ``unite cache backup``: online backups under concurrent writers, restoring into a gateway, and rejected outputs.

Gateways run on 127.0.0.1 with the remote teacher calling the fake paid API (tests/fake_teacher.py), whose
call log shows which tiles the teacher embedded and which came from the cache.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fake_teacher import FakeTeacher, tile_digest
from gateway_helpers import REPO, block_tiles, gateway, wait_for

from shared.cache import DATABASE_NAME, CacheEntry, EmbeddingCache
from shared.cache_backup import backup_cache, copy_database
from shared.errors import CacheError
from shared.imaging import encode_base64_png
from teacher_gateway.usage import BACKUP_KIND, UsageLedger
from unite_cli.main import main

DIM = 16

# Inserts batches of rows with keys key-00000000, key-00000001, ... until it is killed, each batch in one transaction.
WRITER_SCRIPT = """
import sys
import numpy as np
from pathlib import Path
from shared.cache import CacheEntry, EmbeddingCache

cache = EmbeddingCache(Path(sys.argv[1]))
rng = np.random.default_rng(0)
index = 0
while True:
    batch = []
    for _ in range(20):
        batch.append(CacheEntry(key=f"key-{index:08d}", teacher="writer/v1", embedding=rng.standard_normal(DIM).astype(np.float32),
                                tile_png=rng.bytes(2048)))
        index += 1
    cache.put_many(batch)
""".replace("DIM", str(DIM))


def write_rows(cache_dir: Path, stop: threading.Event) -> None:
    """Insert rows as WRITER_SCRIPT does, from a thread of this process, until ``stop`` is set."""
    rng = np.random.default_rng(0)
    index = 0
    with EmbeddingCache(cache_dir) as cache:
        while not stop.is_set():
            batch = []
            for _ in range(20):
                embedding = rng.standard_normal(DIM).astype(np.float32)
                batch.append(CacheEntry(key=f"key-{index:08d}", teacher="writer/v1", embedding=embedding, tile_png=rng.bytes(2048)))
                index += 1
            cache.put_many(batch)


def backup_keys(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return [row[0] for row in connection.execute("SELECT key FROM embeddings ORDER BY key")]


def integrity(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return [row[0] for row in connection.execute("PRAGMA integrity_check")]


def committed_rows(cache_dir: Path) -> int:
    with EmbeddingCache(cache_dir) as cache:
        return cache.count()


def post_tiles(http, tiles: list[np.ndarray]) -> dict:
    response = http.post("/v1/embeddings", json={"input": [{"image": encode_base64_png(tile)} for tile in tiles]})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("writer_kind", ["thread", "process"])
def test_backup_during_inserts_is_consistent(writer_kind, tmp_path):
    cache_dir = tmp_path / "cache"
    committed_rows(cache_dir)  # creates the database before the writer starts
    stop = threading.Event()
    if writer_kind == "thread":
        writer = threading.Thread(target=write_rows, args=(cache_dir, stop))
        writer.start()
        running = writer.is_alive
    else:
        process = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(cache_dir)], cwd=REPO)
        running = lambda: process.poll() is None  # noqa: E731
    try:
        wait_for(lambda: committed_rows(cache_dir) >= 2000, timeout_s=120, what="2000 rows written")
        before = committed_rows(cache_dir)
        backup = backup_cache(cache_dir, tmp_path / "backup.sqlite3")
        writer_was_running = running()
        after = committed_rows(cache_dir)
    finally:
        stop.set()
        if writer_kind == "thread":
            writer.join(timeout=60)
        else:
            process.kill()
            process.wait(timeout=30)

    assert writer_was_running, "the writer stopped before the backup ended, so the test did not back up a cache being written"
    assert integrity(backup.out) == ["ok"]
    keys = backup_keys(backup.out)
    assert before <= len(keys) <= after
    # A snapshot: the first len(keys) keys the writer inserted, with no gap.
    assert keys == [f"key-{index:08d}" for index in range(len(keys))]
    assert backup.rows_by_teacher == {"writer/v1": len(keys)}
    assert backup.bytes == backup.out.stat().st_size
    assert not (tmp_path / "backup.sqlite3-wal").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_restored_backup_serves_cache_hits(tmp_path, capsys):
    fake = FakeTeacher(dim=DIM)
    backed_up = block_tiles(6, seed=3)
    later = block_tiles(4, seed=4)
    cache_dir = tmp_path / "cache"
    out = tmp_path / "backups" / "embeddings-backup.sqlite3"

    with fake.serve():
        identity = f"remote:{fake.url}#{fake.model}"
        with gateway(cache_dir, fake=fake) as http:
            first = post_tiles(http, backed_up)
            # The gateway keeps its connections open, as in production.
            status = main(["cache", "backup", str(cache_dir), "--out", str(out)])
            printed = capsys.readouterr().out
            post_tiles(http, later)

        # Restore as docs/operations.md describes: gateway stopped, WAL side files removed, file copied back.
        for suffix in ("-wal", "-shm"):
            (cache_dir / (DATABASE_NAME + suffix)).unlink(missing_ok=True)
        shutil.copyfile(out, cache_dir / DATABASE_NAME)

        with gateway(cache_dir, fake=fake) as http:
            restored = post_tiles(http, backed_up)
            lost = post_tiles(http, later)

    assert status == 0
    assert f"{identity}  {len(backed_up)}" in printed
    assert "integrity_check  ok" in printed
    assert f"bytes            {out.stat().st_size}" in printed
    assert first["usage"]["tiles_sent_to_teacher"] == len(backed_up)
    assert restored["usage"] == {"tiles": 6, "cache_hits": 6, "coalesced": 0, "model_calls": 0, "tiles_sent_to_teacher": 0}
    np.testing.assert_array_equal(
        np.array([item["embedding"] for item in restored["data"]], dtype=np.float32), fake.expected(np.stack(backed_up))
    )
    # Tiles stored after the backup are not in it, so the teacher embeds them again.
    assert lost["usage"]["cache_hits"] == 0
    assert all(fake.embed_counts[tile_digest(tile)] == 1 for tile in backed_up)
    assert all(fake.embed_counts[tile_digest(tile)] == 2 for tile in later)


@pytest.fixture
def small_cache(tmp_path) -> Path:
    cache_dir = tmp_path / "cache"
    with EmbeddingCache(cache_dir) as cache:
        cache.put_many([CacheEntry(key=f"key-{index}", teacher="teacher/v1", embedding=np.ones(DIM, np.float32), tile_png=b"png") for index in range(10)])
    return cache_dir


def test_backup_of_database_file(small_cache, tmp_path):
    backup = backup_cache(small_cache / DATABASE_NAME, tmp_path / "copy.sqlite3")

    assert backup.rows == 10
    assert backup_keys(backup.out) == sorted(f"key-{index}" for index in range(10))


def test_existing_out_needs_force(small_cache, tmp_path, caplog):
    out = tmp_path / "backup.sqlite3"
    out.write_bytes(b"an older backup")

    refused = main(["cache", "backup", str(small_cache), "--out", str(out)])
    kept = out.read_bytes()
    forced = main(["cache", "backup", str(small_cache), "--out", str(out), "--force"])

    assert refused == 2
    assert f"backup output {out} already exists" in caplog.text
    assert "--force" in caplog.text
    assert kept == b"an older backup"
    assert forced == 0
    assert len(backup_keys(out)) == 10


def test_out_in_cache_folder_rejected(small_cache):
    database = small_cache / DATABASE_NAME
    before = database.read_bytes()
    files = sorted(path.name for path in small_cache.iterdir())

    for name in (DATABASE_NAME, DATABASE_NAME + "-wal", "usage.sqlite3", "usage.sqlite3-journal", "backup.sqlite3"):
        with pytest.raises(CacheError, match=f"backup output {small_cache / name} is in the cache folder .* Pass an --out in another folder"):
            backup_cache(small_cache, small_cache / name, force=True)

    assert database.read_bytes() == before
    assert sorted(path.name for path in small_cache.iterdir()) == files


def test_out_over_live_usage_ledger_rejected(tmp_path, caplog):
    fake = FakeTeacher(dim=DIM)
    cache_dir = tmp_path / "cache"
    ledger = cache_dir / "usage.sqlite3"
    inside = cache_dir / "backups" / "embeddings-backup.sqlite3"

    with fake.serve(), gateway(cache_dir, fake=fake) as http:
        post_tiles(http, block_tiles(3, seed=5))
        assert ledger.is_file()
        status = main(["cache", "backup", str(cache_dir), "--out", str(ledger), "--force"])
        # The gateway still reads and charges its ledger, so a request after the rejected backup succeeds.
        after = post_tiles(http, block_tiles(2, seed=6))
        usage = http.get("/v1/usage")
        subfolder_status = main(["cache", "backup", str(cache_dir), "--out", str(inside)])

    assert status == 2
    assert f"backup output {ledger} is in the cache folder" in caplog.text
    assert after["usage"]["tiles_sent_to_teacher"] == 2
    assert usage.status_code == 200, usage.text
    assert integrity(ledger) == ["ok"]
    assert subfolder_status == 0
    assert len(backup_keys(inside)) == 5


def test_missing_source_names_path(tmp_path, caplog):
    missing = tmp_path / "no-cache"

    status = main(["cache", "backup", str(missing), "--out", str(tmp_path / "backup.sqlite3")])

    assert status == 2
    assert f"embedding cache {missing} not found" in caplog.text
    assert not missing.exists()


def test_folder_without_database_rejected(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(CacheError, match=f"contains no {DATABASE_NAME}"):
        backup_cache(tmp_path / "empty", tmp_path / "backup.sqlite3")


def test_other_sqlite_file_rejected(tmp_path):
    other = tmp_path / "usage.sqlite3"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE spending (teacher TEXT)")

    out = tmp_path / "backups" / "backup.sqlite3"

    with pytest.raises(CacheError, match=r"has no embeddings table \(tables: \['spending'\]\)"):
        backup_cache(other, out)

    assert not out.exists()


def test_damaged_cache_leaves_no_output(small_cache, tmp_path):
    database = small_cache / DATABASE_NAME
    with sqlite3.connect(database) as connection:
        root_page = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'embeddings_teacher'").fetchone()[0]
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    # Overwrite the cell content of the teacher index's root page, which the copy keeps byte for byte.
    data = bytearray(database.read_bytes())
    end = root_page * page_size
    data[end - 300 : end] = b"\x07" * 300
    database.write_bytes(bytes(data))
    out = tmp_path / "backups" / "backup.sqlite3"

    with pytest.raises(CacheError, match=r"failed PRAGMA integrity_check: .*expected \['ok'\]. Nothing was written to --out"):
        backup_cache(small_cache, out)

    assert list(out.parent.iterdir()) == []


def test_usage_ledger_backup_restores_spending(tmp_path, capsys):
    fake = FakeTeacher(dim=DIM)
    cache_dir = tmp_path / "cache"
    out = tmp_path / "backups" / "embeddings-backup.sqlite3"
    usage_out = tmp_path / "backups" / "usage-backup.sqlite3"

    with fake.serve():
        with gateway(cache_dir, fake=fake, budget_tiles=20) as http:
            post_tiles(http, block_tiles(6, seed=7))
            # Both copies are taken while the gateway keeps its ledger open and charges it.
            status = main(["cache", "backup", str(cache_dir), "--out", str(out), "--usage-out", str(usage_out)])
            printed = capsys.readouterr().out
            post_tiles(http, block_tiles(4, seed=8))
            spent_before_restore = http.get("/v1/usage").json()["budget"]["tiles"]["spent"]

        # Restore both files as docs/operations.md describes: gateway stopped, WAL side files removed.
        for name, backup in ((DATABASE_NAME, out), ("usage.sqlite3", usage_out)):
            for suffix in ("-wal", "-shm"):
                (cache_dir / (name + suffix)).unlink(missing_ok=True)
            shutil.copyfile(backup, cache_dir / name)

        with gateway(cache_dir, fake=fake, budget_tiles=20) as http:
            restored = http.get("/v1/usage").json()["budget"]["tiles"]

    assert status == 0
    assert f"backed up usage ledger {cache_dir / 'usage.sqlite3'}" in printed
    assert f"bytes            {usage_out.stat().st_size}" in printed
    assert integrity(usage_out) == ["ok"]
    assert spent_before_restore == 10
    # The ledger as it was at the backup: the 6 tiles charged before it, not the 4 after.
    assert restored == {"limit": 20, "spent": 6, "left": 14}


def test_usage_out_checked_before_copying(small_cache, tmp_path, caplog):
    out = tmp_path / "backups" / "embeddings-backup.sqlite3"
    usage_out = tmp_path / "backups" / "usage-backup.sqlite3"

    missing_ledger = main(["cache", "backup", str(small_cache), "--out", str(out), "--usage-out", str(usage_out)])
    missing_message = caplog.text
    caplog.clear()
    (small_cache / "usage.sqlite3").write_bytes(b"")
    same_file = main(["cache", "backup", str(small_cache), "--out", str(out), "--usage-out", str(out)])
    same_message = caplog.text
    caplog.clear()
    usage_out.parent.mkdir()
    usage_out.write_bytes(b"an older ledger backup")
    existing = main(["cache", "backup", str(small_cache), "--out", str(out), "--usage-out", str(usage_out)])

    assert missing_ledger == 2
    assert f"usage ledger {small_cache / 'usage.sqlite3'} not found" in missing_message
    assert same_file == 2
    assert "is the same file as --out" in same_message
    assert existing == 2
    assert f"backup output {usage_out} already exists" in caplog.text
    # Each rejection came before the embedding cache was copied.
    assert not out.exists()
    assert usage_out.read_bytes() == b"an older ledger backup"


def test_usage_out_rejects_other_database(small_cache, tmp_path):
    with sqlite3.connect(small_cache / "usage.sqlite3") as connection:
        connection.execute("CREATE TABLE spending (teacher TEXT)")
    out = tmp_path / "backups" / "embeddings-backup.sqlite3"
    usage_out = tmp_path / "backups" / "usage-backup.sqlite3"

    status = main(["cache", "backup", str(small_cache), "--out", str(out), "--usage-out", str(usage_out)])

    assert status == 2
    # The ledger is checked before the cache is copied.
    assert not out.exists()
    assert not usage_out.exists()
    with pytest.raises(CacheError, match=r"usage ledger .* has no usage table \(tables: \['spending'\]\)"):
        copy_database(small_cache / "usage.sqlite3", usage_out, BACKUP_KIND)


@pytest.fixture
def cache_with_ledger(small_cache) -> Path:
    """Return ``small_cache`` with a usage ledger beside it, as a gateway leaves it."""
    UsageLedger(small_cache).close()
    return small_cache


def test_usage_out_unusable_paths_rejected(cache_with_ledger, tmp_path, caplog):
    out = tmp_path / "backups" / "embeddings-backup.sqlite3"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    cases = [
        # (--usage-out, --force, expected message)
        (blocker / "usage-backup.sqlite3", False, f"cannot create its folder {blocker}"),
        (pipe, True, f"backup output {pipe} exists and is not a regular file"),
        (cache_with_ledger, False, f"Pass an --usage-out such as {cache_with_ledger.resolve() / 'backups' / 'usage-backup.sqlite3'}"),
        (cache_with_ledger / "usage-backup.sqlite3", True, "Pass an --usage-out in another folder"),
    ]

    for usage_out, force, message in cases:
        caplog.clear()
        status = main(["cache", "backup", str(cache_with_ledger), "--out", str(out), "--usage-out", str(usage_out), *(["--force"] if force else [])])

        assert status == 2, usage_out
        assert message in caplog.text, caplog.text
        assert not out.exists(), usage_out
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_usage_ledger_found_through_symbolic_link(cache_with_ledger, tmp_path):
    link = tmp_path / "elsewhere" / "cache.sqlite3"
    link.parent.mkdir()
    link.symlink_to(cache_with_ledger / DATABASE_NAME)
    usage_out = tmp_path / "backups" / "usage-backup.sqlite3"

    status = main(["cache", "backup", str(link), "--out", str(tmp_path / "backups" / "e.sqlite3"), "--usage-out", str(usage_out)])

    assert status == 0
    assert integrity(usage_out) == ["ok"]
