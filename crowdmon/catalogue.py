"""Every crowdmon metric, declared once as data.

The catalogue is the contract with dashboards and alert rules: names never change once released,
and ``tests/test_catalogue.py`` pins names, types and label sets.  Everything that builds metrics
(:mod:`crowdmon.instrumentation`), draws dashboards or writes alert rules (:mod:`crowdmon.ops`)
reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class MetricKind(str, Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: what Prometheus sees (``name`` is the exposed family name)."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    #: prometheus_client's gauge mode under ``PROMETHEUS_MULTIPROC_DIR``; gauges only.
    multiprocess_mode: str = ""
    #: the seed area the metric belongs to; dashboards group panels by it.
    area: str = ""


# Bucket ladders, each fitted to the scale of what it measures.
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (
    0.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
)
LLM_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
VECTOR_SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
EXTERNAL_API_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

#: The values ``error_type`` may take; :mod:`crowdmon.errors` maps exceptions onto them.
ERROR_TYPES = ("auth", "database", "external_service", "ai_system", "session", "validation", "system")
#: The states of ``component_health_status``; exactly one is 1 per component.
HEALTH_STATES = ("healthy", "degraded", "unhealthy", "unknown")
#: The values ``outcome`` may take on ``external_api_duration_seconds``.
OUTCOMES = ("success", "error", "cancelled")

#: Label values crowdmon writes itself when the real value is unknown or unbounded.
UNMATCHED_HANDLER = "<unmatched>"
OTHER_METHOD = "OTHER"
OVERFLOW_VALUE = "<other>"
UNKNOWN_VALUE = "unknown"

_C, _G, _H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM

HTTP_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("crowdfunding_api_requests_total", _C, "HTTP requests handled, by method, route template and status code.", ("method", "handler", "status"), area="api"),
    MetricSpec("crowdfunding_api_request_duration_seconds", _H, "Time from receiving an HTTP request until its last response byte was sent.", ("method", "handler"), HTTP_LATENCY_BUCKETS, area="api"),
    MetricSpec("crowdfunding_api_request_size_bytes", _H, "Bytes of HTTP request body received.", ("method", "handler"), SIZE_BUCKETS, area="api"),
    MetricSpec("crowdfunding_api_response_size_bytes", _H, "Bytes of HTTP response body sent.", ("method", "handler"), SIZE_BUCKETS, area="api"),
    MetricSpec("crowdfunding_api_requests_in_progress", _G, "HTTP requests being handled right now.", ("method",), multiprocess_mode="livesum", area="api"),
)

ERROR_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("application_errors_total", _C, "Application errors by category, component and user type.", ("error_type", "component", "user_type"), area="errors"),
    MetricSpec("application_error_details_total", _C, "Application errors with the exception class, endpoint and function, for troubleshooting.", ("error_type", "component", "exception", "endpoint", "function"), area="errors"),
    MetricSpec("auth_errors_total", _C, "Authentication and authorisation errors.", ("component", "exception"), area="errors"),
    MetricSpec("database_errors_total", _C, "Database and persistence errors.", ("component", "exception"), area="errors"),
    MetricSpec("external_service_errors_total", _C, "Errors of calls to external services.", ("service", "endpoint", "exception"), area="errors"),
    MetricSpec("ai_system_errors_total", _C, "Errors of the AI and RAG system.", ("component", "exception"), area="errors"),
    MetricSpec("session_errors_total", _C, "Session management errors.", ("component", "exception"), area="errors"),
)

PERFORMANCE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("chat_processing_duration_seconds", _H, "Time to process one chat message.", ("endpoint", "user_type"), LLM_LATENCY_BUCKETS, area="chat"),
    MetricSpec("vector_search_duration_seconds", _H, "Time of one vector database operation.", ("operation",), VECTOR_SEARCH_BUCKETS, area="performance"),
    MetricSpec("database_query_duration_seconds", _H, "Time of one database query.", ("operation",), DATABASE_BUCKETS, area="performance"),
    MetricSpec("external_api_duration_seconds", _H, "Time of one call to an external API, by outcome.", ("service", "endpoint", "outcome"), EXTERNAL_API_BUCKETS, area="performance"),
)

BUSINESS_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("chat_messages_total", _C, "Chat messages processed.", ("user_type", "message_type", "cache_hit", "rag_used"), area="chat"),
    MetricSpec("active_sessions_current", _G, "User sessions active right now.", ("user_type",), multiprocess_mode="livesum", area="business"),
    MetricSpec("memory_operations_total", _C, "Operations on the conversation memory system.", ("operation", "memory_type", "user_type"), area="business"),
    MetricSpec("document_operations_total", _C, "Document processing operations.", ("operation", "document_type", "status"), area="business"),
)

HEALTH_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("component_health_status", _G, "Component health, one-hot: 1 for the current state, 0 for the others.", ("component", "status"), multiprocess_mode="livemostrecent", area="health"),
)

#: crowdmon's view of itself: folding of label values and failures of its own code.
SELF_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("crowdmon_label_overflow_total", _C, "Label values folded into the overflow value because a label reached its cap.", ("metric", "label"), area="self"),
    MetricSpec("crowdmon_internal_errors_total", _C, "Failures inside crowdmon that were contained instead of failing the application.", ("site",), area="self"),
)

#: The seed's 21 metrics, in the order of the design document.
SEED_METRICS: tuple[MetricSpec, ...] = (
    HTTP_METRICS + ERROR_METRICS + PERFORMANCE_METRICS + BUSINESS_METRICS + HEALTH_METRICS
)
CATALOGUE: tuple[MetricSpec, ...] = SEED_METRICS + SELF_METRICS
BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOGUE}

#: The category counter each ``error_type`` feeds besides ``application_errors_total``.
CATEGORY_COUNTERS: dict[str, str] = {
    "auth": "auth_errors_total",
    "database": "database_errors_total",
    "external_service": "external_service_errors_total",
    "ai_system": "ai_system_errors_total",
    "session": "session_errors_total",
}


def spec(name: str) -> MetricSpec:
    """The catalogue entry called ``name``; a clear ``KeyError`` for anything else."""
    try:
        return BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise KeyError(f"{name!r} is not a crowdmon metric; the catalogue has: {known}") from None
