"""Wall time of ``unite embed`` over real slides: the Ray Data engine against the single-process engine.

Both engines embed the same slide list with the same student, each in a fresh process, ``--repeats``
times, and the engine that runs first alternates from one repeat to the next. The single-process
engine (``--engine local``, the default of ``unite embed``) is the baseline. The Ray run is
``--engine ray --workers N`` on a local Ray cluster limited to ``--cpus`` CPUs, which the command starts
and stops itself, so its figure includes Ray's start-up as a user pays it.

The slide list repeats each slide of ``--slides`` ``--copies`` times under distinct names (symbolic
links in a temporary folder), so a run can be given more slides. By default it lists CMU-1-Small-Region
(58 patches), the BRACS crop (1 patch) and the TCGA section (3199 patches) once each. The BRACS crop gets 0.25 µm/px and the TCGA section 2.0 µm/px from the list, as in the tests, because their
files lack it.

Figures: the median wall seconds of each engine, its patches per second, and the ratio of its patches
per second to the baseline's. The largest absolute difference between the two engines' patch features is
printed as well. The student is the UNITE ViT-S architecture at random initialisation (its speed does not
depend on its weights) unless ``--checkpoint`` names an exported student.

Where ``unshare --net`` works (root on Linux), the Ray run starts inside a private network namespace
with only the loopback interface, because Ray's servers bind to the host's network address.

    python benchmarks/embed_engines.py --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Python puts this file's folder first on sys.path, where benchmarks/student_server.py would shadow the
# student_server package, so the repository root takes its place.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)

from benchmarks.onnx_runtime import cpu_model, export_random_student  # noqa: E402

DEFAULT_SLIDES = ("CMU-1-Small-Region.svs", "BRACS_1640_N_3_cropped.tiff", "tcga-cr-7395-01a-01-ts1.svs")
# Resolutions for slides whose files lack one, in µm per level-0 pixel (the tests' estimates).
MPP_OVERRIDES = {"BRACS_1640_N_3_cropped.tiff": 0.25, "tcga-cr-7395-01a-01-ts1.svs": 2.0}
BASELINE = "local"
RUN_TIMEOUT_S = 3600
# The Ray driver: a local cluster of NUM_CPUS CPUs, then the unite command line with the remaining arguments.
RAY_DRIVER = """
import sys
import ray
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False)
from unite_cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class EngineRun:
    """One run of ``unite embed`` with one engine: its wall time and the patches it embedded."""

    engine: str
    seconds: float
    patches: int

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds


def default_slides_dir() -> Path:
    shared_data = os.environ.get("UNITE_SHARED_DATA")
    return (Path(shared_data) if shared_data else REPO.parent / "shared" / "data") / "slides"


def write_slide_list(folder: Path, slides: list[Path], copies: int) -> Path:
    """Link each slide ``copies`` times into ``folder`` under distinct names and return the CSV list of them."""
    rows = []
    for slide in slides:
        mpp = MPP_OVERRIDES.get(slide.name, "")
        for copy in range(copies):
            link = folder / f"{slide.stem}-copy{copy}{slide.suffix}"
            link.symlink_to(slide.resolve())
            rows.append(f"{link},{mpp}")
    slide_list = folder / "slides.csv"
    slide_list.write_text("slide,mpp\n" + "\n".join(rows) + "\n")
    return slide_list


def network_namespace_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


def engine_command(engine: str, slide_list: Path, checkpoint: Path, out: Path, args: argparse.Namespace) -> list[str]:
    arguments = ["embed", str(slide_list), "--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", str(args.batch_size)]
    if engine == BASELINE:
        return [sys.executable, "-m", "unite_cli.main", *arguments]
    command = [sys.executable, "-c", RAY_DRIVER, str(args.cpus), *arguments, "--engine", "ray", "--workers", str(args.workers)]
    if network_namespace_available():
        # Inside the new namespace only the loopback interface exists, and it starts down.
        return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    return command


def run_engine(engine: str, slide_list: Path, checkpoint: Path, out: Path, args: argparse.Namespace) -> EngineRun:
    """Run ``unite embed`` with ``engine`` into the empty folder ``out`` and return its wall time and patch count."""
    from shared.features import read_features

    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    environment.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    completed = subprocess.run(
        engine_command(engine, slide_list, checkpoint, out, args), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=environment, cwd=REPO
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"unite embed --engine {engine} exited with status {completed.returncode}:\n{completed.stderr[-4000:]}")
    patches = sum(len(read_features(path).features) for path in (out / "features").glob("*.h5"))
    return EngineRun(engine, seconds, patches)


def max_abs_difference(first: Path, second: Path) -> float:
    """Return the largest absolute difference between the patch features of two output folders, slide by slide."""
    import numpy as np

    from shared.features import read_features

    largest = 0.0
    for path in sorted((first / "features").glob("*.h5")):
        a, b = read_features(path), read_features(second / "features" / path.name)
        if not np.array_equal(a.coords, b.coords):
            raise SystemExit(f"the engines tiled {path.stem} differently: their patch coordinates differ")
        largest = max(largest, float(np.abs(a.features - b.features).max()))
    return largest


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides-dir", type=Path, default=default_slides_dir(), help="folder of the slides (default: UNITE_SHARED_DATA/slides)")
    parser.add_argument("--slides", nargs="+", default=list(DEFAULT_SLIDES), help="file names in --slides-dir")
    parser.add_argument("--copies", type=int, default=1, help="times each slide is listed, under distinct names (default: 1)")
    parser.add_argument("--workers", type=int, default=2, help="student actors of the Ray engine (default: 2)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine (default: 3)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="exported student (default: the UNITE ViT-S at random initialisation)")
    args = parser.parse_args()
    for name in ("copies", "workers", "cpus", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is {getattr(args, name)}, expected at least 1")
    missing = [name for name in args.slides if not (args.slides_dir / name).is_file()]
    if missing:
        parser.error(f"{', '.join(missing)} not found in {args.slides_dir}: pass --slides-dir, or set UNITE_SHARED_DATA")
    return args


def main() -> None:
    args = parse_args()
    import ray
    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, Ray {ray.__version__}"
    )
    print(f"slides: {', '.join(args.slides)}, each {args.copies} times; batch {args.batch_size}; Ray: {args.workers} student actors, {args.cpus} CPUs")
    with tempfile.TemporaryDirectory(prefix="unite-bench-engines-") as temporary:
        folder = Path(temporary)
        checkpoint = args.checkpoint or export_random_student(folder / "student")
        (folder / "slides").mkdir()
        slide_list = write_slide_list(folder / "slides", [args.slides_dir / name for name in args.slides], args.copies)

        runs: dict[str, list[EngineRun]] = {BASELINE: [], "ray": []}
        for repeat in range(args.repeats):
            order = (BASELINE, "ray") if repeat % 2 == 0 else ("ray", BASELINE)
            for engine in order:
                out = folder / f"{engine}-{repeat}"
                run = run_engine(engine, slide_list, checkpoint, out, args)
                runs[engine].append(run)
                print(f"repeat {repeat + 1}, {engine}: {run.seconds:.1f} s, {run.patches} patches")
        difference = max_abs_difference(folder / f"{BASELINE}-0", folder / "ray-0")

    baseline_rate = statistics.median(run.patches_per_s for run in runs[BASELINE])
    print(f"\n| engine | wall s (median) | min to max | patches | patches/s | ratio to {BASELINE} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for engine, engine_runs in runs.items():
        seconds = [run.seconds for run in engine_runs]
        rate = statistics.median(run.patches_per_s for run in engine_runs)
        label = engine if engine == BASELINE else f"ray, {args.workers} workers"
        print(
            f"| {label} | {statistics.median(seconds):.1f} | {min(seconds):.1f} to {max(seconds):.1f} | {engine_runs[0].patches} "
            f"| {rate:.1f} | {rate / baseline_rate:.2f}x |"
        )
    print(f"\nlargest absolute difference between the engines' patch features: {difference:.2e}")


if __name__ == "__main__":
    main()
