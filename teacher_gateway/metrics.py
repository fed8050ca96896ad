"""Prometheus metrics of one gateway app, served at ``GET /metrics``.

Each app has a registry of its own, so several apps in one process (as in the tests) never share
counters. Counters and histograms count what this process did since it started, as Prometheus expects;
``GET /v1/usage`` returns the same counts summed over every process and restart from the usage ledger.
Gauges read at scrape time give the budget (from the ledger, so all processes agree), the canary check,
the tiles in flight and the remote teacher's own counters.

Every counter has the labels ``teacher`` (identity) and ``key`` (the API key's name, ``anonymous`` without
keys, ``canary`` for the drift check), except where its help text says otherwise.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Scope

from shared.prometheus import CONTENT_TYPE, RequestObserverMiddleware, ServiceMetrics, one_sample_gauge

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "RequestLatencyMiddleware", "gauge", "teacher_stats_metrics"]

PREFIX = "unite_gateway"
# Seconds; a teacher call ranges from milliseconds (a local model on a few tiles) to minutes (a slow API with retries).
TEACHER_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics(ServiceMetrics):
    """The gateway's counters and histograms, and the scrape-time collectors added with :meth:`add_collector`."""

    def __init__(self) -> None:
        super().__init__()
        labels = ("teacher", "key")
        registry = self.registry

        self.requests = Counter(f"{PREFIX}_requests", "Embedding requests admitted.", labels, registry=registry)
        self.tiles = Counter(f"{PREFIX}_tiles", "Tiles received in embedding requests.", labels, registry=registry)
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "Tiles answered from the cache.", labels, registry=registry)
        self.coalesced = Counter(
            f"{PREFIX}_coalesced_tiles",
            "Tiles answered by another request's teacher call that was in flight.",
            labels,
            registry=registry,
        )
        self.teacher_calls = Counter(
            f"{PREFIX}_teacher_calls",
            "Teacher calls charged: one per batch of the teacher's maximum batch size, charged when sent.",
            labels,
            registry=registry,
        )
        self.teacher_tiles = Counter(
            f"{PREFIX}_teacher_tiles", "Tiles sent to the teacher, charged when sent.", labels, registry=registry
        )

        self.teacher_errors = Counter(
            f"{PREFIX}_teacher_errors",
            "Failed teacher calls by error code (labels teacher and code).",
            ("teacher", "code"),
            registry=registry,
        )
        self.refusals = Counter(
            f"{PREFIX}_refusals",
            "Requests refused by a gateway limit, by error code (label code).",
            ("code",),
            registry=registry,
        )

        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer an HTTP request, by route and status code.",
            ("route", "status"),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.teacher_seconds = Histogram(
            f"{PREFIX}_teacher_call_duration_seconds",
            "Time of one teacher.embed call, including the remote client's retries (label teacher).",
            ("teacher",),
            buckets=TEACHER_CALL_BUCKETS,
            registry=registry,
        )


def gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    """Return a one-sample gauge named ``unite_gateway_<name>``."""
    return one_sample_gauge(f"{PREFIX}_{name}", documentation, labels, value)


class RequestLatencyMiddleware(RequestObserverMiddleware):
    """Observe each HTTP request's duration in ``unite_gateway_request_duration_seconds``, by route template and status."""

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    def observe(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        self.metrics.request_seconds.labels(route, str(status)).observe(seconds)


def teacher_stats_metrics(teacher: str, stats: dict[str, Any]) -> list[Metric]:
    """Turn a teacher backend's ``stats()`` into counters named ``unite_gateway_backend_<name>_total``.

    A number becomes one counter labelled with the teacher, and a dict of numbers (such as failures by
    kind) becomes one counter with a ``kind`` label per entry. Other values are left out.
    """
    families: list[Metric] = []
    for name, value in sorted(stats.items()):
        documentation = f"The teacher backend's own count {name!r}, as its stats() returns it."
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            family = CounterMetricFamily(f"{PREFIX}_backend_{name}", documentation, labels=["teacher"])
            family.add_metric([teacher], value)
            families.append(family)
        elif isinstance(value, dict):
            family = CounterMetricFamily(f"{PREFIX}_backend_{name}", documentation, labels=["teacher", "kind"])
            for kind, count in sorted(value.items()):
                if isinstance(count, (int, float)) and not isinstance(count, bool):
                    family.add_metric([teacher, str(kind)], count)
            families.append(family)
    return families
