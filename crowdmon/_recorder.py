"""Recording the ``crowdfunding_api_*`` request metrics: the hot path of the middleware.

Two recorders share one interface.  :class:`ShardedRequestRecorder` (one process) keeps plain
numbers in per-thread shards, so the request path takes no lock and calls no ``labels()``; a
collector sums the shards when ``/metrics`` is scraped.  Each thread only ever writes its own
shard, so counts stay exact under threads and asyncio alike.  :class:`ClientRequestRecorder`
(prometheus_client multiprocess mode) writes prometheus_client metrics, whose values live in the
shared files, through children resolved once per label set.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from crowdmon._sharded import bucket_edges, cumulative_buckets
from crowdmon.cardinality import CardinalityGuard
from crowdmon.catalogue import BY_NAME, MetricSpec

if TYPE_CHECKING:
    from crowdmon.exemplars import ExemplarStore

REQUESTS = BY_NAME["crowdfunding_api_requests_total"]
DURATION = BY_NAME["crowdfunding_api_request_duration_seconds"]
REQUEST_SIZE = BY_NAME["crowdfunding_api_request_size_bytes"]
RESPONSE_SIZE = BY_NAME["crowdfunding_api_response_size_bytes"]
IN_PROGRESS = BY_NAME["crowdfunding_api_requests_in_progress"]

RequestKey = tuple[str, str, str]  # method, handler, status


class RequestRecorder(Protocol):
    def started(self, method: str) -> None:
        """A request with this (normalised) method has entered the middleware."""

    def finished(
        self,
        method: str,
        handler: str,
        status: str,
        duration: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """The request is over: count it, observe it, and take it off the in-progress gauge."""


def _fold(guard: CardinalityGuard, method: str, handler: str, status: str) -> RequestKey:
    """The key a request is recorded under, each label admitted by the guard."""
    name = REQUESTS.name
    return (
        guard.admit(name, "method", method),
        guard.admit(name, "handler", handler),
        guard.admit(name, "status", status),
    )


class _Layout:
    """Where each number of a request series sits in its flat list of cells."""

    def __init__(self) -> None:
        self.duration_bounds = DURATION.buckets
        self.size_bounds = REQUEST_SIZE.buckets
        assert RESPONSE_SIZE.buckets == self.size_bounds
        # [count | duration buckets..., +Inf, sum | request size ... | response size ...]
        self.duration = 1
        self.duration_sum = self.duration + len(self.duration_bounds) + 1
        self.request = self.duration_sum + 1
        self.request_sum = self.request + len(self.size_bounds) + 1
        self.response = self.request_sum + 1
        self.response_sum = self.response + len(self.size_bounds) + 1
        self.width = self.response_sum + 1


_LAYOUT = _Layout()
_DURATION, _DURATION_SUM, _DURATION_BOUNDS = _LAYOUT.duration, _LAYOUT.duration_sum, _LAYOUT.duration_bounds
_REQUEST, _REQUEST_SUM = _LAYOUT.request, _LAYOUT.request_sum
_RESPONSE, _RESPONSE_SUM, _SIZE_BOUNDS = _LAYOUT.response, _LAYOUT.response_sum, _LAYOUT.size_bounds


class _Shard:
    __slots__ = ("in_progress", "series")

    def __init__(self) -> None:
        self.series: dict[RequestKey, list[float]] = {}
        self.in_progress: dict[str, int] = {}


class ShardedRequestRecorder:
    """Lock-free request recording for one process; a prometheus_client collector."""

    #: Set by :mod:`crowdmon.exemplars` when a middleware asks for exemplars.
    exemplars: ExemplarStore | None = None

    def __init__(self, guard: CardinalityGuard) -> None:
        self._guard = guard
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._shards_lock = threading.Lock()

    def _shard(self) -> _Shard:
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._local.shard = _Shard()
            with self._shards_lock:
                self._shards.append(shard)
        return shard

    def started(self, method: str) -> None:
        try:
            in_progress = self._local.shard.in_progress
        except AttributeError:
            in_progress = self._shard().in_progress
        in_progress[method] = in_progress.get(method, 0) + 1

    def finished(
        self,
        method: str,
        handler: str,
        status: str,
        duration: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        # The hottest code in crowdmon: offsets are module constants, the shard is read inline.
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard.in_progress[method] -= 1
        cells = shard.series.get((method, handler, status))
        if cells is None:
            cells = self._new_series(shard, method, handler, status)
        cells[0] += 1
        cells[_DURATION + bisect_left(_DURATION_BOUNDS, duration)] += 1
        cells[_DURATION_SUM] += duration
        cells[_REQUEST + bisect_left(_SIZE_BOUNDS, request_bytes)] += 1
        cells[_REQUEST_SUM] += request_bytes
        cells[_RESPONSE + bisect_left(_SIZE_BOUNDS, response_bytes)] += 1
        cells[_RESPONSE_SUM] += response_bytes

    def _new_series(self, shard: _Shard, method: str, handler: str, status: str) -> list[float]:
        key = _fold(self._guard, method, handler, status)
        cells = shard.series.get(key)
        if cells is None:
            # Stored under the folded key only: a folded request misses the lookup and comes back
            # here every time, rather than growing the shard by its raw values.
            cells = shard.series[key] = [0.0] * _LAYOUT.width
        return cells

    # -- the collector side: runs at scrape time ------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return [_family(spec) for spec in (REQUESTS, DURATION, REQUEST_SIZE, RESPONSE_SIZE, IN_PROGRESS)]

    def collect(self) -> Iterator[Metric]:
        families = self._collect_families()
        return families if self.exemplars is None else self.exemplars.attach(families)

    def _collect_families(self) -> Iterator[Metric]:
        with self._shards_lock:
            shards = list(self._shards)
        series: dict[RequestKey, list[float]] = {}
        in_progress: dict[str, int] = {}
        for shard in shards:
            # dict.copy and list() are atomic under the GIL; the owning thread may write meanwhile.
            for key, cells in shard.series.copy().items():
                total = series.get(key)
                snapshot = list(cells)
                if total is None:
                    series[key] = snapshot
                else:
                    for i, value in enumerate(snapshot):
                        total[i] += value
            for method, count in shard.in_progress.copy().items():
                in_progress[method] = in_progress.get(method, 0) + count

        requests = CounterMetricFamily(_base(REQUESTS), REQUESTS.help, labels=REQUESTS.labels)
        by_route: dict[tuple[str, str], list[float]] = {}
        for (method, handler, status), cells in series.items():
            requests.add_metric([method, handler, status], cells[0])
            total = by_route.get((method, handler))
            if total is None:
                by_route[(method, handler)] = list(cells)
            else:
                for i, value in enumerate(cells):
                    total[i] += value
        yield requests

        layout = _LAYOUT
        for spec, start, bounds in (
            (DURATION, layout.duration, layout.duration_bounds),
            (REQUEST_SIZE, layout.request, layout.size_bounds),
            (RESPONSE_SIZE, layout.response, layout.size_bounds),
        ):
            family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            edges = bucket_edges(bounds)
            for labels, cells in by_route.items():
                family.add_metric(
                    list(labels),
                    cumulative_buckets(edges, cells[start : start + len(bounds) + 1]),
                    sum_value=cells[start + len(bounds) + 1],
                )
            yield family

        gauge = GaugeMetricFamily(IN_PROGRESS.name, IN_PROGRESS.help, labels=IN_PROGRESS.labels)
        for method, count in in_progress.items():
            gauge.add_metric([method], count)
        yield gauge


def _base(spec: MetricSpec) -> str:
    return spec.name.removesuffix("_total")


def _family(spec: MetricSpec) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(_base(spec), spec.help, labels=spec.labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


class ClientRequestRecorder:
    """Request recording through prometheus_client metrics (multiprocess mode)."""

    def __init__(self, guard: CardinalityGuard, registry: CollectorRegistry | None) -> None:
        self._guard = guard
        self.requests = Counter(_base(REQUESTS), REQUESTS.help, REQUESTS.labels, registry=registry)
        self.duration = Histogram(DURATION.name, DURATION.help, DURATION.labels, registry=registry, buckets=DURATION.buckets)
        self.request_size = Histogram(REQUEST_SIZE.name, REQUEST_SIZE.help, REQUEST_SIZE.labels, registry=registry, buckets=REQUEST_SIZE.buckets)
        self.response_size = Histogram(RESPONSE_SIZE.name, RESPONSE_SIZE.help, RESPONSE_SIZE.labels, registry=registry, buckets=RESPONSE_SIZE.buckets)
        self.in_progress = Gauge(IN_PROGRESS.name, IN_PROGRESS.help, IN_PROGRESS.labels, registry=registry, multiprocess_mode=IN_PROGRESS.multiprocess_mode)  # type: ignore[arg-type]
        self._children: dict[RequestKey, tuple[Counter, Histogram, Histogram, Histogram]] = {}
        self._gauges: dict[str, Gauge] = {}

    def started(self, method: str) -> None:
        gauge = self._gauges.get(method)
        if gauge is None:
            gauge = self._gauges[method] = self.in_progress.labels(method)
        gauge.inc()

    def finished(
        self,
        method: str,
        handler: str,
        status: str,
        duration: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        self._gauges[method].dec()
        children = self._children.get((method, handler, status))
        if children is None:
            key = _fold(self._guard, method, handler, status)
            children = (
                self.requests.labels(*key),
                self.duration.labels(key[0], key[1]),
                self.request_size.labels(key[0], key[1]),
                self.response_size.labels(key[0], key[1]),
            )
            if key == (method, handler, status):
                self._children[key] = children
        requests, duration_child, request_child, response_child = children
        requests.inc()
        duration_child.observe(duration)
        request_child.observe(request_bytes)
        response_child.observe(response_bytes)
