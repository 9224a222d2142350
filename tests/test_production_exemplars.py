"""Exemplars: opt-in trace ids on the request counter and duration histogram, in OpenMetrics only."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from crowdmon import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    PrometheusMiddleware,
    setup_monitoring,
)
from crowdmon._types import ASGIApp, Receive, Scope, Send
from crowdmon.exemplars import MAX_EXEMPLAR_RUNES
from tests.production_support import readme_snippet
from tests.support import value

OPENMETRICS = {"accept": "application/openmetrics-text; version=1.0.0"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


async def fast(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def build(registry: CollectorRegistry, exemplars: Any, wrap: Any = None, **options: Any) -> tuple[Starlette, PrometheusInstrumentation]:
    instrumentation = PrometheusInstrumentation(registry, **options)
    app = Starlette(routes=[Route("/items/{item_id}", fast)])
    setup_monitoring(app, instrumentation=instrumentation, exemplars=exemplars)
    return app, instrumentation


def exemplars_in(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    """Every exemplar of an OpenMetrics exposition, keyed by sample name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.exemplar
    return found


async def scrape(app: ASGIApp, headers: dict[str, str] | None = None) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return (await client.get("/metrics", headers=headers or OPENMETRICS)).text


async def test_a_callable_provider_puts_the_latest_trace_id_on_counter_and_bucket(registry: CollectorRegistry) -> None:
    ids = iter(["a" * 32, "b" * 32])
    app, _ = build(registry, lambda scope: {"trace_id": next(ids)})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/items/1")
        await client.get("/items/2")
        text = (await client.get("/metrics", headers=OPENMETRICS)).text
        classic = (await client.get("/metrics")).text

    found = exemplars_in(text)
    counter = found[("crowdfunding_api_requests_total", (("handler", "/items/{item_id}"), ("method", "GET"), ("status", "200")))]
    assert counter.labels == {"trace_id": "b" * 32}
    assert counter.value == 1.0
    buckets = {labels: exemplar for (name, labels), exemplar in found.items() if name == "crowdfunding_api_request_duration_seconds_bucket"}
    assert len(buckets) == 1  # both requests were fast: one bucket, the latest exemplar
    (labels, exemplar), = buckets.items()
    assert exemplar.labels == {"trace_id": "b" * 32}
    assert 0 <= exemplar.value <= float(dict(labels)["le"])
    assert " # {" not in classic  # the Prometheus text format carries no exemplars


class WithSpan:
    """Stands in for a tracing middleware: runs the app inside a span, as OpenTelemetry's does."""

    def __init__(self, app: ASGIApp, sampled: bool) -> None:
        self.app = app
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        self.span = NonRecordingSpan(SpanContext(int(TRACE_ID, 16), int(SPAN_ID, 16), is_remote=False, trace_flags=flags))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with trace.use_span(self.span):
            await self.app(scope, receive, send)


@pytest.mark.parametrize("sampled", [True, False])
async def test_the_current_opentelemetry_span(registry: CollectorRegistry, sampled: bool) -> None:
    app, _ = build(registry, "opentelemetry")
    traced = WithSpan(app, sampled)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=traced), base_url="http://t") as client:
        await client.get("/items/1")
    found = exemplars_in(await scrape(app))

    if sampled:
        key = ("crowdfunding_api_requests_total", (("handler", "/items/{item_id}"), ("method", "GET"), ("status", "200")))
        assert found[key].labels == {"trace_id": TRACE_ID, "span_id": SPAN_ID}
    else:
        assert found == {}


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (f"00-{TRACE_ID}-{SPAN_ID}-01", {"trace_id": TRACE_ID, "span_id": SPAN_ID}),
        (f"00-{TRACE_ID}-{SPAN_ID}-00", None),  # not sampled
        (f"00-{'0' * 32}-{SPAN_ID}-01", None),  # invalid trace id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # invalid parent id
        (f"ff-{TRACE_ID}-{SPAN_ID}-01", None),  # invalid version
        (f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", None),  # ids are lower-case hex
        (f"00-{TRACE_ID}-{SPAN_ID}-01-extra", None),  # version 00 has exactly four fields
        (f"01-{TRACE_ID}-{SPAN_ID}-01-what-comes-later", {"trace_id": TRACE_ID, "span_id": SPAN_ID}),
        ("garbage", None),
    ],
)
async def test_the_traceparent_header(registry: CollectorRegistry, traceparent: str, expected: dict[str, str] | None) -> None:
    app, _ = build(registry, "traceparent")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/items/1", headers={"traceparent": traceparent})
    found = exemplars_in(await scrape(app))

    key = ("crowdfunding_api_requests_total", (("handler", "/items/{item_id}"), ("method", "GET"), ("status", "200")))
    assert (found[key].labels if key in found else None) == expected


@pytest.mark.parametrize(
    "provider",
    [
        lambda scope: 1 / 0,
        lambda scope: {"trace_id": "x" * MAX_EXEMPLAR_RUNES},
        lambda scope: {"not a name": "x"},
    ],
)
async def test_a_failing_provider_never_fails_the_request(registry: CollectorRegistry, provider: Any) -> None:
    app, _ = build(registry, provider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/items/1")
    text = await scrape(app)

    assert response.status_code == 200
    assert value(registry, "crowdfunding_api_requests_total", method="GET", handler="/items/{item_id}", status="200") == 1
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.exemplar") == 1
    assert exemplars_in(text) == {}


async def test_folded_series_show_no_exemplar(registry: CollectorRegistry) -> None:
    app, _ = build(registry, lambda scope: {"trace_id": scope["path"][-1]}, cardinality_caps={"crowdfunding_api_requests_total:status": 1})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/items/1")
        await client.get("/nowhere/2")  # 404: its status is folded into "<other>"
    found = exemplars_in(await scrape(app))

    counters = {labels: exemplar.labels for (name, labels), exemplar in found.items() if name == "crowdfunding_api_requests_total"}
    assert counters == {(("handler", "/items/{item_id}"), ("method", "GET"), ("status", "200")): {"trace_id": "1"}}


@pytest.mark.parametrize("option", ["zipkin", True, 42])
def test_a_wrong_option_fails_at_setup(registry: CollectorRegistry, option: Any) -> None:
    with pytest.raises(CrowdmonSetupError, match="exemplars must be 'opentelemetry', 'traceparent' or a callable"):
        PrometheusMiddleware(Starlette(), registry=registry, exemplars=option)


async def test_without_a_provider_nothing_is_asked(registry: CollectorRegistry) -> None:
    app, instrumentation = build(registry, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/items/1")

    assert instrumentation.requests.exemplars is None  # type: ignore[attr-defined]
    assert exemplars_in(await scrape(app)) == {}


async def test_readme_exemplars_snippet() -> None:
    namespace: dict[str, Any] = {}
    exec(readme_snippet("exemplars"), namespace)
    app = namespace["app"]

    @app.get("/answer/{question_id}")
    async def answer(question_id: int) -> dict[str, int]:
        return {"question_id": question_id}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=WithSpan(app, sampled=True)), base_url="http://t") as client:
        assert (await client.get("/answer/1")).status_code == 200
    found = exemplars_in(await scrape(app))

    key = ("crowdfunding_api_requests_total", (("handler", "/answer/{question_id}"), ("method", "GET"), ("status", "200")))
    assert found[key].labels == {"trace_id": TRACE_ID, "span_id": SPAN_ID}


async def test_a_providers_non_string_values_become_strings(registry: CollectorRegistry) -> None:
    app, _ = build(registry, lambda scope: {"request_number": 42})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/items/1")
        await client.get("/items/2")
    found = exemplars_in(await scrape(app))

    key = ("crowdfunding_api_requests_total", (("handler", "/items/{item_id}"), ("method", "GET"), ("status", "200")))
    assert found[key].labels == {"request_number": "42"}
