"""Prometheus alert rules for the four categories the seed names: component health, error rates
by category, latency thresholds and business anomalies.

Each rule is an :class:`AlertSpec`; its expression is built from the catalogue by
:mod:`crowdmon.ops.queries`, its threshold comes from :data:`DEFAULT_THRESHOLDS` and its ``for:``
from :data:`DEFAULT_DURATIONS`, both overridable per key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crowdmon.catalogue import ERROR_TYPES, spec
from crowdmon.ops.queries import (
    ANSWERS,
    PROBE_HANDLERS,
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
    "crowdmon_internal_errors": (0.0, "contained crowdmon failures over the long rule window, per site"),
    "crowdmon_label_overflow": (0.0, "label values folded into <other> over the long rule window"),
    "http_latency_p95_seconds": (1.0, "p95 request latency of a handler"),
    "chat_latency_p95_seconds": (20.0, "p95 chat processing time of an endpoint"),
    "external_latency_p95_seconds": (10.0, "p95 latency of an external service"),
    "vector_search_latency_p95_seconds": (0.5, "p95 vector search time of an operation"),
    "database_latency_p95_seconds": (0.5, "p95 database query time of an operation"),
    "cache_hit_ratio_min": (0.05, "lowest acceptable share of chat answers (messages other than the user's own) served from the cache"),
    "document_failure_ratio": (0.2, "share of an operation's document operations not ending in success"),
    "sessions_drop_ratio": (0.5, "share of active sessions lost compared with one hour earlier"),
    "sessions_drop_min_sessions": (10.0, "sessions an hour earlier below which a drop is not alerted"),
    "ratio_min_events": (10.0, "events over the rule window below which a group's ratio is not alerted (a handler's requests, a service's calls, chat answers, an operation's document operations)"),
}
DEFAULT_THRESHOLDS: dict[str, float] = {key: value for key, (value, _) in THRESHOLD_DOCS.items()}
#: Thresholds that are shares: fractions from 0 to 1 (0.05 is 5%).
FRACTIONS = ("http_error_ratio", "external_error_ratio", "cache_hit_ratio_min", "document_failure_ratio", "sessions_drop_ratio")
#: The shortest ranges of the rules: ``rate()`` and quantiles, and events counted with
#: ``increase()``; each is at least four scrape intervals.
RULE_WINDOW_SECONDS = 300
LONG_RULE_WINDOW_SECONDS = 900


@dataclass(frozen=True)
class AlertSpec:
    """One alert rule.  ``summary`` and ``description`` are Prometheus templates in which
    ``{threshold}``, ``{threshold_percent}``, ``{for}``, ``{window}`` and ``{long_window}``
    are filled in at export."""

    key: str
    alert: str
    category: str
    severity: str
    duration: str
    expr: Callable[[Scope, Thresholds], str]
    summary: str
    description: str
    runbook: str
    threshold_key: str | None = None
    #: Extra static labels; they also keep rules of one alert name apart.
    labels: tuple[tuple[str, str], ...] = ()

    def render(self, text: str, thresholds: Thresholds, duration: str, scope: Scope) -> str:
        if self.threshold_key is not None:
            value = thresholds[self.threshold_key]
            text = text.replace("{threshold}", _fmt(value)).replace("{threshold_percent}", f"{value * 100:g}%")
        text = text.replace("{window}", _spoken(scope.window)).replace("{long_window}", _spoken(scope.long_window))
        return text.replace("{for}", duration)


def _fmt(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(value)


def _dashboard(title: str) -> str:
    return f"crowdmon / {title} dashboard"


def _health(key: str, alert: str, state: str, severity: str, duration: str, meaning: str) -> AlertSpec:
    def expr(s: Scope, t: Thresholds) -> str:
        selected = gauge_sum("component_health_status", s, ("component",), [matcher("status", "=", state)], aggregation="max")
        return f"{selected} == 1"

    return AlertSpec(
        key, alert, "health", severity, duration, expr,
        f"Component {{{{ $labels.component }}}} reports {state}",
        f"Component {{{{ $labels.component }}}} has reported {state} for {{for}}; {meaning}",
        f"1. Open the {_dashboard('System Health')} and find when {{{{ $labels.component }}}} changed state.\n"
        "2. Ask each instance's /health endpoint: it answers 503 while a component is unhealthy.\n"
        "3. Check the component's logs and its errors on the Error Analysis dashboard.\n"
        "4. The alert resolves once the application reports the component healthy again.",
    )


def _error_rate(kind: str) -> AlertSpec:
    key = f"error_rate_{kind}"

    def expr(s: Scope, t: Thresholds) -> str:
        rate = counter_rate("application_errors_total", s, ("error_type", "component"), [matcher("error_type", "=", kind)])
        return f"{rate} > {_fmt(t[key])}"

    return AlertSpec(
        key, "HighErrorRate", "errors", "warning", "5m", expr,
        f"{kind} errors in {{{{ $labels.component }}}}",
        f'{{{{ $labels.component }}}} records {{{{ $value | printf "%.3g" }}}} {kind} errors per second, above {{threshold}}.',
        f"1. Open the {_dashboard('Error Analysis')}; the Top exceptions table names the exception class, endpoint and function.\n"
        "2. Correlate with deployments, and with the component's dependencies on the System Health dashboard.",
        key,
        (("error_type", kind),),
    )


def _users(s: Scope, *also: str) -> list[str]:
    """The matcher that leaves out requests to the probe handlers (health checks, scrapes), and
    to ``also``: what the HTTP alerts judge is users' traffic."""
    left_out = (*s.probe_handlers, *also)
    return [matcher("handler", "!~", "|".join(map(re.escape, left_out)))] if left_out else []


def _latency(key: str, alert: str, metric: str, by: str, what: str, dashboard: str) -> AlertSpec:
    threshold = f"{key}_p95_seconds"
    requests = by == "handler"

    def expr(s: Scope, t: Thresholds) -> str:
        return f"{quantile(0.95, metric, s, (by,), _users(s, *s.slow_handlers) if requests else ())} > {_fmt(t[threshold])}"

    return AlertSpec(
        key, alert, "latency", "warning", "10m", expr,
        f"p95 {what} of {{{{ $labels.{by} }}}} is {{{{ $value | humanizeDuration }}}}",
        f"The 95th percentile of {what} for {{{{ $labels.{by} }}}} is {{{{ $value | humanizeDuration }}}} over {{window}}, above {{threshold}}s ({metric}).",
        f"1. Open the {_dashboard(dashboard)} and compare p50, p95 and p99 of {{{{ $labels.{by} }}}}.\n"
        "2. All quantiles rising points at load or a slow dependency; p99 alone at a few slow calls.\n"
        "3. Check the dependency latencies (external API, vector search, database) on the API Performance dashboard.",
        threshold,
    )


def _ratio_alert(key: str, alert: str, category: str, severity: str, duration: str, metric: str, numerator: str, by: tuple[str, ...], compare: str, texts: tuple[str, str, str], of: Sequence[str] = ()) -> AlertSpec:
    """A share of ``metric``'s events (of those matching ``of``) compared with a threshold, for
    groups with at least ``ratio_min_events`` events over the window: two failures of a rarely
    used handler are not an error ratio worth a page."""
    label, op, value = numerator.split(" ")
    requests = metric == "crowdfunding_api_requests_total"

    def expr(s: Scope, t: Thresholds) -> str:
        whole = [*(_users(s) if requests else ()), *of]
        events = counter_rate(metric, s, by, whole, function="increase")
        return (
            f"{ratio(metric, s, [matcher(label, op, value)], by, whole)} {compare} {_fmt(t[key])} "
            f"and {events} >= {_fmt(t['ratio_min_events'])}"
        )

    return AlertSpec(key, alert, category, severity, duration, expr, *texts, threshold_key=key)


def _sessions_drop(s: Scope, t: Thresholds) -> str:
    current = gauge_sum("active_sessions_current", s)
    metric = spec("active_sessions_current")
    earlier = f"sum ({s.selector(metric, metric.name)} offset 1h)"
    # No series now (a restart, or the last worker with sessions gone) reads as 0 sessions.
    return (
        f"({current} or vector(0)) < {_fmt(1 - t['sessions_drop_ratio'])} * {earlier} "
        f"and {earlier} >= {_fmt(t['sessions_drop_min_sessions'])}"
    )


def _increase_alert(key: str, alert: str, severity: str, metric: str, by: tuple[str, ...], texts: tuple[str, str, str]) -> AlertSpec:
    def expr(s: Scope, t: Thresholds) -> str:
        # crowdmon starts every series of its self-counters at 0, so increase() sees a first failure.
        return f"{counter_rate(metric, s, by, window=s.long_window, function='increase')} > {_fmt(t[key])}"

    return AlertSpec(key, alert, "errors", severity, "0s", expr, *texts, threshold_key=key)


def _chat_stopped(s: Scope, t: Thresholds) -> str:
    # No chat series at all (none since a restart) reads as 0; an app that has had no chat
    # message in a day (or has no chat) is not alerted.
    chat = counter_rate("chat_messages_total", s, window=s.long_window, function="increase")
    requests = counter_rate("crowdfunding_api_requests_total", s, (), _users(s), window=s.long_window, function="increase")
    metric = spec("chat_messages_total")
    seen = f"count (present_over_time({s.selector(metric, metric.name)}[1d]))"
    return f"({chat} or vector(0)) == 0 and {requests} > 0 and {seen} > 0"


ALERTS: tuple[AlertSpec, ...] = (
    _health("component_unhealthy", "ComponentUnhealthy", "unhealthy", "critical", "1m", "requests that depend on it are likely failing."),
    _health("component_degraded", "ComponentDegraded", "degraded", "warning", "5m", "it works with reduced capacity or quality."),
    _health("component_health_unknown", "ComponentHealthUnknown", "unknown", "info", "15m", "no health check has set its state since start-up."),
    _ratio_alert(
        "http_error_ratio", "HighHTTPErrorRatio", "errors", "critical", "5m",
        "crowdfunding_api_requests_total", "status =~ 5..", ("handler",), ">",
        (
            "{{ $labels.handler }} answers {{ $value | humanizePercentage }} of requests with 5xx",
            "{{ $value | humanizePercentage }} of requests to {{ $labels.handler }} ended with a 5xx status over {window}, above {threshold_percent}.",
            f"1. Open the {_dashboard('API Performance')}: Error ratio and Requests by status for this handler.\n"
            "2. Exceptions the app raises are counted as 500: see Top exceptions on the Error Analysis dashboard.\n"
            "3. Check the System Health dashboard for an unhealthy dependency.",
        ),
    ),
    *(_error_rate(kind) for kind in ERROR_TYPES),
    _ratio_alert(
        "external_error_ratio", "ExternalServiceErrorRatioHigh", "errors", "warning", "5m",
        "external_api_duration_seconds", "outcome = error", ("service",), ">",
        (
            "{{ $value | humanizePercentage }} of calls to {{ $labels.service }} fail",
            "{{ $value | humanizePercentage }} of calls to external service {{ $labels.service }} ended in an error over {window}, above {threshold_percent}.",
            f"1. On the {_dashboard('Error Analysis')}, External service errors names the exception classes.\n"
            "2. Check the provider's status page, your quota and your credentials.\n"
            "3. Check the service's latency on the API Performance dashboard: timeouts show as slow calls first.",
        ),
    ),
    _increase_alert(
        "crowdmon_internal_errors", "CrowdmonInternalErrors", "warning", "crowdmon_internal_errors_total", ("site",),
        (
            "crowdmon contained failures at {{ $labels.site }}",
            "crowdmon's own code failed at {{ $labels.site }} in the last {long_window}; requests were not affected, but some metrics may be missing.",
            "1. The application log holds the first failure of this site with its traceback (logger 'crowdmon').\n"
            "2. Report it with that traceback; the application keeps working meanwhile.",
        ),
    ),
    _increase_alert(
        "crowdmon_label_overflow", "CrowdmonLabelOverflow", "info", "crowdmon_label_overflow_total", ("metric", "label"),
        (
            "Label {{ $labels.label }} of {{ $labels.metric }} reached its value cap",
            "New values of label {{ $labels.label }} on {{ $labels.metric }} were folded into <other> in the last {long_window}.",
            "1. Find what feeds the label: a raw path, a user id or a message in a label is a bug to fix where it is recorded.\n"
            "2. If the values are legitimate and bounded, raise the cap: PrometheusInstrumentation(cardinality_caps={'metric:label': N}).",
        ),
    ),
    _latency("http_latency", "HighRequestLatency", "crowdfunding_api_request_duration_seconds", "handler", "request latency", "API Performance"),
    _latency("chat_latency", "SlowChatProcessing", "chat_processing_duration_seconds", "endpoint", "chat processing time", "Chat Metrics"),
    _latency("external_latency", "SlowExternalAPI", "external_api_duration_seconds", "service", "external call latency", "API Performance"),
    _latency("vector_search_latency", "SlowVectorSearch", "vector_search_duration_seconds", "operation", "vector search time", "API Performance"),
    _latency("database_latency", "SlowDatabaseQueries", "database_query_duration_seconds", "operation", "database query time", "API Performance"),
    AlertSpec(
        "chat_stopped", "ChatMessagesStopped", "business", "warning", "15m", _chat_stopped,
        "No chat messages while the API serves requests",
        "The API keeps answering requests (other than probes and scrapes) but no chat message was processed in the last {long_window}.",
        f"1. Send a chat message yourself and watch the {_dashboard('Chat Metrics')}.\n"
        "2. Check for ComponentUnhealthy alerts and for the chat endpoint's errors on the Error Analysis dashboard.\n"
        "3. Requests reaching other routes but not chat point at the client front end.",
    ),
    _ratio_alert(
        "cache_hit_ratio_min", "ChatCacheHitRatioLow", "business", "info", "30m",
        "chat_messages_total", "cache_hit = true", (), "<",
        (
            "Chat cache hit ratio is {{ $value | humanizePercentage }}",
            "Only {{ $value | humanizePercentage }} of chat answers (messages other than the user's own) were served from the cache over {window}, below {threshold_percent}.",
            "1. Check that the cache is reachable and was not just emptied (a restart empties it).\n"
            f"2. Compare with RAG usage on the {_dashboard('Chat Metrics')}: new kinds of questions miss the cache.",
        ),
        ANSWERS,
    ),
    _ratio_alert(
        "document_failure_ratio", "DocumentOperationFailures", "business", "warning", "15m",
        "document_operations_total", "status != success", ("operation",), ">",
        (
            "{{ $value | humanizePercentage }} of document {{ $labels.operation }} operations fail",
            "{{ $value | humanizePercentage }} of document {{ $labels.operation }} operations did not end in success over {window}, above {threshold_percent}.",
            f"1. Open the {_dashboard('Business KPIs')}: Document operations by operation and status.\n"
            "2. Check the database and the vector store on the System Health dashboard.",
        ),
    ),
    AlertSpec(
        "sessions_drop", "ActiveSessionsDropped", "business", "warning", "10m", _sessions_drop,
        "Active sessions dropped to {{ $value | humanize }}",
        "Active sessions fell to {{ $value | humanize }}, more than {threshold_percent} below the count one hour earlier.",
        "1. Check authentication: auth errors on the Error Analysis dashboard and the auth component's health.\n"
        "2. Check whether the front end or a load balancer stopped sending users.\n"
        "3. A release or a time-of-day pattern can explain it: silence the alert then.",
        "sessions_drop_ratio",
    ),
)
ALERT_KEYS = tuple(alert.key for alert in ALERTS)
DEFAULT_DURATIONS: dict[str, str] = {alert.key: alert.duration for alert in ALERTS}
CATEGORIES = ("health", "errors", "latency", "business")

#: A Prometheus duration: each unit at most once, in this order.
_DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def duration_seconds(text: object) -> float | None:
    """The seconds of a Prometheus duration (``90s``, ``1h30m``; ``0``), or ``None`` for anything
    Prometheus would refuse, such as ``30s1m`` (units out of order) or ``1.5m``."""
    if text == "0":
        return 0.0
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        return None
    seconds = sum(int(count) * unit for count, unit in zip(match.groups(), _UNIT_SECONDS, strict=True) if count)
    return seconds if seconds * 1e9 <= 2**63 - 1 else None  # Prometheus holds durations in int64 ns


def _duration(seconds: float) -> str:
    """Whole seconds as a Prometheus duration, in minutes where they divide."""
    whole = math.ceil(seconds)
    return f"{whole // 60}m" if whole % 60 == 0 else f"{whole}s"


def _spoken(duration: str) -> str:
    """``5m`` as ``5 minutes``, for annotations."""
    seconds = duration_seconds(duration) or 0.0
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


def rule_windows(scrape_interval: str) -> tuple[str, str]:
    """The rules' ``rate()`` and ``increase()`` ranges for a scrape interval: 5 and 15 minutes,
    or four scrape intervals if that is longer, so every range holds enough samples."""
    seconds = duration_seconds(scrape_interval)
    if not seconds:
        raise ValueError(f"scrape_interval must be a Prometheus duration above 0 such as 15s or 1m, got {scrape_interval!r}")
    return _duration(max(RULE_WINDOW_SECONDS, 4 * seconds)), _duration(max(LONG_RULE_WINDOW_SECONDS, 4 * seconds))


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
        if key in FRACTIONS and not 0 <= value <= 1:
            raise ValueError(f"threshold {key!r} is a share, a fraction from 0 to 1 (0.05 is 5%), got {value!r}")
        if key == "sessions_drop_ratio" and value in (0, 1):
            raise ValueError(f"threshold 'sessions_drop_ratio' must lie strictly between 0 and 1 (0.5 alerts on losing half), got {value!r}")
        if value < 0:
            raise ValueError(f"threshold {key!r} must not be negative, got {value!r}")
        resolved_thresholds[key] = float(value)
    resolved_durations = dict(DEFAULT_DURATIONS)
    for key, duration in (durations or {}).items():
        if key not in DEFAULT_DURATIONS:
            raise ValueError(f"unknown alert {key!r} for a 'for:' duration; known alerts: {', '.join(DEFAULT_DURATIONS)}")
        if duration_seconds(duration) is None:
            raise ValueError(
                f"'for:' duration of {key!r} must be a Prometheus duration such as 30s, 5m or 1h30m "
                f"(units in the order y w d h m s ms), got {duration!r}"
            )
        resolved_durations[key] = duration
    return resolved_thresholds, resolved_durations


def check_job(job: str) -> None:
    """A ``ValueError`` unless ``job`` can stand in a PromQL ``job="..."`` matcher as it is."""
    if not job or '"' in job or "\\" in job or "\n" in job:
        raise ValueError(f"job must be a non-empty Prometheus job name without quotes, backslashes or newlines, got {job!r}")


def check_handlers(name: str, handlers: Sequence[str]) -> None:
    """A ``ValueError`` when ``handlers`` is one string (it would be taken letter by letter)."""
    if isinstance(handlers, str):
        raise ValueError(f"{name} must be a collection of handlers, got the string {handlers!r}; write [{handlers!r}]")


def rule_groups(
    job: str,
    thresholds: Mapping[str, float] | None = None,
    durations: Mapping[str, str] | None = None,
    *,
    scrape_interval: str = "15s",
    probe_handlers: Sequence[str] = PROBE_HANDLERS,
    slow_handlers: Sequence[str] = (),
) -> dict[str, Any]:
    """The Prometheus rule file (as data): one group per category, every rule scoped to ``job``.

    Rates are taken over 5 minutes and events counted over 15, or over four ``scrape_interval``
    if that is longer.  Requests to ``probe_handlers`` are not users' traffic; ``slow_handlers``
    are slow by design and left out of the request latency alert."""
    check_job(job)
    resolved_thresholds, resolved_durations = resolve(thresholds, durations)
    check_handlers("probe_handlers", probe_handlers)
    check_handlers("slow_handlers", slow_handlers)
    scope = rule_scope(job, *rule_windows(scrape_interval), probe_handlers, slow_handlers)
    groups = []
    for category in CATEGORIES:
        rules = [
            {
                "alert": alert.alert,
                "expr": alert.expr(scope, resolved_thresholds),
                "for": resolved_durations[alert.key],
                "labels": {"severity": alert.severity, "category": alert.category, "source": "crowdmon", **dict(alert.labels)},
                "annotations": {
                    "summary": alert.render(alert.summary, resolved_thresholds, resolved_durations[alert.key], scope),
                    "description": alert.render(alert.description, resolved_thresholds, resolved_durations[alert.key], scope),
                    "runbook": alert.runbook,
                },
            }
            for alert in ALERTS
            if alert.category == category
        ]
        groups.append({"name": f"crowdmon-{category}", "rules": rules})
    return {"groups": groups}


#: One line per rule for the README: what makes it fire.
WHEN: dict[str, str] = {
    "component_unhealthy": "`component_health_status{status=\"unhealthy\"}` is 1 for a component on any instance",
    "component_degraded": "a component reports `degraded`",
    "component_health_unknown": "a component still reports `unknown` (no check ever set it)",
    "http_error_ratio": "a handler's 5xx share over the rule window is above the threshold (probe handlers left out: an unhealthy app's `/health` answers 503 by design)",
    **{f"error_rate_{kind}": f"`{kind}` errors per second of a component are above the threshold" for kind in ERROR_TYPES},
    "external_error_ratio": "an external service's share of calls with `outcome=\"error\"` is above the threshold",
    "crowdmon_internal_errors": "crowdmon contained failures of its own code over the long rule window",
    "crowdmon_label_overflow": "a label reached its cardinality cap and values were folded into `<other>`",
    "http_latency": "p95 request latency of a handler other than the probe handlers and the slow ones (`--slow-handler`) is above the threshold",
    "chat_latency": "p95 chat processing time of an endpoint is above the threshold",
    "external_latency": "p95 latency of an external service is above the threshold",
    "vector_search_latency": "p95 vector search time of an operation is above the threshold",
    "database_latency": "p95 database query time of an operation is above the threshold",
    "chat_stopped": "no chat message over the long rule window while the API serves requests other than probes, in an app with chat (a chat series was scraped in the last day)",
    "cache_hit_ratio_min": "the chat cache hit ratio is below the threshold",
    "document_failure_ratio": "an operation's share of document operations not ending in `success` is above the threshold",
    "sessions_drop": "active sessions fell by more than the threshold share against one hour earlier (with at least `sessions_drop_min_sessions` then); no series now, as after a restart, counts as 0",
}


def alert_reference_table() -> str:
    """The README's table of alert rules (a test keeps the two equal)."""
    rows = [
        "| alert | category, severity | fires when | threshold key (default) | `for` key (default) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for alert in ALERTS:
        threshold = f"`{alert.threshold_key}` ({DEFAULT_THRESHOLDS[alert.threshold_key]:g})" if alert.threshold_key else ""
        rows.append(
            f"| `{alert.alert}` | {alert.category}, {alert.severity} | {WHEN[alert.key]} | {threshold} | `{alert.key}` ({alert.duration}) |"
        )
    return "\n".join(rows)
