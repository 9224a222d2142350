"""``/metrics``: Prometheus text or OpenMetrics by negotiation, gzip when asked, HEAD, ``name[]``."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from crowdmon import MetricsApp, PrometheusInstrumentation, setup_monitoring
from tests.support import scraped


def client_for(registry: CollectorRegistry) -> httpx.AsyncClient:
    app = Starlette()
    setup_monitoring(app, registry=registry)
    PrometheusInstrumentation(registry).track_document_operation("add", "pdf", "success")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_prometheus_text_format_by_default(registry: CollectorRegistry) -> None:
    async with client_for(registry) as client:
        response = await client.get("/metrics", headers={"accept-encoding": "identity"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert scraped(response.text, "document_operations_total", operation="add", document_type="pdf", status="success") == 1


async def test_openmetrics_when_the_scraper_asks_for_it(registry: CollectorRegistry) -> None:
    async with client_for(registry) as client:
        response = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})

    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    assert 'document_operations_total{document_type="pdf",operation="add",status="success"} 1.0' in response.text


async def test_gzip_when_accepted(registry: CollectorRegistry) -> None:
    async with client_for(registry) as client:
        raw = await client.send(client.build_request("GET", "/metrics", headers={"accept-encoding": "gzip"}), stream=True)
        body = await raw.aread()  # httpx decodes; read the raw header to see what was sent

    assert raw.headers["content-encoding"] == "gzip"
    assert b"document_operations_total" in body
    assert int(raw.headers["content-length"]) < len(body)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        # Prometheus 3's own header: the OpenMetrics it prefers most.
        (
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
            "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
            "application/openmetrics-text; version=1.0.0",
        ),
        ("application/openmetrics-text;q=0, text/plain;q=1", "text/plain; version=0.0.4"),  # refused
        ("application/openmetrics-text;q=0.2, text/plain;q=0.9", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;version=foo", "text/plain; version=0.0.4"),  # unreadable
        # A version prometheus_client does not write is not claimed: OpenMetrics 1.0.0, said so.
        ("application/openmetrics-text;version=99", "application/openmetrics-text; version=1.0.0;"),
        ("application/openmetrics-text; version=0.0.1", "application/openmetrics-text; version=1.0.0;"),
        ("text/plain;version=1.x", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;q=banana", "text/plain; version=0.0.4"),
    ],
)
async def test_the_format_is_the_one_the_scraper_prefers_and_never_a_failure(registry: CollectorRegistry, accept: str, content_type: str) -> None:
    async with client_for(registry) as client:
        response = await client.get("/metrics", headers={"accept": accept, "accept-encoding": "identity"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert registry.get_sample_value("crowdmon_internal_errors_total", {"site": "metrics.render"}) == 0


@pytest.mark.parametrize(("accept_encoding", "gzipped"), [
        ("gzip;q=0, identity", False),
        ("x-gzip-not", False),
        ("br, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0, *", False),  # * stands only for the codings the header does not name
        ("identity, gzip;q=0, *;q=0.5", False),
        ("br, *;q=0", False),
        ("gzip;q=0.1, *;q=0", True),
    ])
async def test_gzip_only_when_the_scraper_does_not_refuse_it(registry: CollectorRegistry, accept_encoding: str, gzipped: bool) -> None:
    async with client_for(registry) as client:
        raw = await client.send(client.build_request("GET", "/metrics", headers={"accept-encoding": accept_encoding}), stream=True)
        await raw.aread()

    assert ("content-encoding" in raw.headers) is gzipped


async def test_head_answers_headers_only(registry: CollectorRegistry) -> None:
    async with client_for(registry) as client:
        response = await client.head("/metrics")

    assert response.status_code == 200
    assert response.content == b""


async def test_name_filter_limits_the_families(registry: CollectorRegistry) -> None:
    async with client_for(registry) as client:
        response = await client.get("/metrics", params={"name[]": "document_operations_total"})

    families = {line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE")}
    assert families == {"document_operations_total"}


async def test_metrics_requests_are_not_counted(registry: CollectorRegistry) -> None:
    async with client_for(registry) as client:
        for _ in range(3):
            await client.get("/metrics")
        response = await client.get("/metrics")

    assert "crowdfunding_api_requests_total{" not in response.text


def test_render_directly() -> None:
    registry = CollectorRegistry()
    PrometheusInstrumentation(registry).track_chat_message("anonymous", "user", False, True)
    body, content_type = MetricsApp(PrometheusInstrumentation(registry)).render()

    assert content_type.startswith("text/plain")
    labels = {"user_type": "anonymous", "message_type": "user", "cache_hit": "false", "rag_used": "true"}
    assert scraped(body.decode(), "chat_messages_total", **labels) == 1
