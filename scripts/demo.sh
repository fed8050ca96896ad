#!/usr/bin/env bash
# Set up the environment and run the demo on the CMU-1 sample slide; extra arguments go to `unite demo`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/setup-env.sh" | tail -n 1)
exec "$venv/bin/unite" demo "$@"
