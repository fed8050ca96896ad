"""Publishing exported students where a running student server picks them up.

A publish root contains every published export under ``versions/`` and a symbolic link ``current`` to the
one being served::

    ROOT/
      versions/20261205T010203123456Z-3f2a9c1b7d4e/   model.safetensors, config.json, README.md, ...
      current -> versions/20261205T010203123456Z-3f2a9c1b7d4e

A version folder is complete before its name appears (it is copied under a hidden staging name, then
renamed), and ``current`` is switched with one ``os.replace`` of a new link over the old one, so a
reader sees either the previous export or the new one, never a mix. The student server resolves
``current`` on every reload check, so pointing ``UNITE_STUDENT_CHECKPOINT_DIR`` at the root (or at
``ROOT/current``) is enough to serve each new student as it is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from shared.checkpoint_format import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, file_sha256
from shared.errors import ConfigError, ModelError

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

    Returns the version folder now served. Publishing an export whose files are byte for byte those that
    ``current`` already serves changes nothing and returns that folder. The ``keep`` newest versions stay
    on disk (the current one always), so a server that is still reading the previous export finds it.
    Raises :class:`ConfigError` when ``keep`` is below 1 or ``export_dir`` is not an exported student
    that loads. That is an export with no weights or no config.json, a config.json whose
    ``weights_sha256`` does not match the weights, or an architecture that the weights do not fit.
    ``current`` is unchanged then.
    """
    if keep < 1:
        raise ConfigError(f"keep is {keep}, expected at least 1 so the current version stays on disk.", limit=1, value=keep)
    sha256 = _check_export(export_dir)

    serving = current_version(root)
    if serving is not None and _tree_digest(serving) == _tree_digest(export_dir):
        logger.info("%s is already published as %s, the current version", export_dir, serving)
        return serving

    versions = root / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    # Microseconds in the name make name order the publishing order, which pruning relies on.
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1_000_000):06d}Z"
    target = versions / f"{stamp}-{sha256[:12]}"
    staging = versions / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
    shutil.copytree(export_dir, staging)
    _fsync_tree(staging)
    os.replace(staging, target)
    _fsync_dir(versions)

    _point_current(root, target)
    _prune(versions, keep=keep, current=target)
    logger.info("published %s as %s (weights sha256 %s)", export_dir, target, sha256)
    return target


def _check_export(export_dir: Path) -> str:
    """Return the sha256 of the export's weights, after checking that config.json records that same hash."""
    weights = export_dir / CHECKPOINT_WEIGHTS
    config_path = export_dir / CHECKPOINT_CONFIG
    for path in (weights, config_path):
        if not path.is_file():
            raise ConfigError(
                f"cannot publish {export_dir}: it has no {path.name}, expected a folder written by `unite distill` "
                f"(OUT/student). Export the student first, then publish that folder.",
                value=str(export_dir),
            )
    sha256 = file_sha256(weights)
    try:
        recorded = json.loads(config_path.read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"cannot publish {export_dir}: {CHECKPOINT_CONFIG} cannot be read as a JSON object ({error}). Export the student again.",
            value=str(config_path),
        ) from error
    if recorded != sha256:
        raise ConfigError(
            f"cannot publish {export_dir}: {CHECKPOINT_CONFIG} records weights_sha256 {recorded!r}, but "
            f"{CHECKPOINT_WEIGHTS} has sha256 {sha256}. The export is incomplete or was changed; export the student again.",
            limit=sha256,
            value=recorded,
        )
    _check_loads(export_dir)
    return sha256


def _check_loads(export_dir: Path) -> None:
    """Load the export on the CPU as the student server does, raising :class:`ConfigError` when that fails."""
    from shared.checkpoint import load_mimic_projector, load_student

    try:
        load_student(export_dir, device="cpu")
        load_mimic_projector(export_dir, device="cpu")
    except (ModelError, RuntimeError) as error:
        # load_state_dict raises RuntimeError for a tensor whose shape the architecture does not have.
        raise ConfigError(
            f"cannot publish {export_dir}: the student server could not load it ({error}). Export the student again.",
            value=str(export_dir),
        ) from error


def _tree_digest(folder: Path) -> str:
    """Return a sha256 over the relative path and the sha256 of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _point_current(root: Path, target: Path) -> None:
    link = root / CURRENT_LINK
    temporary = root / f".{CURRENT_LINK}-{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(target, root), temporary)
    os.replace(temporary, link)
    _fsync_dir(root)


def _prune(versions: Path, *, keep: int, current: Path) -> None:
    published = sorted((path for path in versions.iterdir() if not path.name.startswith(".")), key=lambda path: path.name)
    removed = [path for path in published[:-keep] if path.resolve() != current.resolve()]
    removed += [path for path in versions.iterdir() if path.name.startswith(_STAGING_PREFIX) and _is_stale(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        logger.info("removed %d old published versions or stale staging folders from %s: %s", len(removed), versions, [path.name for path in removed])


def _is_stale(staging: Path) -> bool:
    # A staging folder younger than STALE_STAGING_S may belong to a publish running in another process.
    try:
        return time.time() - staging.stat().st_mtime > STALE_STAGING_S
    except FileNotFoundError:
        return False


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
