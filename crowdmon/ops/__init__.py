"""The operations pack: Grafana dashboards, provisioning, Prometheus alert rules and scrape
config, all generated from the metric catalogue.

The dashboards and the export need the ``ops`` extra (``pip install 'crowdmon[ops]'``: Grafana's
typed dashboard builders and PyYAML); they are imported on first use, so the rest of crowdmon
never needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crowdmon.ops.alerts import (
    ALERT_KEYS,
    ALERTS,
    DEFAULT_DURATIONS,
    DEFAULT_THRESHOLDS,
    THRESHOLD_DOCS,
    AlertSpec,
    rule_groups,
)
from crowdmon.ops.promql import catalogue_problems, references

if TYPE_CHECKING:
    from crowdmon.ops.dashboards import (
        DASHBOARDS,
        DashboardSpec,
        all_queries,
        build_dashboard,
        dashboard_json,
    )
    from crowdmon.ops.files import ExportOptions, export, prometheus_config

_LAZY = {
    "DASHBOARDS": "crowdmon.ops.dashboards",
    "DashboardSpec": "crowdmon.ops.dashboards",
    "all_queries": "crowdmon.ops.dashboards",
    "build_dashboard": "crowdmon.ops.dashboards",
    "dashboard_json": "crowdmon.ops.dashboards",
    "ExportOptions": "crowdmon.ops.files",
    "export": "crowdmon.ops.files",
    "prometheus_config": "crowdmon.ops.files",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'crowdmon.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ALERTS",
    "ALERT_KEYS",
    "DASHBOARDS",
    "DEFAULT_DURATIONS",
    "DEFAULT_THRESHOLDS",
    "THRESHOLD_DOCS",
    "AlertSpec",
    "DashboardSpec",
    "ExportOptions",
    "all_queries",
    "build_dashboard",
    "catalogue_problems",
    "dashboard_json",
    "export",
    "prometheus_config",
    "references",
    "rule_groups",
]
