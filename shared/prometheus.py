"""Prometheus helpers that the teacher gateway and the student server share.

Each service app has a registry of its own (:class:`ServiceMetrics`), so several apps in one process (as in
the tests) never share counters. Values that live in other objects are read at scrape time by collectors
added with :meth:`ServiceMetrics.add_collector`. :class:`RequestObserverMiddleware` times each HTTP
request and hands its route template and status code to the service's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The media type of the text format that :meth:`ServiceMetrics.render` returns.
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Route label of a request that matched no route.
UNMATCHED_ROUTE = "unmatched"


class ServiceMetrics:
    """A service's own metric registry, its scrape-time collectors and its text rendering.

    Subclasses create their counters and histograms in ``self.registry``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

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


def one_sample_gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    """Return a gauge family named ``name`` with one sample: ``value`` under the label names and values of ``labels``."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class RequestObserverMiddleware:
    """ASGI middleware that calls :meth:`observe` once for each HTTP request, after the response or the error.

    A request whose app raised before it started a response is observed with status 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def observe(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        """Record one request that took ``seconds``. ``route`` is the matched route template, or ``unmatched``."""
        raise NotImplementedError

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
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            self.observe(scope, route, status, seconds)
