"""Throughput of the teacher gateway: its remote-teacher client against a fake teacher, and its cache's hit path.

Part 1 sends distinct 224 px tiles through :class:`RemoteTeacher` to the fake embeddings API of the tests,
served on 127.0.0.1 by a child process, so that its PNG decoding and JSON encoding do not share this
process's GIL. Every request waits ``--latency-s`` at the fake. With ``max_concurrency`` requests of
``max_batch_size`` tiles in flight, no client can beat concurrency x batch / latency tiles per second, and
the figure is the fraction of that ideal reached. The fake also spends CPU time on every request (PNG
decoding, JSON encoding), so the run records the mean time its requests really took. The second fraction
is against concurrency x batch / that mean time, and shows how busy the client kept its slots. One round
of requests opens the connections first, and then ``--rounds`` rounds are timed.

Part 2 fills a gateway (``unite serve-gateway`` in a subprocess on 127.0.0.1) with ``--tiles`` tiles
from the fake teacher and reads their embeddings back three ways. The baseline reads the same N vectors
from an HDF5 file written in the same run. The others are ``EmbeddingCache.get_many`` and
``POST /v1/embeddings`` requests of cached tiles over HTTP. Each figure is the best of ``--repeats`` runs.

    python benchmarks/gateway.py --latency-s 0.2 --batch-size 16 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path

import h5py
import httpx
import numpy as np

# The fake teacher and the gateway helpers are test modules, kept in tests/ beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_teacher import FakeTeacher  # noqa: E402
from gateway_helpers import block_tiles, gateway_process, remote_environment  # noqa: E402

from shared.cache import EmbeddingCache  # noqa: E402
from shared.imaging import encode_png, prepare_tile  # noqa: E402
from teacher_gateway.teachers.remote import RemoteTeacher, RemoteTeacherConfig  # noqa: E402

BENCHMARK_LICENCE = "benchmark only: embeddings of synthetic tiles from a fake teacher"
FAKE_STARTUP_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class FakeRecord:
    """Record of a fake teacher run: the max number of requests in flight at once, and each request's seconds from arrival to response."""

    max_in_flight: int
    call_seconds: list[float]


def serve_fake_teacher(latency_s: float, dim: int, connection: Connection) -> None:
    """Serve a fake teacher in a child process: send its URL and model, wait for any message, then send its record."""
    fake = FakeTeacher(dim=dim, latency_s=latency_s)
    with fake.serve():
        connection.send((fake.url, fake.model))
        connection.recv()
        record = FakeRecord(fake.max_in_flight, [call.finished - call.started for call in fake.calls])
    connection.send(record)


class FakeTeacherProcess:
    """A fake teacher on 127.0.0.1, served by a child process until :meth:`finish` collects its record."""

    def __init__(self, *, latency_s: float, dim: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_connection = context.Pipe()
        self._process = context.Process(target=serve_fake_teacher, args=(latency_s, dim, child_connection), daemon=True)
        self._process.start()
        if not self._connection.poll(FAKE_STARTUP_TIMEOUT_S):
            self._process.terminate()
            raise RuntimeError(f"the fake teacher process did not start within {FAKE_STARTUP_TIMEOUT_S:g} s; see its log above.")
        try:
            self.url, self.model = self._connection.recv()
        except EOFError as error:
            raise RuntimeError("the fake teacher process exited during startup; see its log above.") from error

    def finish(self) -> FakeRecord:
        """Stop the server and return what it saw."""
        self._connection.send("stop")
        record = self._connection.recv()
        self._process.join(timeout=30)
        return record

    def __enter__(self) -> FakeTeacherProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=30)


@dataclass(frozen=True)
class Throughput:
    """One concurrency setting of part 1, with the rate it reached and the ideal rate."""

    concurrency: int
    batch_size: int
    tiles: int
    seconds: float
    ideal_tiles_per_s: float
    max_in_flight: int
    mean_call_s: float
    retries: int

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds

    @property
    def request_limited_tiles_per_s(self) -> float:
        """The ideal rate for requests as long as the fake's mean request time, rather than the set latency."""
        return self.concurrency * self.batch_size / self.mean_call_s


def measure_remote_throughput(
    *, concurrency: int, batch_size: int, latency_s: float, dim: int, rounds: int, seed: int
) -> Throughput:
    """Time :meth:`RemoteTeacher.embed` on ``rounds`` x ``concurrency`` full batches of distinct tiles."""
    round_tiles = concurrency * batch_size
    tiles = np.stack(block_tiles((rounds + 1) * round_tiles, seed=seed))
    warm_up, timed = tiles[:round_tiles], tiles[round_tiles:]

    with FakeTeacherProcess(latency_s=latency_s, dim=dim) as fake:
        config = RemoteTeacherConfig(
            url=fake.url,
            model=fake.model,
            dim=dim,
            licence=BENCHMARK_LICENCE,
            max_batch_size=batch_size,
            max_concurrency=concurrency,
        )
        with RemoteTeacher(config) as teacher:
            teacher.embed(warm_up)
            started = time.perf_counter()
            teacher.embed(timed)
            seconds = time.perf_counter() - started
            retries = teacher.stats()["retries"]
        record = fake.finish()

    # The warm-up round ends before the timed rounds start, so its calls are the first ones recorded.
    timed_calls = record.call_seconds[concurrency:]
    return Throughput(
        concurrency=concurrency,
        batch_size=batch_size,
        tiles=len(timed),
        seconds=seconds,
        ideal_tiles_per_s=concurrency * batch_size / latency_s,
        max_in_flight=record.max_in_flight,
        mean_call_s=float(np.mean(timed_calls)),
        retries=retries,
    )


@dataclass(frozen=True)
class HitPathRates:
    """Tiles per second of part 2: each way of reading the same N cached embeddings."""

    hdf5: float
    get_many: float
    http: float


def best_seconds(read: Callable[[], np.ndarray], expected: np.ndarray, repeats: int) -> float:
    """Return the shortest of ``repeats`` timed calls of ``read``, each checked against ``expected``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        vectors = read()
        times.append(time.perf_counter() - started)
        if not np.array_equal(vectors, expected):
            raise RuntimeError("a timed read returned embeddings that differ from the cached ones; check the order of the keys")
    return min(times)


def post_cached_tiles(http: httpx.Client, bodies: list[dict]) -> np.ndarray:
    """Send every request body to the gateway and return the (N, dim) embeddings, checking that all were cache hits."""
    rows = []
    for body in bodies:
        response = http.post("/v1/embeddings", json=body)
        response.raise_for_status()
        document = response.json()
        if document["usage"]["cache_hits"] != len(body["input"]):
            raise RuntimeError(f"expected only cache hits, got usage {document['usage']}")
        rows.extend(item["embedding"] for item in document["data"])
    return np.asarray(rows, dtype=np.float32)


def measure_hit_path(*, tiles: int, dim: int, request_tiles: int, repeats: int, workdir: Path) -> HitPathRates:
    """Fill a subprocess gateway's cache with ``tiles`` tiles, then time three ways of reading their embeddings."""
    prepared = [prepare_tile(tile) for tile in block_tiles(tiles, seed=tiles)]
    images = [base64.b64encode(encode_png(tile)).decode("ascii") for tile in prepared]
    bodies = [
        {"input": [{"image": image} for image in images[start : start + request_tiles]]}
        for start in range(0, len(images), request_tiles)
    ]
    cache_dir = workdir / "cache"

    fake = FakeTeacher(dim=dim)
    with fake.serve():
        with gateway_process(cache_dir, workdir / "gateway.log", remote_environment(fake)) as gateway:
            with httpx.Client(base_url=gateway.url, timeout=HTTP_TIMEOUT_S) as http:
                for body in bodies:
                    http.post("/v1/embeddings", json=body).raise_for_status()
                identity = http.get("/v1/models").json()["data"][0]["id"]

                keys = [EmbeddingCache.tile_key(tile, identity) for tile in prepared]
                with EmbeddingCache(cache_dir) as cache:
                    found = cache.get_many(keys)
                    expected = np.stack([found[key] for key in keys])
                    get_many_s = best_seconds(lambda: _stack_in_order(cache.get_many(keys), keys), expected, repeats)

                http_s = best_seconds(lambda: post_cached_tiles(http, bodies), expected, repeats)
    if len(fake.embed_counts) != tiles or max(fake.embed_counts.values()) != 1:
        raise RuntimeError(f"the fake teacher embedded {fake.embed_counts.total()} tiles, expected each of {tiles} tiles once")

    hdf5_path = workdir / "embeddings.h5"
    with h5py.File(hdf5_path, "w") as file:
        file.create_dataset("embeddings", data=expected)
    with h5py.File(hdf5_path, "r") as file:
        dataset = file["embeddings"]
        hdf5_s = best_seconds(lambda: dataset[...], expected, repeats)

    return HitPathRates(hdf5=tiles / hdf5_s, get_many=tiles / get_many_s, http=tiles / http_s)


def _stack_in_order(found: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.stack([found[key] for key in keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.2, help="seconds the fake teacher waits per request in part 1 (default: 0.2)")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size of the remote teacher in part 1, in tiles (default: 16)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="max_concurrency settings to measure in part 1 (default: 1 4 16)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="timed requests per concurrency slot in part 1 (default: 4)")
    parser.add_argument("--dim", type=int, default=1536, help="embedding length of the fake teacher (default: 1536, as UNI2-h)")
    parser.add_argument("--tiles", type=int, default=4096, help="cached tiles read back in part 2 (default: 4096)")
    parser.add_argument("--request-tiles", type=int, default=256, help="tiles per POST /v1/embeddings in part 2 (default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed reads per method in part 2; the best counts (default: 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the cache and HDF5 file of part 2 (default: a new temporary folder)")
    args = parser.parse_args()

    print(
        f"{os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, torch {version('torch')}, h5py {h5py.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )

    print(f"\nPart 1: RemoteTeacher against the fake teacher, {args.latency_s:g} s per request, batches of {args.batch_size}, dim {args.dim}")
    print("concurrency  ideal tiles/s  tiles/s  of ideal  mean request s  of request-time limit  max in flight  retries")
    for index, concurrency in enumerate(args.concurrency):
        result = measure_remote_throughput(
            concurrency=concurrency,
            batch_size=args.batch_size,
            latency_s=args.latency_s,
            dim=args.dim,
            rounds=args.rounds,
            seed=index,
        )
        print(
            f"{concurrency:>11}  {result.ideal_tiles_per_s:>13.1f}  {result.tiles_per_s:>7.1f}  "
            f"{result.tiles_per_s / result.ideal_tiles_per_s:>8.2f}  {result.mean_call_s:>14.3f}  "
            f"{result.tiles_per_s / result.request_limited_tiles_per_s:>21.2f}  {result.max_in_flight:>13}  {result.retries:>7}"
        )

    print(f"\nPart 2: reading {args.tiles} cached embeddings of dim {args.dim}, best of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="unite-gateway-benchmark-") as temporary:
        workdir = args.workdir if args.workdir is not None else Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        rates = measure_hit_path(
            tiles=args.tiles, dim=args.dim, request_tiles=args.request_tiles, repeats=args.repeats, workdir=workdir
        )
    print(f"h5py, one dataset read                 {rates.hdf5:>12.0f} tiles/s  (baseline)")
    print(f"EmbeddingCache.get_many                {rates.get_many:>12.0f} tiles/s  ({rates.get_many / rates.hdf5:.3g}x HDF5)")
    print(f"POST /v1/embeddings, {args.request_tiles} tiles a request  {rates.http:>12.0f} tiles/s  ({rates.http / rates.hdf5:.3g}x HDF5)")


if __name__ == "__main__":
    main()
