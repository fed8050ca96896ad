"""scripts/setup-env.sh rejects an interpreter it cannot build the environment with, before creating anything."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_ENV = REPO / "scripts" / "setup-env.sh"


def run_setup(python: str, venv_root: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": python, "UNITE_VENV_ROOT": str(venv_root)}
    return subprocess.run(["bash", str(SETUP_ENV)], capture_output=True, text=True, timeout=60, env=environment)


def test_missing_interpreter_rejected(tmp_path):
    completed = run_setup("python-that-does-not-exist", tmp_path / "venvs")

    assert completed.returncode == 1
    assert "The interpreter python-that-does-not-exist was not found" in completed.stderr
    assert not (tmp_path / "venvs").exists()


@pytest.mark.parametrize("version", ["3.10.14", "3.9.18"])
def test_old_python_rejected(tmp_path, version):
    # A stand-in interpreter that reports an old version, as a python3.10 on PATH would.
    interpreter = tmp_path / "python3"
    interpreter.write_text(f'#!/bin/sh\nif [ "$1" = -V ]; then echo "Python {version}"; exit 0; fi\nexit 1\n')
    interpreter.chmod(interpreter.stat().st_mode | stat.S_IXUSR)

    completed = run_setup(str(interpreter), tmp_path / "venvs")

    assert completed.returncode == 1
    assert f"is Python {version}, and UNITE needs Python 3.11 or newer" in completed.stderr
    assert not (tmp_path / "venvs").exists()
