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

:func:`list_versions` reads the published versions, and :func:`rollback_current` points ``current`` back at
an older one with the same link switch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint_format import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, ONNX_WEIGHTS, file_sha256, student_label
from shared.errors import ConfigError, ModelError
from shared.fsync import fsync_dir, fsync_file

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
    """Return the version folder that ``root/current`` points to.

    Returns None when nothing is published yet, and also when ``current`` names no version folder of
    ``root`` (:func:`read_current_link` returns the reason).
    """
    link = root / CURRENT_LINK
    if not link.exists() or read_current_link(root).problem:
        return None
    return link.resolve()


@dataclass(frozen=True)
class CurrentLink:
    """The state of ``ROOT/current``.

    ``target`` is the path that the link stores, or None when there is no link. ``problem`` is empty when
    there is no ``current`` or it is a link to a real folder directly under ``ROOT/versions``, and
    otherwise describes what ``current`` is. A student server follows the link wherever it points, so a
    link with a problem can serve files from outside the publish root.
    """

    target: str | None
    problem: str


def read_current_link(root: Path) -> CurrentLink:
    """Read ``root/current`` and check that it is a link to a version folder of ``root``."""
    link = root / CURRENT_LINK
    if not link.is_symlink():
        if not link.exists():
            return CurrentLink(target=None, problem="")
        kind = "folder" if link.is_dir() else "file"
        return CurrentLink(target=None, problem=f"{link} is a {kind}, expected a symbolic link to a folder under {root / VERSIONS_DIR}")
    target = os.readlink(link)
    try:
        resolved = link.resolve()
    except (OSError, RuntimeError) as error:
        # Python 3.11 raises RuntimeError for a symbolic link loop.
        return CurrentLink(target=target, problem=f"{link} points at {target}, which cannot be resolved ({error})")
    versions = root / VERSIONS_DIR
    if resolved.parent != versions.resolve():
        return CurrentLink(target=target, problem=f"{link} points at {target}, which resolves to {resolved}, outside {versions}")
    if not resolved.is_dir():
        return CurrentLink(target=target, problem=f"{link} points at {target}, but {resolved} is not an existing version folder")
    return CurrentLink(target=target, problem="")


def _check_current_is_link(root: Path, action: str) -> None:
    """Raise :class:`ConfigError` when ``root/current`` exists but is a folder or file, not a symbolic link.

    ``action`` completes the message "cannot ACTION publish root ROOT". Replacing such a ``current`` with a
    link would fail, so publishing and rolling back check this before they change anything.
    """
    link = root / CURRENT_LINK
    if link.is_symlink() or not link.exists():
        return
    kind = "folder" if link.is_dir() else "file"
    raise ConfigError(
        f"cannot {action} publish root {root}: {link} is a {kind}, expected a symbolic link to a folder under {root / VERSIONS_DIR}. "
        f"Move {link} out of the publish root, then run the command again. A folder holding an export can then be "
        f"published with `unite publish add FOLDER {root}`.",
        value=str(link),
    )


def publish_student(export_dir: Path, root: Path, *, keep: int = DEFAULT_KEEP) -> Path:
    """Copy the exported student in ``export_dir`` into ``root/versions/`` and point ``root/current`` at it.

    Returns the version folder now served. Publishing an export whose files are byte for byte those that
    ``current`` already serves changes nothing and returns that folder. The ``keep`` newest versions stay
    on disk (the current one always), so a server that is still reading the previous export finds it.
    Raises :class:`ConfigError` when ``keep`` is below 1, when ``root/current`` exists but is not a
    symbolic link, or when ``export_dir`` is not an exported student that loads. That is an export with
    no weights or no config.json, a config.json whose ``weights_sha256`` does not match the weights, or an
    architecture that the weights do not fit.
    ``current`` is unchanged then.
    """
    if keep < 1:
        raise ConfigError(f"keep is {keep}, expected at least 1 so the current version stays on disk.", limit=1, value=keep)
    _check_current_is_link(root, "publish into")
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
    fsync_dir(versions)

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
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(root)


def _prune(versions: Path, *, keep: int, current: Path) -> None:
    # Only real folders are versions. A symbolic link placed under versions/ is neither counted nor followed.
    published = sorted((path for path in versions.iterdir() if _is_version_folder(path)), key=lambda path: path.name)
    removed = [path for path in published[:-keep] if path.resolve() != current.resolve()]
    removed += [path for path in versions.iterdir() if path.name.startswith(_STAGING_PREFIX) and _is_stale(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        logger.info("removed %d old published versions or stale staging folders from %s: %s", len(removed), versions, [path.name for path in removed])


def _is_version_folder(path: Path) -> bool:
    return not path.name.startswith(".") and path.is_dir() and not path.is_symlink()


def _is_linked_version(path: Path) -> bool:
    return not path.name.startswith(".") and path.is_symlink()


def _is_stale(staging: Path) -> bool:
    # A staging folder younger than STALE_STAGING_S may belong to a publish running in another process.
    try:
        return time.time() - staging.stat().st_mtime > STALE_STAGING_S
    except FileNotFoundError:
        return False


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


@dataclass(frozen=True)
class PublishedVersion:
    """One folder under ``ROOT/versions``, as :func:`list_versions` reads it.

    ``problem`` is empty for a complete version, and otherwise the reason the student server could not load it.
    ``invalid`` is true for an entry that is a symbolic link, not a folder. Its files are not read, and
    rollback rejects it, because a link could point anywhere outside the publish root.
    ``student`` is the name the server reports (``<architecture>@<first 12 hex digits of the sha256>``).
    """

    name: str
    path: Path
    current: bool
    student: str
    sha256: str
    teacher: str
    has_onnx: bool
    size_bytes: int
    problem: str
    invalid: bool = False


def list_versions(root: Path) -> list[PublishedVersion]:
    """Return the published versions under ``root``, newest first, without the hidden staging folders.

    A symbolic link under ``root/versions`` is listed as an invalid version. Each version's weights are
    hashed to tell a complete version from one whose files were changed or cut short, so listing reads
    every weights file once. Raises :class:`ConfigError` when ``root`` has no ``versions`` folder.
    """
    versions = root / VERSIONS_DIR
    if not versions.is_dir():
        raise ConfigError(
            f"publish root {root} has no {VERSIONS_DIR}/ folder, expected a folder that `unite publish add` or "
            "`unite distill-worker --publish-root` publishes into. Pass that folder.",
            value=str(root),
        )
    serving = current_version(root)
    entries = sorted((path for path in versions.iterdir() if _is_version_folder(path) or _is_linked_version(path)), key=lambda path: path.name, reverse=True)
    return [
        _linked_version(entry) if entry.is_symlink() else _read_version(entry, current=serving is not None and entry.resolve() == serving)
        for entry in entries
    ]


def rollback_current(root: Path, to: str | None = None) -> Path:
    """Point ``root/current`` at the version named ``to``, or at the newest complete version older than the current one.

    ``to`` is a folder name under ``root/versions`` (a path ending in one is accepted too). The link is
    switched as :func:`publish_student` switches it, so a student server loads either version, never a mix.
    Returns the version now current. Choosing the current version changes nothing.
    Raises :class:`ConfigError` naming the available versions when nothing is published, when ``to``
    is not a version of ``root``, when that version is incomplete, or when no older complete version exists.
    A version is complete when it is a folder, not a symbolic link, and has its weights and a config.json
    that records their sha256. Whether it loads was checked when it was published, and is not checked again.
    Raises it also when ``root/current`` exists but is not a symbolic link.
    """
    _check_current_is_link(root, "roll back")
    available = list_versions(root)
    complete = [version for version in available if not version.problem]
    listing = _format_available(available)
    serving = next((version for version in available if version.current), None)

    if to is None:
        if serving is None:
            raise ConfigError(
                f"cannot roll back publish root {root}: its {CURRENT_LINK} link names no published version. "
                f"Pass --to with one of the available versions: {listing}.",
                value=None,
            )
        older = [version for version in complete if version.name < serving.name]
        if not older:
            raise ConfigError(
                f"cannot roll back publish root {root}: no complete version is older than the current {serving.name}. "
                f"Available versions: {listing}. Pass --to to pick one, or publish the student you want with `unite publish add`.",
                value=serving.name,
            )
        target = older[0]
    else:
        name = Path(to).name
        target = next((version for version in available if version.name == name), None)
        if target is None:
            raise ConfigError(
                f"cannot roll back publish root {root} to {to!r}: no such version under {root / VERSIONS_DIR}. "
                f"Pass one of the available versions: {listing}.",
                value=to,
                limit=[version.name for version in available],
            )
        if target.problem:
            state = "invalid" if target.invalid else "incomplete"
            raise ConfigError(
                f"cannot roll back publish root {root} to {target.name}: the version is {state} ({target.problem}). "
                f"Pass one of the complete versions: {_format_available(complete)}.",
                value=target.name,
                limit=[version.name for version in complete],
            )

    if serving is not None and target.name == serving.name:
        logger.info("%s is already the current version of %s", target.path, root)
        return target.path
    _point_current(root, target.path)
    logger.info("rolled back %s: current now points at %s (was %s)", root, target.name, serving.name if serving else "nothing")
    return target.path


def _linked_version(link: Path) -> PublishedVersion:
    """Describe a symbolic link under ``ROOT/versions`` as an invalid version, without reading where it points."""
    return PublishedVersion(
        name=link.name,
        path=link,
        current=False,
        student="unknown",
        sha256="",
        teacher="unknown",
        has_onnx=False,
        size_bytes=0,
        problem=f"a symbolic link to {os.readlink(link)}, expected a folder directly under {link.parent}",
        invalid=True,
    )


def _read_version(folder: Path, *, current: bool) -> PublishedVersion:
    """Read a version folder's config.json and sizes, and check that its weights match the recorded sha256."""
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    config: dict = {}
    problem = ""
    try:
        loaded = json.loads((folder / CHECKPOINT_CONFIG).read_text())
        config = loaded if isinstance(loaded, dict) else {}
        if not config:
            problem = f"{CHECKPOINT_CONFIG} is not a JSON object"
    except (OSError, ValueError) as error:
        problem = f"{CHECKPOINT_CONFIG} cannot be read ({error})"
    recorded = str(config.get("weights_sha256", ""))
    weights = folder / CHECKPOINT_WEIGHTS
    if not problem:
        if not weights.is_file():
            problem = f"{CHECKPOINT_WEIGHTS} is missing"
        elif file_sha256(weights) != recorded:
            problem = f"{CHECKPOINT_WEIGHTS} does not have the sha256 that {CHECKPOINT_CONFIG} records"
    try:
        student = student_label(config) if config else "unknown"
    except (KeyError, TypeError):
        student = "unknown"
    return PublishedVersion(
        name=folder.name,
        path=folder,
        current=current,
        student=f"{student}@{recorded[:12]}" if recorded else student,
        sha256=recorded,
        teacher=str(config.get("teacher") or "unknown"),
        has_onnx=(folder / ONNX_WEIGHTS).is_file(),
        size_bytes=size,
        problem=problem,
    )


def _format_available(versions: list[PublishedVersion]) -> str:
    if not versions:
        return "none"
    names = []
    for version in versions:
        name = version.name
        if version.current:
            name += " (current)"
        if version.problem:
            name += " (invalid)" if version.invalid else " (incomplete)"
        names.append(name)
    return ", ".join(names)
