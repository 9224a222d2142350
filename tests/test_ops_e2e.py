"""End to end: the demo app under uvicorn, driven by bounded traffic, scraped by a real Prometheus
that loads the exported rules.  Every dashboard query returns data through the query API, and a
component set unhealthy makes ComponentUnhealthy fire at /api/v1/alerts."""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from crowdmon import CATALOGUE, PrometheusInstrumentation
from crowdmon.catalogue import CATEGORY_COUNTERS, ERROR_TYPES
from crowdmon.demo import build_demo_app
from crowdmon.ops import DASHBOARDS, ExportOptions, export
from crowdmon.ops.dashboards import variable_queries
from crowdmon.ops.promql import with_grafana_variables
from tests.support import free_port, uvicorn_in_thread

JOB = "crowdmon-e2e"
DOCUMENT_TYPE_CAP = 2


@contextlib.contextmanager
def prometheus(config: Path, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 with its storage under ``tmp_path``; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(base), 20, "Prometheus did not become ready", process)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], Any], timeout: float, message: str, process: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{message}: exited with {process.returncode}: {process.stderr.read().decode() if process.stderr else ''}")
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"{message} within {timeout} s")


def query(base: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def families_in(scrape: str) -> set[str]:
    """Catalogue names of the families that have at least one sample in ``scrape``."""
    names = set()
    for family in text_string_to_metric_families(scrape):
        if family.samples:
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def tracking_drivers(monitoring: PrometheusInstrumentation) -> dict[str, Callable[[int], None]]:
    """How the public tracking API records each non-HTTP family, for families the demo leaves empty."""

    def errors(_: int) -> None:
        for error_type in ERROR_TYPES:
            component = "openai" if CATEGORY_COUNTERS.get(error_type) == "external_service_errors_total" else "chat_endpoint"
            monitoring.track_application_error(error_type, component, RuntimeError("boom"), "authenticated", "/chat", "chat")

    def external(_: int) -> None:
        with monitoring.track_external_api_call("openai", "chat/completions"):
            time.sleep(0.002)
        with contextlib.suppress(TimeoutError), monitoring.track_external_api_call("openai", "chat/completions"):
            raise TimeoutError("slow provider")

    def chat_processing(_: int) -> None:
        with monitoring.track_request_performance("/chat", "authenticated"):
            time.sleep(0.002)

    def vector_search(_: int) -> None:
        with monitoring.track_vector_search("similarity"):
            time.sleep(0.001)

    def database(_: int) -> None:
        with monitoring.track_database_query("select"):
            time.sleep(0.001)

    def chat_messages(round_number: int) -> None:
        monitoring.track_chat_message("authenticated", "assistant", cache_hit=round_number % 3 == 0, rag_used=True)
        monitoring.track_chat_message("anonymous", "user")

    def sessions(_: int) -> None:
        monitoring.start_session("authenticated")

    def memory(_: int) -> None:
        monitoring.track_memory_operation("store", "conversation", "authenticated")

    def documents(round_number: int) -> None:
        monitoring.track_document_operation("add", f"type_{round_number % (DOCUMENT_TYPE_CAP + 2)}", "success")
        monitoring.track_document_operation("delete", "eu_crowdfunding", "error")

    def internal_errors(_: int) -> None:
        monitoring.report_internal_error("e2e_site", RuntimeError("contained failure"))

    drivers: dict[str, Callable[[int], None]] = {
        "chat_processing_duration_seconds": chat_processing,
        "vector_search_duration_seconds": vector_search,
        "database_query_duration_seconds": database,
        "external_api_duration_seconds": external,
        "external_service_errors_total": external,
        "chat_messages_total": chat_messages,
        "active_sessions_current": sessions,
        "memory_operations_total": memory,
        "document_operations_total": documents,
        "crowdmon_label_overflow_total": documents,
        "crowdmon_internal_errors_total": internal_errors,
    }
    for name in ("application_errors_total", "application_error_details_total", *CATEGORY_COUNTERS.values()):
        drivers.setdefault(name, errors)
    return drivers


def send_demo_traffic(client: httpx.Client, round_number: int) -> None:
    """One request to each demo route.  The demo's search fails now and then on purpose, and
    uvicorn may drop that connection: such a request is simply one less."""
    requests = [
        ("POST", "/chat"), ("GET", "/chat/stream"), ("GET", f"/documents/{round_number + 1}"),
        ("GET", "/documents/999"), ("GET", "/search"), ("GET", "/admin/ping"), ("GET", f"/no-such-page/{round_number}"),
    ]
    for method, path in requests:
        with contextlib.suppress(httpx.HTTPError):
            client.request(method, path, json={"message": "What is an ECSP licence?"} if method == "POST" else None)


def test_dashboards_show_data_and_alerts_fire_against_a_real_prometheus(tmp_path: Path) -> None:
    monitoring = PrometheusInstrumentation(
        CollectorRegistry(), cardinality_caps={"document_operations_total:document_type": DOCUMENT_TYPE_CAP}
    )
    app = build_demo_app(monitoring)
    with uvicorn_in_thread(app) as app_url, httpx.Client(base_url=app_url, timeout=10) as client:
        target = app_url.removeprefix("http://")
        options = ExportOptions(
            job=JOB,
            targets=(target,),
            scrape_interval="1s",
            evaluation_interval="1s",
            durations={"component_unhealthy": "2s"},
        )
        export(tmp_path / "pack", options)
        send_demo_traffic(client, 0)
        # The demo records what it records; the public tracking API fills in any family it leaves empty.
        empty = {spec.name for spec in CATALOGUE} - families_in(client.get("/metrics").text)
        drivers = tracking_drivers(monitoring)
        assert empty <= set(drivers), f"no way to record {empty - set(drivers)}"
        driven = {drivers[name] for name in empty}

        with prometheus(tmp_path / "pack/prometheus/prometheus.yml", tmp_path) as prom:
            # Bounded traffic: at most 60 rounds, until Prometheus has scraped it three times.
            scrapes = f'count_over_time(up{{job="{JOB}"}}[1m]) >= 3'
            for round_number in range(1, 61):
                send_demo_traffic(client, round_number)
                for drive in driven:
                    drive(round_number)
                time.sleep(0.3)
                if round_number >= 10 and query(prom, scrapes):
                    break
            assert query(prom, scrapes), "Prometheus did not scrape the demo app three times"
            time.sleep(1.5)  # one more scrape after the last round

            values = {"job": JOB, "instance": target, "handler": ".*", "__rate_interval": "1m", "__range": "5m"}
            no_data, nan_only = [], []
            for spec in DASHBOARDS:
                for panel in spec.panels():
                    for panel_target in panel.targets:
                        result = query(prom, with_grafana_variables(panel_target.expr, values))
                        if not result:
                            no_data.append(f"{spec.title} / {panel.title}: {panel_target.expr}")
                        elif all(math.isnan(float(sample["value"][1])) for sample in result):
                            nan_only.append(f"{spec.title} / {panel.title}: {panel_target.expr}")
            assert no_data == []
            assert nan_only == []

            # Template variables: what Grafana's label_values() asks Prometheus for.
            for spec in DASHBOARDS:
                for name, variable in variable_queries(spec):
                    selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable).groups()  # type: ignore[union-attr]
                    answer = httpx.get(f"{prom}/api/v1/label/{label}/values", params={"match[]": with_grafana_variables(selector, values)}, timeout=5).json()
                    assert answer["data"], (spec.uid, name)
                    if name == "handler":
                        assert {"/chat", "/documents/{doc_id}", "/admin/ping"} <= set(answer["data"])

            def alerts() -> list[dict[str, Any]]:
                found: list[dict[str, Any]] = httpx.get(f"{prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
                return [alert for alert in found if alert["labels"]["alertname"] == "ComponentUnhealthy"]

            assert alerts() == [], "ComponentUnhealthy fired while every component was healthy"
            monitoring.set_component_unhealthy("database")
            firing = wait_until(
                lambda: [alert for alert in alerts() if alert["state"] == "firing"], 30, "ComponentUnhealthy did not fire"
            )
            assert [alert["labels"]["component"] for alert in firing] == ["database"]
            assert firing[0]["labels"]["severity"] == "critical"
            assert firing[0]["annotations"]["summary"] == "Component database reports unhealthy"
            assert firing[0]["annotations"]["runbook"].startswith("1. Open the crowdmon / System Health dashboard")
