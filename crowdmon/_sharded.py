"""A histogram whose ``observe()`` takes no lock: per-thread cells, summed when scraped.

Used for the catalogue's histograms in one process (prometheus_client's multiprocess mode keeps
its own ``Histogram``, whose values live in the shared files).  ``labels(*values)`` returns a
child with ``observe(value)``, as prometheus_client's does; each thread only ever writes its own
cells, so counts stay exact under threads and asyncio alike, and the collector reads every
thread's cells at scrape time.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class ShardedHistogram:
    """A labelled histogram collector; register it on a registry like any collector."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        bounds = tuple(float(b) for b in buckets)
        if bounds and bounds[-1] == float("inf"):
            bounds = bounds[:-1]
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"buckets of {name} must be strictly increasing, got {bounds}")
        self.bounds = bounds
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> HistogramChild:
        """The child for ``values`` (one per label name), created on first use."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            with self._lock:
                child = self._children.setdefault(values, HistogramChild(self.bounds))
        return child

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = bucket_edges(self.bounds)
        running = frozenset(threading.enumerate())  # once per scrape, not once per child
        for values, child in list(self._children.items()):
            cells = child.totals(running)
            family.add_metric(list(values), cumulative_buckets(edges, cells[:-1]), sum_value=cells[-1])
        yield family


def bucket_edges(bounds: tuple[float, ...]) -> list[str]:
    """The ``le`` label values of a histogram with these upper bounds, ``+Inf`` last."""
    return [floatToGoString(bound) for bound in (*bounds, float("inf"))]  # type: ignore[no-untyped-call]


def cumulative_buckets(edges: list[str], counts: list[float]) -> list[tuple[str, float]]:
    """Per-bucket counts (``+Inf`` last) as the cumulative ``(le, count)`` pairs Prometheus wants."""
    buckets = []
    running = 0.0
    for edge, count in zip(edges, counts, strict=True):
        running += count
        buckets.append((edge, running))
    return buckets


class HistogramChild:
    """One label set's histogram: ``observe()`` adds to the calling thread's cells.

    The cells of a thread that has ended are folded into one retired set, when a new thread
    starts observing and at every scrape: a worker pool whose idle threads exit and come back
    (anyio's do after 10 s) would otherwise leave one set of cells behind per thread, forever."""

    __slots__ = ("_all", "_all_lock", "_bounds", "_local", "_retired")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, list[float]]] = []
        self._all_lock = threading.Lock()
        self._retired = [0.0] * (len(bounds) + 2)

    def observe(self, amount: float) -> None:
        try:
            cells: list[float] = self._local.cells
        except AttributeError:
            cells = self._new_cells()
        # [bucket 0 .. bucket n (+Inf), sum]; "le" buckets: the first bound >= the value.
        cells[bisect_left(self._bounds, amount)] += 1
        cells[-1] += amount

    def _new_cells(self) -> list[float]:
        cells = self._local.cells = [0.0] * (len(self._bounds) + 2)
        with self._all_lock:
            self._retire_ended(frozenset(threading.enumerate()))
            self._all.append((threading.current_thread(), cells))
        return cells

    def _retire_ended(self, running: frozenset[threading.Thread]) -> None:
        """Fold the cells of threads that have ended (not in ``running``) into the retired set,
        holding the lock: an ended thread writes nothing more.  Never the main thread's or the
        caller's: at interpreter exit the main thread counts as ended, yet ``atexit`` handlers
        still run on it."""
        keep = (threading.main_thread(), threading.current_thread())

        def goes_on(thread: threading.Thread) -> bool:
            # is_alive() only for threads missing from the snapshot: ended, or started since.
            return thread in running or thread in keep or thread.is_alive()

        if all(goes_on(thread) for thread, _ in self._all):
            return
        retired = self._retired
        still = []
        for thread, cells in self._all:
            if goes_on(thread):
                still.append((thread, cells))
            else:
                for i, value in enumerate(cells):
                    retired[i] += value
        self._all[:] = still

    def totals(self, running: frozenset[threading.Thread] | None = None) -> list[float]:
        """Every thread's cells added up (bucket counts, not cumulative, then the sum);
        ``running`` is ``threading.enumerate()``, read once by the caller for many children."""
        with self._all_lock:
            self._retire_ended(frozenset(threading.enumerate()) if running is None else running)
            shards = [cells for _, cells in self._all]
            total = list(self._retired)
        for cells in shards:
            for i, value in enumerate(list(cells)):  # list() is an atomic snapshot under the GIL
                total[i] += value
        return total
