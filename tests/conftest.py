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
