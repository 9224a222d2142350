"""``PrometheusInstrumentation``: one registry, the one set of catalogue metrics built on it, and
everything that records into them.

Metrics are built once per registry.  Building a second ``PrometheusInstrumentation`` on the same
registry (a rebuilt middleware stack, a test re-importing the app) shares the metrics of the first
instead of failing with prometheus_client's "Duplicated timeseries".
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from crowdmon._recorder import ClientRequestRecorder, RequestRecorder, ShardedRequestRecorder
from crowdmon.cardinality import DEFAULT_CAP, CardinalityGuard
from crowdmon.catalogue import (
    CATALOGUE,
    HEALTH_STATES,
    HTTP_METRICS,
    MetricKind,
    MetricSpec,
    spec,
)

logger = logging.getLogger("crowdmon")

PrometheusMetric = Counter | Gauge | Histogram


class CrowdmonSetupError(ValueError):
    """A mistake in how crowdmon is set up; the message says how to fix it."""


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps values in ``PROMETHEUS_MULTIPROC_DIR`` files."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class LabelledMetric:
    """A catalogue metric whose children are resolved once per label set, through the guard."""

    def __init__(self, spec: MetricSpec, metric: PrometheusMetric, guard: CardinalityGuard) -> None:
        self.spec = spec
        self.metric = metric
        self._guard = guard
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        """The prometheus_client child for ``values``, each value admitted by the guard."""
        child = self._children.get(values)
        if child is None:
            folded = self._guard.admit_all(self.spec.name, self.spec.labels, values)
            child = self.metric.labels(*folded)
            if folded == values:
                self._children[values] = child
        return child


class _MetricSet:
    """The metrics of one registry; shared by every instrumentation built on it."""

    def __init__(self, registry: CollectorRegistry | None, guard: CardinalityGuard) -> None:
        self.registry = registry
        self.guard = guard
        self.multiprocess = multiprocess_mode()
        target = registry
        registered: list[Any] = []
        try:
            self.metrics: dict[str, LabelledMetric] = {}
            for item in CATALOGUE:
                if item in HTTP_METRICS:
                    continue
                metric = _build(item, target)
                registered.append(metric)
                self.metrics[item.name] = LabelledMetric(item, metric, guard)
            self.requests: RequestRecorder
            if self.multiprocess:
                client = ClientRequestRecorder(guard, target)
                registered.extend((client.requests, client.duration, client.request_size, client.response_size, client.in_progress))
                self.requests = client
            else:
                sharded = ShardedRequestRecorder(guard)
                if target is not None:
                    target.register(sharded)
                registered.append(sharded)
                self.requests = sharded
        except ValueError as error:
            if target is not None:
                for collector in registered:
                    try:
                        target.unregister(collector)
                    except KeyError:
                        pass
            raise CrowdmonSetupError(
                f"crowdmon cannot register its metrics on this registry: {error}. Another "
                "collector already uses a crowdmon metric name. Remove that collector, or give "
                "crowdmon a registry of its own: PrometheusInstrumentation(registry=CollectorRegistry())."
            ) from error
        guard.on_overflow = self._count_overflow
        self.internal_errors = self.metrics["crowdmon_internal_errors_total"]
        self._logged_sites: set[str] = set()
        self.health: dict[str, str] = {}
        self.health_lock = threading.Lock()

    def _count_overflow(self, metric: str, label: str) -> None:
        # Never through the guard: the self-metric's own labels come from the catalogue.
        self.metrics["crowdmon_label_overflow_total"].metric.labels(metric, label).inc()

    def report_internal_error(self, site: str, error: BaseException) -> None:
        """Count a contained failure of crowdmon's own code and log it once per site."""
        try:
            self.internal_errors.labels(site).inc()
            if site not in self._logged_sites:
                self._logged_sites.add(site)
                logger.error(
                    "crowdmon failed in %s; the request carries on unaffected. Further failures "
                    "here are counted in crowdmon_internal_errors_total{site=%r} without logging.",
                    site,
                    site,
                    exc_info=error,
                )
        except Exception:  # pragma: no cover - the last line of defence must not raise
            pass


def _build(item: MetricSpec, registry: CollectorRegistry | None) -> PrometheusMetric:
    if item.kind == MetricKind.COUNTER:
        return Counter(item.name.removesuffix("_total"), item.help, item.labels, registry=registry)
    if item.kind == MetricKind.HISTOGRAM:
        return Histogram(item.name, item.help, item.labels, registry=registry, buckets=item.buckets)
    return Gauge(
        item.name,
        item.help,
        item.labels,
        registry=registry,
        multiprocess_mode=item.multiprocess_mode or "all",  # type: ignore[arg-type]
    )


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, _MetricSet] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class PrometheusInstrumentation:
    """Owns a registry and the catalogue's metrics on it; everything crowdmon records goes here.

    ``registry=None`` means prometheus_client's global ``REGISTRY``, so the application's own
    metrics and the process collector share one ``/metrics``.  ``cardinality_caps`` maps
    ``"metric"`` or ``"metric:label"`` to the number of distinct values that label may hold.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        default_cap: int = DEFAULT_CAP,
        cardinality_caps: Mapping[str, int] | None = None,
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        with _SHARED_LOCK:
            shared = _SHARED.get(self.registry)
            if shared is None:
                guard = CardinalityGuard(default_cap, cardinality_caps)
                shared = _SHARED[self.registry] = _MetricSet(self.registry, guard)
        self._shared = shared
        self.guard = shared.guard
        self.requests = shared.requests
        self.report_internal_error = shared.report_internal_error

    @property
    def multiprocess(self) -> bool:
        return self._shared.multiprocess

    def metric(self, name: str) -> LabelledMetric:
        """The catalogue metric called ``name`` (e.g. ``"chat_messages_total"``)."""
        spec(name)  # a clear error for a name outside the catalogue
        try:
            return self._shared.metrics[name]
        except KeyError:
            raise CrowdmonSetupError(
                f"{name!r} is recorded by the middleware, not through metric(); "
                "add PrometheusMiddleware to the app instead"
            ) from None

    # -- component health ---------------------------------------------------------------------

    def register_component(self, component: str) -> None:
        """Make ``component`` known; it reports ``unknown`` until its state is set."""
        with self._shared.health_lock:
            if component not in self._shared.health:
                self._set_health_locked(component, "unknown")

    def set_component_health(self, component: str, state: str) -> None:
        """Set ``component_health_status`` one-hot: 1 for ``state``, 0 for the other states."""
        if state not in HEALTH_STATES:
            raise ValueError(f"health state must be one of {HEALTH_STATES}, got {state!r}")
        with self._shared.health_lock:
            self._set_health_locked(component, state)

    def _set_health_locked(self, component: str, state: str) -> None:
        gauge = self._shared.metrics["component_health_status"]
        for candidate in HEALTH_STATES:
            gauge.labels(component, candidate).set(1.0 if candidate == state else 0.0)
        self._shared.health[component] = state

    def set_component_healthy(self, component: str) -> None:
        self.set_component_health(component, "healthy")

    def set_component_degraded(self, component: str) -> None:
        self.set_component_health(component, "degraded")

    def set_component_unhealthy(self, component: str) -> None:
        self.set_component_health(component, "unhealthy")

    def component_health(self) -> dict[str, str]:
        """Every registered component and its current state."""
        with self._shared.health_lock:
            return dict(self._shared.health)


_default: PrometheusInstrumentation | None = None
_default_lock = threading.Lock()


def default_instrumentation() -> PrometheusInstrumentation:
    """The process-wide instance on prometheus_client's global registry, built on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = PrometheusInstrumentation()
    return _default
