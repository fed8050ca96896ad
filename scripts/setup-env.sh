#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project into it.
#
# The venv lives outside the checkout, keyed by a hash of requirements.txt and the Python version, so
# sessions, clones and CI runs on the same machine reuse it while the requirements are unchanged.
# Prints the venv's path as its last line. Override the location with UNITE_VENV_ROOT and the
# interpreter with PYTHON.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
root=${UNITE_VENV_ROOT:-$HOME/.cache/unite/venvs}
if ! command -v "$python" >/dev/null; then
  echo "The interpreter $python was not found. Install Python 3.11 or newer, or set PYTHON to one." >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "$python is $("$python" -V 2>&1), and UNITE needs Python 3.11 or newer (it reads TOML with tomllib). Set PYTHON to a python3.11 or newer." >&2
  exit 1
fi
key=$( { cat "$repo/requirements.txt"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
venv="$root/$key"

mkdir -p "$root"
# One creator at a time: a second run (another clone, a test run started meanwhile) waits here
# instead of deleting a venv that is still being installed.
exec 9>"$root/$key.lock"
flock 9
if [[ ! -f "$venv/.complete" ]]; then
  echo "Creating the environment in $venv (the first time takes a few minutes: torch is large)." >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  log="$root/$key.install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip setuptools wheel && "$venv/bin/python" -m pip install -r "$repo/requirements.txt"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "Installing the requirements failed; the full log is $log." >&2
    exit 1
  fi
  touch "$venv/.complete"
fi

# The optional 'distributed' extra of pyproject.toml (Ray Data, for `unite embed --engine ray` and its
# tests), installed once per venv. A failed install leaves the venv usable, and those tests are skipped.
# Set UNITE_SKIP_DISTRIBUTED=1 to leave it out.
if [[ "${UNITE_SKIP_DISTRIBUTED:-0}" != 1 && ! -f "$venv/.complete-distributed" ]]; then
  log="$root/$key.install-distributed.log"
  if "$venv/bin/python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["distributed"]))' \
      "$repo/pyproject.toml" >"$root/$key.distributed.txt" 2>"$log" \
    && "$venv/bin/python" -m pip install -r "$root/$key.distributed.txt" >>"$log" 2>&1; then
    touch "$venv/.complete-distributed"
  else
    tail -n 5 "$log" >&2
    echo "Installing the optional 'distributed' extra (Ray) failed, so the Ray engine and its tests are unavailable; the full log is $log." >&2
  fi
fi

# The project itself is reinstalled every time, because the venv may last served another checkout.
if ! output=$("$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo" 2>&1); then
  echo "$output" >&2
  echo "Installing the project into $venv failed." >&2
  exit 1
fi
echo "$venv"
