"""Throughput, start-up and memory of the student server's onnx runtime against its torch runtime.

Part 1, throughput: real 224 px tiles are cut from a slide and prepared once. Three runtimes embed the
same tiles, in one process, at each batch size:

- torch with bfloat16 autocast, through :func:`student_server.torch_runtime.embed_torch`, which is what
  the server's default ``torch`` runtime runs. It is the baseline.
- torch in float32: the same model and normalisation with no autocast, the numerics of the ONNX graph.
- onnxruntime with the CPUExecutionProvider, through :func:`student_server.onnx_runtime.embed_onnx`, on
  a session loaded from ``model.onnx`` by :func:`student_server.onnx_runtime.load_onnx_export`.

Every runtime embeds one warm-up batch at each batch size first. Then, in each of ``--rounds`` rounds,
each runtime embeds every tile once, in batches of that size, and the starting runtime rotates from round
to round. The figure is the median over rounds of tiles per second, with its ratio to the baseline, so
background load affects all three alike. torch and onnxruntime both get ``--threads`` intra-op threads,
and onnxruntime otherwise keeps its default session options. The largest absolute difference between the
runtimes' embeddings of the same tiles is printed as well.

Part 2, start-up: each runtime is started ``--startup-repeats`` times in a fresh Python process, which
imports numpy, then the runtime's library (torch and timm, or onnxruntime), loads the student with the
server's loader and embeds one batch. Each child records the import and load seconds and its resident
set size (RSS, from /proc, so Linux only) after each step. The medians are printed.

The student is the UNITE ViT-S architecture at random initialisation (its speed does not depend on its
weights) unless ``--checkpoint`` names an exported student. Either way, ``model.onnx`` is written with
:func:`distiller.onnx_export.export_onnx` into a temporary copy of the export.

    python benchmarks/onnx_runtime.py --slide ../shared/data/slides/CMU-1-Small-Region.svs --batch-sizes 1 8 32

torch, timm and onnxruntime are imported inside the functions that use them, because the start-up part
runs this file in child processes that must import only one runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Python puts this file's folder first on sys.path, where benchmarks/student_server.py would shadow the
# student_server package, so the repository root takes its place.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
BASELINE = "torch bf16 autocast"
TORCH_FP32 = "torch fp32"
ONNX = "onnxruntime fp32"
RUNTIMES = (BASELINE, TORCH_FP32, ONNX)
STARTUP_RUNTIMES = ("torch", "onnx")
CHILD_TIMEOUT_S = 600.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class StartupRecord:
    """Figures that one child process measured while it started one runtime, with memory in MiB."""

    runtime: str
    numpy_import_s: float
    import_s: float
    load_s: float
    first_batch_s: float
    rss_numpy_mib: float
    rss_imported_mib: float
    rss_loaded_mib: float
    peak_rss_mib: float
    torch_imported: bool


def export_random_student(folder: Path) -> Path:
    """Save a randomly initialised UNITE student to ``folder``, as ``unite distill`` would export it."""
    import torch

    from shared.checkpoint import save_student
    from shared.models.student import build_unite_student

    torch.manual_seed(0)
    save_student(
        build_unite_student(),
        folder,
        teacher="benchmark (random initialisation, no teacher)",
        teacher_licence="benchmark only",
        training={"steps": 0, "note": "random initialisation for a speed benchmark"},
    )
    return folder


def copy_export(checkpoint: Path, folder: Path) -> Path:
    """Copy the export ``checkpoint`` (a folder or a published root) to ``folder``, so model.onnx is written beside the copy."""
    from shared.publish import resolve_checkpoint_dir

    source = resolve_checkpoint_dir(checkpoint)
    if not source.is_dir():
        raise SystemExit(f"--checkpoint {checkpoint} is not a folder. Pass the folder that `unite distill` exported.")
    shutil.copytree(source, folder, symlinks=False)
    return folder


def slide_tiles(slide: Path, count: int, mpp: float | None):
    """Read the first ``count`` tissue patches of ``slide``, prepared as the model takes them: (N, 224, 224, 3) uint8."""
    import numpy as np

    from shared.imaging import prepare_tile
    from shared.slides.reader import open_slide
    from shared.slides.tiling import iter_tiles, tile_slide

    tiled = tile_slide(slide, mpp=mpp)
    batches = []
    with open_slide(slide, mpp=mpp) as opened:
        for _, tiles in iter_tiles(opened, tiled.grid, batch_size=64):
            batches.append(np.stack([prepare_tile(tile) for tile in tiles]))
            if sum(len(batch) for batch in batches) >= count:
                break
    if not batches:
        raise SystemExit(f"slide {slide} has no tissue patches. Pass a slide with tissue, or set --mpp for a slide without a resolution.")
    tiles = np.concatenate(batches)
    # A slide with fewer patches than requested repeats them, and each runtime still embeds every tile.
    return np.resize(tiles, (count, *tiles.shape[1:])) if len(tiles) < count else tiles[:count]


def load_runtimes(folder: Path, threads: int) -> dict[str, Callable]:
    """Load the export in ``folder`` with both of the server's loaders and return one batch-embedding function per runtime."""
    import onnxruntime
    import torch

    from shared.imaging import to_model_input
    from student_server.onnx_runtime import embed_onnx, load_onnx_export
    from student_server.torch_runtime import embed_torch, load_torch_export

    torch.set_num_threads(threads)
    torch_student, _ = load_torch_export(folder, device="cpu")
    onnx_student, _ = load_onnx_export(folder, device="cpu")

    # The server's session uses onnxruntime's default thread count, so a session with the same graph and
    # only the intra-op thread count set replaces it here.
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
    onnx_student = replace(onnx_student, session=session)

    def embed_fp32(tiles):
        with torch.inference_mode():
            return torch_student.model(torch.from_numpy(to_model_input(tiles))).float().numpy()

    return {
        BASELINE: lambda tiles: embed_torch(torch_student, tiles, device="cpu"),
        TORCH_FP32: embed_fp32,
        ONNX: lambda tiles: embed_onnx(onnx_student, tiles),
    }


def embed_all(embed: Callable, tiles, batch_size: int):
    """Embed ``tiles`` in batches of ``batch_size`` with ``embed`` and return the (N, D) embeddings."""
    import numpy as np

    return np.concatenate([embed(tiles[start : start + batch_size]) for start in range(0, len(tiles), batch_size)])


def time_batch_size(runtimes: dict[str, Callable], tiles, batch_size: int, rounds: int) -> dict[str, list[float]]:
    """Return each runtime's tiles per second in each of ``rounds`` alternating rounds at ``batch_size``."""
    for embed in runtimes.values():
        embed(tiles[:batch_size])  # warm-up at this batch size

    names = list(runtimes)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            started = time.perf_counter()
            embed_all(runtimes[name], tiles, batch_size)
            rates[name].append(len(tiles) / (time.perf_counter() - started))
    return rates


def max_abs_differences(runtimes: dict[str, Callable], tiles, batch_size: int) -> dict[str, float]:
    """Return the largest |difference| between the ONNX embeddings and each torch runtime's, and the largest |value|."""
    import numpy as np

    embeddings = {name: embed_all(embed, tiles, batch_size) for name, embed in runtimes.items()}
    return {
        f"{ONNX} vs {TORCH_FP32}": float(np.abs(embeddings[ONNX] - embeddings[TORCH_FP32]).max()),
        f"{ONNX} vs {BASELINE}": float(np.abs(embeddings[ONNX] - embeddings[BASELINE]).max()),
        f"largest |{TORCH_FP32} value|": float(np.abs(embeddings[TORCH_FP32]).max()),
    }


def memory_mib() -> tuple[float, float]:
    """Return this process's current and peak resident set size in MiB, read from /proc/self/status (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / MIB  # the file gives kB
    return fields["VmRSS"], fields["VmHWM"]


def start_runtime(runtime: str, folder: Path, tiles_path: Path, threads: int) -> StartupRecord:
    """Import ``runtime`` ("torch" or "onnx") in this fresh process, load the export and embed one batch."""
    started = time.perf_counter()
    import numpy as np

    numpy_import_s = time.perf_counter() - started
    rss_numpy, _ = memory_mib()

    started = time.perf_counter()
    if runtime == "torch":
        import timm  # noqa: F401
        import torch

        torch.set_num_threads(threads)
    else:
        import onnxruntime  # noqa: F401
    import_s = time.perf_counter() - started
    rss_imported, _ = memory_mib()

    # The server's own loader for each runtime, with its default options. It also imports the project's modules.
    started = time.perf_counter()
    if runtime == "torch":
        from student_server.torch_runtime import embed_torch, load_torch_export

        torch_student, _ = load_torch_export(folder, device="cpu")

        def embed(tiles):
            return embed_torch(torch_student, tiles, device="cpu")
    else:
        from student_server.onnx_runtime import embed_onnx, load_onnx_export

        onnx_student, _ = load_onnx_export(folder, device="cpu")

        def embed(tiles):
            return embed_onnx(onnx_student, tiles)

    load_s = time.perf_counter() - started
    rss_loaded, _ = memory_mib()

    tiles = np.load(tiles_path)
    started = time.perf_counter()
    embed(tiles)
    first_batch_s = time.perf_counter() - started
    _, peak = memory_mib()
    return StartupRecord(
        runtime=runtime,
        numpy_import_s=numpy_import_s,
        import_s=import_s,
        load_s=load_s,
        first_batch_s=first_batch_s,
        rss_numpy_mib=rss_numpy,
        rss_imported_mib=rss_imported,
        rss_loaded_mib=rss_loaded,
        peak_rss_mib=peak,
        torch_imported="torch" in sys.modules,
    )


def run_startup_child(runtime: str, folder: Path, tiles_path: Path, threads: int) -> StartupRecord:
    """Run :func:`start_runtime` in a fresh Python process and return its record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child-runtime", runtime, "--child-folder", str(folder)]
    command += ["--child-tiles", str(tiles_path), "--threads", str(threads)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if result.returncode != 0:
        raise SystemExit(f"the {runtime} start-up child exited with status {result.returncode}:\n{result.stderr[-3000:]}")
    return StartupRecord(**json.loads(result.stdout.strip().splitlines()[-1]))


def median_startup(records: list[StartupRecord]) -> dict[str, float | bool]:
    """Return the median of each numeric field of ``records``, and whether any child imported torch."""
    numeric = [name for name in StartupRecord.__dataclass_fields__ if name not in ("runtime", "torch_imported")]
    summary: dict[str, float | bool] = {name: statistics.median(getattr(record, name) for record in records) for name in numeric}
    summary["torch_imported"] = any(record.torch_imported for record in records)
    return summary


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo (Linux), or the platform's processor string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(threads: int) -> str:
    import onnxruntime
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} intra-op threads"
    )


def print_throughput(figures: dict[int, dict[str, list[float]]]) -> None:
    print(f"\n| batch | runtime | tiles/s (median) | min to max over rounds | ratio to {BASELINE} |")
    print("|---|---|---|---|---|")
    for batch_size, rates in figures.items():
        baseline = statistics.median(rates[BASELINE])
        for name in RUNTIMES:
            median = statistics.median(rates[name])
            ratio = "1.00x (baseline)" if name == BASELINE else f"{median / baseline:.2f}x"
            print(f"| {batch_size} | {name} | {median:.1f} | {min(rates[name]):.1f} to {max(rates[name]):.1f} | {ratio} |")


def print_startup(startup: dict[str, dict[str, float | bool]], batch_size: int) -> None:
    print(f"\n| runtime | import s | load s | first batch of {batch_size} s | RSS after numpy MiB | after import | after load | peak | torch imported |")
    print("|---|---|---|---|---|---|---|---|---|")
    libraries = {"torch": "torch + timm", "onnx": "onnxruntime"}
    for runtime, row in startup.items():
        print(
            f"| {libraries[runtime]} | {row['import_s']:.2f} | {row['load_s']:.2f} | {row['first_batch_s']:.2f} | "
            f"{row['rss_numpy_mib']:.0f} | {row['rss_imported_mib']:.0f} | {row['rss_loaded_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
            f"{'yes' if row['torch_imported'] else 'no'} |"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="slide to cut the 224 px tiles from (required except in a child process)")
    parser.add_argument("--mpp", type=float, default=None, help="resolution override in µm per level-0 pixel, for a slide without one")
    parser.add_argument("--checkpoint", type=Path, default=None, help="exported student folder (default: a random UNITE student)")
    parser.add_argument("--tiles", type=int, default=64, help="tiles each runtime embeds per round and batch size (default: 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to time (default: 1 8 32)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size, of which the median is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for torch and onnxruntime (default: the CPU count)")
    parser.add_argument("--startup-repeats", type=int, default=3, help="fresh processes started per runtime in part 2 (default: 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    # Used only by the start-up part, which runs this file again in a fresh process.
    parser.add_argument("--child-runtime", choices=STARTUP_RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-tiles", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_runtime is None and args.slide is None:
        parser.error("--slide is required: pass a slide to cut tiles from, such as ../shared/data/slides/CMU-1-Small-Region.svs.")
    for name in ("tiles", "rounds", "threads", "startup_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is {getattr(args, name)}, expected a positive integer.")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes {args.batch_sizes} contains a value below 1, expected positive batch sizes.")
    return args


def main() -> None:
    args = parse_args()
    if args.child_runtime is not None:
        record = start_runtime(args.child_runtime, args.child_folder, args.child_tiles, args.threads)
        print(json.dumps(record.__dict__))
        return

    import numpy as np

    from distiller.onnx_export import export_onnx

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="unite-bench-onnx-") as temporary:
        work = Path(temporary)
        folder = copy_export(args.checkpoint, work / "student") if args.checkpoint else export_random_student(work / "student")
        started = time.perf_counter()
        export = export_onnx(folder, folder / "model.onnx")
        print(f"{export.summary()} in {time.perf_counter() - started:.1f} s")
        print(f"machine: {describe_machine(args.threads)}")

        tiles = slide_tiles(args.slide, args.tiles, args.mpp)
        largest_batch = max(args.batch_sizes)
        tiles_path = work / "tiles.npy"
        np.save(tiles_path, tiles[:largest_batch])

        # The start-up children run before this process loads the runtimes, so they do not compete with its models for memory.
        records: dict[str, list[StartupRecord]] = {runtime: [] for runtime in STARTUP_RUNTIMES}
        for _ in range(args.startup_repeats):
            for runtime in STARTUP_RUNTIMES:
                records[runtime].append(run_startup_child(runtime, folder, tiles_path, args.threads))
        startup = {runtime: median_startup(values) for runtime, values in records.items()}

        runtimes = load_runtimes(folder, args.threads)
        differences = max_abs_differences(runtimes, tiles, largest_batch)
        figures = {batch_size: time_batch_size(runtimes, tiles, batch_size, args.rounds) for batch_size in args.batch_sizes}
    load_after = os.getloadavg()

    print(f"{len(tiles)} tiles from {args.slide.name}, {args.rounds} alternating rounds per batch size, median tiles/s")
    print_throughput(figures)
    print("\nlargest absolute difference of the embeddings:")
    for name, value in differences.items():
        print(f"  {name}: {value:.3g}")
    print(f"\nstart-up in a fresh process, median of {args.startup_repeats} per runtime:")
    print_startup(startup, min(largest_batch, len(tiles)))
    before = " ".join(f"{value:.2f}" for value in load_before)
    after = " ".join(f"{value:.2f}" for value in load_after)
    print(f"\nload average (1, 5, 15 min): before {before}, after {after}")

    if args.json:
        record = {
            "machine": describe_machine(args.threads),
            "tiles": len(tiles),
            "rounds": args.rounds,
            "tiles_per_s_by_round": {str(batch_size): rates for batch_size, rates in figures.items()},
            "max_abs_difference": differences,
            "startup": startup,
            "load_average_before": load_before,
            "load_average_after": load_after,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
