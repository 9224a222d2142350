"""The exported alert rules, judged by promtool: ``check rules`` passes, and ``test rules`` unit
tests show every alert firing when it should, with its rendered annotations, and staying silent
when it should not."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from crowdmon.catalogue import ERROR_TYPES
from crowdmon.ops import (
    ALERTS,
    DEFAULT_THRESHOLDS,
    ExportOptions,
    catalogue_problems,
    export,
    rule_groups,
)
from crowdmon.ops.alerts import duration_seconds

JOB = "crowdmon"
BY_KEY = {alert.key: alert for alert in ALERTS}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": JOB, "instance": "app:8000", **labels}
    rendered = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def histogram(name: str, counts: Mapping[str, str], **labels: str) -> list[dict[str, str]]:
    """Bucket series ``le -> values`` of one histogram child."""
    return [series(f"{name}_bucket", values, le=le, **labels) for le, values in counts.items()]


@dataclass
class Case:
    """One promtool test: input series, then alerts expected at given times."""

    name: str
    input_series: list[dict[str, str]]
    checks: list[tuple[str, str, list[dict[str, Any]]]] = field(default_factory=list)

    def expect(self, eval_time: str, alertname: str, *alerts: dict[str, Any]) -> Case:
        self.checks.append((eval_time, alertname, list(alerts)))
        return self


FIRED_KEYS: set[str] = set()


def fired(key: str, labels: Mapping[str, str], summary: str, description: str) -> dict[str, Any]:
    """An alert of rule ``key`` as promtool must report it, every annotation rendered."""
    alert = BY_KEY[key]
    FIRED_KEYS.add(key)
    exp_labels = {"severity": alert.severity, "category": alert.category, "source": "crowdmon", **dict(alert.labels), **labels}
    return {
        "exp_labels": exp_labels,
        "exp_annotations": {"summary": summary, "description": description, "runbook": render_labels(alert.runbook, exp_labels)},
    }


def render_labels(template: str, labels: Mapping[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda match: labels[match.group(1)], template)


def error_rate_case(kind: str) -> Case:
    threshold = DEFAULT_THRESHOLDS[f"error_rate_{kind}"]
    per_minute = int(threshold * 2 * 60)  # twice the threshold
    below = int(threshold * 0.5 * 60)
    rate = f"{threshold * 2:.3g}"
    return Case(
        f"HighErrorRate {kind}",
        [
            series("application_errors_total", f"0+{per_minute}x20", error_type=kind, component="chat_endpoint", user_type="authenticated"),
            series("application_errors_total", f"0+{below}x20", error_type=kind, component="rag_system", user_type="anonymous"),
        ],
    ).expect("3m", "HighErrorRate").expect(
        "10m", "HighErrorRate",
        fired(f"error_rate_{kind}", {"error_type": kind, "component": "chat_endpoint"},
              f"{kind} errors in chat_endpoint",
              f"chat_endpoint records {rate} {kind} errors per second, above {threshold:g}."),
    )


def chat_series(values: str) -> dict[str, str]:
    return series("chat_messages_total", values, user_type="authenticated", message_type="user", cache_hit="false", rag_used="true")


def chat_stopped_fired() -> dict[str, Any]:
    return fired(
        "chat_stopped", {}, "No chat messages while the API serves requests",
        "The API keeps answering requests (other than probes and scrapes) but no chat message was processed in the last 15 minutes.",
    )


CASES = [
    Case("ComponentUnhealthy", [
        series("component_health_status", "0 0 1x10", component="database", status="unhealthy"),
        series("component_health_status", "0x12", component="database", status="unhealthy", instance="app:8001"),
        series("component_health_status", "0x12", component="rag_system", status="unhealthy"),
        series("component_health_status", "1x12", component="rag_system", status="healthy"),
    ]).expect("1m", "ComponentUnhealthy").expect("2m", "ComponentUnhealthy").expect(
        "3m", "ComponentUnhealthy",
        fired("component_unhealthy", {"component": "database"}, "Component database reports unhealthy",
              "Component database has reported unhealthy for 1m; requests that depend on it are likely failing."),
    ),
    Case("ComponentDegraded", [
        series("component_health_status", "1x20", component="vector_store", status="degraded"),
        series("component_health_status", "0x20", component="openai", status="degraded"),
    ]).expect("3m", "ComponentDegraded").expect(
        "10m", "ComponentDegraded",
        fired("component_degraded", {"component": "vector_store"}, "Component vector_store reports degraded",
              "Component vector_store has reported degraded for 5m; it works with reduced capacity or quality."),
    ),
    Case("ComponentHealthUnknown", [
        series("component_health_status", "1x30", component="auth0", status="unknown"),
        series("component_health_status", "1 1 0x30", component="openai", status="unknown"),
    ]).expect("10m", "ComponentHealthUnknown").expect(
        "20m", "ComponentHealthUnknown",
        fired("component_health_unknown", {"component": "auth0"}, "Component auth0 reports unknown",
              "Component auth0 has reported unknown for 15m; no health check has set its state since start-up."),
    ),
    Case("HighHTTPErrorRatio", [
        series("crowdfunding_api_requests_total", "0+60x30", method="POST", handler="/chat", status="200"),
        series("crowdfunding_api_requests_total", "0+6x30", method="POST", handler="/chat", status="500"),
        series("crowdfunding_api_requests_total", "0+60x30", method="GET", handler="/search", status="200"),
        series("crowdfunding_api_requests_total", "0+1x30", method="GET", handler="/search", status="503"),
        series("crowdfunding_api_requests_total", "0+60x30", method="GET", handler="/documents/{doc_id}", status="200"),
        # A probe of an unhealthy app answers 503 by design: ComponentUnhealthy pages for it.
        series("crowdfunding_api_requests_total", "0+6x30", method="GET", handler="/health", status="503"),
        # Every request of a rarely used handler fails, but five in five minutes page no one.
        series("crowdfunding_api_requests_total", "0+1x30", method="GET", handler="/export", status="500"),
    ]).expect("4m", "HighHTTPErrorRatio").expect(
        "15m", "HighHTTPErrorRatio",
        fired("http_error_ratio", {"handler": "/chat"}, "/chat answers 9.091% of requests with 5xx",
              "9.091% of requests to /chat ended with a 5xx status over 5 minutes, above 5%."),
    ),
    *(error_rate_case(kind) for kind in ERROR_TYPES),
    Case("ExternalServiceErrorRatioHigh", [
        series("external_api_duration_seconds_count", "0+60x20", service="openai", endpoint="chat/completions", outcome="success"),
        series("external_api_duration_seconds_count", "0+12x20", service="openai", endpoint="chat/completions", outcome="error"),
        series("external_api_duration_seconds_count", "0+60x20", service="stripe", endpoint="charges", outcome="success"),
    ]).expect("4m", "ExternalServiceErrorRatioHigh").expect(
        "10m", "ExternalServiceErrorRatioHigh",
        fired("external_error_ratio", {"service": "openai"}, "16.67% of calls to openai fail",
              "16.67% of calls to external service openai ended in an error over 5 minutes, above 10%."),
    ),
    # crowdmon starts every site at 0: a first failure (middleware) and more failures
    # (metrics.render) fire; failures long ago (exposition) stay silent.
    Case("CrowdmonInternalErrors", [
        series("crowdmon_internal_errors_total", "0x18 1x30", site="middleware"),
        series("crowdmon_internal_errors_total", "0x20 2x30", site="metrics.render"),
        series("crowdmon_internal_errors_total", "5x50", site="exposition"),
    ]).expect("17m", "CrowdmonInternalErrors").expect(
        "22m", "CrowdmonInternalErrors",
        fired("crowdmon_internal_errors", {"site": "metrics.render"}, "crowdmon contained failures at metrics.render",
              "crowdmon's own code failed at metrics.render in the last 15 minutes; requests were not affected, but some metrics may be missing."),
        fired("crowdmon_internal_errors", {"site": "middleware"}, "crowdmon contained failures at middleware",
              "crowdmon's own code failed at middleware in the last 15 minutes; requests were not affected, but some metrics may be missing."),
    ).expect("45m", "CrowdmonInternalErrors"),
    Case("CrowdmonLabelOverflow", [
        series("crowdmon_label_overflow_total", "0x18 4x30", metric="document_operations_total", label="document_type"),
        series("crowdmon_label_overflow_total", "3x50", metric="chat_messages_total", label="user_type"),
    ]).expect("17m", "CrowdmonLabelOverflow").expect(
        "22m", "CrowdmonLabelOverflow",
        fired("crowdmon_label_overflow", {"metric": "document_operations_total", "label": "document_type"},
              "Label document_type of document_operations_total reached its value cap",
              "New values of label document_type on document_operations_total were folded into <other> in the last 15 minutes."),
    ).expect("45m", "CrowdmonLabelOverflow"),
    Case("HighRequestLatency", [
        *histogram("crowdfunding_api_request_duration_seconds", {"0.5": "0x30", "1.0": "0x30", "2.5": "0+60x30", "+Inf": "0+60x30"}, method="GET", handler="/slow"),
        *histogram("crowdfunding_api_request_duration_seconds", {"0.5": "0+60x30", "1.0": "0+60x30", "2.5": "0+60x30", "+Inf": "0+60x30"}, method="GET", handler="/fast"),
        # A health check waiting for its timeout is the probe's answer, not users' latency.
        *histogram("crowdfunding_api_request_duration_seconds", {"0.5": "0x30", "1.0": "0x30", "2.5": "0+6x30", "+Inf": "0+6x30"}, method="GET", handler="/health"),
    ]).expect("9m", "HighRequestLatency").expect(
        "15m", "HighRequestLatency",
        fired("http_latency", {"handler": "/slow"}, "p95 request latency of /slow is 2.425s",
              "The 95th percentile of request latency for /slow is 2.425s over 5 minutes, above 1s (crowdfunding_api_request_duration_seconds)."),
    ),
    Case("SlowChatProcessing", [
        *histogram("chat_processing_duration_seconds", {"10.0": "0x30", "20.0": "0x30", "30.0": "0+30x30", "+Inf": "0+30x30"}, endpoint="/chat", user_type="authenticated"),
        *histogram("chat_processing_duration_seconds", {"10.0": "0+30x30", "20.0": "0+30x30", "30.0": "0+30x30", "+Inf": "0+30x30"}, endpoint="/chat/quick", user_type="authenticated"),
    ]).expect("9m", "SlowChatProcessing").expect(
        "15m", "SlowChatProcessing",
        fired("chat_latency", {"endpoint": "/chat"}, "p95 chat processing time of /chat is 29.5s",
              "The 95th percentile of chat processing time for /chat is 29.5s over 5 minutes, above 20s (chat_processing_duration_seconds)."),
    ),
    Case("SlowExternalAPI", [
        *histogram("external_api_duration_seconds", {"10.0": "0x30", "20.0": "0+30x30", "+Inf": "0+30x30"}, service="openai", endpoint="chat/completions", outcome="success"),
        *histogram("external_api_duration_seconds", {"10.0": "0+30x30", "20.0": "0+30x30", "+Inf": "0+30x30"}, service="stripe", endpoint="charges", outcome="success"),
    ]).expect("9m", "SlowExternalAPI").expect(
        "15m", "SlowExternalAPI",
        fired("external_latency", {"service": "openai"}, "p95 external call latency of openai is 19.5s",
              "The 95th percentile of external call latency for openai is 19.5s over 5 minutes, above 10s (external_api_duration_seconds)."),
    ),
    Case("SlowVectorSearch", [
        *histogram("vector_search_duration_seconds", {"0.5": "0x30", "1.0": "0+30x30", "+Inf": "0+30x30"}, operation="similarity"),
        *histogram("vector_search_duration_seconds", {"0.01": "0+30x30", "0.5": "0+30x30", "1.0": "0+30x30", "+Inf": "0+30x30"}, operation="upsert"),
    ]).expect("9m", "SlowVectorSearch").expect(
        "15m", "SlowVectorSearch",
        fired("vector_search_latency", {"operation": "similarity"}, "p95 vector search time of similarity is 975ms",
              "The 95th percentile of vector search time for similarity is 975ms over 5 minutes, above 0.5s (vector_search_duration_seconds)."),
    ),
    Case("SlowDatabaseQueries", [
        *histogram("database_query_duration_seconds", {"0.5": "0x30", "1.0": "0+30x30", "+Inf": "0+30x30"}, operation="select"),
        *histogram("database_query_duration_seconds", {"0.01": "0+30x30", "0.5": "0+30x30", "1.0": "0+30x30", "+Inf": "0+30x30"}, operation="insert"),
    ]).expect("9m", "SlowDatabaseQueries").expect(
        "15m", "SlowDatabaseQueries",
        fired("database_latency", {"operation": "select"}, "p95 database query time of select is 975ms",
              "The 95th percentile of database query time for select is 975ms over 5 minutes, above 0.5s (database_query_duration_seconds)."),
    ),
    Case("ChatMessagesStopped", [
        chat_series("0+10x5 50x45"),
        series("crowdfunding_api_requests_total", "0+60x50", method="GET", handler="/documents/{doc_id}", status="200"),
    ]).expect("30m", "ChatMessagesStopped").expect(
        "40m", "ChatMessagesStopped",
        chat_stopped_fired(),
    ),
    Case("ChatMessagesStopped, the whole API idle", [
        chat_series("0+10x5 50x45"),
        series("crowdfunding_api_requests_total", "0+60x5 300x45", method="GET", handler="/documents/{doc_id}", status="200"),
    ]).expect("40m", "ChatMessagesStopped"),
    # A restart at 10m: the new process has no chat series until its first chat message.
    Case("ChatMessagesStopped, no chat since a restart", [
        chat_series("0+10x10"),
        series("crowdfunding_api_requests_total", "0+60x60", method="GET", handler="/documents/{doc_id}", status="200"),
    ]).expect("20m", "ChatMessagesStopped").expect(
        "40m", "ChatMessagesStopped",
        chat_stopped_fired(),
    ),
    # Only a load balancer's probes and Prometheus's scrapes reach the API at night.
    Case("ChatMessagesStopped, only probes and scrapes", [
        chat_series("0+10x5 50x45"),
        series("crowdfunding_api_requests_total", "0+6x50", method="GET", handler="/health", status="200"),
        series("crowdfunding_api_requests_total", "0+4x50", method="GET", handler="/metrics", status="200"),
    ]).expect("40m", "ChatMessagesStopped"),
    # An app without chat (or with none for a day) is not alerted.
    Case("ChatMessagesStopped, an app without chat", [
        series("crowdfunding_api_requests_total", "0+60x50", method="GET", handler="/documents/{doc_id}", status="200"),
    ]).expect("40m", "ChatMessagesStopped"),
    Case("ChatCacheHitRatioLow", [
        series("chat_messages_total", "0+1x60", user_type="authenticated", message_type="assistant", cache_hit="true", rag_used="true"),
        series("chat_messages_total", "0+59x60", user_type="authenticated", message_type="assistant", cache_hit="false", rag_used="true"),
        series("chat_messages_total", "0+60x60", user_type="authenticated", message_type="user", cache_hit="false", rag_used="false"),
    ]).expect("20m", "ChatCacheHitRatioLow").expect(
        "45m", "ChatCacheHitRatioLow",
        fired("cache_hit_ratio_min", {}, "Chat cache hit ratio is 1.667%",
              "Only 1.667% of chat answers (messages other than the user's own) were served from the cache over 5 minutes, below 5%."),
    ),
    # One answer in ten from the cache: the users' own messages, never from the cache, do not
    # halve that into an alert (4% of all messages).
    Case("ChatCacheHitRatioLow, healthy cache", [
        series("chat_messages_total", "0+4x60", user_type="authenticated", message_type="assistant", cache_hit="true", rag_used="true"),
        series("chat_messages_total", "0+36x60", user_type="authenticated", message_type="assistant", cache_hit="false", rag_used="true"),
        series("chat_messages_total", "0+60x60", user_type="authenticated", message_type="user", cache_hit="false", rag_used="false"),
    ]).expect("45m", "ChatCacheHitRatioLow"),
    Case("ChatCacheHitRatioLow, a quiet chat", [
        series("chat_messages_total", "0+1x60", user_type="authenticated", message_type="assistant", cache_hit="false", rag_used="true"),
    ]).expect("45m", "ChatCacheHitRatioLow"),
    Case("DocumentOperationFailures", [
        series("document_operations_total", "0+30x40", operation="add", document_type="eu_crowdfunding", status="success"),
        series("document_operations_total", "0+10x40", operation="add", document_type="eu_crowdfunding", status="error"),
        series("document_operations_total", "0+30x40", operation="delete", document_type="eu_crowdfunding", status="success"),
    ]).expect("10m", "DocumentOperationFailures").expect(
        "30m", "DocumentOperationFailures",
        fired("document_failure_ratio", {"operation": "add"}, "25% of document add operations fail",
              "25% of document add operations did not end in success over 5 minutes, above 20%."),
    ),
    Case("ActiveSessionsDropped", [
        series("active_sessions_current", "40x60 10x30", user_type="authenticated"),
    ]).expect("30m", "ActiveSessionsDropped").expect("65m", "ActiveSessionsDropped").expect(
        "80m", "ActiveSessionsDropped",
        fired("sessions_drop", {}, "Active sessions dropped to 10",
              "Active sessions fell to 10, more than 50% below the count one hour earlier."),
    ),
    # A restart (or the last worker with sessions gone) leaves no series at all: that is 0.
    Case("ActiveSessionsDropped, the series gone", [
        series("active_sessions_current", "40x60 _x30", user_type="authenticated"),
    ]).expect("65m", "ActiveSessionsDropped").expect(
        "80m", "ActiveSessionsDropped",
        fired("sessions_drop", {}, "Active sessions dropped to 0",
              "Active sessions fell to 0, more than 50% below the count one hour earlier."),
    ),
    Case("ActiveSessionsDropped, too few sessions to judge", [
        series("active_sessions_current", "8x60 2x30", user_type="authenticated"),
    ]).expect("80m", "ActiveSessionsDropped"),
]


def promtool_test_file(rules: Path, cases: list[Case], interval: str = "1m") -> dict[str, Any]:
    return {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": case.name,
                "interval": interval,
                "input_series": case.input_series,
                "alert_rule_test": [
                    {"eval_time": eval_time, "alertname": alertname, "exp_alerts": alerts}
                    for eval_time, alertname, alerts in case.checks
                ],
            }
            for case in cases
        ],
    }


def run_promtool_tests(tmp_path: Path, rules: dict[str, Any], cases: list[Case], interval: str = "1m") -> subprocess.CompletedProcess[str]:
    """promtool's unit tests of ``cases``, their series scraped every ``interval``."""
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
    tests_path = tmp_path / "rules.test.yml"
    tests_path.write_text(yaml.safe_dump(promtool_test_file(rules_path, cases, interval), sort_keys=False))
    return subprocess.run(["promtool", "test", "rules", str(tests_path)], capture_output=True, text=True, timeout=60)


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    alertnames = {alert.alert for alert in ALERTS}
    firing = {name for case in CASES for _, name, alerts in case.checks if alerts}
    silent = {name for case in CASES for _, name, alerts in case.checks if not alerts}
    assert firing == alertnames
    assert silent == alertnames
    assert set(BY_KEY) == FIRED_KEYS, "every rule, not only every alert name, fires in some case"


def test_promtool_unit_tests_show_each_alert_firing_and_silent(tmp_path: Path) -> None:
    result = run_promtool_tests(tmp_path, rule_groups(JOB), CASES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_promtool(tmp_path: Path) -> None:
    wrong = Case("ComponentUnhealthy expected silent", CASES[0].input_series).expect("3m", "ComponentUnhealthy")
    result = run_promtool_tests(tmp_path, rule_groups(JOB), [wrong])
    assert result.returncode == 1
    assert 'alertname="ComponentUnhealthy"' in result.stdout + result.stderr
    assert 'component="database"' in result.stdout + result.stderr


def test_exported_rules_pass_promtool_check_rules_with_lint_fatal(tmp_path: Path) -> None:
    export(tmp_path, ExportOptions(job="shop-api", thresholds={"http_error_ratio": 0.2}, durations={"component_unhealthy": "30s"}))
    rules = tmp_path / "prometheus" / "crowdmon-alerts.yml"
    result = subprocess.run(["promtool", "check", "rules", "--lint-fatal", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout
    loaded = yaml.safe_load(rules.read_text())
    assert [group["name"] for group in loaded["groups"]] == ["crowdmon-health", "crowdmon-errors", "crowdmon-latency", "crowdmon-business"]
    for group in loaded["groups"]:
        for rule in group["rules"]:
            assert 'job="shop-api"' in rule["expr"]
            assert set(rule["annotations"]) == {"summary", "description", "runbook"}
            assert rule["annotations"]["runbook"].startswith("1. ")


def test_every_rule_names_only_catalogue_metrics_and_labels() -> None:
    for group in rule_groups(JOB)["groups"]:
        for rule in group["rules"]:
            assert catalogue_problems(rule["expr"]) == [], rule["alert"]


def test_thresholds_and_durations_from_the_options_move_when_alerts_fire(tmp_path: Path) -> None:
    rules = rule_groups(JOB, thresholds={"http_latency_p95_seconds": 3, "http_error_ratio": 0.08}, durations={"component_unhealthy": "5m"})
    by_alert = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert by_alert["HighRequestLatency"]["expr"].endswith(" > 3")
    assert by_alert["ComponentUnhealthy"]["for"] == "5m"
    assert "above 8%" in by_alert["HighHTTPErrorRatio"]["annotations"]["description"]
    inputs = {case.name: case.input_series for case in CASES}
    latency, unhealthy, errors = inputs["HighRequestLatency"], inputs["ComponentUnhealthy"], inputs["HighHTTPErrorRatio"]
    cases = [
        Case("latency under the raised threshold", latency).expect("15m", "HighRequestLatency"),
        Case("unhealthy, for: 5m not yet over", unhealthy).expect("3m", "ComponentUnhealthy").expect(
            "8m", "ComponentUnhealthy",
            fired("component_unhealthy", {"component": "database"}, "Component database reports unhealthy",
                  "Component database has reported unhealthy for 5m; requests that depend on it are likely failing."),
        ),
        Case("error ratio still above 8%", errors).expect(
            "15m", "HighHTTPErrorRatio",
            fired("http_error_ratio", {"handler": "/chat"}, "/chat answers 9.091% of requests with 5xx",
                  "9.091% of requests to /chat ended with a 5xx status over 5 minutes, above 8%."),
        ),
    ]
    result = run_promtool_tests(tmp_path, rules, cases)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("thresholds", "durations", "message"),
    [
        ({"http_error_rate": 0.1}, {}, "unknown alert threshold 'http_error_rate'; known thresholds: http_error_ratio,"),
        ({"http_error_ratio": float("nan")}, {}, "threshold 'http_error_ratio' must be a finite number, got nan"),
        ({"http_error_ratio": "5%"}, {}, "threshold 'http_error_ratio' must be a finite number, got '5%'"),
        ({}, {"component_unhealthy": "5"}, "'for:' duration of 'component_unhealthy' must be a Prometheus duration such as 30s, 5m or 1h30m (units in the order y w d h m s ms), got '5'"),
        ({}, {"component_unhealthy": "30s1m"}, "'for:' duration of 'component_unhealthy' must be a Prometheus duration such as 30s, 5m or 1h30m (units in the order y w d h m s ms), got '30s1m'"),
        ({"document_failure_ratio": 20}, {}, "threshold 'document_failure_ratio' is a share, a fraction from 0 to 1 (0.05 is 5%), got 20"),
        ({}, {"ComponentUnhealthy": "5m"}, "unknown alert 'ComponentUnhealthy' for a 'for:' duration; known alerts: component_unhealthy,"),
    ],
)
def test_a_bad_threshold_or_duration_is_refused_with_the_known_keys(thresholds: dict[str, Any], durations: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        rule_groups(JOB, thresholds, durations)
    assert str(raised.value).startswith(message)


def test_rule_windows_hold_four_scrapes_at_a_long_scrape_interval(tmp_path: Path) -> None:
    """Scraped every 5 minutes, a 5-minute rate() holds one sample and is never computed: every
    rate alert would be dead.  The windows become four scrape intervals."""
    rules = rule_groups(JOB, scrape_interval="5m")
    by_alert = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert "[20m]" in by_alert["HighHTTPErrorRatio"]["expr"] and "[5m]" not in by_alert["HighHTTPErrorRatio"]["expr"]
    assert "[20m]" in by_alert["CrowdmonInternalErrors"]["expr"]
    assert "[15m]" in rule_groups(JOB, scrape_interval="75s")["groups"][1]["rules"][-1]["expr"]
    assert "[6m]" in str(rule_groups(JOB, scrape_interval="90s")["groups"][1]["rules"][0]["expr"])
    kind = ERROR_TYPES[0]
    cases = [
        Case("5xx at a 5-minute scrape interval", [
            series("crowdfunding_api_requests_total", "0+300x30", method="POST", handler="/chat", status="200"),
            series("crowdfunding_api_requests_total", "0+30x30", method="POST", handler="/chat", status="500"),
        ]).expect(
            "60m", "HighHTTPErrorRatio",
            fired("http_error_ratio", {"handler": "/chat"}, "/chat answers 9.091% of requests with 5xx",
                  "9.091% of requests to /chat ended with a 5xx status over 20 minutes, above 5%."),
        ),
        Case("errors at a 5-minute scrape interval", [
            series("application_errors_total", "0+300x30", error_type=kind, component="chat_endpoint", user_type="authenticated"),
        ]).expect(
            "60m", "HighErrorRate",
            fired(f"error_rate_{kind}", {"error_type": kind, "component": "chat_endpoint"}, f"{kind} errors in chat_endpoint",
                  f"chat_endpoint records 1 {kind} errors per second, above {DEFAULT_THRESHOLDS[f'error_rate_{kind}']:g}."),
        ),
    ]
    result = run_promtool_tests(tmp_path, rules, cases, interval="5m")
    assert result.returncode == 0, result.stdout + result.stderr
    # The same series against rules for a 15-second scrape interval: nothing fires.
    silent = [Case(case.name, case.input_series).expect("60m", case.checks[0][1]) for case in cases]
    assert run_promtool_tests(tmp_path, rule_groups(JOB), silent, interval="5m").returncode == 0


def test_a_slow_handler_is_left_out_of_the_latency_alert_only(tmp_path: Path) -> None:
    """A chat endpoint waiting for an LLM is slow by design: with --slow-handler it no longer
    fires HighRequestLatency, and its 5xx share still fires HighHTTPErrorRatio."""
    rules = rule_groups(JOB, slow_handlers=["/slow"])
    slow_and_failing = [
        *{case.name: case.input_series for case in CASES}["HighRequestLatency"],
        series("crowdfunding_api_requests_total", "0+60x30", method="GET", handler="/slow", status="200"),
        series("crowdfunding_api_requests_total", "0+12x30", method="GET", handler="/slow", status="500"),
    ]
    cases = [
        Case("a slow handler", slow_and_failing).expect("15m", "HighRequestLatency").expect(
            "15m", "HighHTTPErrorRatio",
            fired("http_error_ratio", {"handler": "/slow"}, "/slow answers 16.67% of requests with 5xx",
                  "16.67% of requests to /slow ended with a 5xx status over 5 minutes, above 5%."),
        ),
    ]
    result = run_promtool_tests(tmp_path, rules, cases)
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(ValueError, match=r"slow_handlers must be a collection of handlers, got the string '/chat'"):
        rule_groups(JOB, slow_handlers="/chat")


def test_a_malformed_scrape_interval_is_refused_for_the_rules() -> None:
    with pytest.raises(ValueError, match=r"scrape_interval must be a Prometheus duration above 0 such as 15s or 1m, got '30s1m'"):
        rule_groups(JOB, scrape_interval="30s1m")
    with pytest.raises(ValueError, match=r"probe_handlers must be a collection of handlers, got the string '/health'"):
        rule_groups(JOB, probe_handlers="/health")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h30m", 5400), ("90s", 90), ("0", 0), ("0s", 0), ("5ms", 0.005), ("1y2w", 365 * 86400 + 14 * 86400),
     ("30s1m", None), ("1m1m", None), ("1.5m", None), ("", None), ("5", None), ("1M", None), ("292y", 292 * 365 * 86400), ("300y", None)],
)
def test_durations_are_read_as_prometheus_reads_them(text: str, seconds: float | None) -> None:
    assert duration_seconds(text) == seconds
