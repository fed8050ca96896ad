"""Prometheus metrics of one student server app, served at ``GET /metrics``.

Each app has a registry of its own, so several apps in one process (as in the tests) never share
counters. Counters and histograms count what this process did since it started. The queue, the slide
jobs and the served checkpoint are read at scrape time from the objects that own them.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Scope

from shared.prometheus import CONTENT_TYPE, RequestObserverMiddleware, ServiceMetrics, one_sample_gauge

__all__ = ["CONTENT_TYPE", "RequestMetricsMiddleware", "StudentMetrics", "gauge"]

PREFIX = "unite_student"
# Seconds; a tile request takes milliseconds on a GPU, a large one seconds on a CPU, a slide upload minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Tiles per forward pass; batch_size is 32 by default and rarely above 256.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RELOAD_OUTCOMES = ("success", "failed")


class StudentMetrics(ServiceMetrics):
    """The student server's counters and histograms, and the scrape-time collectors added with :meth:`add_collector`."""

    def __init__(self) -> None:
        super().__init__()
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


def gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    """Return a one-sample gauge named ``unite_student_<name>``."""
    return one_sample_gauge(f"{PREFIX}_{name}", documentation, labels, value)


class RequestMetricsMiddleware(RequestObserverMiddleware):
    """Count each HTTP request by route template and status, observe its duration, and log one line for it.

    Installed inside :class:`shared.http.RequestGuardMiddleware`, so the log line carries the request id,
    and a body the guard rejects before the app runs (413) is not counted here. Probes and scrapes
    (``quiet_paths``) are logged at DEBUG, other requests at INFO.
    """

    def __init__(self, app: ASGIApp, *, metrics: StudentMetrics, logger: logging.Logger, quiet_paths: frozenset[str]) -> None:
        super().__init__(app)
        self.metrics = metrics
        self.logger = logger
        self.quiet_paths = quiet_paths

    def observe(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        level = logging.DEBUG if scope["path"] in self.quiet_paths else logging.INFO
        self.logger.log(level, "%s %s -> %d in %.3f s", scope["method"], scope["path"], status, seconds)
