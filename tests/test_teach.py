"""``unite teach`` on slide sources like ``unite tile``'s: folders, globs, CSV lists, patch files, failed slides, API keys.

The gateway is a real one on 127.0.0.1 with the reference teacher, and the slides are small synthetic
TIFFs, so each test sends a few dozen tiles at most.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from gateway_helpers import gateway
from synthetic_slides import he_like, write_tiff_slide

from shared.cache import EmbeddingCache
from shared.slides.tiling import tile_slide
from teacher_gateway.auth import hash_key
from unite_cli.main import main
from unite_cli.pipeline import SlideFailure, TeachResult
from unite_cli.teach_plan import TeachPlan

API_KEY = "sk-teach-test-7d1e"


@pytest.fixture
def slide_folder(tmp_path: Path) -> Path:
    """A folder with a slide that tiles, a slide without a resolution and a file that is not a slide."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_tiff_slide(folder / "tissue-a.tif", he_like(1024, 1024, seed=1), mpp=0.5)
    write_tiff_slide(folder / "no-mpp.tif", he_like(1024, 1024, seed=2), mpp=None)
    (folder / "broken.svs").write_text("this is not a slide")
    return folder


def _cached_tiles(cache_dir: Path) -> int:
    with EmbeddingCache(cache_dir) as cache:
        return cache.count()


def test_folder_goes_on_after_failed_slides(slide_folder, tmp_path, capsys, caplog):
    cache_dir, shards = tmp_path / "cache", tmp_path / "shards"
    expected_tiles = len(tile_slide(slide_folder / "tissue-a.tif").grid)

    with gateway(cache_dir) as http:
        status = main(["teach", str(slide_folder), "--gateway", str(http.base_url), "--cache-dir", str(cache_dir), "--shards", str(shards)])
    output = capsys.readouterr().out

    assert status == 1
    assert "3 slides: 1 taught, 2 failed" in output
    assert f"{expected_tiles} tiles sent to the gateway" in output
    assert "failed by reason: " in output
    assert "  no-mpp (no_resolution): " in output
    assert "  broken (" in output
    # The advice of the slide code names options that unite teach has.
    assert "--mpp-csv" in caplog.text
    assert _cached_tiles(cache_dir) == expected_tiles
    assert len(list(shards.glob("shard-*.h5"))) >= 1


def test_csv_list_and_glob_sources(slide_folder, tmp_path, capsys):
    cache_dir, shards = tmp_path / "cache", tmp_path / "shards"
    slide_list = tmp_path / "resolutions.csv"
    slide_list.write_text(f"slide,mpp\n{slide_folder / 'no-mpp.tif'},0.5\n")
    expected_tiles = len(tile_slide(slide_folder / "tissue-a.tif").grid) + len(tile_slide(slide_folder / "no-mpp.tif", mpp=0.5).grid)

    with gateway(cache_dir) as http:
        status = main([
            "teach", str(slide_list), str(slide_folder / "tissue-*.tif"), "--gateway", str(http.base_url),
            "--cache-dir", str(cache_dir), "--shards", str(shards),
        ])
    output = capsys.readouterr().out

    assert status == 0, output
    assert "2 slides: 2 taught, 0 failed" in output
    assert f"{expected_tiles} tiles sent to the gateway" in output
    assert _cached_tiles(cache_dir) == expected_tiles


def test_patches_folder_is_not_tiled_again(slide_folder, tmp_path, capsys):
    tile_out, cache_dir, shards = tmp_path / "tiled", tmp_path / "cache", tmp_path / "shards"
    assert main(["tile", str(slide_folder / "tissue-a.tif"), "--out", str(tile_out)]) == 0
    # Keep two patches only: a slide tiled again by unite teach would send all of its patches.
    patch_file = tile_out / "patches" / "tissue-a_patches.h5"
    with h5py.File(patch_file, "r+") as file:
        kept_coords = file["coords"][:2]
        attrs = dict(file["coords"].attrs)
        del file["coords"]
        file.create_dataset("coords", data=kept_coords)
        file["coords"].attrs.update(attrs)
    capsys.readouterr()

    with gateway(cache_dir) as http:
        status = main([
            "teach", str(slide_folder / "tissue-a.tif"), str(slide_folder / "no-mpp.tif"), "--patches", str(tile_out),
            "--gateway", str(http.base_url), "--cache-dir", str(cache_dir), "--shards", str(shards),
        ])
    output = capsys.readouterr().out

    assert status == 1
    assert "2 slides: 1 taught, 1 failed" in output
    assert "2 tiles sent to the gateway" in output
    assert "  no-mpp (invalid_patch_file): " in output
    assert "no-mpp_patches.h5 not found" in output
    with EmbeddingCache(cache_dir) as cache:
        (teacher,) = cache.count_by_teacher()
        coords = sorted(entry.coords for entry in cache.iter_entries(teacher))
    assert coords == sorted(tuple(int(value) for value in row) for row in kept_coords)


def test_dry_run_takes_slide_options(slide_folder, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    slide_list = tmp_path / "resolutions.csv"
    slide_list.write_text("slide,mpp\nno-mpp.tif,0.5\n")

    with gateway(cache_dir) as http:
        status = main([
            "teach", str(slide_folder), "--gateway", str(http.base_url), "--dry-run", "--mpp-csv", str(slide_list),
            "--allow-fluorescence", "--min-tissue", "0.5",
        ])
        stats = http.get("/v1/cache/stats").json()
    output = capsys.readouterr().out

    assert status == 1
    assert "slides                 2 (1 failed)" in output
    assert "  broken (" in output
    assert "no-mpp (" not in output
    assert stats["total"] == 0


def _command_log(caplog) -> str:
    """Return and clear what the command logged, without the lines of the gateway that runs in this process."""
    text = "\n".join(record.getMessage() for record in caplog.records if record.name == "unite")
    caplog.clear()
    return text


def test_unauthorized_names_api_key_variable(slide_folder, tmp_path, monkeypatch, caplog):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f"[[keys]]\nname = 'lab'\nsha256 = '{hash_key(API_KEY)}'\n")
    slide = str(slide_folder / "tissue-a.tif")

    with gateway(tmp_path / "cache", keys_file=keys_file) as http:
        arguments = ["teach", slide, "--gateway", str(http.base_url), "--dry-run"]
        monkeypatch.delenv("UNITE_API_KEY", raising=False)
        missing = main(arguments)
        missing_log = _command_log(caplog)
        monkeypatch.setenv("UNITE_API_KEY", "sk-wrong")
        wrong = main(arguments)
        wrong_log = _command_log(caplog)
        monkeypatch.setenv("UNITE_API_KEY", API_KEY)
        accepted = main(arguments)

    assert missing == 2
    assert "HTTP 401 (unauthorized): missing API key" in missing_log
    assert "UNITE_API_KEY is unset or empty" in missing_log
    assert "export UNITE_API_KEY=<key>" in missing_log
    assert "Authorization" not in missing_log
    assert wrong == 2
    assert "invalid API key" in wrong_log
    assert "Set UNITE_API_KEY to a key of this gateway's keys file" in wrong_log
    assert "sk-wrong" not in wrong_log
    assert accepted == 0


def test_help_documents_api_key_and_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["teach", "--help"])
    text = " ".join(capsys.readouterr().out.split())

    assert "UNITE_API_KEY" in text
    assert "Exit status: 0" in text
    for option in ("--mpp-csv", "--allow-fluorescence", "--target-mag", "--patches", "--recursive", "--no-fill-holes"):
        assert option in text


def test_summaries_use_singular_for_one():
    result = TeachResult(tiles=1, cache_hits=0, teacher_tiles=1, teacher="t", failed=[SlideFailure("a", "a.svs", "no_tissue", "m")])
    plan = TeachPlan(teacher="t", slides=1, tiles=1, distinct_tiles=1, cache_hits=1, tiles_to_embed=1, teacher_calls=1)

    assert result.summary().startswith("1 slide: 0 taught, 1 failed; 1 tile sent")
    assert "no training shard written" in result.summary()
    assert "1 tile in 1 teacher call\n" in plan.summary() + "\n"
    assert "in the cache           1 distinct tile\n" in plan.summary()
