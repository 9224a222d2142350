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
from crowdmon.demo import DEMO_CARDINALITY_CAPS, OPENING, build_demo_app
from crowdmon.ops import ALERTS, DASHBOARDS, ExportOptions, export
from crowdmon.ops.dashboards import variable_queries
from crowdmon.ops.promql import with_grafana_variables
from tests.support import free_port, uvicorn_in_thread

JOB = "crowdmon-e2e"


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


def send_demo_traffic(client: httpx.Client) -> None:
    """One round of the demo's opening traffic: every path of the demo, its failures included."""
    for method, path, body, failure, user in OPENING:
        with contextlib.suppress(httpx.HTTPError):
            client.request(method, path, json=body, headers={"x-demo-user": user, "x-demo-fail": failure})


def test_dashboards_show_data_and_alerts_fire_against_a_real_prometheus(tmp_path: Path) -> None:
    monitoring = PrometheusInstrumentation(CollectorRegistry(), cardinality_caps=DEMO_CARDINALITY_CAPS)
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
        send_demo_traffic(client)
        assert {spec.name for spec in CATALOGUE} - families_in(client.get("/metrics").text) == set()

        with prometheus(tmp_path / "pack/prometheus/prometheus.yml", tmp_path) as prom:
            # Bounded traffic: at most 60 rounds, until Prometheus has scraped it three times.
            scrapes = f'count_over_time(up{{job="{JOB}"}}[1m]) >= 3'
            for round_number in range(1, 61):
                send_demo_traffic(client)
                time.sleep(0.3)
                if round_number >= 5 and query(prom, scrapes):
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

            # Every exported rule is loaded and evaluates without error against the real data.
            groups = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert len(rules) == len(ALERTS)
            assert [rule["name"] for rule in rules if rule["health"] != "ok"] == []

            def alerts() -> list[dict[str, Any]]:
                found: list[dict[str, Any]] = httpx.get(f"{prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
                return [alert for alert in found if alert["labels"]["alertname"] == "ComponentUnhealthy"]

            assert alerts() == [], "ComponentUnhealthy fired while every component was healthy"
            # rag_system has no health check that /health could reset; traffic has stopped anyway.
            monitoring.set_component_unhealthy("rag_system")
            firing = wait_until(
                lambda: [alert for alert in alerts() if alert["state"] == "firing"], 30, "ComponentUnhealthy did not fire"
            )
            assert [alert["labels"]["component"] for alert in firing] == ["rag_system"]
            assert firing[0]["labels"]["severity"] == "critical"
            assert firing[0]["annotations"]["summary"] == "Component rag_system reports unhealthy"
            assert firing[0]["annotations"]["runbook"].startswith("1. Open the crowdmon / System Health dashboard")
