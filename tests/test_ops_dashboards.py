"""The generated dashboards: built with Grafana's typed builders, every query naming only
catalogue metrics and labels, every catalogue metric on a panel, valid PromQL for promtool."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from crowdmon.catalogue import CATALOGUE
from crowdmon.ops import DASHBOARDS, all_queries, catalogue_problems, dashboard_json, references
from crowdmon.ops.promql import spec_for_series, with_grafana_variables
from crowdmon.ops.queries import DASHBOARD_SCOPE, counter_rate, gauge_sum, quantile

GRAFANA_VALUES = {"job": "crowdmon", "instance": ".*", "handler": ".*", "__rate_interval": "1m", "__range": "5m"}


def panels_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in document["panels"] if panel["type"] != "row"]


def test_every_dashboard_query_names_only_catalogue_metrics_and_labels() -> None:
    queries = all_queries()
    assert len(queries) > 40
    problems = {query: catalogue_problems(query) for query in queries}
    assert {query: found for query, found in problems.items() if found} == {}


def test_every_catalogue_metric_is_on_a_dashboard() -> None:
    shown = set()
    for query in all_queries():
        for series, _ in references(query).series:
            metric, _ = spec_for_series(series)
            assert metric is not None
            shown.add(metric.name)
    assert shown == {spec.name for spec in CATALOGUE}


def test_every_panel_query_follows_the_job_instance_and_handler_variables() -> None:
    for spec in DASHBOARDS:
        for panel in spec.panels():
            for target in panel.targets:
                for series, matchers in references(target.expr).series:
                    found = {(m.label, m.op, m.value) for m in matchers}
                    assert {("job", "=~", "$job"), ("instance", "=~", "$instance")} <= found, (panel.title, series)
                    metric, _ = spec_for_series(series)
                    if spec.handler_variable and metric is not None and "handler" in metric.labels:
                        assert ("handler", "=~", "$handler") in found, (panel.title, series)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("sum by (handlr) (rate(crowdfunding_api_requests_total[5m]))", "grouping label 'handlr' is on none of the series the expression reads"),
        ("rate(chat_message_total[5m])", "series 'chat_message_total' is not in the catalogue"),
        ("chat_processing_duration_seconds", "series 'chat_processing_duration_seconds' is not in the catalogue (a histogram is queried as _bucket, _sum or _count)"),
        ('component_health_status{state="unhealthy"}', "component_health_status has no label 'state'; it has ['component', 'instance', 'job', 'status']"),
        ('component_health_status{status="sick"}', "component_health_status{status} never takes the value 'sick'; it is one of ['healthy', 'degraded', 'unhealthy', 'unknown']"),
        ('sum(rate(application_errors_total{error_type=~"auth|db"}[5m]))', "application_errors_total{error_type} never takes the value 'db'; it is one of ['auth', 'database', 'external_service', 'ai_system', 'session', 'validation', 'system']"),
        ("histogram_quantile(0.9, sum by (le) (rate(chat_messages_total[1m])))", "grouping label 'le' is on none of the series the expression reads"),
        ("rat(chat_messages_total[1m])", "unknown function 'rat'"),
        ("label_values(crowdfunding_api_requests_total, route)", "grouping label 'route' is on none of the series the expression reads"),
    ],
)
def test_the_checker_names_what_the_catalogue_lacks(query: str, problem: str) -> None:
    assert catalogue_problems(query) == [problem]


def test_the_query_builders_refuse_what_the_catalogue_lacks() -> None:
    with pytest.raises(ValueError, match="chat_messages_total has no label 'handler'"):
        counter_rate("chat_messages_total", DASHBOARD_SCOPE, ("handler",))
    with pytest.raises(ValueError, match="quantiles need a histogram"):
        quantile(0.95, "chat_messages_total", DASHBOARD_SCOPE)
    with pytest.raises(ValueError, match="rate\\(\\) needs a counter"):
        counter_rate("active_sessions_current", DASHBOARD_SCOPE)
    with pytest.raises(ValueError, match="not a gauge"):
        gauge_sum("chat_messages_total", DASHBOARD_SCOPE)
    with pytest.raises(KeyError, match="'chat_message_total' is not a crowdmon metric"):
        counter_rate("chat_message_total", DASHBOARD_SCOPE)


def test_latency_panels_use_histogram_quantile_over_summed_bucket_rates() -> None:
    api = next(spec for spec in DASHBOARDS if spec.uid == "crowdmon-api-performance")
    latency = next(panel for panel in api.panels() if panel.title.startswith("Latency"))
    assert [target.expr for target in latency.targets] == [
        f'histogram_quantile({q}, sum by (le, handler) (rate(crowdfunding_api_request_duration_seconds_bucket{{job=~"$job", instance=~"$instance", handler=~"$handler"}}[$__rate_interval])))'
        for q in (0.5, 0.95, 0.99)
    ]
    assert [target.legend for target in latency.targets] == ["p50 {{handler}}", "p95 {{handler}}", "p99 {{handler}}"]


def test_dashboards_round_trip_through_grafanas_model_unchanged() -> None:
    for spec in DASHBOARDS:
        text = dashboard_json(spec, "Prometheus")
        again = json.dumps(Dashboard.from_json(json.loads(text)), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
        assert again == text, spec.uid


def test_dashboard_json_is_complete_for_grafana() -> None:
    uids = set()
    for spec in DASHBOARDS:
        document = json.loads(dashboard_json(spec, "Team Prometheus"))
        uids.add(document["uid"])
        assert document["schemaVersion"] >= 39
        ids = [panel["id"] for panel in document["panels"]]
        assert len(ids) == len(set(ids)) and 0 not in ids
        variables = {variable["name"]: variable for variable in document["templating"]["list"]}
        expected = ["datasource", "job", "instance"] + (["handler"] if spec.handler_variable else [])
        assert list(variables) == expected
        assert variables["datasource"]["current"]["text"] == "Team Prometheus"
        assert variables["datasource"]["query"] == "prometheus"
        for name in expected[1:]:
            assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        panels = panels_of(document)
        assert panels and len(panels) == len(spec.panels())
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert ref_ids == [chr(ord("A") + index) for index in range(len(ref_ids))]
            assert all(target["expr"] for target in panel["targets"])
            if panel["type"] == "timeseries":
                assert panel["options"]["legend"]["showLegend"] is True
                assert panel["options"]["tooltip"]["mode"] == "multi"
    assert len(uids) == len(DASHBOARDS) == 5


def test_dashboard_queries_are_valid_promql_for_promtool(tmp_path: Path) -> None:
    panel_queries = [target.expr for spec in DASHBOARDS for panel in spec.panels() for target in panel.targets]
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"crowdmon:dashboard_query_{index}", "expr": with_grafana_variables(query, GRAFANA_VALUES)}
                    for index, query in enumerate(panel_queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(panel_queries)} rules found" in result.stdout


def test_grafana_variables_are_substituted_or_named() -> None:
    assert with_grafana_variables('x{job=~"$job"}[${__rate_interval}]', GRAFANA_VALUES) == 'x{job=~"crowdmon"}[1m]'
    with pytest.raises(KeyError, match=r"no value for Grafana variable \$tenant"):
        with_grafana_variables('x{tenant=~"$tenant"}', GRAFANA_VALUES)


def panel_query(dashboard_uid: str, title: str) -> str:
    (spec,) = [spec for spec in DASHBOARDS if spec.uid == dashboard_uid]
    (panel,) = [panel for panel in spec.panels() if panel.title == title]
    return with_grafana_variables(panel.targets[0].expr, GRAFANA_VALUES)


def evaluate_with_promtool(tmp_path: Path, input_series: list[dict[str, str]], checks: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "none.yml").write_text("groups: []\n")
    test = {
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "promql_expr_test": checks}],
    }
    path = tmp_path / "panels.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_health_stat_panels_count_components_not_replicas(tmp_path: Path) -> None:
    """Three replicas report the same two components: one component unhealthy is 1, not 3."""
    states = {"database": "unhealthy", "openai": "healthy"}
    input_series = [
        {
            "series": f'component_health_status{{job="crowdmon", instance="app-{replica}:8000", component="{component}", status="{status}"}}',
            "values": "1x10" if status == states[component] else "0x10",
        }
        for replica in range(3)
        for component in states
        for status in ("healthy", "degraded", "unhealthy", "unknown")
    ]
    checks = [
        {"expr": panel_query("crowdmon-system-health", "Unhealthy components"), "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 1}]},
        {"expr": panel_query("crowdmon-system-health", "Degraded components"), "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]},
        {
            "expr": panel_query("crowdmon-system-health", "Components by state"),
            "eval_time": "5m",
            "exp_samples": [{"labels": '{status="healthy"}', "value": 1}, {"labels": '{status="unhealthy"}', "value": 1}],
        },
    ]
    result = evaluate_with_promtool(tmp_path, input_series, checks)
    assert result.returncode == 0, result.stdout + result.stderr



def test_stat_panels_colour_by_what_they_count() -> None:
    """One unhealthy component is red and one degraded is orange, zero of either green (Grafana's
    own default would be green up to 80); the messages-in-range stat is one instant query."""
    panels = {panel["title"]: panel for spec in DASHBOARDS for panel in panels_of(json.loads(dashboard_json(spec, "Prometheus")))}

    def steps(title: str) -> list[tuple[float | None, str]]:
        thresholds = panels[title]["fieldConfig"]["defaults"]["thresholds"]
        assert thresholds["mode"] == "absolute"
        return [(step["value"], step["color"]) for step in thresholds["steps"]]

    assert steps("Unhealthy components") == [(None, "green"), (1, "red")]
    assert steps("Degraded components") == [(None, "green"), (1, "orange")]
    assert [(target["instant"], target["range"]) for target in panels["Messages in range by user type"]["targets"]] == [(True, False)]
