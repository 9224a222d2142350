"""crowdmon: production-grade Prometheus monitoring for any ASGI application."""

from crowdmon.cardinality import CardinalityGuard
from crowdmon.catalogue import CATALOGUE, MetricKind, MetricSpec
from crowdmon.context import current_endpoint, current_user_type, default_user_type
from crowdmon.decorators import (
    instrumented_metrics,
    tracked_chat,
    tracked_database_query,
    tracked_document_operation,
    tracked_errors,
    tracked_external,
    tracked_memory_operation,
    tracked_session,
    tracked_vector_search,
)
from crowdmon.errors import ErrorTaxonomy, add_error_rule, classify_error, default_taxonomy
from crowdmon.exposition import MetricsApp, MetricsServer, serve_metrics
from crowdmon.health import HealthApp
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    default_instrumentation,
)
from crowdmon.integration import setup_monitoring
from crowdmon.middleware import PrometheusMiddleware
from crowdmon.tracking import (
    component_health,
    end_session,
    register_component,
    register_health_check,
    set_component_degraded,
    set_component_healthy,
    set_component_unhealthy,
    start_session,
    track_application_error,
    track_chat_message,
    track_database_query,
    track_document_operation,
    track_external_api_call,
    track_memory_operation,
    track_request_performance,
    track_session,
    track_vector_search,
)

__all__ = [
    "CATALOGUE",
    "CardinalityGuard",
    "CrowdmonSetupError",
    "ErrorTaxonomy",
    "HealthApp",
    "MetricKind",
    "MetricSpec",
    "MetricsApp",
    "MetricsServer",
    "PrometheusInstrumentation",
    "PrometheusMiddleware",
    "add_error_rule",
    "classify_error",
    "component_health",
    "current_endpoint",
    "current_user_type",
    "default_instrumentation",
    "default_taxonomy",
    "default_user_type",
    "end_session",
    "instrumented_metrics",
    "register_component",
    "register_health_check",
    "serve_metrics",
    "set_component_degraded",
    "set_component_healthy",
    "set_component_unhealthy",
    "setup_monitoring",
    "start_session",
    "track_application_error",
    "track_chat_message",
    "track_database_query",
    "track_document_operation",
    "track_external_api_call",
    "track_memory_operation",
    "track_request_performance",
    "track_session",
    "track_vector_search",
    "tracked_chat",
    "tracked_database_query",
    "tracked_document_operation",
    "tracked_errors",
    "tracked_external",
    "tracked_memory_operation",
    "tracked_session",
    "tracked_vector_search",
]
