"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real slides and tiles are kept beside the checkout, never inside it. UNITE_SHARED_DATA overrides the folder.
SHARED_DATA = Path(os.environ.get("UNITE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Return the folder of real test data (slides/, tiles/), or skip the test when it is absent."""
    if not (SHARED_DATA / "slides").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}; set UNITE_SHARED_DATA to the folder holding slides/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    """Return the folder of real slides, or skip the test when the shared data is absent."""
    return shared_data / "slides"


@pytest.fixture(scope="session")
def cmu1_tiled(slides_dir: Path):
    """Return CMU-1-Small-Region tiled with the default options."""
    from shared.slides import tile_slide

    return tile_slide(slides_dir / "CMU-1-Small-Region.svs")


@pytest.fixture(autouse=True)
def private_student_jobs_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every test its own student-server jobs folder, since a running server locks its folder.

    Settings built without ``jobs_dir`` read ``UNITE_STUDENT_JOBS_DIR``, so two servers in one test
    session (or a test server beside a real one on this machine) never share the default folder.
    """
    monkeypatch.setenv("UNITE_STUDENT_JOBS_DIR", str(tmp_path_factory.mktemp("student-jobs")))
