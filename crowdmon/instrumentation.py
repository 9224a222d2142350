"""``PrometheusInstrumentation``: one registry, the one set of catalogue metrics built on it, and
everything that records into them.

Metrics are built once per registry.  Building a second ``PrometheusInstrumentation`` on the same
registry (a rebuilt middleware stack, a test re-importing the app) shares the metrics of the first
instead of failing with prometheus_client's "Duplicated timeseries".
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from time import perf_counter
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values

from crowdmon._recorder import BufferedRequestRecorder, ClientRequestRecorder, RequestRecorder
from crowdmon._sharded import ShardedHistogram
from crowdmon.cardinality import DEFAULT_CAP, CardinalityGuard, SharedAdmissions
from crowdmon.catalogue import (
    BY_NAME,
    CATALOGUE,
    CATEGORY_COUNTERS,
    ERROR_TYPES,
    HEALTH_STATES,
    HTTP_METRICS,
    SELF_METRICS,
    UNKNOWN_VALUE,
    MetricKind,
    MetricSpec,
    spec,
)
from crowdmon.context import current_request, user_type_of
from crowdmon.errors import classify_error
from crowdmon.timing import Timing, is_exception_group, only_leaves

logger = logging.getLogger("crowdmon")

PrometheusMetric = Counter | Gauge | Histogram | ShardedHistogram


class CrowdmonSetupError(ValueError):
    """A mistake in how crowdmon is set up; the message says how to fix it."""


def check_registry(owner: str, registry: object) -> None:
    """Refuse a ``registry=`` that is not a ``CollectorRegistry`` (or ``None``), naming the fix."""
    if registry is not None and not isinstance(registry, CollectorRegistry):
        hint = "; for an instrumentation, write instrumentation=" if isinstance(registry, PrometheusInstrumentation) else ""
        raise CrowdmonSetupError(f"{owner}'s registry= takes a prometheus_client CollectorRegistry, got {registry!r}{hint}")


def check_instrumentation(owner: str, instrumentation: object) -> None:
    """Refuse an ``instrumentation=`` that is not a :class:`PrometheusInstrumentation` (or ``None``)."""
    if instrumentation is not None and not isinstance(instrumentation, PrometheusInstrumentation):
        if not isinstance(instrumentation, CollectorRegistry):
            hint = ""
        elif owner in ("MetricsApp", "HealthApp"):
            hint = f"; for a registry, write {owner}(PrometheusInstrumentation(registry))"
        else:
            hint = "; for a registry, write registry="
        raise CrowdmonSetupError(
            f"{owner}'s instrumentation= takes a PrometheusInstrumentation (or None for the default "
            f"one), got {instrumentation!r}{hint}"
        )


def check_path(option: str, path: object) -> str:
    """A path option: a ``str`` starting with ``/``, as the ASGI scope's ``path`` does."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise CrowdmonSetupError(f"{option} must be a path starting with '/', got {path!r}")
    return path


def unknown_option(owner: str, option: str, known: tuple[str, ...]) -> str:
    """The message for an option ``owner`` does not take: the closest it does, and all of them."""
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{owner} has no option {option!r}{hint}; its options are: {', '.join(known)}"


def check_called_with_scope(option: str, function: object) -> None:
    """Refuse a callable that cannot be called the way crowdmon calls it: with the ASGI scope."""
    # Its own parameters first: an adapter made with functools.wraps says it wraps a function it
    # may call differently.  A wrapper taking anything (*args, **kwargs) passes its call on, so
    # then what it wraps must take the scope.
    for follow_wrapped in (False, True):
        try:
            signature = inspect.signature(function, follow_wrapped=follow_wrapped)  # type: ignore[arg-type]
        except (TypeError, ValueError):  # a callable without a signature (some builtins) is taken on trust
            return
        try:
            signature.bind(None)
        except TypeError as error:
            raise CrowdmonSetupError(
                f"{option} is called with one argument, the ASGI scope; {function!r} cannot be called so ({error})"
            ) from None
        passes_on = all(
            parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            for parameter in signature.parameters.values()
        )
        if not (passes_on and hasattr(function, "__wrapped__")):
            return


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps values in ``PROMETHEUS_MULTIPROC_DIR`` files."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


#: Seconds a health check may take before its component counts as unhealthy.
DEFAULT_HEALTH_CHECK_TIMEOUT = 2.0

HealthCheckFunction = Callable[[], Any]


@dataclass(frozen=True, eq=False)
class HealthCheck:
    """A check ``/health`` runs for ``component``: sync or async, bounded by ``timeout``.  Each
    registration is a check of its own (compared by identity)."""

    component: str
    check: HealthCheckFunction
    timeout: float


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
        # No reference to the registry: it is the key of _SHARED, and would never be let go of.
        self.guard = guard
        from crowdmon.multiprocess import (  # imports this module
            check_process_setup,
            multiprocess_directory,
        )

        self.multiprocess = check_process_setup()
        directory = multiprocess_directory()
        if self.multiprocess and directory and SharedAdmissions.available():
            guard.shared = SharedAdmissions(directory)  # one cap for all the server's workers
        target = registry
        registered: list[Any] = []
        try:
            self.requests: RequestRecorder
            if self.multiprocess:
                client = ClientRequestRecorder(guard, target)
                registered.extend((client.requests, client.duration, client.request_size, client.response_size, client.in_progress))
                self.requests = client
            else:
                # Registered first: a scrape absorbs the buffered requests before it reads the
                # self-metrics (label folds, internal errors) that absorbing may add to.
                buffered = BufferedRequestRecorder(guard, self.report_internal_error)
                if target is not None:
                    target.register(buffered)
                registered.append(buffered)
                self.requests = buffered
            self.metrics: dict[str, LabelledMetric] = {}
            for item in CATALOGUE:
                if item in HTTP_METRICS:
                    continue
                metric = _build(item, target, self.multiprocess)
                registered.append(metric)
                self.metrics[item.name] = LabelledMetric(item, metric, guard)
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
        # Every series of the self-counters starts at 0: one born at its first increment reads as
        # no change to increase(), and an alert on a first contained failure would never fire.
        for site in INTERNAL_ERROR_SITES:
            self.internal_errors.metric.labels(site)
        overflow = self.metrics["crowdmon_label_overflow_total"].metric
        for item in CATALOGUE:
            for name in item.labels:
                overflow.labels(item.name, name)
        self._logged_sites: set[str] = set()
        self.health: dict[str, str] = {}
        self.health_lock = threading.Lock()
        self.health_checks: dict[str, HealthCheck] = {}

    def _count_overflow(self, metric: str, label: str, times: int) -> None:
        # Never through the guard: the self-metric's own labels come from the catalogue.
        self.metrics["crowdmon_label_overflow_total"].metric.labels(metric, label).inc(times)  # type: ignore[union-attr]

    def report_internal_error(self, site: str, error: BaseException, times: int = 1) -> None:
        """Count a contained failure of crowdmon's own code (``times`` requests it cost) and log
        it once per site."""
        try:
            # Never through the guard: it may be what failed, and sites are crowdmon's own names.
            self.internal_errors.metric.labels(site).inc(times)  # type: ignore[union-attr]
            if site not in self._logged_sites:
                self._logged_sites.add(site)
                logger.error(
                    "crowdmon failed in %s; the app carries on unaffected. Further failures "
                    "here are counted in crowdmon_internal_errors_total{site=%r} without logging.",
                    site,
                    site,
                    exc_info=error,
                )
        except Exception:  # pragma: no cover - the last line of defence must not raise
            pass


#: Every ``site`` of ``crowdmon_internal_errors_total``: where crowdmon contains a failure of its own.
INTERNAL_ERROR_SITES = (
    "middleware.start", "middleware.context", "middleware.receive", "middleware.send",
    "middleware.handler", "middleware.record", "middleware.exemplar",
    "metrics.render", "metrics.prune", "health", "timing", "session", "user_type_resolver",
    "track_application_error", "track_chat_message", "track_memory_operation", "track_document_operation",
    "tracked_external", "tracked_errors", "tracked_chat", "tracked_memory_operation",
    "tracked_document_operation", "tracked_session",
    "vector_search_duration_seconds", "database_query_duration_seconds",
)  # fmt: skip


def _build(item: MetricSpec, registry: CollectorRegistry | None, multiprocess: bool) -> PrometheusMetric:
    if item.kind == MetricKind.COUNTER:
        return Counter(item.name.removesuffix("_total"), item.help, item.labels, registry=registry)
    if item.kind == MetricKind.HISTOGRAM:
        if multiprocess:
            return Histogram(item.name, item.help, item.labels, registry=registry, buckets=item.buckets)
        # One process: observe() without prometheus_client's per-value locks (see _sharded).
        histogram = ShardedHistogram(item.name, item.help, item.labels, item.buckets)
        if registry is not None:
            registry.register(histogram)
        return histogram
    return Gauge(
        item.name,
        item.help,
        item.labels,
        registry=registry,
        multiprocess_mode=item.multiprocess_mode or "all",  # type: ignore[arg-type]
    )


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, _MetricSet] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


#: The metric whose admitted labels every request metric is recorded under.
REQUESTS_TOTAL = "crowdfunding_api_requests_total"


def _checked_caps(caps: Mapping[str, int] | None) -> dict[str, int]:
    """``cardinality_caps`` with every key a catalogue metric (and one of its labels) and every
    cap a positive int, or a :class:`CrowdmonSetupError` saying which is not."""
    checked: dict[str, int] = {}
    if caps is not None and not isinstance(caps, Mapping):
        raise CrowdmonSetupError(
            f"cardinality_caps takes a mapping such as {{'chat_messages_total:user_type': 20}}, got {caps!r}"
        )
    for key, cap in (caps or {}).items():
        metric, _, label = str(key).partition(":")
        known = BY_NAME.get(metric)
        if known is None:
            close = difflib.get_close_matches(metric, BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CrowdmonSetupError(
                f"cardinality_caps key {key!r} names no catalogue metric{hint}; keys are 'metric' or "
                "'metric:label', e.g. 'chat_messages_total:user_type'"
            )
        if known in HTTP_METRICS and metric != REQUESTS_TOTAL:
            raise CrowdmonSetupError(
                f"cardinality_caps key {key!r}: every crowdfunding_api_* metric records a request under "
                f"the labels admitted for {REQUESTS_TOTAL}, so cap those instead, e.g. "
                f"'{REQUESTS_TOTAL}:{label or 'handler'}'"
            )
        if known in SELF_METRICS:
            raise CrowdmonSetupError(
                f"cardinality_caps key {key!r}: crowdmon's own metrics take their label values from the "
                "catalogue (metric and label names, internal sites) and are bounded already; leave them out"
            )
        if ":" in str(key) and not label:
            raise CrowdmonSetupError(
                f"cardinality_caps key {key!r} names no label; write {metric!r} to cap each of its "
                f"labels, or '{metric}:<label>' for one of {', '.join(known.labels)}"
            )
        if label and label not in known.labels:
            raise CrowdmonSetupError(
                f"cardinality_caps key {key!r}: {metric} has no label {label!r}; its labels are "
                f"{', '.join(known.labels) or 'none'}"
            )
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise CrowdmonSetupError(f"cardinality_caps[{key!r}] must be a positive int, got {cap!r}")
        checked[key] = cap
    return checked


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
        default_cap: int | None = None,
        cardinality_caps: Mapping[str, int] | None = None,
    ) -> None:
        check_registry("PrometheusInstrumentation", registry)
        self.registry = REGISTRY if registry is None else registry
        caps = _checked_caps(cardinality_caps)
        if default_cap is not None and (isinstance(default_cap, bool) or not isinstance(default_cap, int) or default_cap < 1):
            raise CrowdmonSetupError(
                f"default_cap must be a positive int (the distinct values a label may hold), got {default_cap!r}"
            )
        with _SHARED_LOCK:
            shared = _SHARED.get(self.registry)
            if shared is None:
                guard = CardinalityGuard(DEFAULT_CAP if default_cap is None else default_cap, caps)
                shared = _SHARED[self.registry] = _MetricSet(self.registry, guard)
            elif (default_cap is not None and default_cap != shared.guard.default_cap) or (
                cardinality_caps is not None and caps != shared.guard.caps
            ):
                raise CrowdmonSetupError(
                    "crowdmon's metrics on this registry were set up already, with "
                    f"default_cap={shared.guard.default_cap} and cardinality_caps={shared.guard.caps}; "
                    "the caps are fixed by the first PrometheusInstrumentation on a registry: pass them "
                    "there, and hand that instrumentation on (setup_monitoring(app, instrumentation=...))"
                )
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
    # Inside a request handled by the middleware, ``endpoint`` and ``user_type`` left out (None)
    # come from the request; outside one they are ``unknown``.

    def track_request_performance(
        self, endpoint: str | None = None, user_type: str | None = None
    ) -> Timing:
        """Context manager (``with`` or ``async with``) timing chat processing into
        ``chat_processing_duration_seconds{endpoint,user_type}``."""
        return self._timing(
            lambda: self.metric("chat_processing_duration_seconds").labels(
                self.endpoint_label(endpoint), self.user_type_label(user_type)
            )
        )

    def track_external_api_call(self, service: str, endpoint: str) -> Timing:
        """Context manager timing one external call into ``external_api_duration_seconds`` with
        its outcome; an exception also counts in ``external_service_errors_total``."""
        service, endpoint = label(service), label(endpoint)
        durations = self.metric("external_api_duration_seconds")
        return Timing(
            lambda outcome: durations.labels(service, endpoint, outcome),
            self.report_internal_error,
            on_error=lambda error, started: self.count_external_error(service, endpoint, error, since=started),
        )

    def track_vector_search(self, operation: str) -> Timing:
        """Context manager timing a vector database operation into ``vector_search_duration_seconds``."""
        return self._timing(lambda: self.metric("vector_search_duration_seconds").labels(label(operation)))

    def track_database_query(self, operation: str) -> Timing:
        """Context manager timing a database query into ``database_query_duration_seconds``."""
        return self._timing(lambda: self.metric("database_query_duration_seconds").labels(label(operation)))

    def _timing(self, child: Callable[[], Any]) -> Timing:
        """A :class:`Timing` observing into ``child()``, resolved now (inside the request whose
        labels it may read); if that fails, the failure is reported and the block timed into
        nothing: the code it times runs all the same."""
        try:
            resolved = child()
        except Exception as failure:
            self.report_internal_error("timing", failure)
            resolved = UNRECORDED
        return Timing(lambda outcome: resolved, self.report_internal_error)

    def track_chat_message(
        self,
        user_type: str | None = None,
        message_type: str = "user",
        cache_hit: bool = False,
        rag_used: bool = False,
    ) -> None:
        """Count one chat message in ``chat_messages_total``."""
        try:
            self.metric("chat_messages_total").labels(
                self.user_type_label(user_type), label(message_type), flag(cache_hit), flag(rag_used)
            ).inc()
        except Exception as failure:
            self.report_internal_error("track_chat_message", failure)

    def track_memory_operation(
        self, operation: str, memory_type: str, user_type: str | None = None
    ) -> None:
        """Count one memory system operation in ``memory_operations_total``."""
        try:
            self.metric("memory_operations_total").labels(
                label(operation), label(memory_type), self.user_type_label(user_type)
            ).inc()
        except Exception as failure:
            self.report_internal_error("track_memory_operation", failure)

    def track_document_operation(self, operation: str, document_type: str, status: str = "success") -> None:
        """Count one document operation in ``document_operations_total``."""
        try:
            self.metric("document_operations_total").labels(
                label(operation), label(document_type), label(status)
            ).inc()
        except Exception as failure:
            self.report_internal_error("track_document_operation", failure)

    def track_application_error(
        self,
        error_type: str | None,
        component: str,
        error: BaseException,
        user_type: str | None = None,
        endpoint: str | None = None,
        function: str | None = None,
    ) -> None:
        """Count ``error`` in ``application_errors_total``, ``application_error_details_total``
        and its category's counter (``auth_errors_total``, ...).

        ``error_type=None`` classifies ``error`` with the default taxonomy.  The ``exception``
        label is the class name, never the message.  An error already counted in a metric (by a
        decorator it passed through, or as the cause of this one) is not counted there again.
        """
        try:
            if error_type is None:
                error_type = classify_error(error)
            elif error_type not in ERROR_TYPES:
                self.report_internal_error(
                    "track_application_error",
                    ValueError(f"error_type must be one of {ERROR_TYPES}, got {error_type!r}; counted as 'system'"),
                )
                error_type = "system"
            self.record_error(
                error,
                error_type=error_type,
                component=label(component),
                user_type=self.user_type_label(user_type),
                endpoint=self.endpoint_label(endpoint),
                function=label(function),
            )
        except Exception as failure:
            self.report_internal_error("track_application_error", failure)

    def record_error(
        self,
        error: BaseException,
        *,
        error_type: str,
        component: str,
        user_type: str,
        endpoint: str,
        function: str,
        since: float | None = None,
    ) -> None:
        """The counting behind :meth:`track_application_error`, with labels already resolved;
        ``since`` is when the failed call started (see :func:`first_count`)."""
        exception = type(error).__name__
        metrics = self._shared.metrics
        if first_count(error, "application_errors_total", since):
            metrics["application_errors_total"].labels(error_type, component, user_type).inc()
        if first_count(error, "application_error_details_total", since):
            metrics["application_error_details_total"].labels(
                error_type, component, exception, endpoint, function
            ).inc()
        category = CATEGORY_COUNTERS.get(error_type)
        if category is not None and first_count(error, category, since):
            if category == "external_service_errors_total":
                metrics[category].labels(component, endpoint, exception).inc()
            else:
                metrics[category].labels(component, exception).inc()

    def count_external_error(self, service: str, endpoint: str, error: BaseException, since: float | None = None) -> None:
        """Count ``error`` once in ``external_service_errors_total{service,endpoint,exception}``;
        ``since`` is when the failed call started (see :func:`first_count`).  A group of failures
        and cancellations is not an ``Exception`` and is not counted: its failures were counted
        where they were raised."""
        if isinstance(error, Exception) and first_count(error, "external_service_errors_total", since):
            self._shared.metrics["external_service_errors_total"].labels(
                service, endpoint, type(error).__name__
            ).inc()

    def start_session(self, user_type: str | None = None) -> None:
        """One more active session in ``active_sessions_current``."""
        try:
            self.metric("active_sessions_current").labels(self.user_type_label(user_type)).inc()
        except Exception as failure:
            self.report_internal_error("session", failure)

    def end_session(self, user_type: str | None = None) -> None:
        """One active session fewer in ``active_sessions_current``."""
        try:
            self.metric("active_sessions_current").labels(self.user_type_label(user_type)).dec()
        except Exception as failure:
            self.report_internal_error("session", failure)

    def track_session(self, user_type: str | None = None) -> SessionScope:
        """Context manager holding one active session for its duration, whatever ends it."""
        return SessionScope(self, self.user_type_label(user_type))

    # -- labels from the request in progress --------------------------------------------------

    def endpoint_label(self, endpoint: object = None) -> str:
        """``endpoint`` as a label, or the route template of the current request."""
        if endpoint is not None:
            return label(endpoint)
        context = current_request.get()
        return UNKNOWN_VALUE if context is None else context.endpoint()

    def user_type_label(self, user_type: object = None) -> str:
        """``user_type`` as a label, or the current request's user type from its resolver."""
        if user_type is not None:
            return label(user_type)
        context = current_request.get()
        # A failing resolver is counted where this records.
        return UNKNOWN_VALUE if context is None else user_type_of(context, self.report_internal_error)

    # -- component health ---------------------------------------------------------------------

    def register_component(self, component: str) -> None:
        """Make ``component`` known; it reports ``unknown`` until its state is set."""
        _check_component(component)
        with self._shared.health_lock:
            if component not in self._shared.health:
                self._set_health_locked(component, "unknown")

    def register_health_check(
        self,
        component: str,
        check: HealthCheckFunction,
        *,
        timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT,
    ) -> None:
        """Run ``check`` (sync or async) on every ``/health`` request and set ``component``'s
        state from its answer: ``True``/``None`` healthy, ``False`` unhealthy, or a state name.
        An exception or a run longer than ``timeout`` seconds makes the component unhealthy."""
        _check_component(component)
        _check_health_check(component, check)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise CrowdmonSetupError(f"health check timeout must be a positive, finite number of seconds, got {timeout!r}")
        self.register_component(component)
        with self._shared.health_lock:
            self._shared.health_checks[component] = HealthCheck(component, check, float(timeout))

    def health_checks(self) -> list[HealthCheck]:
        """The registered health checks."""
        with self._shared.health_lock:
            return list(self._shared.health_checks.values())

    def set_component_health(self, component: str, state: str) -> None:
        """Set ``component_health_status`` one-hot: 1 for ``state``, 0 for the other states."""
        _check_component(component)
        if state not in HEALTH_STATES:
            raise ValueError(f"health state must be one of {HEALTH_STATES}, got {state!r}")
        with self._shared.health_lock:
            self._set_health_locked(component, state)

    def _set_health_locked(self, component: str, state: str) -> None:
        # The state /health reports is kept even if the gauge cannot be written.
        self._shared.health[component] = state
        try:
            if self._shared.guard.admit("component_health_status", "component", component) != component:
                # Past the cap (the fold is counted): one <other> series cannot be one-hot for
                # several components, so none is written; /health still reports the component.
                return
            gauge = self._shared.metrics["component_health_status"]
            for candidate in HEALTH_STATES:
                gauge.labels(component, candidate).set(1.0 if candidate == state else 0.0)
        except Exception as failure:
            self.report_internal_error("health", failure)

    def set_component_healthy(self, component: str) -> None:
        """``component_health_status{component}`` one-hot on ``healthy``."""
        self.set_component_health(component, "healthy")

    def set_component_degraded(self, component: str) -> None:
        """``component_health_status{component}`` one-hot on ``degraded``."""
        self.set_component_health(component, "degraded")

    def set_component_unhealthy(self, component: str) -> None:
        """``component_health_status{component}`` one-hot on ``unhealthy``."""
        self.set_component_health(component, "unhealthy")

    def component_health(self) -> dict[str, str]:
        """Every registered component and its current state."""
        with self._shared.health_lock:
            return dict(self._shared.health)


def _check_component(component: object) -> None:
    if not isinstance(component, str) or not component:
        raise CrowdmonSetupError(
            f"a component is named by a non-empty string such as 'database', got {component!r}"
        )


def _check_health_check(component: str, check: object) -> None:
    """A health check is called with no arguments and returns (or its coroutine returns) its answer."""
    fix = f"the health check for {component!r} must be a callable (sync or async) taking no arguments"
    if not callable(check):
        raise CrowdmonSetupError(f"{fix}, got {check!r}")
    if inspect.isgeneratorfunction(check) or inspect.isasyncgenfunction(check):
        raise CrowdmonSetupError(f"{fix} and returning its answer, got the generator function {check!r}: return, do not yield")
    try:
        signature = inspect.signature(check)
    except (TypeError, ValueError):  # a callable without a signature (some builtins) is taken on trust
        return
    try:
        signature.bind()
    except TypeError as error:
        raise CrowdmonSetupError(
            f"{fix}; {check!r} cannot be called so ({error}): bind its arguments first, "
            "e.g. functools.partial(check, connection)"
        ) from None


class _Unrecorded:
    """The metric child of a block whose real child could not be resolved: records nothing
    (the failure was reported where it happened)."""

    __slots__ = ()

    def observe(self, amount: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass


UNRECORDED = _Unrecorded()


class SessionScope:
    """An active session for the duration of a ``with`` or ``async with`` block, or of a call.

    The gauge comes back down however the block ends, including cancellation and
    ``KeyboardInterrupt``."""

    __slots__ = ("_child", "_instrumentation")

    def __init__(self, instrumentation: PrometheusInstrumentation, user_type: str) -> None:
        self._instrumentation = instrumentation
        try:
            self._child = instrumentation.metric("active_sessions_current").labels(user_type)
        except Exception as failure:
            instrumentation.report_internal_error("session", failure)
            self._child = UNRECORDED

    @classmethod
    def unrecorded(cls) -> SessionScope:
        """A session counted nowhere: there is no instrumentation to count it in (see
        :func:`recording_instrumentation`)."""
        scope = cls.__new__(cls)
        scope._child = UNRECORDED  # never fails, so there is never a failure to report
        scope._instrumentation = None  # type: ignore[assignment]
        return scope

    def __enter__(self) -> SessionScope:
        try:
            self._child.inc()
        except Exception as failure:
            self._instrumentation.report_internal_error("session", failure)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._child.dec()
        except Exception as failure:
            self._instrumentation.report_internal_error("session", failure)

    async def __aenter__(self) -> SessionScope:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()


_COUNTED = "_crowdmon_counted"
#: In the marks, the process that made them: an exception pickled back from a worker process
#: (a ``ProcessPoolExecutor``'s) keeps its attributes, and was not counted in this one's
#: registry (unless in multiprocess mode, where the worker's files are summed with the rest).
_PROCESS = "pid"


def first_count(error: BaseException, metric: str, since: float | None = None) -> bool:
    """Whether ``error`` is to be counted in ``metric`` now: not when it, or an exception it was
    raised from or while handling, was counted there already during the same call (started at
    ``since``, a ``perf_counter`` time) or the same request.  The same exception object raised
    again by a later call or request (a module-level exception, a failed task awaited again) is
    a failure of its own and is counted again.  An exception group whose every failure was
    counted there already (a ``TaskGroup`` of decorated calls) is not counted again either.
    Marks it counted, with the time."""
    request = current_request.get()
    request_started = getattr(request, "started", None)  # the middleware's request object has it
    if isinstance(request_started, float) and (since is None or request_started > since):
        since = request_started
    if _counted_before(error, metric, since) or (
        is_exception_group(error) and only_leaves(error, lambda leaf: _counted_before(leaf, metric, since))
    ):
        return False
    try:
        counted = _marks(error)
        if counted is not None:
            counted[metric] = perf_counter()
        else:
            # Past the class's own __setattr__: a frozen dataclass exception refuses the mark
            # there, and every exception has an instance dict.
            BaseException.__setattr__(error, _COUNTED, {_PROCESS: os.getpid(), metric: perf_counter()})
    except Exception:  # an exception without an instance dict after all: counted every time
        pass
    return True


def _marks(error: BaseException) -> dict[str, float] | None:
    """The metrics ``error`` was counted in, with the times: by this process, or, in
    multiprocess mode, where every process's counts are summed, by any process."""
    counted = getattr(error, _COUNTED, None)
    if isinstance(counted, dict) and (counted.get(_PROCESS) == os.getpid() or values_in_files()):
        return counted
    return None


def values_in_files() -> bool:
    """Whether prometheus_client keeps this process's values in multiprocess files (it decides
    once, when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``)."""
    return values.ValueClass is not values.MutexValue


def _counted_before(error: BaseException, metric: str, since: float | None) -> bool:
    """Whether ``error``, or an exception it was raised from or while handling, was counted in
    ``metric`` at ``since`` or later."""
    current: BaseException | None = error
    seen = 0
    pending: list[BaseException] = []
    while current is not None and seen < 16:
        seen += 1
        counted_at = _marks(current)
        at = counted_at.get(metric) if counted_at is not None else None
        if at is not None and (since is None or at >= since):
            return True
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
        current = pending.pop() if pending else None
    return False


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


def flag(value: object) -> str:
    """A yes-or-no label value: ``"true"`` or ``"false"`` for a ``bool`` and for what equals
    one (numpy's booleans, a database's 1 and 0), which the dashboards' ``cache_hit="true"``
    would otherwise miss; anything else as :func:`label` writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is not None and not isinstance(value, (str, Enum)):
        try:
            if value == 1:
                return "true"
            if value == 0:
                return "false"
        except Exception:  # an object whose comparison has no single truth (a numpy array)
            pass
    return label(value)


_default: PrometheusInstrumentation | None = None
_default_lock = threading.Lock()
#: Whether building the default failed (and was logged): what records then records nothing.
_default_failed = False


def default_instrumentation() -> PrometheusInstrumentation:
    """The process-wide instance on prometheus_client's global registry, built on first use.

    Decorators and module-level tracking functions given no instrumentation look it up at every
    call, so :func:`crowdmon.testing.isolated_instrumentation` can stand in for it."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = PrometheusInstrumentation()
    return _default


def recording_instrumentation() -> PrometheusInstrumentation | None:
    """:func:`default_instrumentation` for what records while the app serves: the module-level
    tracking functions and the decorators given no instrumentation; ``None``: record nothing.

    Building the default is set-up, but they do it on first use, inside a request, so its error (a
    name clash on the global registry) must not become the request's.  It is logged once, with
    its fix, and they record nothing (recorded elsewhere, in multiprocess mode it would still
    reach the shared files, and be served inside the clashing family); the app carries on.
    ``setup_monitoring(app)`` tries again, and raises it."""
    global _default_failed
    current = _default
    if current is not None or _default_failed:
        return current
    try:
        return default_instrumentation()
    except CrowdmonSetupError as failure:
        with _default_lock:
            if not _default_failed:
                _default_failed = True
                logger.error(
                    "%s Until it is fixed, crowdmon's module-level tracking functions and the "
                    "decorators given no instrumentation= record nothing.",
                    failure,
                )
        return None


def replace_default_instrumentation(
    instrumentation: PrometheusInstrumentation | None,
) -> PrometheusInstrumentation | None:
    """Make ``instrumentation`` the process-wide default (``None``: build it again on next use);
    returns the previous one.  For test isolation."""
    global _default, _default_failed
    with _default_lock:
        previous, _default, _default_failed = _default, instrumentation, False
    return previous
