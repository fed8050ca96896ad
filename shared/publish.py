"""Publishing exported students where a running student server picks them up.

A publish root holds every published export under ``versions/`` and a symbolic link ``current`` to the
one being served::

    ROOT/
      versions/20261205T010203Z-3f2a9c1b7d4e/   model.safetensors, config.json, README.md, ...
      current -> versions/20261205T010203Z-3f2a9c1b7d4e

A version folder is complete before its name appears (it is copied under a hidden staging name, then
renamed), and ``current`` is switched with one ``os.replace`` of a new link over the old one, so a
reader sees either the previous export or the new one, never a mix. The student server resolves
``current`` on every reload check, so pointing ``UNITE_STUDENT_CHECKPOINT_DIR`` at the root (or at
``ROOT/current``) is enough to serve each new student as it is published.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from shared.checkpoint import CHECKPOINT_WEIGHTS, file_sha256
from shared.errors import ConfigError

logger = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
CURRENT_LINK = "current"
DEFAULT_KEEP = 5
_STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 3600.0


def resolve_checkpoint_dir(path: Path) -> Path:
    """Return the export folder that ``path`` names: ``path/current`` resolved for a publish root, else ``path`` resolved."""
    link = path / CURRENT_LINK
    if link.exists():
        return link.resolve()
    return path.resolve()


def current_version(root: Path) -> Path | None:
    """Return the version folder that ``root/current`` points to, or None when nothing is published yet."""
    link = root / CURRENT_LINK
    return link.resolve() if link.exists() else None


def publish_student(export_dir: Path, root: Path, *, keep: int = DEFAULT_KEEP) -> Path:
    """Copy the exported student in ``export_dir`` into ``root/versions/`` and point ``root/current`` at it.

    Returns the new version folder. The ``keep`` newest versions stay on disk (the current one always),
    so a server that is still reading the previous export finds it. Raises :class:`ConfigError` when
    ``export_dir`` is not an exported student, or ``keep`` is below 1.
    """
    weights = export_dir / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise ConfigError(
            f"cannot publish {export_dir}: it has no {CHECKPOINT_WEIGHTS}, expected a folder written by `unite distill`. "
            "Export the student first, then publish that folder.",
            value=str(export_dir),
        )
    if keep < 1:
        raise ConfigError(f"keep is {keep}, expected at least 1 so the current version stays on disk.", limit=1, value=keep)

    versions = root / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{file_sha256(weights)[:12]}"
    target = versions / name
    if target.exists():
        # The same weights published twice in one second: the folder already holds them.
        logger.info("%s is already published as %s", export_dir, target)
    else:
        staging = versions / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        shutil.copytree(export_dir, staging)
        _fsync_tree(staging)
        os.replace(staging, target)
        _fsync_dir(versions)

    _point_current(root, target)
    _prune(versions, keep=keep, current=target)
    logger.info("published %s as %s", export_dir, target)
    return target


def _point_current(root: Path, target: Path) -> None:
    link = root / CURRENT_LINK
    temporary = root / f".{CURRENT_LINK}-{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(target, root), temporary)
    os.replace(temporary, link)
    _fsync_dir(root)


def _prune(versions: Path, *, keep: int, current: Path) -> None:
    # A staging folder younger than an hour may belong to a publish running in another process.
    stale_staging = [
        path
        for path in versions.iterdir()
        if path.name.startswith(_STAGING_PREFIX) and time.time() - path.stat().st_mtime > STALE_STAGING_S
    ]
    published = sorted((path for path in versions.iterdir() if not path.name.startswith(".")), key=lambda path: path.name)
    for path in [*published[:-keep], *stale_staging]:
        if path.resolve() != current.resolve():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
