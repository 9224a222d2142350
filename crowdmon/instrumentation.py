"""``PrometheusInstrumentation``: one registry, the one set of catalogue metrics built on it, and
everything that records into them.

Metrics are built once per registry.  Building a second ``PrometheusInstrumentation`` on the same
registry (a rebuilt middleware stack, a test re-importing the app) shares the metrics of the first
instead of failing with prometheus_client's "Duplicated timeseries".
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from enum import Enum
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from crowdmon._recorder import ClientRequestRecorder, RequestRecorder, ShardedRequestRecorder
from crowdmon.cardinality import DEFAULT_CAP, CardinalityGuard
from crowdmon.catalogue import (
    CATALOGUE,
    CATEGORY_COUNTERS,
    ERROR_TYPES,
    HEALTH_STATES,
    HTTP_METRICS,
    UNKNOWN_VALUE,
    MetricKind,
    MetricSpec,
    spec,
)
from crowdmon.timing import Timing

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
                    with contextlib.suppress(KeyError):
                        target.unregister(collector)
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
        self.metrics["crowdmon_label_overflow_total"].metric.labels(metric, label).inc()  # type: ignore[union-attr]

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

    # -- the seed's tracking API ----------------------------------------------------------------

    def track_request_performance(self, endpoint: str, user_type: str = UNKNOWN_VALUE) -> Timing:
        """Context manager (``with`` or ``async with``) timing chat processing into
        ``chat_processing_duration_seconds{endpoint,user_type}``."""
        child = self.metric("chat_processing_duration_seconds").labels(label(endpoint), label(user_type))
        return Timing(lambda outcome: child, self.report_internal_error)

    def track_external_api_call(self, service: str, endpoint: str) -> Timing:
        """Context manager timing one external call into ``external_api_duration_seconds`` with
        its outcome; an exception also counts in ``external_service_errors_total``."""
        service, endpoint = label(service), label(endpoint)
        durations = self.metric("external_api_duration_seconds")
        errors = self.metric("external_service_errors_total")
        return Timing(
            lambda outcome: durations.labels(service, endpoint, outcome),
            self.report_internal_error,
            on_error=lambda error: errors.labels(service, endpoint, type(error).__name__).inc(),
        )

    def track_vector_search(self, operation: str) -> Timing:
        """Context manager timing a vector database operation into ``vector_search_duration_seconds``."""
        child = self.metric("vector_search_duration_seconds").labels(label(operation))
        return Timing(lambda outcome: child, self.report_internal_error)

    def track_database_query(self, operation: str) -> Timing:
        """Context manager timing a database query into ``database_query_duration_seconds``."""
        child = self.metric("database_query_duration_seconds").labels(label(operation))
        return Timing(lambda outcome: child, self.report_internal_error)

    def track_chat_message(
        self,
        user_type: str = UNKNOWN_VALUE,
        message_type: str = "user",
        cache_hit: bool = False,
        rag_used: bool = False,
    ) -> None:
        """Count one chat message in ``chat_messages_total``."""
        self.metric("chat_messages_total").labels(
            label(user_type), label(message_type), label(cache_hit), label(rag_used)
        ).inc()

    def track_memory_operation(
        self, operation: str, memory_type: str, user_type: str = UNKNOWN_VALUE
    ) -> None:
        """Count one memory system operation in ``memory_operations_total``."""
        self.metric("memory_operations_total").labels(
            label(operation), label(memory_type), label(user_type)
        ).inc()

    def track_document_operation(self, operation: str, document_type: str, status: str) -> None:
        """Count one document operation in ``document_operations_total``."""
        self.metric("document_operations_total").labels(
            label(operation), label(document_type), label(status)
        ).inc()

    def track_application_error(
        self,
        error_type: str,
        component: str,
        error: BaseException,
        user_type: str = UNKNOWN_VALUE,
        endpoint: str = UNKNOWN_VALUE,
        function: str = UNKNOWN_VALUE,
    ) -> None:
        """Count ``error`` in ``application_errors_total``, ``application_error_details_total``
        and its category's counter (``auth_errors_total``, ...).  The ``exception`` label is the
        class name, never the message."""
        if error_type not in ERROR_TYPES:
            raise ValueError(f"error_type must be one of {ERROR_TYPES}, got {error_type!r}")
        component = label(component)
        exception = type(error).__name__
        self.metric("application_errors_total").labels(error_type, component, label(user_type)).inc()
        self.metric("application_error_details_total").labels(
            error_type, component, exception, label(endpoint), label(function)
        ).inc()
        category = CATEGORY_COUNTERS.get(error_type)
        if category == "external_service_errors_total":
            self.metric(category).labels(component, label(endpoint), exception).inc()
        elif category is not None:
            self.metric(category).labels(component, exception).inc()

    def start_session(self, user_type: str = UNKNOWN_VALUE) -> None:
        """One more active session in ``active_sessions_current``."""
        self.metric("active_sessions_current").labels(label(user_type)).inc()

    def end_session(self, user_type: str = UNKNOWN_VALUE) -> None:
        """One active session fewer in ``active_sessions_current``."""
        self.metric("active_sessions_current").labels(label(user_type)).dec()

    def track_session(self, user_type: str = UNKNOWN_VALUE) -> SessionScope:
        """Context manager holding one active session for its duration, whatever happens inside."""
        return SessionScope(self, label(user_type))

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


class SessionScope:
    """An active session for the duration of a ``with`` or ``async with`` block."""

    def __init__(self, instrumentation: PrometheusInstrumentation, user_type: str) -> None:
        self._instrumentation = instrumentation
        self._user_type = user_type

    def __enter__(self) -> SessionScope:
        self._instrumentation.start_session(self._user_type)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._instrumentation.end_session(self._user_type)

    async def __aenter__(self) -> SessionScope:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()


def label(value: object) -> str:
    """A label value: enums by their value, strings as they are, booleans as ``"true"`` /
    ``"false"``, ``None`` as ``"unknown"``, anything else through ``str``."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return UNKNOWN_VALUE
    return str(value)


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
