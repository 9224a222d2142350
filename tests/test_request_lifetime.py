"""A request's objects live as long as the request, not as long as copies of its context."""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import gc
import sys
import time
import types
import weakref
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

import crowdmon
import crowdmon.instrumentation
from crowdmon import PrometheusMiddleware
from crowdmon._types import Message, Receive, Scope, Send
from crowdmon.testing import isolated_instrumentation, metric_value
from tests.asgi import http_scope, run_asgi
from tests.support import run_threads_while, uvicorn_in_thread, value


class Marker:
    """Put in a request's scope; alive only while something still holds the scope."""


def test_a_server_keep_alive_timer_does_not_keep_finished_requests_alive(registry: CollectorRegistry) -> None:
    # uvicorn arms a keep-alive timer inside the last send of every response and cancels it when
    # the connection's next request arrives.  A cancelled timer stays in the event loop's queue,
    # holding the context it was scheduled in, until every timer due before it is gone: here
    # until the idle connection's timer fires, 5 s (the keep-alive timeout) after its request.
    markers: list[weakref.ref[Marker]] = []

    async def item(request: Request) -> Response:
        return JSONResponse({"id": request.path_params["item_id"]})

    starlette = Starlette(routes=[Route("/items/{item_id}", item)])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            marker = Marker()
            markers.append(weakref.ref(marker))
            scope["marker"] = marker
        await starlette(scope, receive, send)

    with (
        uvicorn_in_thread(PrometheusMiddleware(app, registry=registry)) as base_url,
        httpx.Client(base_url=base_url) as idle,
        httpx.Client(base_url=base_url) as busy,
    ):
        statuses = [idle.get("/items/0").status_code] + [busy.get(f"/items/{n}").status_code for n in range(1, 10)]
        # uvicorn keeps each connection's last request (0 and 9) until the next one; the others
        # are gone once the server's task has ended, a moment after the client has its response.
        deadline = time.monotonic() + 2
        while not set(alive := [n for n, marker in enumerate(markers) if marker() is not None]) <= {0, 9}:
            if time.monotonic() > deadline:
                break
            gc.collect()
            time.sleep(0.01)

    assert statuses == [200] * 10
    assert set(alive) <= {0, 9}
    assert value(registry, "crowdfunding_api_requests_total", method="GET", handler="/items/{item_id}", status="200") == 10


@pytest.mark.parametrize(("asks_during_the_request", "user_type"), [(True, "premium"), (False, "unknown")])
async def test_a_context_copy_that_outlives_its_request_answers_with_what_the_request_knew(
    registry: CollectorRegistry, asks_during_the_request: bool, user_type: str
) -> None:
    # A task the app started, or a timer it scheduled, runs in a copy of the request's context.
    copies: list[contextvars.Context] = []
    resolved: list[Scope] = []

    def plan(scope: Scope) -> str:
        resolved.append(scope)
        return "premium"

    async def item(request: Request) -> Response:
        if asks_during_the_request:
            assert crowdmon.current_user_type() == "premium"
        assert crowdmon.current_endpoint() == "/items/{item_id}"
        copies.append(contextvars.copy_context())
        return JSONResponse({})

    app = Starlette(routes=[Route("/items/{item_id}", item)])
    app.add_middleware(PrometheusMiddleware, registry=registry, user_type_resolver=plan)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/items/7")).status_code == 200

    (copy,) = copies
    assert copy.run(crowdmon.current_endpoint) == "/items/{item_id}"
    assert copy.run(crowdmon.current_user_type) == user_type
    assert len(resolved) == (1 if asks_during_the_request else 0)


async def test_receive_and_send_kept_past_the_end_of_their_request(registry: CollectorRegistry) -> None:
    kept: list[Any] = []
    sent: list[Message] = []
    incoming = [{"type": "http.request", "body": b"", "more_body": False}]

    async def server_receive() -> Message:
        assert incoming, "the server was asked after the request ended"
        return incoming.pop()

    async def server_send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        kept.extend((receive, send))

    await PrometheusMiddleware(app, registry=registry)(http_scope("/gone"), server_receive, server_send)
    receive, send = kept

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert await receive() == {"type": "http.disconnect"}  # as the ASGI spec has a server answer
    with pytest.raises(RuntimeError, match=r"this request has ended \(its app returned\), so it cannot send 'http.response.body'"):
        await send({"type": "http.response.body", "body": b"late"})
    assert len(sent) == 2


async def test_the_endpoint_is_the_handler_label_before_and_after_the_request_ends(registry: CollectorRegistry) -> None:
    seen: list[str | None] = []
    copies: list[contextvars.Context] = []

    async def item(request: Request) -> Response:
        seen.append(crowdmon.current_endpoint())
        copies.append(contextvars.copy_context())
        return JSONResponse({})

    def tenant_routes(scope: Scope) -> str | None:
        return "/tenants/*" if scope["path"].startswith("/tenants/") else None

    app = Starlette(routes=[Route("/tenants/{name}", item), Route("/items/{item_id}", item)])
    app.add_middleware(PrometheusMiddleware, registry=registry, handler_resolver=tenant_routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for path in ("/tenants/acme", "/items/7"):
            assert (await client.get(path)).status_code == 200

    assert seen == ["/tenants/*", "/items/{item_id}"]
    assert [copy.run(crowdmon.current_endpoint) for copy in copies] == ["/tenants/*", "/items/{item_id}"]
    assert value(registry, "crowdfunding_api_requests_total", method="GET", handler="/tenants/*", status="200") == 1


async def test_an_app_whose_endpoint_refers_to_its_middleware_is_collected_once_dropped() -> None:
    # A label through a mount with a path parameter keeps the chain of mounts it was found with,
    # and the route; an app that refers back to itself (here the endpoint, through the module
    # namespace of a real app) must still be collected with all that once nothing else holds it.
    def build() -> tuple[PrometheusMiddleware, weakref.ref[PrometheusMiddleware]]:
        async def item(request: Request) -> Response:
            return JSONResponse({"labelled": crowdmon.current_endpoint(), "app": id(middleware)})

        inner = Starlette(routes=[Route("/items/{item_id}", item)])
        outer = Starlette(routes=[Mount("/tenants/{tenant}", app=inner)])
        middleware = PrometheusMiddleware(outer, registry=CollectorRegistry())
        return middleware, weakref.ref(middleware)

    middleware, dropped = build()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://test") as client:
        answer = await client.get("/tenants/acme/items/1")
    assert answer.json()["labelled"] == "/tenants/{tenant}/items/{item_id}"
    assert value(middleware.instrumentation.registry, "crowdfunding_api_requests_total",
                 method="GET", handler="/tenants/{tenant}/items/{item_id}", status="200") == 1.0
    del middleware, answer, client
    gc.collect()
    assert dropped() is None, [type(referrer) for referrer in gc.get_referrers(dropped())]


class Boom(Exception):
    pass


def cancel_during_the_last_question(kind: str) -> Any:
    """An app that read the whole body and then returns, raises or starts a 500, and a server
    whose task is cancelled (a shutdown, a timeout around the app) in the one iteration
    crowdmon's own receive (which may not wait) takes."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        if kind == "raise":
            raise Boom("the app's own")
        if kind == "5xx":
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"x"})

    return app


@pytest.mark.parametrize(
    ("kind", "raised", "reached_the_server", "status"),
    [
        ("return", asyncio.CancelledError, [], "499"),
        ("raise", Boom, [], "499"),  # the app's own exception leaves, not the cancellation
        ("5xx", asyncio.CancelledError, ["http.response.start"], "500"),  # the start reaches the server
    ],
)
async def test_a_task_cancelled_while_crowdmon_asks_if_the_client_is_there(
    registry: CollectorRegistry, kind: str, raised: type[BaseException], reached_the_server: list[str], status: str
) -> None:
    middleware = PrometheusMiddleware(cancel_during_the_last_question(kind), registry=registry)
    asked = asyncio.Event()
    incoming: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        asked.set()  # crowdmon's question: the app never asks twice
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    async def send(message: Message) -> None:
        sent.append(message)

    task = asyncio.ensure_future(middleware(http_scope("/x"), receive, send))
    while not asked.is_set():
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(raised):
        await task
    assert [message["type"] for message in sent] == reached_the_server
    assert value(registry, "crowdfunding_api_requests_total", method="GET", handler="<unmatched>", status=status) == 1
    assert value(registry, "crowdfunding_api_requests_in_progress", method="GET") == 0


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (builtins.BaseExceptionGroup("nursery", [asyncio.CancelledError()]), "499"),
        (builtins.BaseExceptionGroup("nursery", [builtins.BaseExceptionGroup("inner", [asyncio.CancelledError()]), asyncio.CancelledError()]), "499"),
        (builtins.BaseExceptionGroup("nursery", [asyncio.CancelledError(), KeyError("x")]), "500"),  # not only cancelled
    ],
)
async def test_a_group_of_cancellations_is_a_cancelled_request(registry: CollectorRegistry, error: BaseException, status: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise error

    middleware = PrometheusMiddleware(app, registry=registry)
    with pytest.raises(builtins.BaseExceptionGroup) as caught:
        await run_asgi(middleware, http_scope("/x"))
    assert caught.value is error
    assert value(registry, "crowdfunding_api_requests_total", method="GET", handler="<unmatched>", status=status) == 1


def test_a_request_closed_from_another_context_is_recorded_without_a_failure_of_crowdmon(registry: CollectorRegistry) -> None:
    # The garbage collector, or a framework shutting down, closes an unfinished request's
    # coroutine from whatever context it is in: the request context cannot be reset there (its
    # token is another context's), and there is nothing of it to reset either.
    @types.coroutine
    def suspended() -> Iterator[None]:
        yield  # what an event loop would wake it from

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await suspended()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    middleware = PrometheusMiddleware(app, registry=registry)
    call = middleware(http_scope("/x"), receive, send)
    contextvars.copy_context().run(call.send, None)  # the request starts, in a context of its own
    contextvars.copy_context().run(call.close)

    # Closed with no response started: no client got one, as with an app that raised.
    assert value(registry, "crowdfunding_api_requests_total", method="GET", handler="<unmatched>", status="500") == 1
    assert value(registry, "crowdfunding_api_requests_in_progress", method="GET") == 0
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.context") == 0


async def test_a_request_in_flight_when_the_default_instrumentation_changes_ends_where_it_started() -> None:
    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with isolated_instrumentation() as first:
        middleware = PrometheusMiddleware(app)  # follows the default
        slow = asyncio.ensure_future(run_asgi(middleware, http_scope("/slow")))
        await asyncio.sleep(0.01)
        with isolated_instrumentation() as second:
            await run_asgi(middleware, http_scope("/fast"))  # the middleware follows the new default
            gate.set()
            await slow
            for instrumentation in (first, second):
                assert metric_value("crowdfunding_api_requests_in_progress", {"method": "GET"}, instrumentation=instrumentation) == 0
                assert metric_value("crowdfunding_api_requests_total", instrumentation=instrumentation) == 1


async def test_a_scope_without_a_type_is_handed_to_the_app_untouched(registry: CollectorRegistry) -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    scope = http_scope("/x")
    del scope["type"]
    await PrometheusMiddleware(app, registry=registry)(scope, receive_nothing, send_nothing)
    assert seen == [scope]
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.start") == 0


async def receive_nothing() -> Message:
    raise AssertionError("not called")


async def send_nothing(message: Message) -> None:
    raise AssertionError("not called")


def test_requests_in_threads_end_where_they_started_while_the_default_keeps_changing() -> None:
    """Event loops in three threads serve through one middleware that follows the default,
    while a fourth thread keeps switching the default between two instrumentations (threads
    switched as often as Python allows): every request starts and ends in the same one."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    requests_per_thread = 2000
    with isolated_instrumentation() as first:
        second = crowdmon.PrometheusInstrumentation(CollectorRegistry())
        middleware = PrometheusMiddleware(app)

        def switch() -> None:
            for instrumentation in (second, first):
                crowdmon.instrumentation.replace_default_instrumentation(instrumentation)

        def serve() -> None:
            async def run() -> None:
                for _ in range(requests_per_thread):
                    await run_asgi(middleware, http_scope("/"))

            asyncio.run(run())

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            run_threads_while(switch, [serve] * 3)
        finally:
            sys.setswitchinterval(interval)
        totals = [metric_value("crowdfunding_api_requests_total", instrumentation=each) for each in (first, second)]
        assert sum(totals) == 3 * requests_per_thread and min(totals) > 0
        for instrumentation in (first, second):
            assert metric_value("crowdfunding_api_requests_in_progress", {"method": "GET"}, instrumentation=instrumentation) == 0
