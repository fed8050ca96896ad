"""Tests of the distiller's worker mode on real shards: threshold, training, publishing, ONNX export, resume and the command.

Shards hold real LC25000 lung tiles and the pixel-projection teacher of test_distiller.py, and the student
is timm's test_vit trained for one short epoch, so each training takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distill_training import CrashAtStep
from test_distiller import RESTRICTIVE_LICENCE, _lung_tiles, _write_shards

from distiller.config import DistillConfig
from distiller.onnx_export import RELATIVE_TOLERANCE
from distiller.worker import DEFAULT_MIN_NEW_TILES, DEFAULT_POLL_S, ONNX_FILE, STATE_FILE, DistillWorker, WorkerOptions, read_state
from shared.checkpoint import CHECKPOINT_WEIGHTS, file_sha256, load_student
from shared.errors import ConfigError
from shared.imaging import to_model_input
from shared.publish import DEFAULT_KEEP, VERSIONS_DIR, current_version, resolve_checkpoint_dir
from student_server.onnx_runtime import ONNX_WEIGHTS, embed_onnx, load_onnx_export
from unite_cli import distill_worker

REPO = Path(__file__).resolve().parents[1]
SMALL_STUDENT = "test_vit"
# torch 2.14 cannot export test_vit to ONNX, because it resamples its position embeddings with an antialiased
# bicubic upsampling that has no ONNX operator, so the ONNX tests train this small timm CNN instead.
ONNX_STUDENT = "resnet10t"
TILES_PER_SLIDE = 8
# Training options of every run here: 3 slides give 16 training tiles, so 4 steps of 4 tiles.
TRAINING = {"student": SMALL_STUDENT, "batch_size": 4, "epochs": 1, "val_fraction": 0.3, "num_workers": 0, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def lung_tiles(shared_data):
    return _lung_tiles(shared_data, 48)


def make_worker(tmp_path: Path, min_new_tiles: int, **training) -> DistillWorker:
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "worker", **{**TRAINING, **training})
    return DistillWorker(config, WorkerOptions(publish_root=tmp_path / "published", min_new_tiles=min_new_tiles, once=True))


def test_worker_waits_below_threshold(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:16], slides_per_shard=2, tiles_per_slide=TILES_PER_SLIDE)

    result = make_worker(tmp_path, min_new_tiles=24).check()

    assert not result.trained
    assert result.new_tiles == 16
    assert current_version(tmp_path / "published") is None
    assert read_state(tmp_path / "worker" / STATE_FILE).trainings == 0


def test_worker_waits_without_shards(tmp_path):
    result = make_worker(tmp_path, min_new_tiles=1).check()

    assert not result.trained
    assert result.total_tiles == 0


def test_worker_trains_at_threshold_then_idles(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    worker = make_worker(tmp_path, min_new_tiles=24)

    first = worker.check()
    served = resolve_checkpoint_dir(tmp_path / "published")
    student = load_student(served)
    second = worker.check()
    state = json.loads((tmp_path / "worker" / STATE_FILE).read_text())

    assert first.trained
    assert first.published == served
    assert student.sha256 == file_sha256(served / CHECKPOINT_WEIGHTS)
    assert student.config["student"] == SMALL_STUDENT
    assert not second.trained
    assert second.new_tiles == 0
    assert state["trained_tiles"] == 24
    assert state["trainings"] == 1
    assert state["published"] == served.name
    assert state["running"] is None
    assert len(list((tmp_path / "published" / VERSIONS_DIR).iterdir())) == 1


def test_worker_trains_again_on_new_shard(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    worker = make_worker(tmp_path, min_new_tiles=16)
    first = worker.check()
    _write_shards(tmp_path / "shards", lung_tiles[:48], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)

    worker = DistillWorker(worker.config, WorkerOptions(publish_root=tmp_path / "published", min_new_tiles=16, warm_start=True, once=True))
    second = worker.check()

    assert first.trained and second.trained
    assert second.new_tiles == 24
    assert current_version(tmp_path / "published") == second.published
    assert second.published != first.published
    assert read_state(tmp_path / "worker" / STATE_FILE).trained_tiles == 48


def test_worker_resumes_crashed_training(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "worker", checkpoint_every_n_steps=2, **TRAINING)
    options = WorkerOptions(publish_root=tmp_path / "published", min_new_tiles=8, once=True)

    crashing = DistillWorker(config, options, callbacks=[CrashAtStep(3)])
    with pytest.raises(RuntimeError, match="simulated crash at global step 3"):
        crashing.check()
    crashed_state = read_state(tmp_path / "worker" / STATE_FILE)
    resumed = DistillWorker(config, options).check()

    assert crashed_state.running is not None
    assert (tmp_path / "worker" / "runs" / crashed_state.running["run"] / "lightning" / "last.ckpt").is_file()
    assert resumed.trained
    assert resumed.resumed
    assert resumed.published.name == read_state(tmp_path / "worker" / STATE_FILE).published
    assert load_student(resolve_checkpoint_dir(tmp_path / "published")).config["training"]["steps"] == 4


def test_worker_resumed_run_publishes_onnx(lung_tiles, tmp_path):
    # A new run and a resumed run export through the same code, so one crashed and resumed training covers both.
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "worker", checkpoint_every_n_steps=2, **{**TRAINING, "student": ONNX_STUDENT})
    options = WorkerOptions(publish_root=tmp_path / "published", min_new_tiles=24, once=True, onnx=True)
    with pytest.raises(RuntimeError, match="simulated crash at global step 3"):
        DistillWorker(config, options, callbacks=[CrashAtStep(3)]).check()

    result = DistillWorker(config, options).check()
    served = resolve_checkpoint_dir(tmp_path / "published")
    onnx_student, _ = load_onnx_export(served)
    torch_student = load_student(served).model.eval()
    tiles = lung_tiles[:5]
    with torch.no_grad():
        expected = torch_student.forward_head(torch_student.forward_features(torch.from_numpy(to_model_input(tiles))), pre_logits=True).numpy()
    actual = embed_onnx(onnx_student, tiles)

    assert result.trained
    assert result.resumed
    assert result.published == served
    assert (served / ONNX_FILE).is_file()
    assert onnx_student.sha256 == file_sha256(served / CHECKPOINT_WEIGHTS)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max()))


def test_worker_onnx_file_matches_server():
    assert ONNX_FILE == ONNX_WEIGHTS


def test_worker_stops_on_restrictive_licence(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE, licence=RESTRICTIVE_LICENCE)

    with pytest.raises(ConfigError, match="accept-teacher-licence|accept_teacher_licence"):
        make_worker(tmp_path, min_new_tiles=8).check()

    assert current_version(tmp_path / "published") is None


def test_worker_rejects_resume_option(tmp_path):
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "worker", resume_from="last")

    with pytest.raises(ConfigError, match="the worker resumes its own runs"):
        DistillWorker(config, WorkerOptions(publish_root=tmp_path / "published"))


def test_worker_rejects_several_nodes(tmp_path):
    config = DistillConfig(shard_dir=tmp_path / "shards", out_dir=tmp_path / "worker", num_nodes=2)

    with pytest.raises(ConfigError, match="num_nodes is 2, expected 1") as raised:
        DistillWorker(config, WorkerOptions(publish_root=tmp_path / "published"))

    assert "unite publish add" in raised.value.message


@pytest.mark.parametrize("field, value", [("min_new_tiles", 0), ("keep", 0), ("poll_s", 0.0)])
def test_worker_options_reject_invalid(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"{field} is {value}"):
        WorkerOptions(publish_root=tmp_path, **{field: value})


def test_cli_defaults_match_worker():
    assert distill_worker.DEFAULT_MIN_NEW_TILES == DEFAULT_MIN_NEW_TILES
    assert distill_worker.DEFAULT_POLL_S == DEFAULT_POLL_S
    assert distill_worker.DEFAULT_KEEP == DEFAULT_KEEP


def worker_command(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "unite_cli.main", "distill-worker",
        "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "worker"), "--publish-root", str(tmp_path / "published"),
        "--student", SMALL_STUDENT, "--batch-size", "4", "--epochs", "1", "--val-fraction", "0.3", "--num-workers", "0",
        "--accelerator", "cpu", *extra,
    ]


@pytest.mark.parametrize("variable, value", [("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "job-1"), ("SLURM_NTASKS", "4")])
def test_cli_refuses_outside_launcher(tmp_path, variable, value):
    # torchrun and srun start every process of a job; the worker must be one process that starts its trainings' own.
    environment = {**ddp_environment(), variable: value}

    completed = subprocess.run(worker_command(tmp_path, "--once"), capture_output=True, text=True, timeout=120, cwd=REPO, env=environment)

    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"started with {variable} set" in completed.stderr
    assert "--strategy ddp" in completed.stderr
    assert not (tmp_path / "worker").exists()


def test_cli_once_trains_and_publishes(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)

    completed = subprocess.run(worker_command(tmp_path, "--once", "--min-new-tiles", "24"), capture_output=True, text=True, timeout=300, cwd=REPO)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "1 trainings" in completed.stdout
    assert load_student(resolve_checkpoint_dir(tmp_path / "published")).config["student"] == SMALL_STUDENT


def test_cli_stops_on_sigterm_between_checks(tmp_path):
    command = worker_command(tmp_path, "--poll-s", "0.2", "--min-new-tiles", "8")

    # The worker logs one line per check; after two it is polling.
    returncode, stdout, stderr = sigterm_when(command, tmp_path, lambda log: log.read_text().count("waiting for 8") >= 2, timeout_s=120)

    assert returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stderr
    assert "0 trainings" in stdout


# Run by `python -c`: a None entry in sys.modules makes `import onnx` raise ImportError and
# importlib.util.find_spec return None, as on a machine without the packages, so the worker's ONNX export
# fails for real. Then the command runs with the remaining arguments.
ONNX_HIDDEN = textwrap.dedent(
    """
    import sys

    sys.modules.update({"onnx": None, "onnxruntime": None})
    from unite_cli.main import main

    sys.exit(main(sys.argv[1:]))
    """
)


def test_cli_onnx_failure_still_publishes(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    arguments = worker_command(tmp_path, "--once", "--min-new-tiles", "24", "--onnx")[3:]

    completed = subprocess.run([sys.executable, "-c", ONNX_HIDDEN, *arguments], capture_output=True, text=True, timeout=300, cwd=REPO)
    served = resolve_checkpoint_dir(tmp_path / "published")
    warnings = [line for line in completed.stderr.splitlines() if "WARNING distiller.worker: ONNX export" in line]

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "1 trainings" in completed.stdout
    assert len(warnings) == 1, completed.stderr[-3000:]
    assert str(tmp_path / "worker" / "runs") in warnings[0]
    assert "onnx and onnxruntime packages" in warnings[0]
    assert "keeps serving the previous version" in warnings[0]
    assert load_student(served).config["student"] == SMALL_STUDENT
    assert not (served / ONNX_FILE).exists()


# 3 slides of 8 tiles give 16 training tiles, 4 steps of 4 per epoch, so 20 epochs plan 80 steps. The
# SIGTERM, sent when the first epoch's last.ckpt appears, lands long before the last step.
SIGTERM_EPOCHS = 20
SIGTERM_PLANNED_STEPS = SIGTERM_EPOCHS * 4


def sigterm_when(
    command: list[str], tmp_path: Path, ready: Callable[[Path], bool], *, env: dict[str, str] | None = None, timeout_s: float = 300
) -> tuple[int, str, str]:
    """Start the worker, send it SIGTERM once ``ready(log_path)`` is true (or after ``timeout_s``), and return its exit status, stdout and stderr."""
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready(log_path) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            stdout, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, stdout, log_path.read_text()


def sigterm_after_first_epoch(command: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the worker as :func:`sigterm_when` does, sending SIGTERM once a training has written last.ckpt."""
    # LastCheckpoint writes last.ckpt at the end of each epoch, so its appearance means steps have run.
    return sigterm_when(command, tmp_path, lambda _: any((tmp_path / "worker" / "runs").glob("*/lightning/last.ckpt")), env=env)


def test_cli_sigterm_mid_training_then_resumes(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    command = worker_command(tmp_path, "--min-new-tiles", "24", "--poll-s", "0.2")
    command[command.index("--epochs") + 1] = str(SIGTERM_EPOCHS)

    returncode, stdout, stderr = sigterm_after_first_epoch(command, tmp_path)

    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    state = json.loads((tmp_path / "worker" / STATE_FILE).read_text())
    checkpoint_path = tmp_path / "worker" / "runs" / state["running"]["run"] / "lightning" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)

    assert "received SIGTERM" in stderr
    assert f"stopped at global step {checkpoint['global_step']} on request" in stderr
    assert stdout == ""
    assert 0 < checkpoint["global_step"] < SIGTERM_PLANNED_STEPS
    assert checkpoint["state_dict"]
    assert state["trainings"] == 0
    assert state["published"] is None
    assert state["running"]["shards"] == [["shard-00000.h5", 24]]
    assert current_version(tmp_path / "published") is None
    assert not (tmp_path / "published" / VERSIONS_DIR).exists()

    resumed = subprocess.run([*command, "--once"], capture_output=True, text=True, timeout=600, cwd=REPO)
    served = resolve_checkpoint_dir(tmp_path / "published")
    final_state = read_state(tmp_path / "worker" / STATE_FILE)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the unfinished training in {checkpoint_path.parent.parent}" in resumed.stderr
    assert "1 trainings" in resumed.stdout
    assert final_state.running is None
    assert final_state.trainings == 1
    assert final_state.published == served.name
    assert load_student(served).config["training"]["steps"] == SIGTERM_PLANNED_STEPS


# With --strategy ddp --devices 2 on the CPU, Lightning runs the worker's command again as the process of rank 1,
# and the two processes meet on 127.0.0.1 with the gloo backend. Each takes 8 of the 16 training tiles, so an
# epoch has 2 steps of 4 tiles per process.
DDP_OPTIONS = ("--strategy", "ddp", "--devices", "2")
DDP_STEPS_PER_EPOCH = 2


def ddp_environment() -> dict[str, str]:
    # Without the launcher's variables the worker starts its own processes. The address keeps them on this machine,
    # and Lightning picks a free port for each training.
    environment = {name: value for name, value in os.environ.items() if name not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**environment, "MASTER_ADDR": "127.0.0.1"}


def processes_mentioning(text: str) -> list[str]:
    """Return the command lines of the running processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        line = " ".join(argument.decode(errors="replace") for argument in arguments)
        if text in line:
            found.append(line)
    return found


def wait_for_no_process(text: str, timeout: float) -> list[str]:
    """Wait until no process mentions ``text``, and return those left after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_cli_ddp_once_publishes_one_version(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    command = worker_command(tmp_path, "--once", "--min-new-tiles", "24", *DDP_OPTIONS)

    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=ddp_environment())
    left = wait_for_no_process(str(tmp_path), timeout=60)
    state = read_state(tmp_path / "worker" / STATE_FILE)
    versions = list((tmp_path / "published" / VERSIONS_DIR).iterdir())
    runs = list((tmp_path / "worker" / "runs").iterdir())
    served = resolve_checkpoint_dir(tmp_path / "published")
    training = load_student(served).config["training"]

    assert completed.returncode == 0, completed.stderr[-5000:]
    assert completed.stdout.splitlines() == [f"1 trainings; published students are in {tmp_path / 'published'}"]
    assert f"process of rank 1 joins the training in {runs[0]}" in completed.stderr
    assert "ERROR" not in completed.stderr, completed.stderr[-5000:]
    assert left == []
    assert len(versions) == 1
    assert len(runs) == 1
    assert state.trainings == 1
    assert state.trained_tiles == 24
    assert state.published == versions[0].name == served.name
    assert state.running is None
    assert training["processes"] == 2
    assert training["steps"] == DDP_STEPS_PER_EPOCH


def test_cli_ddp_sigterm_mid_training_then_resumes(lung_tiles, tmp_path):
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    command = worker_command(tmp_path, "--min-new-tiles", "24", "--poll-s", "0.2", *DDP_OPTIONS)
    command[command.index("--epochs") + 1] = str(SIGTERM_EPOCHS)

    # Only rank 0 gets the signal, as from `docker stop`. Rank 1 stops after the same step.
    returncode, stdout, stderr = sigterm_after_first_epoch(command, tmp_path, env=ddp_environment())
    left = wait_for_no_process(str(tmp_path), timeout=60)
    state = read_state(tmp_path / "worker" / STATE_FILE)
    checkpoint_path = tmp_path / "worker" / "runs" / state.running["run"] / "lightning" / "last.ckpt"
    step = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["global_step"]

    assert returncode == 128 + signal.SIGTERM, stderr[-5000:]
    assert stdout == ""
    assert left == []
    assert f"process of rank 1: training in {checkpoint_path.parent.parent} stopped at global step {step} on request" in stderr
    assert 0 < step < SIGTERM_EPOCHS * DDP_STEPS_PER_EPOCH
    assert state.trainings == 0
    assert state.published is None
    assert not (tmp_path / "published" / VERSIONS_DIR).exists()

    resumed = subprocess.run([*command, "--once"], capture_output=True, text=True, timeout=600, cwd=REPO, env=ddp_environment())
    left_after_resume = wait_for_no_process(str(tmp_path), timeout=60)
    final_state = read_state(tmp_path / "worker" / STATE_FILE)
    served = resolve_checkpoint_dir(tmp_path / "published")

    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resuming the unfinished training in {checkpoint_path.parent.parent}" in resumed.stderr
    assert resumed.stdout.splitlines() == [f"1 trainings; published students are in {tmp_path / 'published'}"]
    assert left_after_resume == []
    assert len(list((tmp_path / "published" / VERSIONS_DIR).iterdir())) == 1
    assert final_state.trainings == 1
    assert final_state.running is None
    assert final_state.published == served.name
    assert load_student(served).config["training"]["steps"] == SIGTERM_EPOCHS * DDP_STEPS_PER_EPOCH


def test_cli_ddp_loop_trains_twice_then_stops(lung_tiles, tmp_path):
    # Lightning's launcher starts other processes only from a process that has not launched any, so the worker
    # must undo that record after the first training for the second one to start a new rank-1 process.
    _write_shards(tmp_path / "shards", lung_tiles[:24], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
    command = worker_command(tmp_path, "--min-new-tiles", "24", "--poll-s", "0.2", *DDP_OPTIONS)
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=ddp_environment())
        try:
            deadline = time.monotonic() + 300
            while read_state(tmp_path / "worker" / STATE_FILE).trainings < 1 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            _write_shards(tmp_path / "shards", lung_tiles[:48], slides_per_shard=3, tiles_per_slide=TILES_PER_SLIDE)
            while read_state(tmp_path / "worker" / STATE_FILE).trainings < 2 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            # The rank-1 process of the second training exits on its own, and then only the worker polls.
            while len(processes_mentioning(str(tmp_path))) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            running_while_polling = processes_mentioning(str(tmp_path))
            process.send_signal(signal.SIGTERM)
            stdout, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    stderr = log_path.read_text()
    state = read_state(tmp_path / "worker" / STATE_FILE)
    versions = sorted(path.name for path in (tmp_path / "published" / VERSIONS_DIR).iterdir())

    assert process.returncode == 0, stderr[-5000:]
    assert running_while_polling == [" ".join(command)]
    assert stdout.splitlines() == [f"2 trainings; published students are in {tmp_path / 'published'}"]
    assert stderr.count("process of rank 1 joins the training") == 2
    assert "ERROR" not in stderr, stderr[-5000:]
    assert wait_for_no_process(str(tmp_path), timeout=60) == []
    assert len(versions) == 2
    assert state.trainings == 2
    assert state.trained_tiles == 48
    assert state.published == versions[-1] == resolve_checkpoint_dir(tmp_path / "published").name
    assert state.running is None
    assert load_student(resolve_checkpoint_dir(tmp_path / "published")).config["training"]["processes"] == 2
