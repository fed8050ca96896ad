"""Prometheus metrics of one student server app, served at ``GET /metrics``.

Each app has a registry of its own, so several apps in one process (as in the tests) never share
counters. Counters and histograms count what this process did since it started. The queue, the slide
jobs and the served checkpoint are read at scrape time from the objects that own them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "unite_student"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; a tile request takes milliseconds on a GPU, a large one seconds on a CPU, a slide upload minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Tiles per forward pass; batch_size is 32 by default and rarely above 256.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RELOAD_OUTCOMES = ("success", "failed")


class StudentMetrics:
    """The student server's counters and histograms, and the scrape-time collectors added with :meth:`add_collector`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests answered, by route template and status code.", ("route", "status"), registry=registry
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds",
            "Time to answer an HTTP request, by route template.",
            ("route",),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Tiles in each forward pass of the engine, gathered from one or more requests.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.tiles = Counter(f"{PREFIX}_tiles", "Tiles embedded by the engine.", registry=registry)
        self.reloads = Counter(
            f"{PREFIX}_reloads",
            "Loads of a new checkpoint, by outcome: 'success', or 'failed' (the previous one stays served).",
            ("outcome",),
            registry=registry,
        )
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register ``collect``, called at every scrape, for metrics whose values live elsewhere."""
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    """Return a one-sample gauge named ``unite_student_<name>``."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class RequestMetricsMiddleware:
    """Count each HTTP request by route template and status, observe its duration, and log one line for it.

    Installed inside :class:`shared.http.RequestGuardMiddleware`, so the log line carries the request id,
    and a body the guard rejects before the app runs (413) is not counted here. Probes and scrapes
    (``quiet_paths``) are logged at DEBUG, other requests at INFO.
    """

    def __init__(self, app: ASGIApp, *, metrics: StudentMetrics, logger: logging.Logger, quiet_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logger
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            seconds = time.perf_counter() - started
            # The route template, never the raw path, so unknown URLs cannot create unbounded label values.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(seconds)
            level = logging.DEBUG if scope["path"] in self.quiet_paths else logging.INFO
            self.logger.log(level, "%s %s -> %d in %.3f s", scope["method"], scope["path"], status, seconds)
