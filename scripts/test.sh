#!/usr/bin/env bash
# Set up the environment and run the test suite; extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/setup-env.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
