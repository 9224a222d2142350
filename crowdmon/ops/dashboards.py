"""The five Grafana dashboards, built with Grafana's typed builders from the metric catalogue.

One dashboard per area the seed names (System Health, API Performance, Chat Metrics, Error
Analysis, Business KPIs).  Panels are data (:class:`PanelSpec`); their queries come from
:mod:`crowdmon.ops.queries`, so each one names only catalogue metrics and labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as dashboard_builders
    from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models import prometheus as prometheus_model
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "crowdmon's dashboards need Grafana's builders: pip install 'crowdmon[ops]'"
    ) from error

from crowdmon.ops.queries import (
    ANSWERS,
    counter_rate,
    gauge_sum,
    health_code,
    quantile,
    rate_or_zero,
    ratio,
)
from crowdmon.ops.queries import (
    DASHBOARD_SCOPE as S,
)

PanelKind = Literal["timeseries", "stat", "statetimeline", "table"]

#: Health states coded so that ``max`` across instances is the worst state.
HEALTH_CODES = {"healthy": 0, "unknown": 1, "degraded": 2, "unhealthy": 3}
HEALTH_COLOURS = {"healthy": "green", "unknown": "text", "degraded": "orange", "unhealthy": "red"}
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    targets: tuple[Target, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    value_mappings: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Colour steps: the colour from each value on (the first from no value, None).
    thresholds: tuple[tuple[float | None, str], ...] = ()
    #: One value for the time range, queried once (a stat over ``$__range``), not a series.
    instant: bool = False


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]
    handler_variable: bool = False

    def panels(self) -> list[PanelSpec]:
        return [panel for _, panels in self.rows for panel in panels]


def _h(handler: bool) -> tuple[str, ...]:
    return ('handler=~"$handler"',) if handler else ()


def _latency(name: str, by: str, title: str, description: str, extra: Sequence[str] = (), unit: str = "s") -> PanelSpec:
    return PanelSpec(
        title,
        description,
        tuple(Target(quantile(q, name, S, (by,), extra), f"p{round(q * 100)} {{{{{by}}}}}") for q in QUANTILES),
        unit=unit,
    )


def _components_in(state: str) -> str:
    """How many components report ``state`` on at least one instance (each counted once)."""
    reporting = gauge_sum("component_health_status", S, ("component",), [f'status="{state}"'], aggregation="max")
    return f"count ({reporting} == 1) or vector(0)"


_HEALTH_MAPPINGS = {str(code): (state, HEALTH_COLOURS[state]) for state, code in HEALTH_CODES.items()}

SYSTEM_HEALTH = DashboardSpec(
    "crowdmon-system-health",
    "crowdmon / System Health",
    "Component health from component_health_status, and crowdmon's own signals.",
    (
        (
            "Components",
            (
                PanelSpec("Component health", "Worst state of each component across instances.", (Target(health_code(S, HEALTH_CODES), "{{component}}"),), "statetimeline", width=24, value_mappings=_HEALTH_MAPPINGS),
                PanelSpec("Unhealthy components", "Components reporting unhealthy now, on any instance.", (Target(_components_in("unhealthy")),), "stat", width=8, thresholds=((None, "green"), (1, "red"))),
                PanelSpec("Degraded components", "Components reporting degraded now, on any instance.", (Target(_components_in("degraded")),), "stat", width=8, thresholds=((None, "green"), (1, "orange"))),
                PanelSpec("Components by state", "How many components report each state, on any instance.", (Target(f"count by (status) ({gauge_sum('component_health_status', S, ('component', 'status'), aggregation='max')} == 1)", "{{status}}"),), "stat", width=8),
            ),
        ),
        (
            "crowdmon itself",
            (
                PanelSpec("Label values folded", "Label values folded into <other> because a label reached its cap; raise the cap or fix the label source. Only labels with folds are drawn.", (Target(counter_rate("crowdmon_label_overflow_total", S, ("metric", "label"), function="increase") + " > 0", "{{metric}} {{label}}"),)),
                PanelSpec("Contained internal errors", "Failures inside crowdmon that were contained; the application was not affected. Only sites with failures are drawn.", (Target(counter_rate("crowdmon_internal_errors_total", S, ("site",), function="increase") + " > 0", "{{site}}"),)),
            ),
        ),
    ),
)


def _api_performance() -> DashboardSpec:
    h = _h(True)
    requests = "crowdfunding_api_requests_total"
    return DashboardSpec(
        "crowdmon-api-performance",
        "crowdmon / API Performance",
        "HTTP traffic, errors and latency by route template, and the latency of the dependencies.",
        (
            (
                "Traffic",
                (
                    PanelSpec("Request rate by handler", "Requests per second per route template.", (Target(counter_rate(requests, S, ("handler",), h), "{{handler}}"),), unit="reqps"),
                    PanelSpec("Error ratio (5xx) by handler", "Share of requests answered with a 5xx status.", (Target(ratio(requests, S, ['status=~"5.."'], ("handler",), h), "{{handler}}"),), unit="percentunit"),
                    PanelSpec("Requests by status", "Requests per second per status code.", (Target(counter_rate(requests, S, ("status",), h), "{{status}}"),), unit="reqps"),
                    PanelSpec("Requests in progress", "Requests being handled right now, per method.", (Target(gauge_sum("crowdfunding_api_requests_in_progress", S, ("method",)), "{{method}}"),)),
                ),
            ),
            (
                "Latency and sizes",
                (
                    _latency("crowdfunding_api_request_duration_seconds", "handler", "Latency p50 / p95 / p99 by handler", "Until the last response byte was sent.", h),
                    PanelSpec("Request and response size p95", "Bytes of body received and sent.", (
                        Target(quantile(0.95, "crowdfunding_api_request_size_bytes", S, ("handler",), h), "request {{handler}}"),
                        Target(quantile(0.95, "crowdfunding_api_response_size_bytes", S, ("handler",), h), "response {{handler}}"),
                    ), unit="bytes"),
                ),
            ),
            (
                "Dependencies",
                (
                    _latency("external_api_duration_seconds", "service", "External API latency by service", "Calls to external services, all outcomes."),
                    PanelSpec("External API error ratio by service", "Share of external calls that ended in an error.", (Target(ratio("external_api_duration_seconds", S, ['outcome="error"'], ("service",)), "{{service}}"),), unit="percentunit"),
                    _latency("vector_search_duration_seconds", "operation", "Vector search latency", "Vector database operations."),
                    _latency("database_query_duration_seconds", "operation", "Database query latency", "Database queries."),
                ),
            ),
        ),
        handler_variable=True,
    )


API_PERFORMANCE = _api_performance()

CHAT_METRICS = DashboardSpec(
    "crowdmon-chat",
    "crowdmon / Chat Metrics",
    "Chat messages, cache hits, RAG usage and processing time.",
    (
        (
            "Messages",
            (
                PanelSpec("Chat message rate by type", "Messages per second per message type.", (Target(counter_rate("chat_messages_total", S, ("message_type",)), "{{message_type}}"),), unit="ops"),
                PanelSpec("Cache hit ratio", "Share of answers (messages other than the user's own) served from the cache.", (Target(ratio("chat_messages_total", S, ['cache_hit="true"'], (), ANSWERS), "cache hits"),), unit="percentunit", width=6),
                PanelSpec("RAG usage", "Share of answers (messages other than the user's own) made with retrieval-augmented generation.", (Target(ratio("chat_messages_total", S, ['rag_used="true"'], (), ANSWERS), "RAG used"),), unit="percentunit", width=6),
                PanelSpec("Chat message rate by user type", "Messages per second per user type.", (Target(counter_rate("chat_messages_total", S, ("user_type",)), "{{user_type}}"),), unit="ops"),
                _latency("chat_processing_duration_seconds", "endpoint", "Chat processing time", "Time to process one chat message."),
            ),
        ),
    ),
)

ERROR_ANALYSIS = DashboardSpec(
    "crowdmon-errors",
    "crowdmon / Error Analysis",
    "Application errors by category, component and exception class.",
    (
        (
            "Categories",
            (
                PanelSpec("Errors by category", "Errors per second per error_type.", (Target(counter_rate("application_errors_total", S, ("error_type",)), "{{error_type}}"),), unit="ops"),
                PanelSpec("Errors by component", "Errors per second per component.", (Target(counter_rate("application_errors_total", S, ("component", "error_type")), "{{component}} ({{error_type}})"),), unit="ops"),
                PanelSpec("Top exceptions", "The exception classes seen most in the time range, with where they were raised.", (Target(f"topk(10, {counter_rate('application_error_details_total', S, ('exception', 'error_type', 'component', 'endpoint', 'function'), window='$__range', function='increase')})"),), "table", width=24),
            ),
        ),
        (
            "By category counter",
            (
                PanelSpec("Authentication errors", "auth_errors_total per component and exception.", (Target(counter_rate("auth_errors_total", S, ("component", "exception")), "{{component}} {{exception}}"),), unit="ops", width=8),
                PanelSpec("Database errors", "database_errors_total per component and exception.", (Target(counter_rate("database_errors_total", S, ("component", "exception")), "{{component}} {{exception}}"),), unit="ops", width=8),
                PanelSpec("External service errors", "external_service_errors_total per service and exception.", (Target(counter_rate("external_service_errors_total", S, ("service", "exception")), "{{service}} {{exception}}"),), unit="ops", width=8),
                PanelSpec("AI system errors", "ai_system_errors_total per component and exception.", (Target(counter_rate("ai_system_errors_total", S, ("component", "exception")), "{{component}} {{exception}}"),), unit="ops", width=8),
                PanelSpec("Session errors", "session_errors_total per component and exception.", (Target(counter_rate("session_errors_total", S, ("component", "exception")), "{{component}} {{exception}}"),), unit="ops", width=8),
                PanelSpec("HTTP 5xx rate by handler", "Requests answered with a 5xx status, per second.", (Target(rate_or_zero("crowdfunding_api_requests_total", S, ("handler",), ['status=~"5.."']), "{{handler}}"),), unit="reqps", width=8),
            ),
        ),
    ),
)

BUSINESS_KPIS = DashboardSpec(
    "crowdmon-business",
    "crowdmon / Business KPIs",
    "User activity: sessions, messages, memory and document operations.",
    (
        (
            "Activity",
            (
                PanelSpec("Active sessions", "User sessions active now, per user type.", (Target(gauge_sum("active_sessions_current", S, ("user_type",)), "{{user_type}}"),)),
                PanelSpec("Messages in range by user type", "Chat messages over the dashboard's time range.", (Target(counter_rate("chat_messages_total", S, ("user_type",), window="$__range", function="increase"), "{{user_type}}"),), "stat", instant=True),
                PanelSpec("Memory operations", "Memory system operations per second.", (Target(counter_rate("memory_operations_total", S, ("operation", "memory_type")), "{{operation}} {{memory_type}}"),), unit="ops"),
                PanelSpec("Document operations", "Document operations per second, by operation and status.", (Target(counter_rate("document_operations_total", S, ("operation", "status")), "{{operation}} {{status}}"),), unit="ops"),
            ),
        ),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (SYSTEM_HEALTH, API_PERFORMANCE, CHAT_METRICS, ERROR_ANALYSIS, BUSINESS_KPIS)


def variable_queries(spec: DashboardSpec) -> list[tuple[str, str]]:
    """The dashboard's template variables backed by a query: ``(name, query)``."""
    source = "crowdfunding_api_requests_total"
    queries = [
        ("job", f"label_values({source}, job)"),
        ("instance", f'label_values({source}{{job=~"$job"}}, instance)'),
    ]
    if spec.handler_variable:
        queries.append(("handler", f'label_values({source}{{job=~"$job", instance=~"$instance"}}, handler)'))
    return queries


def all_queries() -> list[str]:
    """Every PromQL expression the dashboards run, panels first, then template variables."""
    panels = [target.expr for spec in DASHBOARDS for panel in spec.panels() for target in panel.targets]
    variables = [query for spec in DASHBOARDS for _, query in variable_queries(spec)]
    return panels + variables


def build_dashboard(spec: DashboardSpec, datasource: str) -> model.Dashboard:
    """One dashboard as Grafana's typed model; ``datasource`` is the default data source name."""
    source = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
    builder = (
        dashboard_builders.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(["crowdmon"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .current(model.VariableOption(selected=True, text=datasource, value=datasource))
        )
    )
    for name, query in variable_queries(spec):
        builder = builder.with_variable(
            dashboard_builders.QueryVariable(name)
            .label(name.capitalize())
            .query(query)
            .datasource(source)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
            .multi(True)
            .current(model.VariableOption(selected=True, text="All", value="$__all"))
        )
    panel_id = 1
    for row_title, panels in spec.rows:
        builder = builder.with_row(dashboard_builders.Row(row_title).id(panel_id))
        panel_id += 1
        for panel in panels:
            builder = builder.with_panel(_panel(panel, source, panel_id))
            panel_id += 1
    built: model.Dashboard = builder.build()
    return built


def _panel(spec: PanelSpec, source: model.DataSourceRef, panel_id: int) -> Any:
    builder: Any
    if spec.kind == "timeseries":
        builder = (
            timeseries.Panel()
            .line_width(1)
            .fill_opacity(10)
            .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode("table")).placement(common.LegendPlacement("bottom")).show_legend(True).calcs(["mean", "max", "lastNotNull"]))
            .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode("multi")).sort(common.SortOrder("desc")))
        )
    elif spec.kind == "stat":
        builder = stat.Panel().reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"])).graph_mode(common.BigValueGraphMode("area"))
    elif spec.kind == "statetimeline":
        builder = (
            statetimeline.Panel()
            .show_value(common.VisibilityMode("auto"))
            .merge_values(True)
            .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode("list")).placement(common.LegendPlacement("bottom")).show_legend(True))
            .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode("single")).sort(common.SortOrder("none")))
        )
    else:
        builder = table.Panel()
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(source)
        .unit(spec.unit)
        .span(spec.width)
        .height(8)
    )
    if spec.value_mappings:
        builder = builder.mappings(
            [
                model.ValueMap(
                    {
                        value: model.ValueMappingResult(text=text, color=colour, index=index)
                        for index, (value, (text, colour)) in enumerate(spec.value_mappings.items())
                    }
                )
            ]
        ).color_scheme(dashboard_builders.FieldColor().mode(model.FieldColorModeId("thresholds")))
    if spec.thresholds:
        steps = [model.Threshold(value=value, color=colour) for value, colour in spec.thresholds]
        builder = builder.thresholds(
            dashboard_builders.ThresholdsConfig().mode(model.ThresholdsMode("absolute")).steps(steps)
        ).color_scheme(dashboard_builders.FieldColor().mode(model.FieldColorModeId("thresholds")))
    for index, target in enumerate(spec.targets):
        query = prometheus.Dataquery().expr(target.expr).ref_id(chr(ord("A") + index))
        if spec.kind == "table":
            query = query.instant().format(prometheus_model.PromQueryFormat("table"))
        elif spec.instant:
            query = query.instant()
        else:
            query = query.range()
        if target.legend:
            query = query.legend_format(target.legend)
        builder = builder.with_target(query)
    return builder


def dashboard_json(spec: DashboardSpec, datasource: str) -> str:
    """The dashboard as the JSON Grafana imports."""
    return json.dumps(build_dashboard(spec, datasource), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def dashboard_reference_table() -> str:
    """The README's table of dashboards and their panels (a test keeps the two equal)."""
    rows = ["| dashboard (uid) | rows: panels |", "| --- | --- |"]
    for spec in DASHBOARDS:
        rows_text = "; ".join(f"**{title}**: {', '.join(panel.title for panel in panels)}" for title, panels in spec.rows)
        rows.append(f"| {spec.title} (`{spec.uid}`) | {rows_text} |")
    return "\n".join(rows)
