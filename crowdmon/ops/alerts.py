"""Prometheus alert rules for the four categories the seed names: component health, error rates
by category, latency thresholds and business anomalies.

Each rule is an :class:`AlertSpec`; its expression is built from the catalogue by
:mod:`crowdmon.ops.queries`, its threshold comes from :data:`DEFAULT_THRESHOLDS` and its ``for:``
from :data:`DEFAULT_DURATIONS`, both overridable per key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crowdmon.catalogue import ERROR_TYPES, spec
from crowdmon.ops.queries import (
    Scope,
    counter_rate,
    gauge_sum,
    matcher,
    quantile,
    ratio,
    rule_scope,
)

Thresholds = Mapping[str, float]

#: Every threshold a rule reads, with its default and what it means.
THRESHOLD_DOCS: dict[str, tuple[float, str]] = {
    "http_error_ratio": (0.05, "share of a handler's requests answered 5xx"),
    **{f"error_rate_{kind}": (1.0 if kind == "validation" else 0.1, f"{kind} errors per second, per component") for kind in ERROR_TYPES},
    "external_error_ratio": (0.1, "share of an external service's calls ending in an error"),
    "crowdmon_internal_errors": (0.0, "contained crowdmon failures in 15 minutes, per site"),
    "crowdmon_label_overflow": (0.0, "label values folded into <other> in 15 minutes"),
    "http_latency_p95_seconds": (1.0, "p95 request latency of a handler"),
    "chat_latency_p95_seconds": (20.0, "p95 chat processing time of an endpoint"),
    "external_latency_p95_seconds": (10.0, "p95 latency of an external service"),
    "vector_search_latency_p95_seconds": (0.5, "p95 vector search time of an operation"),
    "database_latency_p95_seconds": (0.5, "p95 database query time of an operation"),
    "cache_hit_ratio_min": (0.05, "lowest acceptable share of chat messages served from the cache"),
    "document_failure_ratio": (0.2, "share of an operation's document operations not ending in success"),
    "sessions_drop_ratio": (0.5, "share of active sessions lost compared with one hour earlier"),
    "sessions_drop_min_sessions": (10.0, "sessions an hour earlier below which a drop is not alerted"),
}
DEFAULT_THRESHOLDS: dict[str, float] = {key: value for key, (value, _) in THRESHOLD_DOCS.items()}


@dataclass(frozen=True)
class AlertSpec:
    key: str
    alert: str
    category: str
    severity: str
    duration: str
    expr: Callable[[Scope, Thresholds], str]
    summary: str
    description: str
    runbook: str
    #: Extra static labels; they also keep rules of one alert name apart.
    labels: tuple[tuple[str, str], ...] = ()


def _fmt(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(value)


_DASH = "crowdmon / {} dashboard"
_HEALTH_RUNBOOK = (
    "1. Open the {dash} and find when {{{{ $labels.component }}}} changed state.\n"
    "2. Ask each instance's /health endpoint (it answers 503 while a component is unhealthy).\n"
    "3. Check the component's logs and, on the Error Analysis dashboard, its errors.\n"
    "4. The alert resolves once the application reports the component healthy again."
).format(dash=_DASH.format("System Health"))


def _health(key: str, alert: str, state: str, severity: str, duration: str, meaning: str) -> AlertSpec:
    return AlertSpec(
        key, alert, "health", severity, duration,
        lambda s, t: f"{gauge_sum('component_health_status', s, ('component',), [matcher('status', '=', state)], aggregation='max')} == 1",
        f"Component {{{{ $labels.component }}}} reports {state}",
        f"Component {{{{ $labels.component }}}} has reported {state} on at least one instance; {meaning}",
        _HEALTH_RUNBOOK,
    )


def _error_rate(kind: str) -> AlertSpec:
    key = f"error_rate_{kind}"
    return AlertSpec(
        key, "HighErrorRate", "errors", "warning", "5m",
        lambda s, t: f"{counter_rate('application_errors_total', s, ('error_type', 'component'), [matcher('error_type', '=', kind)])} > {_fmt(t[key])}",
        f"{kind} errors in {{{{ $labels.component }}}}: {{{{ $value | humanize }}}} per second",
        "{{ $labels.component }} records {{ $value | humanize }} " + kind + " errors per second.",
        "1. Open the Error Analysis dashboard and filter the Top exceptions table by this component.\n"
        "2. application_error_details_total names the exception class, endpoint and function.\n"
        "3. Correlate with deployments and with the component's dependency on the System Health dashboard.",
        (("error_type", kind),),
    )


def _latency(key: str, alert: str, metric: str, by: str, what: str, dashboard: str, duration: str = "10m") -> AlertSpec:
    threshold = f"{key}_p95_seconds"
    return AlertSpec(
        key, alert, "latency", "warning", duration,
        lambda s, t: f"{quantile(0.95, metric, s, (by,))} > {_fmt(t[threshold])}",
        f"p95 {what} of {{{{ $labels.{by} }}}} is {{{{ $value | humanizeDuration }}}}",
        f"95% of {what}s of {{{{ $labels.{by} }}}} take up to {{{{ $value | humanizeDuration }}}} ({metric}).",
        f"1. Open the {_DASH.format(dashboard)} and compare p50, p95 and p99 of {{{{ $labels.{by} }}}}.\n"
        "2. A rise of all quantiles points at load or a slow dependency; a rise of p99 alone at a few slow calls.\n"
        "3. Check the dependency latencies (external API, vector search, database) on the API Performance dashboard.",
    )


def _sessions_drop(s: Scope, t: Thresholds) -> str:
    current = gauge_sum("active_sessions_current", s)
    metric = spec("active_sessions_current")
    earlier = f"sum ({s.selector(metric, metric.name)} offset 1h)"
    return (
        f"{current} < {_fmt(1 - t['sessions_drop_ratio'])} * {earlier} "
        f"and {earlier} >= {_fmt(t['sessions_drop_min_sessions'])}"
    )


ALERTS: tuple[AlertSpec, ...] = (
    _health("component_unhealthy", "ComponentUnhealthy", "unhealthy", "critical", "1m", "requests depending on it are likely failing."),
    _health("component_degraded", "ComponentDegraded", "degraded", "warning", "5m", "it works with reduced capacity or quality."),
    _health("component_health_unknown", "ComponentHealthUnknown", "unknown", "info", "15m", "no health check has set its state since start-up."),
    AlertSpec(
        "http_error_ratio", "HighHTTPErrorRatio", "errors", "critical", "5m",
        lambda s, t: f"{ratio('crowdfunding_api_requests_total', s, [matcher('status', '=~', '5..')], ('handler',))} > {_fmt(t['http_error_ratio'])}",
        "{{ $labels.handler }} answers {{ $value | humanizePercentage }} of requests with 5xx",
        "{{ $value | humanizePercentage }} of requests to {{ $labels.handler }} ended with a 5xx status over 5 minutes.",
        "1. Open the API Performance dashboard: Error ratio and Requests by status for this handler.\n"
        "2. Exceptions raised by the app are counted as 500: see Top exceptions on the Error Analysis dashboard.\n"
        "3. Check the System Health dashboard for an unhealthy dependency.",
    ),
    *(_error_rate(kind) for kind in ERROR_TYPES),
    AlertSpec(
        "external_error_ratio", "ExternalServiceErrorRatioHigh", "errors", "warning", "5m",
        lambda s, t: f"{ratio('external_api_duration_seconds', s, [matcher('outcome', '=', 'error')], ('service',))} > {_fmt(t['external_error_ratio'])}",
        "{{ $value | humanizePercentage }} of calls to {{ $labels.service }} fail",
        "{{ $value | humanizePercentage }} of calls to external service {{ $labels.service }} ended in an error over 5 minutes.",
        "1. external_service_errors_total names the endpoint and exception class (Error Analysis dashboard).\n"
        "2. Check the provider's status page and your quota or credentials.\n"
        "3. Check the service's latency on the API Performance dashboard: timeouts show as slow calls first.",
    ),
    AlertSpec(
        "crowdmon_internal_errors", "CrowdmonInternalErrors", "errors", "warning", "0s",
        lambda s, t: f"{counter_rate('crowdmon_internal_errors_total', s, ('site',), window='15m', function='increase')} > {_fmt(t['crowdmon_internal_errors'])}",
        "crowdmon contained failures at {{ $labels.site }}",
        "crowdmon's own code failed {{ $value | humanize }} times at {{ $labels.site }} in 15 minutes; requests were not affected but some metrics may be missing.",
        "1. The application log has the first failure of this site with its traceback (logger 'crowdmon').\n"
        "2. Report it with that traceback; the application keeps working meanwhile.",
    ),
    AlertSpec(
        "crowdmon_label_overflow", "CrowdmonLabelOverflow", "errors", "info", "0s",
        lambda s, t: f"{counter_rate('crowdmon_label_overflow_total', s, ('metric', 'label'), window='15m', function='increase')} > {_fmt(t['crowdmon_label_overflow'])}",
        "Label {{ $labels.label }} of {{ $labels.metric }} reached its value cap",
        "{{ $value | humanize }} new values of label {{ $labels.label }} on {{ $labels.metric }} were folded into <other> in 15 minutes.",
        "1. Find what feeds the label: a raw path, a user id or a message in a label is a bug to fix at the call site.\n"
        "2. If the values are legitimate and bounded, raise the cap with PrometheusInstrumentation(cardinality_caps={'metric:label': N}).",
    ),
    _latency("http_latency", "HighRequestLatency", "crowdfunding_api_request_duration_seconds", "handler", "request latency", "API Performance"),
    _latency("chat_latency", "SlowChatProcessing", "chat_processing_duration_seconds", "endpoint", "chat processing time", "Chat Metrics"),
    _latency("external_latency", "SlowExternalAPI", "external_api_duration_seconds", "service", "external call latency", "API Performance"),
    _latency("vector_search_latency", "SlowVectorSearch", "vector_search_duration_seconds", "operation", "vector search time", "API Performance"),
    _latency("database_latency", "SlowDatabaseQueries", "database_query_duration_seconds", "operation", "database query time", "API Performance"),
    AlertSpec(
        "chat_stopped", "ChatMessagesStopped", "business", "warning", "15m",
        lambda s, t: f"{counter_rate('chat_messages_total', s, window='15m')} == 0 and {counter_rate('crowdfunding_api_requests_total', s, window='15m')} > 0",
        "No chat messages while the API serves requests",
        "The API keeps answering requests but no chat message was processed in 15 minutes.",
        "1. Send a chat message yourself and watch the Chat Metrics dashboard.\n"
        "2. Check ComponentUnhealthy alerts and the chat endpoint's errors on the Error Analysis dashboard.\n"
        "3. Check the client front end: requests reaching other routes but not chat point at it.",
    ),
    AlertSpec(
        "cache_hit_ratio_low", "ChatCacheHitRatioLow", "business", "info", "30m",
        lambda s, t: f"{ratio('chat_messages_total', s, [matcher('cache_hit', '=', 'true')])} < {_fmt(t['cache_hit_ratio_min'])}",
        "Chat cache hit ratio is {{ $value | humanizePercentage }}",
        "Only {{ $value | humanizePercentage }} of chat messages were served from the cache over 5 minutes.",
        "1. Check that the cache is reachable and not freshly emptied (a restart empties it).\n"
        "2. Compare with RAG usage on the Chat Metrics dashboard: new kinds of questions miss the cache.",
    ),
    AlertSpec(
        "document_failure_ratio", "DocumentOperationFailures", "business", "warning", "15m",
        lambda s, t: f"{ratio('document_operations_total', s, [matcher('status', '!=', 'success')], ('operation',))} > {_fmt(t['document_failure_ratio'])}",
        "{{ $value | humanizePercentage }} of document {{ $labels.operation }} operations fail",
        "{{ $value | humanizePercentage }} of document {{ $labels.operation }} operations did not end in success over 5 minutes.",
        "1. Open the Business KPIs dashboard: Document operations by operation and status.\n"
        "2. Check the database and vector store on the System Health dashboard.\n"
        "3. Look for the failing documents' type in document_operations_total.",
    ),
    AlertSpec(
        "sessions_drop", "ActiveSessionsDropped", "business", "warning", "10m",
        _sessions_drop,
        "Active sessions dropped to {{ $value | humanize }}",
        "Active sessions fell to {{ $value | humanize }}, more than the configured share below the count one hour earlier.",
        "1. Check authentication: auth errors on the Error Analysis dashboard and the auth component's health.\n"
        "2. Check whether the front end or a load balancer stopped sending users.\n"
        "3. A planned release or a time-of-day pattern can explain it: silence the alert then.",
    ),
)
ALERT_KEYS = tuple(alert.key for alert in ALERTS)
DEFAULT_DURATIONS: dict[str, str] = {alert.key: alert.duration for alert in ALERTS}
CATEGORIES = ("health", "errors", "latency", "business")

_DURATION = re.compile(r"0|(?:\d+(?:ms|[smhdwy]))+")


def resolve(
    thresholds: Mapping[str, float] | None = None, durations: Mapping[str, str] | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """Defaults overlaid with the user's values; a ``ValueError`` naming the known keys for an
    unknown key, a threshold that is not a finite number, or a malformed duration."""
    resolved_thresholds = dict(DEFAULT_THRESHOLDS)
    for key, value in (thresholds or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown alert threshold {key!r}; known thresholds: {', '.join(DEFAULT_THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"threshold {key!r} must be a finite number, got {value!r}")
        resolved_thresholds[key] = float(value)
    resolved_durations = dict(DEFAULT_DURATIONS)
    for key, duration in (durations or {}).items():
        if key not in DEFAULT_DURATIONS:
            raise ValueError(f"unknown alert {key!r} for a 'for:' duration; known alerts: {', '.join(DEFAULT_DURATIONS)}")
        if not isinstance(duration, str) or not _DURATION.fullmatch(duration):
            raise ValueError(f"'for:' duration of {key!r} must be a Prometheus duration such as 30s, 5m or 1h, got {duration!r}")
        resolved_durations[key] = duration
    return resolved_thresholds, resolved_durations


def rule_groups(
    job: str,
    thresholds: Mapping[str, float] | None = None,
    durations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Prometheus rule file (as data): one group per category, every rule scoped to ``job``."""
    if not job or '"' in job or "\\" in job:
        raise ValueError(f"job must be a non-empty Prometheus job name without quotes or backslashes, got {job!r}")
    resolved_thresholds, resolved_durations = resolve(thresholds, durations)
    scope = rule_scope(job)
    groups = []
    for category in CATEGORIES:
        rules = [
            {
                "alert": alert.alert,
                "expr": alert.expr(scope, resolved_thresholds),
                "for": resolved_durations[alert.key],
                "labels": {"severity": alert.severity, "category": alert.category, "source": "crowdmon", **dict(alert.labels)},
                "annotations": {"summary": alert.summary, "description": alert.description, "runbook": alert.runbook},
            }
            for alert in ALERTS
            if alert.category == category
        ]
        groups.append({"name": f"crowdmon-{category}", "rules": rules})
    return {"groups": groups}
