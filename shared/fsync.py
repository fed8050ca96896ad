"""Flushing written files and folder entries to disk, so a rename that follows survives a power loss."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush the contents of the file ``path`` to disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_dir(folder: Path) -> None:
    """Flush the entries of ``folder`` to disk, so files created or renamed in it stay there."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
