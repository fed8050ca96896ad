"""``unite tile`` over many slides: slide sources, state records, locks, resuming, failures and workers.

The command runs as a real subprocess wherever processes matter (locks, kills, worker pools). The
slides are small synthetic TIFFs, plus the real slides where a real failure mode is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
from shared.jobs import Job, JobFolder, JobOutcome, JobResult, JobState, JobSummary, WriteError, format_count, run_jobs
from shared.slides.sources import SlideSource, collect_slides, read_slide_list
from shared.slides.tile_job import TileOptions, output_paths, slide_jobs, tile_slide_job
from unite_cli.pipeline import tile_to_patch_files

SUMMARY = re.compile(r"(\d+) slides?: (\d+) done, (\d+) skipped \(done earlier\), (\d+) failed, (\d+) locked")
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
        ("slide,mpp\na.tif,fast\n", "row 2: mpp 'fast' is not a resolution"),
        ("slide,mpp\na.tif,0.5\nb.tif,1000\n", "row 3: mpp '1000' is not a resolution"),
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


@pytest.mark.parametrize("source", ["", "   "], ids=["empty", "blank"])
def test_empty_source_rejected(tmp_path: Path, monkeypatch, source: str) -> None:
    _good_slide(tmp_path, "in-current-folder")
    monkeypatch.chdir(tmp_path)  # Path("") is the current folder, whose slide must not be taken

    with pytest.raises(ConfigError, match="is empty") as raised:
        collect_slides([source])

    assert repr(source) in raised.value.message


def test_single_string_is_one_source(tmp_path: Path) -> None:
    path = _good_slide(tmp_path, "a")

    assert collect_slides(str(path)) == [SlideSource(path)]
    assert collect_slides(path) == [SlideSource(path)]


def test_first_listing_names_slide(tmp_path: Path) -> None:
    path = _good_slide(tmp_path / "site", "s1")
    link = tmp_path / "links" / "link_s1.tif"
    link.parent.mkdir()
    link.symlink_to(path)
    listing = tmp_path / "list.csv"
    listing.write_text(f"slide,mpp\n{link},0.25\n")

    by_file = collect_slides([path, link])
    with_csv_mpp = collect_slides([path, listing])
    link_first = collect_slides([link, path])

    assert by_file == [SlideSource(path)]
    assert with_csv_mpp == [SlideSource(path, 0.25)]  # the path of the first listing, the CSV's resolution
    assert link_first == [SlideSource(link)]


def test_csv_unclosed_quote_rejected(tmp_path: Path) -> None:
    _good_slide(tmp_path, "s1")
    listing = tmp_path / "list.csv"
    listing.write_text('slide,mpp\ns1.tif,0.5\n"s1.tif,0.25\n')

    with pytest.raises(ConfigError) as raised:
        read_slide_list(listing)

    assert f"slide list {listing}, line 3" in raised.value.message
    assert "quote" in raised.value.message


def test_csv_extra_cells_rejected(tmp_path: Path) -> None:
    a = _good_slide(tmp_path, "a")
    listing = tmp_path / "list.csv"
    listing.write_text("slide,mpp\na.tif,0.5,tumour\n")
    trailing_comma = tmp_path / "trailing.csv"
    trailing_comma.write_text("slide,mpp\na.tif,0.5,\n")

    with pytest.raises(ConfigError) as raised:
        read_slide_list(listing)

    assert f"slide list {listing}, row 2" in raised.value.message
    assert "'tumour'" in raised.value.message
    assert read_slide_list(trailing_comma) == [SlideSource(a, 0.5)]


def test_excluded_folder_not_collected(tmp_path: Path) -> None:
    slide = _good_slide(tmp_path, "s1")
    _good_slide(tmp_path / "out" / "thumbnails", "s1")

    from_folder = collect_slides([tmp_path], recursive=True, exclude=[tmp_path / "out" / "thumbnails"])
    from_glob = collect_slides([str(tmp_path / "**" / "*.tif")], exclude=[tmp_path / "out" / "thumbnails"])

    assert from_folder == [SlideSource(slide)]
    assert from_glob == [SlideSource(slide)]


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


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"attempts": "one"}, "'attempts' is 'one'"),
        ({"attempts": True}, "'attempts' is True"),
        ({"attempts": -1}, "'attempts' is -1"),
        ({"config": None}, "'config' is None"),
        ({"status": "finished"}, "'status' is 'finished'"),
        ({"outputs": {"patches": 3}}, "'outputs'"),
        ({"name": "other-slide"}, "'name' is 'other-slide'"),
        ({"colour": "blue"}, "unknown fields ['colour']"),
        ({"seconds": float("inf")}, "Infinity is not a JSON number"),
    ],
    ids=["attempts-text", "attempts-bool", "attempts-negative", "config-null", "unknown-status", "output-number",
         "other-name", "unknown-field", "infinity"],
)
def test_state_with_wrong_types_ignored(tmp_path: Path, caplog, change: dict, problem: str) -> None:
    folder = JobFolder(tmp_path)
    folder.create()
    record = {**json.loads(json.dumps(JobState(name="slide", status="done", attempts=1).__dict__)), **change}
    folder.state_path("slide").write_text(json.dumps(record))

    assert folder.read_state("slide") is None
    assert problem in caplog.text


def test_state_checks_cover_every_field() -> None:
    from dataclasses import fields

    from shared.jobs import _STATE_FIELD_TYPES

    assert set(_STATE_FIELD_TYPES) == {item.name for item in fields(JobState)}


def test_state_non_finite_written_as_null(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path)
    folder.create()
    state = JobState(name="slide", status="done", details={"tissue_fraction": float("nan")},
                     config={"min_area_um2": float("inf"), "sizes": (224, 256)})

    folder.write_state(state)
    record = json.loads(folder.state_path("slide").read_text(), parse_constant=lambda constant: pytest.fail(constant))

    assert record["details"] == {"tissue_fraction": None}
    assert record["config"] == {"min_area_um2": None, "sizes": [224, 256]}


def test_state_write_error_names_cause(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path)
    folder.create()
    folder.state_path("slide").mkdir()  # a folder in the way of the record

    with pytest.raises(WriteError) as raised:
        folder.write_state(JobState(name="slide"))

    assert raised.value.code == "write_failed"
    assert str(folder.state_path("slide")) in raised.value.message
    assert "a folder is in the way" in raised.value.message
    assert list(folder.state_dir.glob("*.partial")) == []


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


def test_run_jobs_reruns_invalid_record(tmp_path: Path) -> None:
    jobs = [Job("a", "a", config={"patch_size": 224}), Job("b", "b", config={"patch_size": 224})]
    JobFolder(tmp_path).create()
    (tmp_path / "state" / "a.json").write_text(json.dumps(
        {"name": "a", "status": "failed", "attempts": "one", "config": {"patch_size": 225}}
    ))
    (tmp_path / "state" / "b.json").write_text(json.dumps({"name": "b", "status": "done", "attempts": 1, "config": None}))

    summary = run_jobs(jobs, _marker_task, out_dir=tmp_path, progress=False)
    states = _states(tmp_path)

    assert sorted(summary.done) == ["a", "b"]
    assert states["a"]["attempts"] == 1
    assert states["b"]["config"] == {"patch_size": 224}


def _finish_other_job_task(job: Job, out_dir: Path) -> JobResult:
    """Tile job "first", and meanwhile record "second" as done with other options, as a concurrent run would."""
    if job.name == "first":
        other = JobState(name="second", source="second", status="done", attempts=1, run_id="other-run",
                         worker="host:1", config={"overlap": 10}, outputs={"marker": "markers/second.txt"})
        JobFolder(out_dir).write_state(other)
    return _marker_task(job, out_dir)


def test_done_by_other_run_left_alone(tmp_path: Path) -> None:
    jobs = [Job("first", "first", config={"overlap": 0}), Job("second", "second", config={"overlap": 0})]

    summary = run_jobs(jobs, _finish_other_job_task, out_dir=tmp_path, progress=False)
    second = _states(tmp_path)["second"]

    assert summary.done == ["first"]
    assert [(outcome.name, outcome.reason) for outcome in summary.failed] == [("second", "other_options")]
    assert "overlap 10 -> 0" in summary.failed[0].message
    assert summary.exit_status == 1
    assert (second["run_id"], second["config"], second["attempts"]) == ("other-run", {"overlap": 10}, 1)
    assert not (tmp_path / "markers" / "second.txt").exists()  # this run never tiled it


def test_run_jobs_unusable_folder_rejected(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state folder goes\n")

    with pytest.raises(ConfigError) as raised:
        run_jobs([Job("a", "a")], _marker_task, out_dir=tmp_path, progress=False)

    assert f"output folder {tmp_path} cannot be used" in raised.value.message
    assert "a file is in the way" in raised.value.message
    assert not (tmp_path / "markers").exists()


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

    assert lines[0] == "5 slides: 1 done, 1 skipped (done earlier), 2 failed, 1 locked by another process"
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


def test_summary_of_one_slide_is_singular() -> None:
    summary = JobSummary()
    summary.add(JobOutcome("a", "done"))

    assert summary.format().splitlines()[0] == "1 slide: 1 done, 0 skipped (done earlier), 0 failed, 0 locked by another process"


def test_format_count_plurals() -> None:
    assert format_count(0, "slide") == "0 slides"
    assert format_count(1, "slide") == "1 slide"
    assert format_count(2, "slide") == "2 slides"
    assert format_count(1, "patch", "patches") == "1 patch"
    assert format_count(3, "patch", "patches") == "3 patches"


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



# Write errors, option bounds and concurrent runs through `unite tile`.


def test_long_names_fail_alone(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    good = _good_slide(folder, "good")
    # A 243-character name fits its lock file but not state/NAME.json.partial (256 bytes), and a
    # 251-character one fits the slide file but not locks/NAME.lock; most file systems allow 255.
    for length in (243, 251):
        os.link(good, folder / f"{'x' * length}.tif")
    out = tmp_path / "out"

    result = _unite(folder, "--out", out)
    states = _states(out)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert _counts(result.stdout) == {"total": 3, "done": 1, "skipped": 0, "failed": 2, "locked": 0}
    assert "failed by reason: write_failed 2" in result.stdout
    assert "the file name is longer than the file system allows" in result.stdout
    assert "Rename the source to a shorter name" in result.stdout
    assert sorted(states) == ["good"]
    assert states["good"]["status"] == "done"


def test_blocked_outputs_fail_slide(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    for index, name in enumerate(("a", "b", "c")):
        _good_slide(folder, name, seed=index)
    out = tmp_path / "out"
    # Folders in the way of a's contours and of b's patch file make those writes fail.
    output_paths(out, "a")["contours"].mkdir(parents=True)
    output_paths(out, "b")["patches"].mkdir(parents=True)

    result = _unite(folder, "--out", out)
    states = _states(out)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [states[name]["status"] for name in ("a", "b", "c")] == ["failed", "failed", "done"]
    assert states["a"]["reason"] == states["b"]["reason"] == "write_failed"
    assert f"slide a: writing {output_paths(out, 'a')['contours']} failed: a folder is in the way" in states["a"]["message"]
    assert f"slide b: writing {output_paths(out, 'b')['patches']} failed: a folder is in the way" in states["b"]["message"]


def test_unusable_out_exits_2(tmp_path: Path) -> None:
    slide = _good_slide(tmp_path / "slides", "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "locks").write_text("a file where the lock folder goes\n")

    result = _unite(slide, "--out", out)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"output folder {out} cannot be used" in result.stderr
    assert "Move that file away" in result.stderr
    assert not (out / "state" / "a.json").exists()


def test_read_only_state_folder_exits_2(tmp_path: Path) -> None:
    slide = _good_slide(tmp_path / "slides", "a")
    out = tmp_path / "out"
    (out / "state").mkdir(parents=True)
    (out / "state").chmod(0o555)
    made_immutable = False
    if os.access(out / "state", os.W_OK):
        # root writes to a read-only folder anyway, but not to an immutable one, as on a shared folder.
        made_immutable = shutil.which("chattr") is not None and subprocess.run(
            ["chattr", "+i", str(out / "state")], capture_output=True
        ).returncode == 0
        if not made_immutable:
            (out / "state").chmod(0o755)
            pytest.skip("this user can write to a read-only folder and chattr +i is not available here")
    try:
        result = _unite(slide, "--out", out)
    finally:
        if made_immutable:
            subprocess.run(["chattr", "-i", str(out / "state")], check=True)
        (out / "state").chmod(0o755)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"output folder {out} cannot be used, because writing in {out / 'state'} failed" in result.stderr


def test_full_disk_fails_each_slide(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    for index in range(3):
        _good_slide(folder, f"slide-{index}", seed=index)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs as a full disk here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "out"
        for folder_name in ("state", "locks"):
            (out / folder_name).mkdir(parents=True)
        # Leave about 8 KiB free: the write check of the job folder passes, the slides' outputs do not fit.
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(0, free - 8192))

        result = _unite(folder, "--out", out)
        states = _states(out)
    finally:
        subprocess.run(["umount", str(disk)], check=True)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert _counts(result.stdout)["failed"] == 3
    assert "failed by reason: write_failed 3" in result.stdout
    assert "the disk is full" in result.stdout
    assert all(state["status"] in ("running", "failed") for state in states.values())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--patch-size", "60000"], "patch_size=60000 must be a whole number of pixels at the target resolution from 1 to 4096"),
        (["--target-mag", "1e-6"], "target_magnification=1e-06 must be an objective power from 0.5 to 200"),
        (["--target-mpp", "1e-6"], "target_mpp=1e-06 must be a resolution from 0.05 to 20 µm/px"),
        (["--min-area-um2", "inf"], "min_area_um2=inf must be an area in µm² from 0 to 1e+10"),
        (["--workers", "1000"], "workers=1000 must be a whole number of worker processes from 1 to 256"),
        (["--read-workers", "100"], "read_workers=100 must be a whole number of reader threads from 1 to 64"),
    ],
    ids=["patch-size", "target-mag", "target-mpp", "min-area", "workers", "read-workers"],
)
def test_options_above_limit_exit_2(tmp_path: Path, arguments: list[str], message: str) -> None:
    slide = _good_slide(tmp_path / "slides", "a")

    result = _unite(slide, "--out", tmp_path / "out", *arguments)

    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out" / "state" / "a.json").exists()


def test_help_states_checked_limits() -> None:
    from shared import jobs
    from shared.slides import grid, tiling
    from unite_cli import slide_options, tile

    assert slide_options.MAX_PATCH_SIZE == grid.MAX_PATCH_SIZE
    assert slide_options.TARGET_MPP_RANGE == (grid.MIN_TARGET_MPP, grid.MAX_TARGET_MPP)
    assert slide_options.TARGET_MAG_RANGE == (grid.MIN_TARGET_MAGNIFICATION, grid.MAX_TARGET_MAGNIFICATION)
    assert slide_options.MAX_MIN_AREA_UM2 == tiling.MAX_MIN_AREA_UM2
    assert tile.MAX_WORKERS == jobs.MAX_WORKERS
    assert tile.MAX_READ_WORKERS == tiling.MAX_READ_WORKERS


def test_default_target_given_is_same_options() -> None:
    default = TileOptions().output_config()

    assert TileOptions(target_mpp=0.5).output_config() == default
    assert TileOptions(target_magnification=20).output_config() == default
    assert default["target_mpp"] == 0.5
    assert "target_magnification" not in default
    assert TileOptions(target_magnification=40).output_config()["target_mpp"] == 0.25


def test_out_inside_recursive_source_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    _good_slide(folder, "s1")
    out = folder / "out"

    first = _unite(folder, "--recursive", "--out", out)
    second = _unite(folder, "--recursive", "--out", out)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert _counts(second.stdout) == {"total": 1, "done": 0, "skipped": 1, "failed": 0, "locked": 0}


# Signals: worker processes must not outlive the run, and an interrupted run reports what it did.

SLEEPING_TASK = textwrap.dedent("""
    import os
    import time
    from pathlib import Path

    from shared.jobs import JobResult


    def sleeping_task(job, out_dir):
        started = Path(out_dir) / "started"
        started.mkdir(exist_ok=True)
        (started / job.name).write_text(str(os.getpid()))
        time.sleep(600)
        return JobResult(outputs={})
""")

JOB_RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path

    from shared.jobs import Job, RunInterrupted, run_jobs
    from sleeping_task import sleeping_task

    jobs = [Job(f"job-{index}", f"job-{index}") for index in range(4)]
    try:
        run_jobs(jobs, sleeping_task, out_dir=Path(sys.argv[1]), workers=2, progress=False)
    except RunInterrupted as interrupted:
        print(interrupted.summary.format(), flush=True)
        sys.exit(interrupted.exit_status)
""")


def _process_alive(pid: int) -> bool:
    """Return False once the process has exited, whether or not its new parent has reaped it yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_for_exit(pids: list[int], limit: float = 60) -> list[int]:
    """Return the pids still running after they had up to ``limit`` seconds to exit."""
    deadline = time.monotonic() + limit
    while any(_process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _process_alive(pid)]


def _start_sleeping_run(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start run_jobs with 2 workers whose tasks sleep, and return the process and its workers' pids."""
    (tmp_path / "sleeping_task.py").write_text(SLEEPING_TASK)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-c", JOB_RUNNER, str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True,
    )
    started = tmp_path / "out" / "started"
    deadline = time.monotonic() + 120
    while len(list(started.glob("job-*"))) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the workers did not start their jobs within 120 s"
        time.sleep(0.05)
    time.sleep(0.1)  # let both markers be written whole
    return process, [int(path.read_text()) for path in started.glob("job-*")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_workers_die_with_killed_parent(tmp_path: Path) -> None:
    process, workers = _start_sleeping_run(tmp_path)
    assert all(_process_alive(pid) for pid in workers)

    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)

    assert _wait_for_exit(workers) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_sigterm_stops_workers(tmp_path: Path) -> None:
    process, workers = _start_sleeping_run(tmp_path)

    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    states = _states(tmp_path / "out")

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert _counts(stdout)["total"] == 0
    assert "interrupted: 4 slides not finished" in stdout
    assert [pid for pid in workers if _process_alive(pid)] == []
    assert sorted(name for name, state in states.items() if state["status"] == "running") == sorted(
        path.name for path in (tmp_path / "out" / "started").iterdir()
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_summary(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    # Enough slides that the run cannot finish between the first finished slide and the signal.
    names = [f"slide-{index}" for index in range(30)]
    for index, name in enumerate(names):
        _good_slide(folder, name, seed=index, size=(1200, 1500))
    out = tmp_path / "out"

    # A new session, so that the signal below goes to the run and its workers, as a terminal's Ctrl-C does.
    process = subprocess.Popen(
        [sys.executable, "-m", "unite_cli.main", "tile", str(folder), "--out", str(out), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # A child inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt handler. Code that
        # ran earlier in this test process may have ignored it, so the child starts with the default again.
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 240
    while not any(state["status"] == "done" for state in _states_if_any(out).values()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no slide finished within 240 s"
        time.sleep(0.01)
    workers = [int(state["worker"].rsplit(":", 1)[1]) for state in _states(out).values()]
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    counts = _counts(stdout)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert len(errors) == 1, stderr
    assert "unite tile: interrupted (SIGINT)" in errors[0]
    assert counts["done"] >= 1
    assert f"interrupted: {format_count(len(names) - counts['total'], 'slide')} not finished" in stdout
    assert _wait_for_exit(workers) == []

    resumed = _unite(folder, "--out", out)

    assert resumed.returncode == 0, resumed.stderr
    assert all(state["status"] == "done" for state in _states(out).values())
    assert sorted(_states(out)) == sorted(names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_parent_watch_exits_orphan(tmp_path: Path) -> None:
    # The check that replaces PR_SET_PDEATHSIG off Linux: a grandchild watches its parent, which is killed.
    child = textwrap.dedent("""
        import os, threading, time
        from shared.jobs import _watch_parent
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
        print(os.getpid(), flush=True)
        time.sleep(600)
    """)
    middle = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
        print(child.stdout.readline().strip(), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True)
    orphan = int(parent.stdout.readline())
    assert _process_alive(orphan)

    parent.send_signal(signal.SIGKILL)
    parent.communicate(timeout=60)

    assert _wait_for_exit([orphan]) == []
