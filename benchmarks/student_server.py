"""Throughput of the student server against the raw student, measured in the same run.

Part 1, tiles: real 224 px tiles are cut from a slide and encoded as PNG once. The baseline embeds them
in this process with :func:`shared.models.inference.embed_tiles`, the function the server's batcher
calls, at the server's batch size. Then ``unite serve-student`` runs in a subprocess on 127.0.0.1, and
``C`` concurrent clients each send requests of ``--tiles-per-request`` tiles to ``POST /v1/embeddings``
until every tile has been sent ``--rounds`` times. The figures are tiles per second as a fraction of the
raw model's rate, and the p50 and p99 request latency. The clients run in this process, so JSON and
base64 work on both sides shares the machine's cores with the model, as it does on a real host.

Part 2, a slide: the same slide is uploaded to ``POST /v1/slides``, and the job is polled until it has
succeeded. The baseline, in this process, tiles the slide and embeds its patches one step after the
other (:func:`shared.slides.tiling.tile_slide`, then reading and embedding each batch in turn). The
figure is the baseline's seconds over the server's, upload included, so above 1 the server is faster.

The student is the UNITE architecture at random initialisation (its speed does not depend on its
weights) unless ``--checkpoint`` names an exported student.

    python benchmarks/student_server.py --slide ../shared/data/slides/CMU-1-Small-Region.svs --clients 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from shared.checkpoint import load_student, save_student
from shared.imaging import encode_png, prepare_tile
from shared.models.inference import embed_tiles
from shared.models.student import build_unite_student
from shared.slides.reader import open_slide
from shared.slides.tiling import iter_tiles, tile_slide

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 3600.0
HTTP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class TileRun:
    """One concurrency setting of part 1."""

    clients: int
    tiles: int
    seconds: float
    tiles_per_s: float
    fraction_of_raw: float
    p50_s: float
    p99_s: float


def export_student(folder: Path) -> Path:
    """Export a randomly initialised UNITE student to ``folder``, as ``unite distill`` would."""
    torch.manual_seed(0)
    model = build_unite_student()
    save_student(
        model,
        folder,
        teacher="benchmark (random initialisation, no teacher)",
        teacher_licence="benchmark only",
        training={"steps": 0, "note": "random initialisation for a speed benchmark"},
    )
    return folder


def slide_tiles(slide: Path, count: int, mpp: float | None) -> np.ndarray:
    """Read the first ``count`` tissue patches of ``slide``, prepared as the model takes them: (N, 224, 224, 3) uint8."""
    tiled = tile_slide(slide, mpp=mpp)
    batches = []
    with open_slide(slide, mpp=mpp) as opened:
        for _, tiles in iter_tiles(opened, tiled.grid, batch_size=64):
            batches.append(np.stack([prepare_tile(tile) for tile in tiles]))
            if sum(len(batch) for batch in batches) >= count:
                break
    tiles = np.concatenate(batches)
    # A slide with fewer patches than asked repeats them; each request still decodes and embeds every tile.
    return np.resize(tiles, (count, *tiles.shape[1:])) if len(tiles) < count else tiles[:count]


def raw_tiles_per_s(model: torch.nn.Module, tiles: np.ndarray, batch_size: int) -> float:
    """Embed ``tiles`` once to warm up, then time a second pass; return tiles per second."""
    embed_tiles(model, tiles[:batch_size], batch_size=batch_size)
    started = time.perf_counter()
    embed_tiles(model, tiles, batch_size=batch_size)
    return len(tiles) / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def student_server(checkpoint: Path, jobs_dir: Path, log_path: Path, batch_size: int, max_wait_ms: float):
    """Run ``unite serve-student`` on 127.0.0.1 in a subprocess; yield its URL once ``/readyz`` returns 200."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("UNITE_STUDENT_")}
    env.update(
        {
            "UNITE_STUDENT_BATCH_SIZE": str(batch_size),
            "UNITE_STUDENT_MAX_BATCH_WAIT_MS": str(max_wait_ms),
            "UNITE_STUDENT_JOBS_DIR": str(jobs_dir),
            "UNITE_STUDENT_MAX_QUEUED_TILES": "100000",
        }
    )
    command = [sys.executable, "-m", "unite_cli.main", "serve-student", "--host", "127.0.0.1", "--port", str(port), "--checkpoint", str(checkpoint)]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the student server exited with status {process.returncode} during startup; see {log_path}.")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the student server was not ready within {STARTUP_TIMEOUT_S:g} s; see {log_path}.")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def drive(url: str, payloads: list[dict], clients: int) -> tuple[float, list[float]]:
    """Send ``payloads`` from ``clients`` concurrent clients; return the wall seconds and each request's latency."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            payload = queue.get_nowait()
            sent = time.perf_counter()
            response = await http.post(f"{url}/v1/embeddings", json=payload)
            if response.status_code != 200:
                raise SystemExit(f"POST /v1/embeddings returned {response.status_code}: {response.text[:500]}")
            latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - started, latencies


def tile_payloads(tiles: np.ndarray, tiles_per_request: int, rounds: int) -> list[dict]:
    """Build the JSON bodies: every tile ``rounds`` times, ``tiles_per_request`` base64 PNG tiles per body."""
    encoded = [base64.b64encode(encode_png(tile)).decode("ascii") for tile in tiles]
    bodies = []
    for _ in range(rounds):
        for start in range(0, len(encoded), tiles_per_request):
            bodies.append({"input": [{"image": image} for image in encoded[start : start + tiles_per_request]]})
    return bodies


def run_slide_job(url: str, slide: Path, mpp: float | None) -> tuple[float, int]:
    """Upload ``slide`` as a job and poll it to the end; return the seconds from upload to success and the patch count."""
    fields = {} if mpp is None else {"mpp": str(mpp)}
    started = time.perf_counter()
    with open(slide, "rb") as file, httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
        response = http.post(f"{url}/v1/slides", files={"file": (slide.name, file)}, data=fields)
        if response.status_code != 202:
            raise SystemExit(f"POST /v1/slides returned {response.status_code}: {response.text[:500]}")
        job_url = f"{url}/v1/jobs/{response.json()['id']}"
        while time.perf_counter() - started < JOB_TIMEOUT_S:
            job = http.get(job_url).json()
            if job["status"] == "succeeded":
                return time.perf_counter() - started, int(job["num_patches"])
            if job["status"] in ("failed", "interrupted"):
                raise SystemExit(f"the slide job ended as {job['status']}: {json.dumps(job.get('error'))}")
            time.sleep(0.05)
    raise SystemExit(f"the slide job did not finish within {JOB_TIMEOUT_S:g} s.")


def sequential_slide_seconds(model: torch.nn.Module, slide: Path, mpp: float | None, batch_size: int) -> tuple[float, int]:
    """Tile ``slide`` and embed its patches one step after the other; return the seconds and the patch count."""
    started = time.perf_counter()
    tiled = tile_slide(slide, mpp=mpp)
    count = 0
    with open_slide(slide, mpp=mpp) as opened:
        # One read worker: each batch is read, then embedded, with no reading ahead.
        for _, tiles in iter_tiles(opened, tiled.grid, batch_size=batch_size, workers=1):
            embed_tiles(model, tiles, batch_size=batch_size)
            count += len(tiles)
    return time.perf_counter() - started, count


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, required=True, help="slide to cut tiles from and to embed as a job")
    parser.add_argument("--mpp", type=float, default=None, help="resolution override in µm per level-0 pixel, for a slide without one")
    parser.add_argument("--checkpoint", type=Path, default=None, help="exported student folder (default: a random UNITE student)")
    parser.add_argument("--tiles", type=int, default=256, help="distinct tiles sent in part 1 (default: 256)")
    parser.add_argument("--rounds", type=int, default=1, help="times each tile is sent per concurrency setting (default: 1)")
    parser.add_argument("--tiles-per-request", type=int, default=8, help="tiles in one POST /v1/embeddings (default: 8)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients to try (default: 1 4 16)")
    parser.add_argument("--batch-size", type=int, default=32, help="the server's largest batch and the baseline's batch (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's batching wait in ms (default: 5)")
    parser.add_argument("--skip-slide", action="store_true", help="skip part 2")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="unite-bench-student-") as temporary:
        work = Path(temporary)
        checkpoint = args.checkpoint or export_student(work / "student")
        model = load_student(checkpoint).model
        tiles = slide_tiles(args.slide, args.tiles, args.mpp)
        raw = raw_tiles_per_s(model, tiles, args.batch_size)
        print(f"raw model: {raw:.1f} tiles/s (embed_tiles, batch {args.batch_size}, {torch.get_num_threads()} torch threads)")

        payloads = tile_payloads(tiles, args.tiles_per_request, args.rounds)
        runs: list[TileRun] = []
        slide_figures: dict[str, float] = {}
        with student_server(checkpoint, work / "jobs", work / "server.log", args.batch_size, args.max_wait_ms) as url:
            asyncio.run(drive(url, payloads[: max(1, len(payloads) // 8)], 1))  # warm-up
            for clients in args.clients:
                seconds, latencies = asyncio.run(drive(url, payloads, clients))
                rate = len(tiles) * args.rounds / seconds
                run = TileRun(clients, len(tiles) * args.rounds, seconds, rate, rate / raw, percentile(latencies, 50), percentile(latencies, 99))
                runs.append(run)
                print(
                    f"{clients:>3} clients: {rate:.1f} tiles/s = {run.fraction_of_raw:.2f}x raw, "
                    f"p50 {run.p50_s * 1000:.0f} ms, p99 {run.p99_s * 1000:.0f} ms per request of {args.tiles_per_request} tiles"
                )
            if not args.skip_slide:
                server_s, patches = run_slide_job(url, args.slide, args.mpp)
        if not args.skip_slide:
            sequential_s, sequential_patches = sequential_slide_seconds(model, args.slide, args.mpp, args.batch_size)
            if sequential_patches != patches:
                raise SystemExit(f"the server embedded {patches} patches and the baseline {sequential_patches}; they should agree.")
            slide_figures = {"patches": patches, "server_s": server_s, "sequential_s": sequential_s, "speed_up": sequential_s / server_s}
            print(
                f"slide {args.slide.name}: {patches} patches, server job {server_s:.1f} s (upload included), "
                f"tiling then raw inference in sequence {sequential_s:.1f} s: {sequential_s / server_s:.2f}x"
            )

    if args.json:
        record = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "raw_tiles_per_s": raw,
            "tiles_per_request": args.tiles_per_request,
            "batch_size": args.batch_size,
            "max_wait_ms": args.max_wait_ms,
            "runs": [asdict(run) for run in runs],
            "slide": slide_figures,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
