#!/usr/bin/env bash
# Run docker-compose.yml for real on a machine without a Docker engine: podman's Docker-compatible API
# plus the Docker Compose v2 binary. It builds the images from an offline wheelhouse, starts the stack,
# runs the first-start path (profile "init") and checks what a user would check:
#
#   1. podman, runc and debootstrap (apt-get install when missing and run as root)
#   2. a containers.conf that selects runc (podman's default runtime, crun, fails in some sandboxes),
#      passed through CONTAINERS_CONF, so the system's own file is left alone
#   3. the base image localhost/python-base:bookworm, built with debootstrap and `podman import`,
#      unless UNITE_BASE_IMAGE names another one (for example python:3.11-slim-bookworm where a
#      registry is reachable)
#   4. the wheelhouse: `pip wheel -r requirements.txt`, cached in UNITE_WHEELHOUSE_ROOT (default
#      ~/.cache/unite/wheelhouses) under a hash of the requirements files and the Python version, and
#      hard-linked into ./wheelhouse, the build context's copy
#   5. the images gateway, distiller and student (podman build, one target each, sharing the dependency
#      layer), and student-onnx when UNITE_COMPOSE_ONNX=1
#   6. podman's API socket, then `docker compose up -d`: health checks, the student server's /readyz 503
#      before a student exists, `docker compose run --rm init`, the student server ready, a tile POSTed
#      from this host to the student server (384 floats) and to the gateway (1536 floats), and the sample
#      slide POSTed as a slide job that must succeed. With UNITE_COMPOSE_ONNX=1, student-onnx (profile
#      onnx) is started too and must become healthy and return 384 floats for a tile from the model.onnx
#      that init published
#   7. `unite cache backup` of the cache and the usage ledger in the gateway container, both copied to
#      this host with `docker compose cp` and checked there, and `unite publish list` in the distiller container
#   8. `docker compose down`, then the named volumes still contain the cache, the shards and the
#      published student, and a restarted student server is ready at once and still has the slide job
#
# The stack runs as compose project UNITE_COMPOSE_PROJECT (default unite-compose-test), on free ports of
# 127.0.0.1, so a deployment named "unite" on the same machine is not touched. Its volumes are removed at
# the end unless UNITE_COMPOSE_KEEP=1. Image sizes and step timings are printed at the end.
#
# Needs: root (for apt-get and podman's rootful storage), Linux x86-64, curl, python3 3.11 (the image's Python,
# so the host's wheels fit), the package index for the wheelhouse (once per requirements change), and
# Debian's mirror for debootstrap (once). On 2 cores a first run takes an estimated 10 to 15 minutes and
# a run with the images built 1 to 4 minutes (docs/deployment.md has the measured steps).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
cache_root=${UNITE_CACHE_ROOT:-$HOME/.cache/unite}
wheelhouse_root=${UNITE_WHEELHOUSE_ROOT:-$cache_root/wheelhouses}
project=${UNITE_COMPOSE_PROJECT:-unite-compose-test}
base_image=${UNITE_BASE_IMAGE:-localhost/python-base:bookworm}
tag=${UNITE_IMAGE_TAG:-local}
keep=${UNITE_COMPOSE_KEEP:-0}
build_onnx=${UNITE_COMPOSE_ONNX:-0}
onnx_requirements=requirements-student-onnx.txt
nice=(nice -n 15)

started=$(date +%s)
step_started=$started
timings=()

log() { echo "compose-up: $*" >&2; }
fail() { echo "compose-up: FAILED: $*" >&2; exit 1; }
step_done() {
  local now
  now=$(date +%s)
  timings+=("$(printf '%-34s %5d s' "$1" $((now - step_started)))")
  step_started=$now
}

[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] || fail "this script supports Linux x86-64 only, and this machine is $(uname -s) $(uname -m)."
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "$python is $("$python" -V 2>&1), but the wheelhouse needs Python 3.11, the images' version. Set PYTHON to a python3.11."

work=$(mktemp -d "${TMPDIR:-/tmp}/unite-compose.XXXXXX")
socket_pid=
ticker_pid=
cleanup() {
  local status=$?
  if [[ -n "$ticker_pid" ]]; then
    kill "$ticker_pid" 2>/dev/null || true
    wait "$ticker_pid" 2>/dev/null || true
  fi
  if [[ -n "${compose_ready:-}" && "$keep" != 1 ]]; then
    compose --profile "*" down --volumes --timeout 30 >/dev/null 2>&1 || log "docker compose down --volumes failed. Remove the project's containers and volumes with podman rm and podman volume rm."
  fi
  if [[ -n "$socket_pid" ]]; then
    kill "$socket_pid" 2>/dev/null || true
    wait "$socket_pid" 2>/dev/null || true
  fi
  if [[ $status -ne 0 && -d "$work" ]]; then
    log "logs and settings of this run are kept in $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# 1. Tools.
missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || fail "${missing[*]} missing, and installing them needs root. Run as root, or install podman, runc and debootstrap first."
  command -v apt-get >/dev/null 2>&1 || fail "${missing[*]} missing, and this machine has no apt-get to install them. Install podman, runc and debootstrap first."
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >&2
fi
[[ $(id -u) -eq 0 ]] || fail "run as root: the images are built and run in podman's rootful storage."
step_done "tools"

# 2. containers.conf for this run's podman commands and API service.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=8192:8192", "nproc=8192:8192"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$work/containers.conf"

# 3. Base image.
if [[ "$base_image" == localhost/python-base:bookworm ]] && ! podman image exists "$base_image"; then
  log "building $base_image with debootstrap (Debian 12 minbase with python3, python3-venv, ca-certificates)"
  rootfs="$work/rootfs"
  "${nice[@]}" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap failed. The full log is $work/debootstrap.log"; }
  tar -C "$rootfs" -c . | podman import - "$base_image" >/dev/null
  rm -rf "$rootfs"
fi
podman image exists "$base_image" || fail "base image $base_image not found. Pull it first, or unset UNITE_BASE_IMAGE to build localhost/python-base:bookworm."
step_done "base image"

# 4. Wheelhouse, built once per requirements and Python version, then hard-linked into the context.
requirement_files=("$repo/requirements.txt")
[[ -f "$repo/$onnx_requirements" ]] && requirement_files+=("$repo/$onnx_requirements")
key=$( { cat "${requirement_files[@]}"; "$python" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)
wheelhouse="$wheelhouse_root/$key"
mkdir -p "$wheelhouse_root"
exec 9>"$wheelhouse_root/$key.lock"
flock 9
if [[ ! -f "$wheelhouse/.complete" ]]; then
  log "building the wheelhouse $wheelhouse (the first time downloads torch and its CUDA libraries, about 4 GB)"
  rm -rf "$wheelhouse"
  requirement_args=()
  for file in "${requirement_files[@]}"; do requirement_args+=(-r "$file"); done
  "${nice[@]}" "$python" -m pip wheel --quiet "${requirement_args[@]}" "setuptools>=68" -w "$wheelhouse" >"$work/wheelhouse.log" 2>&1 \
    || { tail -n 30 "$work/wheelhouse.log" >&2; fail "pip wheel failed. The full log is $work/wheelhouse.log"; }
  touch "$wheelhouse/.complete"
fi
flock -u 9
context_wheelhouse="$repo/wheelhouse"
if [[ -e "$context_wheelhouse" && ! -f "$context_wheelhouse/.unite-wheelhouse" ]]; then
  fail "$context_wheelhouse exists and was not made by this script. Move it aside so that the script can replace it."
fi
if [[ "$(cat "$context_wheelhouse/.unite-wheelhouse" 2>/dev/null)" != "$key" ]]; then
  rm -rf "$context_wheelhouse"
  mkdir "$context_wheelhouse"
  # Hard links cost no space when the cache is on the same file system. Otherwise the wheels are copied.
  cp -l "$wheelhouse"/*.whl "$context_wheelhouse"/ 2>/dev/null || cp "$wheelhouse"/*.whl "$context_wheelhouse"/
  echo "$key" >"$context_wheelhouse/.unite-wheelhouse"
fi
step_done "wheelhouse"

# 5. Images. podman builds from the context folder directly, and the three targets share the layers
# up to `runtime`, so only the first target installs the requirements.
targets=(gateway distiller student)
if [[ "$build_onnx" == 1 ]]; then
  [[ -f "$repo/$onnx_requirements" ]] || fail "UNITE_COMPOSE_ONNX=1, but $onnx_requirements is missing."
  targets+=(student-onnx)
fi
for target in "${targets[@]}"; do
  log "building unite-$target:$tag"
  "${nice[@]}" podman build --quiet --format docker --layers --target "$target" \
    --build-arg BASE_IMAGE="$base_image" -t "unite-$target:$tag" "$repo" >"$work/build-$target.log" 2>&1 \
    || { tail -n 40 "$work/build-$target.log" >&2; fail "building the target $target failed. The full log is $work/build-$target.log"; }
  step_done "image $target"
done

# 6. The API socket and docker compose.
compose_binary=$("$repo/scripts/get-compose.sh" | tail -n 1)
export DOCKER_CONFIG="$work/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
cp "$compose_binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  compose_command=(docker compose)
else
  compose_command=("$compose_binary")
fi
podman system service --time=0 "unix://$work/podman.sock" >"$work/podman-service.log" 2>&1 &
socket_pid=$!
export DOCKER_HOST="unix://$work/podman.sock"
for _ in $(seq 1 50); do
  [[ -S "$work/podman.sock" ]] && break
  sleep 0.2
done
[[ -S "$work/podman.sock" ]] || fail "podman's API socket did not appear. Its log is $work/podman-service.log"

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gateway_port=$(free_port)
student_port=$(free_port)
onnx_port=$(free_port)
data_dir="$work/data"
mkdir -p "$data_dir" "$work/weights"
sample=$cache_root/data/CMU-1-Small-Region.svs
if [[ ! -f "$sample" ]]; then
  log "fetching the sample slide"
  venv=$("$repo/scripts/setup-env.sh" | tail -n 1)
  sample=$("$venv/bin/unite" fetch-sample --data-dir "$cache_root/data" | tail -n 1)
fi
cp "$sample" "$data_dir/CMU-1-Small-Region.svs"
chmod -R a+rX "$data_dir" "$work/weights"

cat >"$work/compose.env" <<EOF
UNITE_IMAGE_TAG=$tag
UNITE_BASE_IMAGE=$base_image
UNITE_DATA_DIR=$data_dir
UNITE_WEIGHTS_DIR=$work/weights
UNITE_GATEWAY_PORT=$gateway_port
UNITE_STUDENT_PORT=$student_port
UNITE_STUDENT_ONNX_PORT=$onnx_port
UNITE_DISTILL_POLL_S=10
UNITE_STUDENT_RELOAD_INTERVAL_S=2
EOF
compose() {
  COMPOSE_BAKE=false "${compose_command[@]}" --project-name "$project" --file "$repo/docker-compose.yml" \
    --project-directory "$repo" --env-file "$work/compose.env" "$@"
}
compose_ready=1

# podman 4.3 runs health checks from systemd timers, which containers started through its API outside
# systemd never get, so their status would stay "starting" and `depends_on: service_healthy` would wait
# forever. This loop runs each running container's check every 5 s in their place; containers without
# a health check make `podman healthcheck run` fail, which is ignored.
health_ticker() {
  while true; do
    for id in $(podman ps --quiet --filter "label=com.docker.compose.project=$project"); do
      podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
    sleep 5
  done
}
health_ticker &
ticker_pid=$!

container_health() { podman inspect --format '{{.State.Health.Status}}' "$(compose ps --quiet "$1")" 2>/dev/null || echo missing; }
wait_healthy() {
  local service=$1 limit=$2 waited=0
  while [[ "$(container_health "$service")" != healthy ]]; do
    ((waited < limit)) || { compose logs --tail 40 "$service" >&2; fail "$service is not healthy after $limit s"; }
    sleep 3
    waited=$((waited + 3))
  done
}
# Print the HTTP status and the start of the body of a GET, or "000 <error>" when the connection fails.
http_status() { "$python" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        print(response.status, response.read().decode()[:300])
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode()[:300])
except OSError as error:
    print("000", error)
EOF
}
wait_alive() {
  local url=$1 limit=$2 waited=0
  until [[ "$(http_status "$url/healthz")" == 200* ]]; do
    ((waited < limit)) || fail "$url/healthz did not return 200 within $limit s"
    sleep 2
    waited=$((waited + 2))
  done
}
# POST one tile from this host to each published port and check the embedding lengths. The arguments
# are triples: a name for the messages, a port on 127.0.0.1 and the expected number of floats.
check_embeddings() { "$python" - "$@" <<'EOF'
import base64, json, struct, sys, urllib.request, zlib

def png(size=224):
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # PNG filter type 0 (none) starts each row
        for x in range(size):
            rows += bytes((200 - (x + y) % 60, 120 + (x * y) % 50, 180 + y % 40))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")

request = json.dumps({"input": [{"image": base64.b64encode(png()).decode("ascii")}]}).encode()
arguments = sys.argv[1:]
for name, port, expected in zip(arguments[0::3], arguments[1::3], map(int, arguments[2::3])):
    post = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=request, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=120) as response:
        embedding = json.load(response)["data"][0]["embedding"]
    if len(embedding) != expected or not all(isinstance(value, float) for value in embedding):
        sys.exit(f"compose-up: FAILED: the {name} returned {len(embedding)} values, expected {expected} floats")
    print(f"compose-up: {name} on 127.0.0.1:{port} returned {len(embedding)} floats", file=sys.stderr)
EOF
}

# Poll GET /v1/jobs/ID on the student server until the slide job has succeeded and its result can be
# read. A failed job, or no success within the time limit in seconds, fails the script.
wait_job() { "$python" - "http://127.0.0.1:$student_port/v1/jobs/$1" "$2" <<'EOF'
import json, sys, time, urllib.error, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + limit

def get(address):
    try:
        with urllib.request.urlopen(address, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        sys.exit(f"compose-up: FAILED: GET {address} returned {error.code}: {error.read().decode()[:300]}")

while True:
    job = get(url)
    if job["status"] == "succeeded":
        get(url + "/result")
        print(f"compose-up: slide job {job['id']} succeeded with {job['num_patches']} patches", file=sys.stderr)
        break
    if job["status"] == "failed" or time.monotonic() > deadline:
        sys.exit(f"compose-up: FAILED: slide job {job['id']} is {job['status']} after at most {limit:.0f} s: {job['error']}")
    time.sleep(2)
EOF
}

log "docker compose up -d (project $project, gateway on 127.0.0.1:$gateway_port, student server on 127.0.0.1:$student_port)"
compose up -d --no-build >"$work/compose-up.log" 2>&1 || { cat "$work/compose-up.log" >&2; fail "docker compose up failed"; }
wait_healthy gateway 180
step_done "up, gateway healthy"

user_id=$(compose exec -T gateway id -u)
[[ "$user_id" != 0 ]] || fail "the gateway runs as root"
wait_alive "http://127.0.0.1:$student_port" 120
read -r status body < <(http_status "http://127.0.0.1:$student_port/readyz")
[[ "$status" == 503 ]] || fail "the student server's /readyz returned $status before a student was published, expected 503: $body"
log "student server before the first student: /readyz $status $body"

log "docker compose run --rm init (teach the sample slide, train and publish a first student)"
compose run --rm init >"$work/init.log" 2>&1 || { tail -n 40 "$work/init.log" >&2; fail "docker compose run --rm init failed. The full log is $work/init.log"; }
step_done "init (teach, train, publish)"
wait_healthy student 120
step_done "student healthy"

check_embeddings "gateway" "$gateway_port" 1536 "student server" "$student_port" 384
step_done "embeddings from the host"

# A slide job of the sample slide. Its record and outputs live in the named volume jobs, so the student
# server restarted in step 8 still serves them.
log "POST /v1/slides with the sample slide, then wait for the slide job"
curl -sS --max-time 120 "http://127.0.0.1:$student_port/v1/slides" -F "file=@$sample" >"$work/slide-job.json" \
  || fail "POST /v1/slides to the student server failed"
job_id=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$work/slide-job.json") \
  || { cat "$work/slide-job.json" >&2; fail "POST /v1/slides returned no job id"; }
wait_job "$job_id" 300
step_done "slide job"

# The slim ONNX student serves the model.onnx that init's worker (run with --onnx) put into the published
# student. The service is in profile "onnx", so the compose commands that name it get that profile.
if [[ "$build_onnx" == 1 ]]; then
  log "starting student-onnx (profile onnx) on 127.0.0.1:$onnx_port"
  compose --profile onnx up -d --no-build student-onnx >"$work/compose-onnx.log" 2>&1 \
    || { cat "$work/compose-onnx.log" >&2; fail "starting student-onnx failed"; }
  COMPOSE_PROFILES=onnx wait_healthy student-onnx 120
  read -r status body < <(http_status "http://127.0.0.1:$onnx_port/readyz")
  [[ "$status" == 200 ]] || fail "student-onnx's /readyz returned $status after its health check passed, expected 200: $body"
  check_embeddings "student-onnx" "$onnx_port" 384
  step_done "student-onnx healthy, embeddings"
fi

# Two commands of docs/operations.md on the running stack: an online backup of the cache, copied to this
# host and checked there, and the list of published students, which must mark one current with model.onnx.
log "unite cache backup in the gateway, docker compose cp to this host, unite publish list in the distiller"
compose exec -T gateway unite cache backup /cache/embeddings --out /cache/backups/embeddings.sqlite3 \
  --usage-out /cache/backups/usage.sqlite3 >"$work/backup.log" 2>&1 \
  || { cat "$work/backup.log" >&2; fail "unite cache backup in the gateway container failed"; }
for database in embeddings usage; do
  compose cp "gateway:/cache/backups/$database.sqlite3" "$work/$database-backup.sqlite3" >"$work/backup-cp.log" 2>&1 \
    || { cat "$work/backup-cp.log" >&2; fail "docker compose cp of the $database backup to this host failed"; }
done
"$python" - "$work/embeddings-backup.sqlite3" "$work/usage-backup.sqlite3" <<'EOF' || fail "the backups copied to this host are not a complete cache and ledger"
import sqlite3, sys
for path, name, table in ((sys.argv[1], "cache", "embeddings"), (sys.argv[2], "usage ledger", "usage")):
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    check = connection.execute("PRAGMA integrity_check").fetchone()[0]
    rows = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    if check != "ok" or rows == 0:
        sys.exit(f"compose-up: FAILED: the {name} backup has integrity_check {check!r} and {rows} rows, expected ok and at least 1")
    print(f"compose-up: {name} backup on this host: integrity_check ok, {rows} rows", file=sys.stderr)
EOF
compose exec -T distiller unite publish list /checkpoints/published >"$work/publish-list.log" 2>&1 \
  || { cat "$work/publish-list.log" >&2; fail "unite publish list in the distiller container failed"; }
grep -Eq '^\*  .* yes  .*complete$' "$work/publish-list.log" \
  || { cat "$work/publish-list.log" >&2; fail "unite publish list shows no complete current version with model.onnx"; }
log "published students: $(head -n 1 "$work/publish-list.log")"
step_done "backup and publish list"

# 8. down keeps the named volumes, and their data is still there.
compose --profile "*" down --timeout 30 >"$work/compose-down.log" 2>&1 || { cat "$work/compose-down.log" >&2; fail "docker compose down failed"; }
for volume in cache checkpoints jobs; do
  podman volume exists "${project}_$volume" || fail "the named volume ${project}_$volume is gone after docker compose down"
done
compose run --rm --no-deps init sh -c \
  'ls /cache/embeddings | grep -q . && ls /cache/shards | grep -q . && test -f /checkpoints/published/current/model.safetensors' \
  >"$work/volumes.log" 2>&1 || { cat "$work/volumes.log" >&2; fail "the named volumes lost the cache, the shards or the published student"; }
compose up -d --no-build student >"$work/compose-restart.log" 2>&1 || { cat "$work/compose-restart.log" >&2; fail "restarting the student server failed"; }
wait_healthy student 120
wait_job "$job_id" 30
step_done "down, volumes kept, restart"

echo "compose-up: all checks passed in $(( $(date +%s) - started )) s"
for timing in "${timings[@]}"; do echo "  $timing"; done
echo "image sizes (podman image inspect):"
for target in "${targets[@]}"; do
  size=$(podman image inspect --format '{{.Size}}' "localhost/unite-$target:$tag")
  echo "  unite-$target:$tag  $((size / 1000000)) MB"
done
size=$(podman image inspect --format '{{.Size}}' "$base_image")
echo "  $base_image  $((size / 1000000)) MB (base)"
