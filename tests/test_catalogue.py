"""The metric catalogue is the contract: names, types and label sets are pinned here, and a full
scrape passes ``promtool check metrics`` without findings."""

from __future__ import annotations

import re
import subprocess

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crowdmon import CATALOGUE, PrometheusInstrumentation, setup_monitoring
from crowdmon.catalogue import SEED_METRICS
from crowdmon.demo import build_demo_app
from crowdmon.instrumentation import INTERNAL_ERROR_SITES
from tests.support import REPO_ROOT

# name -> (type, labels): the released catalogue. Changing a line here breaks dashboards.
SNAPSHOT = {
    "crowdfunding_api_requests_total": ("counter", ("method", "handler", "status")),
    "crowdfunding_api_request_duration_seconds": ("histogram", ("method", "handler")),
    "crowdfunding_api_request_size_bytes": ("histogram", ("method", "handler")),
    "crowdfunding_api_response_size_bytes": ("histogram", ("method", "handler")),
    "crowdfunding_api_requests_in_progress": ("gauge", ("method",)),
    "application_errors_total": ("counter", ("error_type", "component", "user_type")),
    "application_error_details_total": ("counter", ("error_type", "component", "exception", "endpoint", "function")),
    "auth_errors_total": ("counter", ("component", "exception")),
    "database_errors_total": ("counter", ("component", "exception")),
    "external_service_errors_total": ("counter", ("service", "endpoint", "exception")),
    "ai_system_errors_total": ("counter", ("component", "exception")),
    "session_errors_total": ("counter", ("component", "exception")),
    "chat_processing_duration_seconds": ("histogram", ("endpoint", "user_type")),
    "vector_search_duration_seconds": ("histogram", ("operation",)),
    "database_query_duration_seconds": ("histogram", ("operation",)),
    "external_api_duration_seconds": ("histogram", ("service", "endpoint", "outcome")),
    "chat_messages_total": ("counter", ("user_type", "message_type", "cache_hit", "rag_used")),
    "active_sessions_current": ("gauge", ("user_type",)),
    "memory_operations_total": ("counter", ("operation", "memory_type", "user_type")),
    "document_operations_total": ("counter", ("operation", "document_type", "status")),
    "component_health_status": ("gauge", ("component", "status")),
    "crowdmon_label_overflow_total": ("counter", ("metric", "label")),
    "crowdmon_internal_errors_total": ("counter", ("site",)),
}


def test_catalogue_matches_the_snapshot() -> None:
    assert {spec.name: (spec.kind.value, spec.labels) for spec in CATALOGUE} == SNAPSHOT
    assert len(SEED_METRICS) == 21


def record_one_of_everything(instrumentation: PrometheusInstrumentation) -> None:
    instrumentation.requests.start("GET")
    instrumentation.requests.record(("GET", "/x", 200, 0.01, 10, 20))
    with instrumentation.track_request_performance("/chat", "authenticated"):
        pass
    with instrumentation.track_external_api_call("openai", "chat/completions"):
        pass
    with instrumentation.track_vector_search("similarity"):
        pass
    with instrumentation.track_database_query("select"):
        pass
    instrumentation.track_chat_message("authenticated", "assistant", True, False)
    instrumentation.track_memory_operation("store", "conversation", "authenticated")
    instrumentation.track_document_operation("add", "eu_crowdfunding", "success")
    for error_type in ("auth", "database", "external_service", "ai_system", "session"):
        instrumentation.track_application_error(error_type, "api", ValueError("x"), "anonymous", "/chat", "chat")
    instrumentation.start_session("authenticated")
    instrumentation.set_component_healthy("rag_system")
    instrumentation.metric("crowdmon_label_overflow_total").labels("m", "l").inc()
    instrumentation.metric("crowdmon_internal_errors_total").labels("test").inc()


def test_every_catalogue_metric_is_exposed_with_its_type_and_labels(registry: CollectorRegistry) -> None:
    record_one_of_everything(PrometheusInstrumentation(registry))
    exposed = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name.endswith("_created"):
            continue  # prometheus_client's creation timestamps, one per counter and histogram
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {key for sample in family.samples for key in sample.labels if key not in ("le",)}
        exposed[name] = (family.type, labels)

    assert exposed == {name: (kind, set(labels)) for name, (kind, labels) in SNAPSHOT.items()}


def test_a_full_scrape_passes_promtool_check_metrics(registry: CollectorRegistry) -> None:
    record_one_of_everything(PrometheusInstrumentation(registry))
    scrape = generate_latest(registry)

    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, timeout=30)

    assert result.stderr.decode() == ""
    assert result.returncode == 0


async def test_the_demo_apps_metrics_endpoint_passes_promtool(registry: CollectorRegistry) -> None:
    app = build_demo_app(PrometheusInstrumentation(registry))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/documents/3")
        await client.get("/chat/stream")
        scrape = (await client.get("/metrics", headers={"accept": "text/plain"})).content

    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, timeout=30)

    assert result.stderr.decode() == ""
    assert result.returncode == 0


def test_setup_monitoring_returns_one_instrumentation_per_registry(registry: CollectorRegistry) -> None:
    from starlette.applications import Starlette

    first = setup_monitoring(Starlette(), registry=registry)
    second = setup_monitoring(Starlette(), registry=registry)

    assert first.metric("chat_messages_total").metric is second.metric("chat_messages_total").metric


def test_every_self_counter_series_starts_at_zero_so_a_first_failure_is_an_increase() -> None:
    """A series born at its first increment reads as no change to PromQL's increase()."""
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry)
    for site in INTERNAL_ERROR_SITES:
        assert registry.get_sample_value("crowdmon_internal_errors_total", {"site": site}) == 0
    for item in CATALOGUE:
        for label in item.labels:
            assert registry.get_sample_value("crowdmon_label_overflow_total", {"metric": item.name, "label": label}) == 0
    instrumentation.report_internal_error("metrics.render", RuntimeError("first"))
    assert registry.get_sample_value("crowdmon_internal_errors_total", {"site": "metrics.render"}) == 1


def test_every_site_crowdmon_reports_a_failure_at_is_known() -> None:
    """Each literal site in the source (report("..."), report_internal_error("..."), site = "...",
    the duration decorators' metrics) is one the counter starts at 0."""
    source = "\n".join(path.read_text() for path in (REPO_ROOT / "crowdmon").glob("*.py"))
    sites = set(re.findall(r"""report(?:_internal_error)?\(\s*"([^"]+)\"""", source))
    sites |= set(re.findall(r'^\s+site = "([^"]+)"', source, flags=re.MULTILINE)) - {"decorator"}
    sites |= set(re.findall(r'_DurationProbe\(instrumentation, "([^"]+)"', source))
    assert len(sites) > 20
    assert sites <= set(INTERNAL_ERROR_SITES), sites - set(INTERNAL_ERROR_SITES)
