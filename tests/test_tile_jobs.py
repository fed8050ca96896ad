"""``unite tile`` over many slides: slide sources, state records, locks, resuming, failures and workers.

The command runs as a real subprocess wherever processes matter (locks, kills, worker pools). The
slides are small synthetic TIFFs, plus the real slides where a real failure mode is needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from slide_data import CMU1, TCGA, TCGA_MPP_ESTIMATE
from synthetic_slides import GLASS, he_like, write_tiff_slide

from shared.errors import ConfigError
from shared.jobs import Job, JobFolder, JobOutcome, JobResult, JobState, JobSummary, run_jobs
from shared.slides.sources import SlideSource, collect_slides, read_slide_list
from shared.slides.tile_job import TileOptions, output_paths, slide_jobs, tile_slide_job
from unite_cli.pipeline import tile_to_patch_files

SUMMARY = re.compile(r"(\d+) slide\(s\): (\d+) done, (\d+) skipped \(done earlier\), (\d+) failed, (\d+) locked")
OUTPUT_KINDS = ("patches", "contours", "thumbnail", "visualization")


# Slides and runs.


def _good_slide(folder: Path, name: str, *, seed: int = 0, size: tuple[int, int] = (900, 1200)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_tiff_slide(folder / f"{name}.tif", he_like(*size, seed=seed), mpp=0.5)


def _truncated_slide(folder: Path, name: str) -> Path:
    path = _good_slide(folder, name, seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file_slide(folder: Path, name: str) -> Path:
    path = folder / f"{name}.svs"
    path.write_text("patient notes, not a slide\n")
    return path


def _blank_slide(folder: Path, name: str) -> Path:
    image = np.empty((900, 1200, 3), dtype=np.uint8)
    image[:] = GLASS
    return write_tiff_slide(folder / f"{name}.tif", image, mpp=0.5)


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Two good slides and three bad ones: truncated, a text file named .svs, and blank glass."""
    folder = tmp_path / "slides"
    _good_slide(folder, "good-a", seed=1)
    _good_slide(folder, "good-b", seed=2)
    _truncated_slide(folder, "truncated")
    _text_file_slide(folder, "notes")
    _blank_slide(folder, "blank")
    return folder


def _unite(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unite_cli.main", "tile", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start_unite(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unite_cli.main", "tile", *map(str, arguments)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _counts(stdout: str) -> dict[str, int]:
    match = SUMMARY.search(stdout)
    assert match is not None, f"no summary line in the output:\n{stdout}"
    total, done, skipped, failed, locked = map(int, match.groups())
    return {"total": total, "done": done, "skipped": skipped, "failed": failed, "locked": locked}


def _states(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "state").glob("*.json"))}


def _mtimes(out: Path, name: str) -> dict[str, int]:
    return {kind: path.stat().st_mtime_ns for kind, path in output_paths(out, name).items()}


# Slide sources.


def test_folder_source_takes_slide_files(tmp_path: Path) -> None:
    a = _good_slide(tmp_path, "a")
    b = _good_slide(tmp_path, "b", seed=1)
    (tmp_path / "labels.csv").write_text("slide,label\n")
    (tmp_path / "readme.txt").write_text("not a slide")
    nested = _good_slide(tmp_path / "more", "c", seed=2)

    flat = collect_slides([tmp_path])
    recursive = collect_slides([tmp_path], recursive=True)

    assert flat == [SlideSource(a), SlideSource(b)]
    assert [slide.path for slide in recursive] == [a, b, nested]


def test_glob_source_matches_files(tmp_path: Path) -> None:
    a = _good_slide(tmp_path, "case-1")
    _good_slide(tmp_path, "control-1", seed=1)
    nested = _good_slide(tmp_path / "sub", "case-2", seed=2)

    assert [slide.path for slide in collect_slides([str(tmp_path / "case-*.tif")])] == [a]
    assert [slide.path for slide in collect_slides([str(tmp_path / "**" / "case-*.tif")])] == [a, nested]


def test_csv_source_reads_paths_and_mpp(tmp_path: Path) -> None:
    a = _good_slide(tmp_path / "slides", "a")
    b = _good_slide(tmp_path / "slides", "b", seed=1)
    listing = tmp_path / "list.csv"
    listing.write_text(f"wsi,mpp,label\nslides/a.tif,0.25,tumour\n{b},,normal\n")

    slides = collect_slides([listing])

    assert slides == [SlideSource(a, 0.25), SlideSource(b, None)]
    assert slides[0].name == "a"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,mpp\na.tif,0.5\n", "no 'slide' or 'wsi' column"),
        ("slide,mpp\n,0.5\n", "row 2: the 'slide' cell is empty"),
        ("slide,mpp\na.tif,fast\n", "row 2: mpp='fast'"),
        ("slide,mpp\na.tif,0.5\nb.tif,1000\n", "row 3: mpp='1000'"),
    ],
    ids=["no-slide-column", "empty-slide", "mpp-not-number", "mpp-implausible"],
)
def test_csv_source_errors_name_row(tmp_path: Path, text: str, message: str) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(text)

    with pytest.raises(ConfigError) as raised:
        read_slide_list(listing)

    assert message in raised.value.message
    assert str(listing) in raised.value.message


def test_duplicate_names_rejected(tmp_path: Path) -> None:
    first = _good_slide(tmp_path / "site-1", "slide")
    second = _good_slide(tmp_path / "site-2", "slide", seed=1)

    with pytest.raises(ConfigError) as raised:
        collect_slides([tmp_path / "site-1", tmp_path / "site-2"])

    assert str(first) in raised.value.message
    assert str(second) in raised.value.message
    assert "--out" in raised.value.message


def test_same_file_twice_is_one_slide(tmp_path: Path) -> None:
    path = _good_slide(tmp_path, "a")

    assert collect_slides([path, tmp_path, str(tmp_path / "*.tif")]) == [SlideSource(path)]


def test_empty_and_missing_sources_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(ConfigError, match="no slide found in") as empty:
        collect_slides([tmp_path / "empty", str(tmp_path / "*.svs")])
    with pytest.raises(ConfigError, match="not found") as missing:
        collect_slides([tmp_path / "no-such.svs"])

    assert str(tmp_path / "empty") in empty.value.message
    assert str(tmp_path / "no-such.svs") in missing.value.message


# State records and locks.


def test_lock_excludes_second_holder(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path)
    folder.create()

    first = folder.try_lock("slide")
    second = folder.try_lock("slide")
    other = folder.try_lock("other-slide")
    first.release()
    third = folder.try_lock("slide")

    assert first is not None
    assert second is None
    assert other is not None
    assert third is not None


def test_lock_released_when_holder_killed(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path)
    folder.create()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from shared.jobs import JobFolder
            lock = JobFolder({str(tmp_path)!r}).try_lock("slide")
            print("locked" if lock else "busy", flush=True)
            time.sleep(300)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert folder.try_lock("slide") is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)

    assert folder.try_lock("slide") is not None


def test_state_round_trip_leaves_no_temp(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path)
    folder.create()
    state = JobState(name="slide", source="/data/slide.svs", status="failed", reason="damaged", message="short read",
                     attempts=2, outputs={"thumbnail": "thumbnails/slide.jpg"}, config={"patch_size": 224})

    path = folder.write_state(state)

    assert path == tmp_path / "state" / "slide.json"
    assert folder.read_state("slide") == state
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["slide.json"]


def test_unreadable_state_is_ignored(tmp_path: Path, caplog) -> None:
    folder = JobFolder(tmp_path)
    folder.create()
    folder.state_path("slide").write_text("{not json")

    assert folder.read_state("slide") is None
    assert "slide.json" in caplog.text


# Jobs run in this process and in worker pools. The tasks are module-level so worker processes can unpickle them.


def _marker_task(job: Job, out_dir: Path) -> JobResult:
    if job.payload == "raise":
        raise ValueError(f"bad value in {job.name}")
    if job.payload == "config":
        raise ConfigError(f"{job.name}: invalid option")
    if job.payload == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    path = Path(out_dir) / "markers" / f"{job.name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{job.name} {os.getpid()}\n")
    return JobResult(outputs={"marker": path}, details={"pid": os.getpid()})


def test_run_jobs_records_each_error_kind(tmp_path: Path, caplog) -> None:
    jobs = [Job("ok", "ok"), Job("bug", "bug", payload="raise"), Job("option", "option", payload="config")]

    summary = run_jobs(jobs, _marker_task, out_dir=tmp_path, progress=False)
    states = _states(tmp_path)

    assert summary.done == ["ok"]
    assert summary.failed_by_reason() == {"internal_error": ["bug"], "invalid_config": ["option"]}
    assert summary.exit_status == 1
    assert states["ok"]["status"] == "done"
    assert states["ok"]["outputs"] == {"marker": "markers/ok.txt"}
    assert states["bug"]["reason"] == "internal_error"
    assert states["bug"]["message"] == "ValueError: bad value in bug"
    assert states["option"]["reason"] == "invalid_config"
    assert "Traceback" in caplog.text  # the internal error's traceback is logged
    assert "bad value in bug" in caplog.text


def test_run_jobs_redoes_done_job_without_outputs(tmp_path: Path) -> None:
    jobs = [Job("a", "a"), Job("b", "b")]
    run_jobs(jobs, _marker_task, out_dir=tmp_path, progress=False)
    (tmp_path / "markers" / "b.txt").unlink()

    summary = run_jobs(jobs, _marker_task, out_dir=tmp_path, progress=False)

    assert summary.skipped == ["a"]
    assert summary.done == ["b"]
    assert _states(tmp_path)["b"]["attempts"] == 2
    assert (tmp_path / "markers" / "b.txt").is_file()


def test_run_jobs_rejects_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="same job name 'a'"):
        run_jobs([Job("a", "/x/a.svs"), Job("a", "/y/a.svs")], _marker_task, out_dir=tmp_path, progress=False)


def test_worker_pool_runs_every_job(tmp_path: Path) -> None:
    jobs = [Job(f"job-{index}", f"job-{index}") for index in range(5)] + [Job("bug", "bug", payload="raise")]

    summary = run_jobs(jobs, _marker_task, out_dir=tmp_path, workers=2, progress=False)
    states = _states(tmp_path)
    worker_pids = {states[f"job-{index}"]["details"]["pid"] for index in range(5)}

    assert sorted(summary.done) == [f"job-{index}" for index in range(5)]
    assert [outcome.name for outcome in summary.failed] == ["bug"]
    assert states["bug"]["reason"] == "internal_error"
    assert os.getpid() not in worker_pids


def test_dead_worker_recorded_as_failed(tmp_path: Path) -> None:
    jobs = [Job("die", "die", payload="die")] + [Job(f"job-{index}", f"job-{index}") for index in range(4)]

    summary = run_jobs(jobs, _marker_task, out_dir=tmp_path, workers=2, progress=False)
    state = _states(tmp_path)["die"]

    assert sorted(summary.done) == [f"job-{index}" for index in range(4)]
    assert [(outcome.name, outcome.reason) for outcome in summary.failed] == [("die", "internal_error")]
    assert state["status"] == "failed"
    assert "worker process died" in state["message"]
    assert state["attempts"] == 2


def test_summary_lists_failures_by_reason() -> None:
    summary = JobSummary()
    for outcome in [
        JobOutcome("a", "done"),
        JobOutcome("b", "skipped"),
        JobOutcome("c", "locked"),
        JobOutcome("d", "failed", "damaged", "slide d: short read"),
        JobOutcome("e", "failed", "no_tissue", "slide e: no tissue", earlier=True),
    ]:
        summary.add(outcome)

    lines = summary.format().splitlines()

    assert lines[0] == "5 slide(s): 1 done, 1 skipped (done earlier), 2 failed, 1 locked by another process"
    assert lines[1] == "failed by reason: damaged 1, no_tissue 1"
    assert lines[2] == "  d (damaged): slide d: short read"
    assert lines[3] == "  e (no_tissue, in an earlier run): slide e: no tissue"
    assert "--retry-failed" in lines[4]
    assert summary.exit_status == 1


def test_summary_without_failures_exits_zero() -> None:
    summary = JobSummary()
    summary.add(JobOutcome("a", "done"))
    summary.add(JobOutcome("b", "locked"))

    assert summary.exit_status == 0


# The tiling job on one slide.


def test_tile_job_writes_every_output(tmp_path: Path) -> None:
    path = _good_slide(tmp_path / "slides", "slide-1")
    options = TileOptions(edge="pad")
    job, = slide_jobs(collect_slides([path]), options, mpp=0.5)

    result = tile_slide_job(job, tmp_path / "out", options=options)

    assert result.outputs == output_paths(tmp_path / "out", "slide-1")
    with h5py.File(result.outputs["patches"], "r") as file:
        coords = file["coords"][()]
        attrs = dict(file["coords"].attrs)
    geojson = json.loads(result.outputs["contours"].read_text())
    thumbnail = Image.open(result.outputs["thumbnail"])
    overlay = Image.open(result.outputs["visualization"])

    assert len(coords) == result.details["patches"] > 0
    assert attrs["name"] == "slide-1"
    assert attrs["edge"] == "pad"
    assert attrs["mpp"] == 0.5
    assert result.details["mpp_source"] == "override"
    assert geojson["type"] == "FeatureCollection"
    assert len(geojson["features"]) >= 1
    assert thumbnail.format == overlay.format == "JPEG"
    assert thumbnail.size == overlay.size
    assert job.config["mpp_override"] == 0.5
    assert job.config["edge"] == "pad"
    assert "read_workers" not in job.config


def test_slide_jobs_pick_mpp_override(tmp_path: Path) -> None:
    from shared.slides.resolution import MppTable

    a = _good_slide(tmp_path, "a")
    b = _good_slide(tmp_path, "b", seed=1)
    c = _good_slide(tmp_path, "c", seed=2)
    table_path = tmp_path / "mpp.csv"
    table_path.write_text("slide,mpp\nb.tif,0.3\nc.tif,0.4\n")
    slides = [SlideSource(a), SlideSource(b), SlideSource(c, 0.25)]

    jobs = slide_jobs(slides, TileOptions(), mpp=0.5, mpp_table=MppTable.from_csv(table_path))

    # The slide list's value comes first, then the mpp CSV, then --mpp.
    assert [job.payload.mpp for job in jobs] == [0.5, 0.3, 0.25]
    assert [job.config["mpp_override"] for job in jobs] == [0.5, 0.3, 0.25]


def test_tile_to_patch_files_still_works(slides_dir: Path, tmp_path: Path) -> None:
    paths = tile_to_patch_files([slides_dir / CMU1], tmp_path, mpp=None, patch_size=224, target_mpp=0.5)

    assert paths == [tmp_path / "patches" / "CMU-1-Small-Region_patches.h5"]
    with h5py.File(paths[0], "r") as file:
        assert file["coords"].shape[0] > 50


# `unite tile` as a real command.


def test_tile_records_bad_slides(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = _unite(mixed_folder, "--out", out)
    states = _states(out)

    assert result.returncode == 1, result.stderr
    assert _counts(result.stdout) == {"total": 5, "done": 2, "skipped": 0, "failed": 3, "locked": 0}
    assert "failed by reason: damaged 1, no_tissue 1, unreadable 1" in result.stdout
    assert sorted(states) == ["blank", "good-a", "good-b", "notes", "truncated"]
    expected = {"good-a": ("done", None), "good-b": ("done", None), "truncated": ("failed", "damaged"),
                "notes": ("failed", "unreadable"), "blank": ("failed", "no_tissue")}
    for name, (status, reason) in expected.items():
        assert (states[name]["status"], states[name]["reason"]) == (status, reason), name
        assert states[name]["attempts"] == 1
        assert states[name]["source"].startswith(str(mixed_folder))
    for name in ("truncated", "notes", "blank"):
        assert str(mixed_folder / Path(states[name]["source"]).name) in states[name]["message"]
        assert f"  {name} ({states[name]['reason']}): " in result.stdout
    for name in ("good-a", "good-b"):
        assert sorted(states[name]["outputs"]) == sorted(OUTPUT_KINDS)
        for relative in states[name]["outputs"].values():
            assert (out / relative).is_file()
        assert states[name]["details"]["patches"] > 0
        assert states[name]["details"]["mpp_source"] == "tiff-resolution"
    assert not (out / "patches" / "truncated_patches.h5").exists()


def test_rerun_skips_done_and_failed(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _unite(mixed_folder, "--out", out)
    before = {name: _mtimes(out, name) for name in ("good-a", "good-b")}

    again = _unite(mixed_folder, "--out", out)
    states_again = _states(out)
    retried = _unite(mixed_folder, "--out", out, "--retry-failed")
    states_retried = _states(out)

    assert again.returncode == 1
    assert _counts(again.stdout) == {"total": 5, "done": 0, "skipped": 2, "failed": 3, "locked": 0}
    assert "(damaged, in an earlier run)" in again.stdout
    assert "--retry-failed" in again.stdout
    assert {name: _mtimes(out, name) for name in ("good-a", "good-b")} == before
    assert all(state["attempts"] == 1 for state in states_again.values())
    assert retried.returncode == 1
    assert _counts(retried.stdout) == {"total": 5, "done": 0, "skipped": 2, "failed": 3, "locked": 0}
    assert "in an earlier run" not in retried.stdout
    assert [states_retried[name]["attempts"] for name in ("blank", "notes", "truncated")] == [2, 2, 2]
    assert [states_retried[name]["attempts"] for name in ("good-a", "good-b")] == [1, 1]


def test_changed_options_on_done_slides_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    _good_slide(folder, "a")
    out = tmp_path / "out"
    _unite(folder, "--out", out)

    result = _unite(folder, "--out", out, "--patch-size", "256")

    assert result.returncode == 2
    assert "a (patch_size 224 -> 256)" in result.stderr
    assert "--out" in result.stderr
    assert _states(out)["a"]["config"]["patch_size"] == 224


def test_failed_slide_retried_with_new_mpp(slides_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sources = [slides_dir / CMU1, slides_dir / TCGA]
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text(f"slide,mpp\n{TCGA},{TCGA_MPP_ESTIMATE}\n")

    first = _unite(*sources, "--out", out)
    first_states = _states(out)
    second = _unite(*sources, "--out", out, "--mpp-csv", mpp_csv)
    tcga = _states(out)["tcga-cr-7395-01a-01-ts1"]

    assert first.returncode == 1
    assert first_states["tcga-cr-7395-01a-01-ts1"]["reason"] == "no_resolution"
    assert "--mpp" in first_states["tcga-cr-7395-01a-01-ts1"]["message"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert _counts(second.stdout) == {"total": 2, "done": 1, "skipped": 1, "failed": 0, "locked": 0}
    assert tcga["status"] == "done"
    assert tcga["attempts"] == 2
    assert tcga["details"]["mpp"] == TCGA_MPP_ESTIMATE
    assert tcga["details"]["mpp_source"] == "override"


def test_held_lock_leaves_slide_alone(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    _good_slide(folder, "a")
    _good_slide(folder, "b", seed=1)
    out = tmp_path / "out"
    jobs = JobFolder(out)
    jobs.create()
    lock = jobs.try_lock("a")

    result = _unite(folder, "--out", out)
    lock.release()

    assert result.returncode == 0, result.stderr
    assert _counts(result.stdout) == {"total": 2, "done": 1, "skipped": 0, "failed": 0, "locked": 1}
    assert sorted(_states(out)) == ["b"]
    assert not (out / "patches" / "a_patches.h5").exists()


def test_two_processes_share_slides(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    for index in range(6):
        _good_slide(folder, f"slide-{index}", seed=index)
    out = tmp_path / "out"

    processes = [_start_unite(folder, "--out", out) for _ in range(2)]
    results = [(process.communicate(timeout=300), process.returncode) for process in processes]
    counts = [_counts(stdout) for (stdout, _), _ in results]
    states = _states(out)

    assert [code for _, code in results] == [0, 0], [stderr for (_, stderr), _ in results]
    # Each slide is tiled by exactly one of the two processes; the other skips it or finds it locked.
    assert counts[0]["done"] + counts[1]["done"] == 6
    for count in counts:
        assert count["done"] + count["skipped"] + count["locked"] == 6
        assert count["failed"] == 0
    assert sorted(states) == [f"slide-{index}" for index in range(6)]
    assert all(state["status"] == "done" for state in states.values())
    assert all(state["attempts"] == 1 for state in states.values())


def test_killed_run_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    names = [f"slide-{index}" for index in range(6)]
    for index, name in enumerate(names):
        _good_slide(folder, name, seed=index, size=(1200, 1500))
    out = tmp_path / "out"

    process = _start_unite(folder, "--out", out)
    deadline = time.monotonic() + 240
    while not any(state["status"] == "done" for state in _states_if_any(out).values()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no slide finished within 240 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)

    killed_states = _states(out)
    done_before = sorted(name for name, state in killed_states.items() if state["status"] == "done")
    running_before = sorted(name for name, state in killed_states.items() if state["status"] == "running")
    mtimes_before = {name: _mtimes(out, name) for name in done_before}
    assert 0 < len(done_before) < len(names), "the run finished before it was killed"

    resumed = _unite(folder, "--out", out)
    states = _states(out)

    assert resumed.returncode == 0, resumed.stderr
    assert _counts(resumed.stdout) == {
        "total": 6, "done": 6 - len(done_before), "skipped": len(done_before), "failed": 0, "locked": 0,
    }
    assert all(state["status"] == "done" for state in states.values())
    assert {name: _mtimes(out, name) for name in done_before} == mtimes_before
    for name in done_before:
        assert states[name]["attempts"] == 1
    for name in running_before:
        assert states[name]["attempts"] == 2
    assert list(out.rglob("*.partial")) == []


def _states_if_any(out: Path) -> dict[str, dict]:
    return _states(out) if (out / "state").is_dir() else {}


def test_worker_processes_match_serial(mixed_folder: Path, tmp_path: Path) -> None:
    serial = _unite(mixed_folder, "--out", tmp_path / "serial")
    parallel = _unite(mixed_folder, "--out", tmp_path / "parallel", "--workers", "2")
    serial_states = _states(tmp_path / "serial")
    parallel_states = _states(tmp_path / "parallel")

    assert parallel.returncode == serial.returncode == 1
    assert _counts(parallel.stdout) == _counts(serial.stdout)
    for name, state in serial_states.items():
        assert parallel_states[name]["status"] == state["status"], name
        assert parallel_states[name]["reason"] == state["reason"], name
        assert parallel_states[name]["details"].get("patches") == state["details"].get("patches"), name
    for name in ("good-a", "good-b"):
        with h5py.File(tmp_path / "serial" / "patches" / f"{name}_patches.h5", "r") as serial_file, h5py.File(
            tmp_path / "parallel" / "patches" / f"{name}_patches.h5", "r"
        ) as parallel_file:
            assert (serial_file["coords"][()] == parallel_file["coords"][()]).all()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--overlap", "224"], "overlap=224"),
        (["--target-mag", "0"], "target_magnification=0"),
        (["--min-tissue", "2"], "min_tissue_fraction=2"),
        (["--mpp", "1000"], "--mpp 1000"),
        (["--workers", "0"], "workers=0"),
        (["--read-workers", "0"], "read_workers=0"),
        (["--min-area-um2", "-1"], "min_area_um2=-1"),
    ],
    ids=["overlap", "magnification", "min-tissue", "mpp", "workers", "read-workers", "min-area"],
)
def test_invalid_options_exit_2(tmp_path: Path, arguments: list[str], message: str) -> None:
    slide = _good_slide(tmp_path / "slides", "a")

    result = _unite(slide, "--out", tmp_path / "out", *arguments)

    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out" / "state" / "a.json").exists()


def test_exclusive_options_rejected(tmp_path: Path) -> None:
    slide = _good_slide(tmp_path / "slides", "a")

    both_targets = _unite(slide, "--out", tmp_path / "out", "--target-mpp", "0.5", "--target-mag", "20")
    both_mpps = _unite(slide, "--out", tmp_path / "out", "--mpp", "0.5", "--mpp-csv", tmp_path / "x.csv")

    assert both_targets.returncode == 2
    assert "not allowed with argument" in both_targets.stderr
    assert both_mpps.returncode == 2
    assert "not allowed with argument" in both_mpps.stderr

