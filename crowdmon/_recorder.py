"""Recording the ``crowdfunding_api_*`` request metrics: the hot path of the middleware.

Two recorders share one interface: ``start(method)`` when a request enters, ``record(entry)``
when it is over, ``flush()`` to bring every recorded request into the metrics.

:class:`BufferedRequestRecorder` (one process) makes the request path as short as Python allows:
``start`` and ``record`` are ``list.append`` itself, so a request costs two appends and no lock,
no ``labels()`` call, no bucket search.  The lists are absorbed into plain per-series numbers in
batches, when a batch is full and before every scrape, so what a scrape shows is exact.  The
per-entry work of absorbing is done by C (``sorted``, ``bisect``, ``map`` over ``itemgetter``,
``sum``, ``Counter``, ``dict.fromkeys``); Python loops run once per label set and bucket.
``append`` and slicing are atomic, so counts stay exact under threads and asyncio alike.
Where the package is compiled, a request of a label set already admitted does not even append:
the compiled middleware adds it to that label set's sums in C as it finishes (``sums``, a
``RequestSums``), and :meth:`BufferedRequestRecorder.flush` drains the sums into the series.
:class:`ClientRequestRecorder` (prometheus_client multiprocess mode) writes prometheus_client
metrics at once, through children resolved once per label set: their values live in files
another worker may be scraped from.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from crowdmon._compiled import speedups
from crowdmon._sharded import bucket_edges, cumulative_buckets
from crowdmon.cardinality import CardinalityGuard
from crowdmon.catalogue import BY_NAME, OTHER_METHOD, MetricSpec

if TYPE_CHECKING:
    from crowdmon._speedups import RequestSums
    from crowdmon.exemplars import ExemplarStore

REQUESTS = BY_NAME["crowdfunding_api_requests_total"]
DURATION = BY_NAME["crowdfunding_api_request_duration_seconds"]
REQUEST_SIZE = BY_NAME["crowdfunding_api_request_size_bytes"]
RESPONSE_SIZE = BY_NAME["crowdfunding_api_response_size_bytes"]
IN_PROGRESS = BY_NAME["crowdfunding_api_requests_in_progress"]

RequestKey = tuple[str, str, str]  # method, handler, status, as labels
#: One finished request: method and status as the server and the app gave them (turned into
#: labels when absorbed), handler label, duration (s), request bytes, response bytes.
RequestEntry = tuple[object, str, object, float, int, int]

#: Methods recorded as they are; any other method is recorded as :data:`OTHER_METHOD`.
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_METHOD_LABELS = {method: method for method in STANDARD_METHODS}
_STATUS_LABELS = {code: str(code) for code in range(100, 600)}


def method_label(method: object) -> str:
    """The request method, or :data:`OTHER_METHOD` for anything but the nine standard ones."""
    try:
        return _METHOD_LABELS.get(method, OTHER_METHOD)  # type: ignore[call-overload,no-any-return]
    except Exception:  # unhashable: no server sends one, but the label must stay bounded
        return OTHER_METHOD


def status_label(status: object) -> str:
    """The status the app sent, as a label; anything but an integer from 100 to 599 (an HTTP
    status) is recorded as ``"0"``, so an app's odd numbers cannot grow the series."""
    if isinstance(status, int):
        return _STATUS_LABELS.get(status, "0")
    return "0"


#: How a recorder reports a contained failure: site, error, and how many requests it cost.
Reporter = Callable[[str, BaseException, int], None]

#: Finished requests a :class:`BufferedRequestRecorder` holds before it absorbs them.
FLUSH_AT = 1024


class RequestRecorder(Protocol):
    @property
    def start(self) -> Callable[[object], None]:
        """Called with the method (as the server gave it) of every request that enters."""

    @property
    def record(self) -> Callable[[RequestEntry], None]:
        """Called once per request that is over, with its :data:`RequestEntry`."""

    #: Entries recorded but not yet absorbed; the middleware calls :meth:`flush` at ``flush_at``.
    pending: list[RequestEntry]
    flush_at: int
    @property
    def sums(self) -> RequestSums | None:
        """Where the compiled middleware adds the requests of known label sets itself, or ``None``."""

    def flush(self) -> None:
        """Bring every recorded request into the metrics."""


def _fold(guard: CardinalityGuard, key: RequestKey, requests: int = 1) -> RequestKey:
    """The key ``requests`` requests are recorded under, each label admitted by the guard."""
    name = REQUESTS.name
    method, handler, status = key
    return (
        guard.admit(name, "method", method, requests),
        guard.admit(name, "handler", handler, requests),
        guard.admit(name, "status", status, requests),
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
_KEY: Callable[[RequestEntry], tuple[object, str, object]] = itemgetter(0, 1, 2)
_DURATION: Callable[[RequestEntry], float] = itemgetter(3)
_RECEIVED: Callable[[RequestEntry], int] = itemgetter(4)
_SENT: Callable[[RequestEntry], int] = itemgetter(5)


def sends_no_body(method: object, status: object) -> bool:
    """Whether the server sends no response body whatever the app hands it: a ``HEAD`` request,
    or a 1xx, 204 or 304 response (Starlette's ``Response`` still hands over the body)."""
    return method == "HEAD" or (status.__class__ is int and (100 <= status < 200 or status in (204, 304)))


def _add_observations(cells: list[float], first: int, bounds: Sequence[float], ordered: Sequence[float]) -> None:
    """Histogram cells from ``first`` on (buckets, ``+Inf``, sum) take the ``ordered`` values:
    one bisection per bucket, not one per value."""
    below = 0
    for offset, bound in enumerate(bounds):
        upto = bisect_right(ordered, bound)  # values <= bound: Prometheus's "le"
        cells[first + offset] += upto - below
        below = upto
    cells[first + len(bounds)] += len(ordered) - below
    cells[first + len(bounds) + 1] += sum(ordered)


def _label_sets(ordered: list[RequestEntry]) -> Iterator[tuple[tuple[object, str, object], int, int]]:
    """Each label set of a batch sorted by label set, with the slice of entries it spans, found
    by bisection."""
    start, end = 0, len(ordered)
    while start < end:
        key = _KEY(ordered[start])
        stop = bisect_right(ordered, key, start, key=_KEY)
        yield key, start, stop
        start = stop


def _plain(entry: RequestEntry) -> RequestEntry:
    """The entry with its method and status made values every other entry can be sorted and
    hashed with."""
    method, handler, status, duration, received, sent = entry
    return (method_label(method), handler, int(status) if isinstance(status, int) else 0, duration, received, sent)


class _Plan:
    """What absorbing a batch will change, worked out before anything changes: everything that
    can fail on odd values (hashing, sorting) happens here."""

    def __init__(self, started: Mapping[object, int], batch: list[RequestEntry]) -> None:
        #: Entries sorted by label set (C compares the objects the entries share); each label
        #: set's values are sorted on their own later, where floats and ints compare fastest.
        self.ordered = sorted(batch, key=_KEY)
        self.spans = list(_label_sets(self.ordered))
        self.in_progress: Tally[str] = Tally()
        for method, count in started.items():
            self.in_progress[method_label(method)] += count
        requests: dict[tuple[object, str, object], int] = {}
        for raw_key, start, stop in self.spans:
            requests[raw_key] = requests.get(raw_key, 0) + stop - start
            self.in_progress[method_label(raw_key[0])] -= stop - start
        # Label sets in the order their first request arrived, so the cardinality guard admits
        # values first come, first served, as if each request were recorded on its own.
        arrival = dict.fromkeys(map(_KEY, batch)) if len(requests) > 1 else requests
        self.label_sets = [
            (raw_key, (method_label(raw_key[0]), raw_key[1], status_label(raw_key[2])), requests[raw_key])
            for raw_key in arrival
        ]


class BufferedRequestRecorder:
    """Request recording for one process, absorbed in batches; a prometheus_client collector.

    Where the package is compiled, each label set the Python path below admits (with values
    that are labels as they are) is registered with ``sums`` (``RequestSums`` in
    ``crowdmon/_speedups.c``): the compiled middleware adds that label set's later requests to
    its sums in C, and :meth:`flush` drains them into the series with the lists."""

    flush_at = FLUSH_AT
    #: Set by :mod:`crowdmon.exemplars` when a middleware asks for exemplars.
    exemplars: ExemplarStore | None = None

    def __init__(self, guard: CardinalityGuard, report: Reporter) -> None:
        self._guard = guard
        self._report = report
        self.pending: list[RequestEntry] = []
        self._starts: list[object] = []
        self.record = self.pending.append
        self.start = self._starts.append
        self._lock = threading.Lock()
        self._series: dict[RequestKey, list[float]] = {}
        self._in_progress: dict[str, int] = {}
        compiled = speedups()
        #: Counts the started requests' methods (C counts a run of one method object at once).
        self._tally: Callable[[list[object]], Mapping[object, int]] = Tally if compiled is None else compiled.tally
        #: Where the compiled middleware adds up, as they finish, the requests of each label set
        #: whose raw values are already labels (a standard method, a status from 100 to 599) and
        #: that the guard admitted as they are, and counts the starts of standard methods; the
        #: rest comes through ``start`` and ``record``.  As bounded as the series.
        self.sums: RequestSums | None = None
        if compiled is not None:
            offsets = (_LAYOUT.duration, _LAYOUT.request, _LAYOUT.response)
            self.sums = compiled.RequestSums(STANDARD_METHODS, _LAYOUT.duration_bounds, _LAYOUT.size_bounds, offsets)

    def flush(self) -> None:
        with self._lock:
            # Finished requests first, then started ones: a request seen finished was seen
            # started, so the in-progress gauge never goes below zero.  Entries appended meanwhile
            # sit after the slice and stay for the next flush.
            pending = self.pending
            batch = pending[: len(pending)]
            del pending[: len(batch)]
            starts = self._starts
            started = starts[: len(starts)]
            del starts[: len(started)]
            if self.sums is not None:
                try:
                    added, finished, lost = self.sums.drain()
                except Exception as error:
                    # Only memory runs out here, before anything was drained: all of it waits
                    # for the next flush.
                    self._report("middleware.record", error, 1)
                else:
                    in_progress = self._in_progress
                    for label, count in added.items():
                        in_progress[label] = in_progress.get(label, 0) + count
                    for label, count in finished.items():
                        in_progress[label] = in_progress.get(label, 0) - count
                    if lost:
                        self._report("middleware.record", MemoryError(f"{lost} request series cells not written"), 1)
            try:
                plan = _Plan(self._tally(started), batch)
            except Exception:
                # A method or status no server or app should send (unhashable, not comparable
                # with the others): the same again with every one of them made a plain value.
                try:
                    plan = _Plan(Tally(map(method_label, started)), [_plain(entry) for entry in batch])
                except Exception as error:
                    # Still not (a handler label no middleware makes): the batch is lost, each
                    # request counted as a failure, and the gauge stays right.
                    self._report("middleware.record", error, len(batch))
                    in_progress = self._in_progress
                    for method in started:
                        label = method_label(method)
                        in_progress[label] = in_progress.get(label, 0) + 1
                    for entry in batch:
                        label = method_label(entry[0])
                        in_progress[label] = in_progress.get(label, 0) - 1
                    return
            self._apply(plan)

    def _apply(self, plan: _Plan) -> None:
        in_progress = self._in_progress
        for method, count in plan.in_progress.items():
            in_progress[method] = in_progress.get(method, 0) + count
        series = self._series
        targets: dict[tuple[object, str, object], list[float] | None] = {}
        for raw_key, key, requests in plan.label_sets:
            cells = series.get(key)
            if cells is None:
                try:
                    cells = self._new_series(key, requests)
                except Exception as error:
                    # These requests are lost; each is counted as a failure of its own.
                    self._report("middleware.record", error, requests)
            targets[raw_key] = cells
            if (
                self.sums is not None
                and cells is not None
                and raw_key[0].__class__ is str  # exact values only: a str subclass is recorded as any odd value
                and raw_key[1].__class__ is str
                and raw_key[2].__class__ is int
                and raw_key[0] == key[0]
                and key[2] == _STATUS_LABELS.get(raw_key[2])
                and self._series.get(key) is cells
            ):
                self.sums.register(raw_key[0], raw_key[1], raw_key[2], cells, sends_no_body(raw_key[0], raw_key[2]))
        layout = _LAYOUT
        ordered = plan.ordered
        for raw_key, start, stop in plan.spans:
            cells = targets[raw_key]
            if cells is None:
                continue
            entries = ordered[start:stop]
            cells[0] += stop - start
            _add_observations(cells, layout.duration, layout.duration_bounds, sorted(map(_DURATION, entries)))
            _add_observations(cells, layout.request, layout.size_bounds, sorted(map(_RECEIVED, entries)))
            # Per label set, not per request: the method and the status are part of the key.
            sent = [0] * (stop - start) if sends_no_body(raw_key[0], raw_key[2]) else sorted(map(_SENT, entries))
            _add_observations(cells, layout.response, layout.size_bounds, sent)

    def _new_series(self, key: RequestKey, requests: int) -> list[float]:
        folded = _fold(self._guard, key, requests)
        cells = self._series.get(folded)
        if cells is None:
            # Stored under the folded key only: a folded key misses the lookup and comes back
            # here at every batch, rather than growing the series by its raw values.
            cells = self._series[folded] = [0.0] * _LAYOUT.width
        return cells

    # -- the collector side: runs at scrape time ------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return [_family(spec) for spec in (REQUESTS, DURATION, REQUEST_SIZE, RESPONSE_SIZE, IN_PROGRESS)]

    def collect(self) -> Iterator[Metric]:
        families = self._collect_families()
        return families if self.exemplars is None else self.exemplars.attach(families)

    def _collect_families(self) -> Iterator[Metric]:
        try:
            self.flush()
        except Exception as error:  # pragma: no cover - flush contains its own failures
            self._report("middleware.record", error, 1)
        with self._lock:
            series = {key: list(cells) for key, cells in self._series.items()}
            in_progress = dict(self._in_progress)

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

    flush_at = 1
    sums = None

    def __init__(self, guard: CardinalityGuard, registry: CollectorRegistry | None) -> None:
        self._guard = guard
        self.requests = Counter(_base(REQUESTS), REQUESTS.help, REQUESTS.labels, registry=registry)
        self.duration = Histogram(DURATION.name, DURATION.help, DURATION.labels, registry=registry, buckets=DURATION.buckets)
        self.request_size = Histogram(REQUEST_SIZE.name, REQUEST_SIZE.help, REQUEST_SIZE.labels, registry=registry, buckets=REQUEST_SIZE.buckets)
        self.response_size = Histogram(RESPONSE_SIZE.name, RESPONSE_SIZE.help, RESPONSE_SIZE.labels, registry=registry, buckets=RESPONSE_SIZE.buckets)
        self.in_progress = Gauge(IN_PROGRESS.name, IN_PROGRESS.help, IN_PROGRESS.labels, registry=registry, multiprocess_mode=IN_PROGRESS.multiprocess_mode)  # type: ignore[arg-type]
        self._children: dict[RequestKey, tuple[Counter, Histogram, Histogram, Histogram]] = {}
        self._gauges: dict[str, Gauge] = {}
        #: Always empty: every request is written at once.
        self.pending: list[RequestEntry] = []

    def flush(self) -> None:
        """Nothing to do: the values are already in the shared files."""

    def start(self, method: object) -> None:
        label = method_label(method)
        gauge = self._gauges.get(label)
        if gauge is None:
            gauge = self._gauges[label] = self.in_progress.labels(label)
        gauge.inc()

    def record(self, entry: RequestEntry) -> None:
        raw_method, handler, raw_status, duration, request_bytes, response_bytes = entry
        method, status = method_label(raw_method), status_label(raw_status)
        self._gauges[method].dec()
        children = self._children.get((method, handler, status))
        if children is None:
            key = _fold(self._guard, (method, handler, status))
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
        response_child.observe(0 if sends_no_body(raw_method, raw_status) else response_bytes)
