"""The request recorder: exact counts under threads and asyncio, read back at scrape, whether
absorbed in full batches or by the scrape itself."""

from __future__ import annotations

import asyncio
import threading
from array import array
from http import HTTPStatus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import crowdmon.middleware
from crowdmon import PrometheusInstrumentation, PrometheusMiddleware
from crowdmon._recorder import DURATION as DURATION_SPEC
from crowdmon._recorder import REQUEST_SIZE as REQUEST_SIZE_SPEC
from crowdmon._recorder import RESPONSE_SIZE as RESPONSE_SIZE_SPEC
from crowdmon._recorder import (
    BufferedRequestRecorder,
    RequestEntry,
    method_label,
    sends_no_body,
    status_label,
)
from crowdmon._types import Receive, Scope, Send
from tests.asgi import http_scope, run_asgi
from tests.support import run_threads_while, scraped, value

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


def test_event_loops_in_threads_are_counted_exactly_while_scraped(registry: CollectorRegistry) -> None:
    """Four event loops in four threads serve three label sets through one middleware while a
    fifth thread scrapes: once a scrape has registered a label set, the compiled middleware adds
    its requests up as they finish, with no entry left in the recorder's list."""

    async def item(request: Request) -> Response:
        return PlainTextResponse("x" * int(request.path_params["size"]), status_code=404 if request.path_params["size"] == "7" else 200)

    app = Starlette(routes=[Route("/items/{size}", item, methods=["GET", "HEAD"])])
    app.add_middleware(PrometheusMiddleware, registry=registry)
    scopes = [http_scope("/items/3"), http_scope("/items/7"), http_scope("/items/5", "HEAD")]
    asyncio.run(run_all(app, scopes))  # each label set seen once, then registered by a scrape
    generate_latest(registry)
    gauge_seen: set[float] = set()

    def scrape() -> None:
        generate_latest(registry)
        gauge_seen.add(value(registry, IN_PROGRESS, method="GET"))

    def serve() -> None:
        asyncio.run(run_all(app, scopes * 300))

    run_threads_while(scrape, [serve] * 4)

    per_set = 1 + 4 * 300
    assert value(registry, REQUESTS, method="GET", handler="/items/{size}", status="200") == per_set
    assert value(registry, REQUESTS, method="GET", handler="/items/{size}", status="404") == per_set
    assert value(registry, REQUESTS, method="HEAD", handler="/items/{size}", status="200") == per_set
    assert value(registry, DURATION + "_count", method="GET", handler="/items/{size}") == 2 * per_set
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/items/{size}") == (3 + 7) * per_set
    assert value(registry, RESPONSE_SIZE + "_sum", method="HEAD", handler="/items/{size}") == 0
    assert value(registry, IN_PROGRESS, method="GET") == value(registry, IN_PROGRESS, method="HEAD") == 0
    assert min(gauge_seen) >= 0


async def run_all(app: Starlette, scopes: list[dict[str, object]]) -> None:
    for scope in scopes:
        await run_asgi(app, dict(scope))


def test_requests_of_a_registered_label_set_leave_nothing_in_the_recorders_list() -> None:
    instrumentation = PrometheusInstrumentation(CollectorRegistry())
    recorder = instrumentation.requests
    assert isinstance(recorder, BufferedRequestRecorder)
    app = Starlette(routes=[Route("/a", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(PrometheusMiddleware, instrumentation=instrumentation)
    asyncio.run(run_all(app, [http_scope("/a")]))
    assert len(recorder.pending) == 1  # a label set not seen before goes to the recorder's list
    recorder.flush()
    asyncio.run(run_all(app, [http_scope("/a")] * 20 + [http_scope("/a", "POST")]))
    # The compiled middleware adds the 20 to the registered label set's sums; the Python one
    # records every request in the list.  The new label set (POST, a 405) takes the list on both.
    assert len(recorder.pending) == (1 if crowdmon.middleware.COMPILED else 21)
    assert value(instrumentation.registry, REQUESTS, method="GET", handler="/a", status="200") == 21
    assert value(instrumentation.registry, REQUESTS, method="POST", handler="/a", status="405") == 1
    assert value(instrumentation.registry, IN_PROGRESS, method="GET") == 0


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


REQUEST_SIZE = "crowdfunding_api_request_size_bytes"
SIZE_EDGES = (0, 1, 100, 1024, 1025, 10**6, 10**9)  # on, around and beyond the bucket bounds
DURATION_EDGES = (0.0, 0.005, 0.0050001, 0.1, 1.0, 59.9, 1e6)
entries = st.tuples(
    st.sampled_from(["GET", "POST", "PROPFIND", "get", "HEAD"]),
    st.sampled_from(["/a", "/b/{id}", "<unmatched>"]),
    st.sampled_from([200, 201, 204, 304, 404, 500, 499, 999, HTTPStatus.CREATED]),
    st.one_of(st.sampled_from(DURATION_EDGES), st.floats(0, 100, allow_nan=False)),
    st.one_of(st.sampled_from(SIZE_EDGES), st.integers(0, 10**7)),
    st.one_of(st.sampled_from(SIZE_EDGES), st.integers(0, 10**7)),
)


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(entries, max_size=300), cuts=st.lists(st.integers(0, 300), max_size=4))
def test_batches_hold_exactly_what_prometheus_client_would(requests: list[RequestEntry], cuts: list[int]) -> None:
    """However requests fall into batches, every sample equals prometheus_client's own metrics
    fed the same requests one by one."""
    ours = CollectorRegistry()
    recorder = PrometheusInstrumentation(ours).requests
    theirs = CollectorRegistry()
    counter = Counter("crowdfunding_api_requests", "x", ["method", "handler", "status"], registry=theirs)
    histograms = {
        spec.name: Histogram(spec.name, "x", ["method", "handler"], buckets=spec.buckets, registry=theirs)
        for spec in (DURATION_SPEC, REQUEST_SIZE_SPEC, RESPONSE_SIZE_SPEC)
    }
    for index, entry in enumerate(requests):
        if index in cuts:
            recorder.flush()  # a batch ends here, as when it fills up or a scrape comes
        method, handler, status, duration, received, sent = entry
        recorder.start(method)
        recorder.record(entry)
        labels = (method_label(method), handler)
        counter.labels(*labels, status_label(status)).inc()
        sent = 0 if sends_no_body(method, status) else sent
        for name, amount in zip(histograms, (duration, received, sent), strict=True):
            histograms[name].labels(*labels).observe(amount)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            if family.name.startswith("crowdfunding_api_") and family.type in ("counter", "histogram")
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    expected = samples(theirs)
    got = samples(ours)
    assert got.keys() == expected.keys()
    for key, amount in expected.items():
        assert got[key] == pytest.approx(amount, rel=1e-9), key
    assert all(value(ours, IN_PROGRESS, method=m) == 0 for m in ("GET", "POST", "OTHER"))


class Method(str):
    """A method a server or framework hands over as a str subclass (an enum's member, say)."""


def test_label_sets_seen_before_are_added_up_compiled_and_the_numbers_are_the_pythons() -> None:
    """Once a label set is registered, the compiled middleware adds its requests to the
    recorder's ``sums`` as they finish; a recorder without sums, fed the same requests through
    ``start`` and ``record``, ends with the same cells and gauge."""
    compiled = PrometheusInstrumentation(CollectorRegistry()).requests
    python = PrometheusInstrumentation(CollectorRegistry()).requests
    assert isinstance(compiled, BufferedRequestRecorder) and isinstance(python, BufferedRequestRecorder)
    assert (compiled.sums is not None) == crowdmon.middleware.COMPILED
    python.sums = None
    batches: list[list[RequestEntry]] = [
        [("GET", "/a", 200, 0.004, 0, 10), ("HEAD", "/a", 200, 0.2, 0, 10), ("POST", "/b", 201, 3.0, 2000, 5)],
        [("GET", "/a", 200, 0.006, 0, 10), ("HEAD", "/a", 200, 0.1, 0, 99), ("POST", "/b", 201, 100.0, 10**6, 5),
         ("GET", "/a", 204, 0.001, 0, 7), ("PROPFIND", "/a", 200, 0.5, 0, 1), ("GET", "/a", HTTPStatus.OK, 0.5, 0, 1),
         ("GE", "/a", 200, 0.5, 0, 1), ("GET", "/a", 1000, 0.5, 0, 1), (Method("GET"), "/a", 201, 0.5, 0, 1)],
        [("GET", "/a", 204, 0.001, 0, 7), ("GET", "/a", 200, 0.05, 3, 4)] * 50,
    ]
    added = []
    for batch in batches:
        for recorder in (compiled, python):
            for entry in batch:
                # What the middleware does with a request.
                sums = recorder.sums
                if sums is None or not sums.start(entry[0]):
                    recorder.start(entry[0])
                if sums is None or not sums.add(*entry):
                    recorder.record(entry)
                elif recorder is compiled:
                    added.append(entry[:3])
            recorder.flush()
    if crowdmon.middleware.COMPILED:
        # Each batch registers its new label sets for the next; HTTPStatus.OK and Method("GET"),
        # not an exact int and str, and the label sets that are not labels as they are
        # (PROPFIND, GE, 1000) are recorded.
        assert set(added) == {("GET", "/a", 200), ("HEAD", "/a", 200), ("POST", "/b", 201), ("GET", "/a", 204)}
        assert len(added) == 3 + 100
    assert compiled._series.keys() == python._series.keys()
    for key, cells in python._series.items():
        assert compiled._series[key] == pytest.approx(cells, rel=1e-12), key
    assert compiled._series[("HEAD", "/a", "200")][0] == 2
    assert compiled._series[("GET", "/a", "204")][0] == 51
    assert compiled._series[("GET", "/a", "200")][0] == 53
    assert compiled._in_progress == python._in_progress == {"GET": 0, "HEAD": 0, "POST": 0, "OTHER": 0}


def test_statuses_and_methods_no_server_sends_are_recorded_not_lost(registry: CollectorRegistry) -> None:
    """Odd values that cannot be sorted or hashed with the rest still count, as "0" and OTHER."""
    recorder = PrometheusInstrumentation(registry).requests
    odd: list[RequestEntry] = [
        ("GET", "/a", 200, 0.01, 1, 2),
        ("GET", "/a", "201", 0.01, 1, 2),  # a string status: not comparable with ints
        ("GET", "/a", None, 0.01, 1, 2),
        ("GET", "/a", [500], 0.01, 1, 2),  # unhashable
        (b"GET", "/a", 404, 0.01, 1, 2),  # bytes method: not comparable with str
        (["PATCH"], "/a", 404, 0.01, 1, 2),  # unhashable method
        ("GET", "/a", HTTPStatus.OK, 0.01, 1, 2),
    ]
    for entry in odd:
        recorder.start(entry[0])
        recorder.record(entry)

    assert value(registry, REQUESTS, method="GET", handler="/a", status="200") == 2
    assert value(registry, REQUESTS, method="GET", handler="/a", status="0") == 3
    assert value(registry, REQUESTS, method="OTHER", handler="/a", status="404") == 2
    assert value(registry, DURATION + "_count", method="GET", handler="/a") == 5
    assert value(registry, IN_PROGRESS, method="GET") == 0
    assert value(registry, IN_PROGRESS, method="OTHER") == 0


def test_a_batch_of_only_unhashable_statuses_is_recorded_once(registry: CollectorRegistry) -> None:
    recorder = PrometheusInstrumentation(registry).requests
    for status in ([500], [404], [500]):  # comparable with each other, but unhashable
        recorder.start("GET")
        recorder.record(("GET", "/a", status, 0.01, 1, 2))

    assert value(registry, REQUESTS, method="GET", handler="/a", status="0") == 3
    assert value(registry, IN_PROGRESS, method="GET") == 0


def test_one_scrape_shows_the_label_folds_its_own_absorbing_made(registry: CollectorRegistry) -> None:
    """The recorder is collected first: a scrape that absorbs a batch also shows its folds."""
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps={f"{REQUESTS}:handler": 1})
    recorder = instrumentation.requests
    for handler in ("/a", "/b", "/c", "/b"):
        recorder.start("GET")
        recorder.record(("GET", handler, 200, 0.01, 0, 0))

    text = generate_latest(registry).decode()
    folds = scraped(text, "crowdmon_label_overflow_total", metric=REQUESTS, label="handler")
    assert folds == 3
    assert scraped(text, REQUESTS, method="GET", handler="<other>", status="200") == 3
    assert scraped(text, REQUESTS, method="GET", handler="/a", status="200") == 1


class UnhashableCode(int):
    """An int whose hash fails: the worst a status can be."""

    def __hash__(self) -> int:
        raise ValueError("no hash")


def test_a_status_whose_hash_fails_is_recorded_by_its_number_and_nothing_is_lost(
    registry: CollectorRegistry,
) -> None:
    recorder = PrometheusInstrumentation(registry).requests
    recorder.start("GET")  # still in progress at the scrape
    for handler, status in (("/a", 200), ("/b", 200), ("/a", UnhashableCode(200))):
        recorder.start("GET")
        recorder.record(("GET", handler, status, 0.01, 1, 2))

    assert value(registry, REQUESTS, method="GET", handler="/a", status="200") == 2
    assert value(registry, REQUESTS, method="GET", handler="/b", status="200") == 1
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.record") == 0
    assert value(registry, IN_PROGRESS, method="GET") == 1


async def test_odd_status_objects_from_the_app_are_recorded_by_their_number_or_as_0(
    registry: CollectorRegistry,
) -> None:
    statuses: list[object] = [HTTPStatus.CREATED, 201, 201.0, "201"]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": statuses[int(scope["path"][1:])], "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = PrometheusMiddleware(app, registry=registry)
    for index in range(len(statuses)):
        await run_asgi(middleware, http_scope(f"/{index}"))

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="201") == 2
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="0") == 2


async def test_a_status_that_is_no_http_status_is_recorded_as_0_with_its_body(registry: CollectorRegistry) -> None:
    # 0 used to read as "no response yet": the body went uncounted and the request became a 500.
    # Integers outside 100-599 each became a label of their own.
    statuses: list[object] = [0, 99, 600, 1000, -5, True, 10**30]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": statuses[int(scope["path"][1:])], "headers": []})
        await send({"type": "http.response.body", "body": b"abc"})

    middleware = PrometheusMiddleware(app, registry=registry)
    for index in range(len(statuses)):
        await run_asgi(middleware, http_scope(f"/{index}"))

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="0") == len(statuses)
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 0
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="<unmatched>") == 3 * len(statuses)
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.send") == 0
    labels = {sample.labels["status"] for family in registry.collect() for sample in family.samples if "status" in sample.labels}
    assert labels == {"0"}


async def test_bodies_are_counted_in_bytes_whatever_buffer_carries_them(registry: CollectorRegistry) -> None:
    # A memoryview's len() counts its items: four bytes each for an array of 'I'.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": memoryview(array("I", [1, 2, 3])), "more_body": True})
        await send({"type": "http.response.body", "body": bytearray(b"ab")})

    incoming = [
        {"type": "http.request", "body": memoryview(array("H", [1, 2])), "more_body": True},
        {"type": "http.request", "body": memoryview(b"xyz"), "more_body": True},
        {"type": "http.request", "body": bytearray(b"q"), "more_body": False},
    ]
    await run_asgi(PrometheusMiddleware(app, registry=registry), http_scope("/", "POST"), incoming)

    assert value(registry, REQUEST_SIZE + "_sum", method="POST", handler="<unmatched>") == 4 + 3 + 1
    assert value(registry, RESPONSE_SIZE + "_sum", method="POST", handler="<unmatched>") == 12 + 2


def test_a_resolver_that_defers_to_the_router_keeps_one_entry_per_route(registry: CollectorRegistry) -> None:
    app = Starlette(routes=[Route("/items/{n}", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(PrometheusMiddleware, registry=registry, handler_resolver=lambda scope: None)

    async def many() -> None:
        for n in range(300):
            await run_asgi(app, http_scope(f"/items/{n}"))

    asyncio.run(many())
    middleware = app.middleware_stack
    while not isinstance(middleware, PrometheusMiddleware):
        middleware = middleware.app  # type: ignore[attr-defined]
    assert value(registry, REQUESTS, method="GET", handler="/items/{n}", status="200") == 300
    assert len(middleware._route_objects) == 1


async def test_a_fastapi_key_that_is_not_a_dict_does_not_cost_the_route_label(registry: CollectorRegistry) -> None:
    async def endpoint(request: Request) -> Response:
        request.scope["fastapi"] = "not a dict"
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/odd", endpoint)])
    app.add_middleware(PrometheusMiddleware, registry=registry)
    for _ in range(2):
        await run_asgi(app, http_scope("/odd"))

    assert value(registry, REQUESTS, method="GET", handler="/odd", status="200") == 2
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.handler") == 0


def test_a_batch_that_cannot_be_absorbed_is_counted_as_lost_and_the_gauge_stays_right(
    registry: CollectorRegistry,
) -> None:
    recorder = PrometheusInstrumentation(registry).requests
    recorder.start("GET")  # still in progress at the scrape
    for handler in ("/a", ["not", "a", "label"]):  # no middleware makes such a handler
        recorder.start("GET")
        recorder.record(("GET", handler, 200, 0.01, 1, 2))  # type: ignore[arg-type]

    assert value(registry, "crowdmon_internal_errors_total", site="middleware.record") == 2
    assert value(registry, IN_PROGRESS, method="GET") == 1
    recorder.record(("GET", "/a", 200, 0.01, 1, 2))  # the one in progress ends
    assert value(registry, REQUESTS, method="GET", handler="/a", status="200") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0
