"""Through a real uvicorn server on 127.0.0.1: FastAPI and Starlette apps, scraped over HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from crowdmon import setup_monitoring
from crowdmon.demo import build_demo_app
from crowdmon.instrumentation import PrometheusInstrumentation
from tests.support import scraped, uvicorn_in_thread


def build_fastapi(registry: CollectorRegistry) -> FastAPI:
    app = FastAPI()
    orders = APIRouter(prefix="/orders")

    @orders.get("/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    @orders.post("/")
    def create_order(payload: dict[str, str]) -> dict[str, int]:  # runs in the threadpool
        return {"fields": len(payload)}

    app.include_router(orders)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                await asyncio.sleep(0.01)
                yield b"c" * 2500

        return StreamingResponse(chunks())

    setup_monitoring(app, registry=registry)
    return app


def test_fastapi_under_uvicorn_records_exact_values(registry: CollectorRegistry) -> None:
    with uvicorn_in_thread(build_fastapi(registry)) as base_url, httpx.Client(base_url=base_url) as client:
        for order_id in range(25):
            assert client.get(f"/orders/{order_id}").status_code == 200
        for _ in range(5):
            assert client.post("/orders/", json={"a": "1", "b": "2"}).status_code == 200
        assert len(client.get("/stream").content) == 10000
        assert client.get("/nowhere/17").status_code == 404
        scrape = client.get("/metrics").text

    assert scraped(scrape, "crowdfunding_api_requests_total", method="GET", handler="/orders/{order_id}", status="200") == 25
    assert scraped(scrape, "crowdfunding_api_requests_total", method="POST", handler="/orders/", status="200") == 5
    assert scraped(scrape, "crowdfunding_api_request_size_bytes_sum", method="POST", handler="/orders/") == 5 * len(b'{"a":"1","b":"2"}')
    assert scraped(scrape, "crowdfunding_api_response_size_bytes_sum", method="GET", handler="/stream") == 10000
    assert scraped(scrape, "crowdfunding_api_request_duration_seconds_bucket", method="GET", handler="/stream", le="0.025") == 0
    assert scraped(scrape, "crowdfunding_api_requests_total", method="GET", handler="<unmatched>", status="404") == 1
    assert scraped(scrape, "crowdfunding_api_requests_in_progress", method="GET") == 0


async def test_concurrent_requests_are_all_counted(registry: CollectorRegistry) -> None:
    with uvicorn_in_thread(build_fastapi(registry)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, limits=httpx.Limits(max_connections=20)) as client:
            responses = await asyncio.gather(*(client.get(f"/orders/{n}") for n in range(300)))
            scrape = (await client.get("/metrics")).text

    assert {response.status_code for response in responses} == {200}
    assert scraped(scrape, "crowdfunding_api_requests_total", method="GET", handler="/orders/{order_id}", status="200") == 300
    assert scraped(scrape, "crowdfunding_api_request_duration_seconds_count", method="GET", handler="/orders/{order_id}") == 300


def test_demo_app_serves_metrics_and_health(registry: CollectorRegistry) -> None:
    app = build_demo_app(PrometheusInstrumentation(registry))
    with uvicorn_in_thread(app) as base_url, httpx.Client(base_url=base_url) as client:
        # The demo's dependencies fail now and then by design: count what each answer was.
        statuses = Counter(client.post("/chat", json={"message": "hello"}).status_code for _ in range(10))
        health = client.get("/health")
        scrape = client.get("/metrics").text

    assert health.status_code in (200, 503)
    assert set(health.json()["components"]) >= {"rag_system", "openai"}
    for status, count in statuses.items():
        assert scraped(scrape, "crowdfunding_api_requests_total", method="POST", handler="/chat", status=str(status)) == count


def test_sizes_are_what_the_server_sends_and_receives(registry: CollectorRegistry) -> None:
    """Starlette hands the body of a HEAD response to the server, and an app may hand one with a
    204; the server sends neither, and 0 bytes are recorded.  An upload the client abandons is
    the bytes that arrived, not its Content-Length."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from tests.server_app import ABANDONED, no_content, text, upload

    ABANDONED.clear()
    received = ABANDONED

    app = Starlette(routes=[Route("/text", text, methods=["GET", "HEAD"]), Route("/none", no_content), Route("/upload", upload, methods=["POST"])])
    setup_monitoring(app, registry=registry)
    with uvicorn_in_thread(app) as base_url:
        with httpx.Client(base_url=base_url) as client:
            assert [len(client.get("/text").content), len(client.head("/text").content)] == [1000, 0]
            none = client.get("/none")
            assert (none.status_code, none.content) == (204, b"")
        port = int(base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10000\r\n\r\n" + b"a" * 100)
            deadline = time.monotonic() + 5
            while registry.get_sample_value("crowdfunding_api_requests_in_progress", {"method": "POST"}) != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while not received:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        text = httpx.get(f"{base_url}/metrics").text

    def size(kind: str, method: str, handler: str) -> float:
        return scraped(text, f"crowdfunding_api_{kind}_size_bytes_sum", method=method, handler=handler)

    assert (size("response", "GET", "/text"), size("response", "HEAD", "/text"), size("response", "GET", "/none")) == (1000, 0, 0)
    assert scraped(text, "crowdfunding_api_requests_total", method="HEAD", handler="/text", status="200") == 1
    assert received == [100]
    assert scraped(text, "crowdfunding_api_requests_total", method="POST", handler="/upload", status="499") == 1
    assert size("request", "POST", "/upload") == 100
    assert scraped(text, "crowdfunding_api_requests_in_progress", method="POST") == 0


def test_an_exception_after_the_client_left_is_499_though_starlette_answers_it(registry: CollectorRegistry) -> None:
    """setup_monitoring wraps ServerErrorMiddleware, which starts a 500 for an unhandled
    exception and raises it again: the client that left never gets it, so it is a 499.  The
    same exception with the client still there is the 500 it receives."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from tests.server_app import RAISED, work

    RAISED.clear()
    raised = RAISED

    app = Starlette(routes=[Route("/work", work, methods=["POST"])])
    setup_monitoring(app, registry=registry)
    with uvicorn_in_thread(app) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /work?wait=gone HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        deadline = time.monotonic() + 5
        while not raised:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answered = httpx.post(f"{base_url}/work", content=b"hello")
        text = httpx.get(f"{base_url}/metrics").text

    assert (answered.status_code, answered.text) == (500, "Internal Server Error")
    assert raised == ["gone", ""]
    assert scraped(text, "crowdfunding_api_requests_total", method="POST", handler="/work", status="499") == 1
    assert scraped(text, "crowdfunding_api_requests_total", method="POST", handler="/work", status="500") == 1
    assert scraped(text, "crowdfunding_api_request_size_bytes_sum", method="POST", handler="/work") == 10
    assert scraped(text, "crowdfunding_api_requests_in_progress", method="POST") == 0
