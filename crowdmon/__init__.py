"""crowdmon: production-grade Prometheus monitoring for any ASGI application."""

from crowdmon.cardinality import CardinalityGuard
from crowdmon.catalogue import CATALOGUE, MetricKind, MetricSpec
from crowdmon.context import current_endpoint
from crowdmon.exposition import MetricsApp
from crowdmon.health import HealthApp
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    default_instrumentation,
)
from crowdmon.integration import setup_monitoring
from crowdmon.middleware import PrometheusMiddleware

__all__ = [
    "CATALOGUE",
    "CardinalityGuard",
    "CrowdmonSetupError",
    "HealthApp",
    "MetricKind",
    "MetricSpec",
    "MetricsApp",
    "PrometheusInstrumentation",
    "PrometheusMiddleware",
    "current_endpoint",
    "default_instrumentation",
    "setup_monitoring",
]
