"""The request recorder: exact counts under threads and asyncio, read back at scrape, whether
absorbed in full batches or by the scrape itself."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from crowdmon import PrometheusInstrumentation, PrometheusMiddleware
from tests.asgi import http_scope, run_asgi
from tests.support import value

REQUESTS = "crowdfunding_api_requests_total"
DURATION = "crowdfunding_api_request_duration_seconds"
RESPONSE_SIZE = "crowdfunding_api_response_size_bytes"
IN_PROGRESS = "crowdfunding_api_requests_in_progress"


def test_threads_recording_at_once_lose_no_request_even_while_scraped(registry: CollectorRegistry) -> None:
    recorder = PrometheusInstrumentation(registry).requests
    threads, per_thread = 8, 3000
    barrier = threading.Barrier(threads + 1)
    stop_scraping = threading.Event()
    scrapes = 0
    gauge_seen: set[float] = set()

    def record(index: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            # What the middleware does for each request.
            recorder.start("GET")
            recorder.record(("GET", "/items/{item_id}", 200 if n % 3 else 404, 0.003, 10, 100 + index))
            if len(recorder.pending) >= recorder.flush_at:
                recorder.flush()

    def scrape() -> None:
        nonlocal scrapes
        barrier.wait()
        while not stop_scraping.is_set():
            generate_latest(registry)  # must never fail while requests are recorded
            gauge_seen.add(value(registry, IN_PROGRESS, method="GET"))
            scrapes += 1

    workers = [threading.Thread(target=record, args=(i,)) for i in range(threads)]
    scraper = threading.Thread(target=scrape)
    for thread in [*workers, scraper]:
        thread.start()
    for thread in workers:
        thread.join()
    stop_scraping.set()
    scraper.join()

    total = threads * per_thread
    ok = sum(1 for n in range(per_thread) if n % 3) * threads
    assert scrapes > 0
    assert recorder.flush_at < total  # batches were absorbed by the threads too, not only scrapes
    # Each thread has at most one request between start and record at any moment.
    assert gauge_seen <= set(range(threads + 1)), gauge_seen
    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == ok
    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="404") == total - ok
    assert value(registry, DURATION + "_count", method="GET", handler="/items/{item_id}") == total
    assert value(registry, DURATION + "_bucket", method="GET", handler="/items/{item_id}", le="0.005") == total
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/items/{item_id}") == sum(
        (100 + i) * per_thread for i in range(threads)
    )
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_concurrent_asyncio_requests_are_counted_exactly(registry: CollectorRegistry) -> None:
    inside = 0
    peak = 0

    async def interleaved(request: Request) -> Response:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        inside -= 1
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/work/{n}", interleaved, methods=["GET", "POST"])])
    app.add_middleware(PrometheusMiddleware, registry=registry)
    await asyncio.gather(
        *(run_asgi(app, http_scope(f"/work/{n}", "POST" if n % 4 == 0 else "GET")) for n in range(400))
    )

    assert peak > 1  # the requests really overlapped
    assert value(registry, REQUESTS, method="GET", handler="/work/{n}", status="200") == 300
    assert value(registry, REQUESTS, method="POST", handler="/work/{n}", status="200") == 100
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/work/{n}") == 600
    assert value(registry, IN_PROGRESS, method="GET") == 0


def test_sync_endpoints_in_the_threadpool_are_counted_exactly(registry: CollectorRegistry) -> None:
    def blocking(request: Request) -> Response:  # runs in Starlette's threadpool
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/sync", blocking)])
    app.add_middleware(PrometheusMiddleware, registry=registry)

    def many_loops() -> None:
        async def batch() -> None:
            await asyncio.gather(*(run_asgi(app, http_scope("/sync")) for _ in range(50)))

        asyncio.run(batch())

    # Four event loops in four threads, one middleware.
    threads = [threading.Thread(target=many_loops) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert value(registry, REQUESTS, method="GET", handler="/sync", status="200") == 200
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/sync") == 800
    assert value(registry, IN_PROGRESS, method="GET") == 0
