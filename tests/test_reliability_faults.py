"""Fault injection: crowdmon's own code fails on every request, and the app does not notice.

Each fault replaces a piece of crowdmon (never prometheus_client) with one that raises: the
recorder, the cardinality guard and its overflow hook, the route-template resolution, a user's
``handler_resolver``, the measuring of odd messages, and finally the error reporting itself.  The
app's responses must be exactly those of an app without crowdmon, every contained failure is
counted in ``crowdmon_internal_errors_total{site}``, and logged once, however often it happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry

import crowdmon._core
import crowdmon.middleware
from crowdmon import PrometheusInstrumentation, PrometheusMiddleware
from crowdmon._types import Message, Receive, Scope, Send
from tests.asgi import http_scope, run_asgi
from tests.support import value

INTERNAL_ERRORS = "crowdmon_internal_errors_total"
REQUESTS = "crowdfunding_api_requests_total"
ROUNDS = 10  # each round sends the five requests below


class InjectedFault(RuntimeError):
    pass


class AppError(Exception):
    pass


def boom(*args: object, **kwargs: object) -> Any:
    raise InjectedFault("injected")


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.post("/echo")
    def echo(payload: dict[str, str]) -> dict[str, int]:  # sync: runs in the threadpool
        return {"fields": len(payload)}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for size in (10, 0, 3000):
                yield b"s" * size

        return StreamingResponse(chunks())

    @app.get("/text")
    async def text(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.query_params.get("q", ""), status_code=202)

    return app


async def exchange(app: Any) -> list[tuple[int, bytes, list[tuple[str, str]]]]:
    """Five requests of every kind, ``ROUNDS`` times; what the client got back."""
    answers = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for round_number in range(ROUNDS):
            for response in (
                await client.get(f"/items/{round_number}"),
                await client.post("/echo", json={"a": "b", "c": str(round_number)}),
                await client.get("/stream"),
                await client.get("/text", params={"q": "hello"}),
                await client.get("/nowhere"),
            ):
                answers.append((response.status_code, response.content, sorted(response.headers.items())))
    return answers


def instrumented(registry: CollectorRegistry, **options: Any) -> tuple[FastAPI, PrometheusInstrumentation]:
    instrumentation = PrometheusInstrumentation(registry, **options.pop("instrumentation_options", {}))
    app = build_app()
    app.add_middleware(PrometheusMiddleware, instrumentation=instrumentation, **options)
    return app, instrumentation


@pytest.fixture(scope="module")
def unmonitored_answers() -> list[tuple[int, bytes, list[tuple[str, str]]]]:
    return asyncio.run(exchange(build_app()))


def crowdmon_errors(caplog: pytest.LogCaptureFixture, site: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "crowdmon" and site in r.getMessage()]


Fault = Callable[[pytest.MonkeyPatch, PrometheusInstrumentation], None]


def fail_recording(monkeypatch: pytest.MonkeyPatch, instrumentation: PrometheusInstrumentation) -> None:
    monkeypatch.setattr(instrumentation.requests, "record", boom)


def fail_request_start(monkeypatch: pytest.MonkeyPatch, instrumentation: PrometheusInstrumentation) -> None:
    # The compiled middleware counts a standard method's start in the recorder's sums, in C,
    # where nothing can fail; without them every start goes through ``start``.
    monkeypatch.setattr(instrumentation.requests, "sums", None)
    monkeypatch.setattr(instrumentation.requests, "start", boom)


def fail_guard(monkeypatch: pytest.MonkeyPatch, instrumentation: PrometheusInstrumentation) -> None:
    monkeypatch.setattr(instrumentation.guard, "admit", boom)


def fail_route_template(monkeypatch: pytest.MonkeyPatch, instrumentation: PrometheusInstrumentation) -> None:
    monkeypatch.setattr(crowdmon.middleware, "handler_label_for", boom)


class UnsettableContextVar:
    """A context variable whose ``set`` fails."""

    set = staticmethod(boom)
    reset = staticmethod(boom)


def fail_request_context(monkeypatch: pytest.MonkeyPatch, instrumentation: PrometheusInstrumentation) -> None:
    monkeypatch.setattr(crowdmon._core, "current_request", UnsettableContextVar())


# site, the fault, how many requests fail in it, how many requests are still counted
FAULTS = [
    pytest.param("middleware.record", fail_recording, 5 * ROUNDS, 0, id="recorder"),
    pytest.param("middleware.start", fail_request_start, 5 * ROUNDS, 0, id="request-start"),
    pytest.param("middleware.record", fail_guard, 5 * ROUNDS, 0, id="cardinality-guard"),
    # A request with no route in its scope is asked again too (its router may not record one):
    # all five fail in it, and are still counted, as <unmatched>.
    pytest.param("middleware.handler", fail_route_template, 5 * ROUNDS, 5 * ROUNDS, id="route-template"),
]
if not crowdmon.middleware.COMPILED:
    # The compiled core publishes the context in C, where nothing a test can reach makes it fail;
    # tests/test_python_core.py runs this file on the Python core, where this case applies.
    FAULTS.append(pytest.param("middleware.context", fail_request_context, 5 * ROUNDS, 5 * ROUNDS, id="request-context"))


@pytest.mark.parametrize(("site", "fault", "failures", "counted"), FAULTS)
async def test_a_failing_part_of_crowdmon_never_changes_a_response(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    unmonitored_answers: list[tuple[int, bytes, list[tuple[str, str]]]],
    site: str,
    fault: Fault,
    failures: int,
    counted: int,
) -> None:
    app, instrumentation = instrumented(registry)
    fault(monkeypatch, instrumentation)

    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        answers = await exchange(app)

    assert answers == unmonitored_answers
    assert value(registry, INTERNAL_ERRORS, site=site) == failures
    logged = crowdmon_errors(caplog, site)
    assert len(logged) == 1
    assert logged[0].exc_info is not None and isinstance(logged[0].exc_info[1], InjectedFault)
    recorded = sum(s.value for f in registry.collect() if f.name == "crowdfunding_api_requests" for s in f.samples)
    assert recorded == counted


async def test_a_failing_user_resolver_leaves_responses_and_counts_intact(
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    unmonitored_answers: list[tuple[int, bytes, list[tuple[str, str]]]],
) -> None:
    calls = 0

    def resolver(scope: Scope) -> str | None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise InjectedFault("resolver bug")
        return None  # falls back to the router's template

    app, _ = instrumented(registry, handler_resolver=resolver)
    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        assert await exchange(app) == unmonitored_answers

    assert value(registry, INTERNAL_ERRORS, site="middleware.handler") == 5 * ROUNDS // 2
    assert len(crowdmon_errors(caplog, "middleware.handler")) == 1
    # Calls alternate, so every route fails half the time: those requests are counted unmatched.
    half = ROUNDS // 2
    for method, handler, status in (
        ("GET", "/items/{item_id}", "200"),
        ("POST", "/echo", "200"),
        ("GET", "/stream", "200"),
        ("GET", "/text", "202"),
    ):
        assert value(registry, REQUESTS, method=method, handler=handler, status=status) == half
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 2 * half
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="200") == half
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="202") == half
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == ROUNDS


async def test_a_failing_overflow_self_metric_never_fails_a_request(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    unmonitored_answers: list[tuple[int, bytes, list[tuple[str, str]]]],
) -> None:
    app, instrumentation = instrumented(
        registry, instrumentation_options={"cardinality_caps": {f"{REQUESTS}:handler": 1}}
    )
    monkeypatch.setattr(instrumentation.guard, "on_overflow", boom)
    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        assert await exchange(app) == unmonitored_answers

    # The first handler seen is admitted; every request of the four other routes needs a fold.
    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == ROUNDS
    assert value(registry, INTERNAL_ERRORS, site="middleware.record") == 4 * ROUNDS
    assert len(crowdmon_errors(caplog, "middleware.record")) == 1


async def test_the_apps_exception_wins_over_a_failure_of_crowdmon(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    failure = AppError("the app's own")

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise failure

    instrumentation = PrometheusInstrumentation(registry)
    monkeypatch.setattr(instrumentation.requests, "record", boom)
    app = PrometheusMiddleware(failing, instrumentation=instrumentation, handler_resolver=boom)
    for _ in range(3):
        with pytest.raises(AppError) as raised:
            await run_asgi(app, http_scope("/x"))
        assert raised.value is failure
        assert raised.value.__context__ is None

    assert value(registry, INTERNAL_ERRORS, site="middleware.handler") == 3
    assert value(registry, INTERNAL_ERRORS, site="middleware.record") == 3


class HostileMessage(dict[str, Any]):
    """A message whose reading fails: crowdmon must still hand it on untouched."""

    def get(self, key: str, default: Any = None) -> Any:
        raise InjectedFault(f"cannot read {key}")


async def test_messages_crowdmon_cannot_read_still_pass_through(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = [HostileMessage(type="http.request", body=b"abc")]
    outgoing: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": []},
        HostileMessage(type="http.response.body", body=b"xyz"),
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.append(await receive())
        for message in outgoing:
            await send(message)

    middleware = PrometheusMiddleware(app, registry=registry)
    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        for _ in range(4):
            received.clear()
            sent = await run_asgi(middleware, http_scope("/odd", "POST"), list(incoming))
            assert [id(m) for m in sent] == [id(m) for m in outgoing]
            assert received[0] is incoming[0]

    assert value(registry, INTERNAL_ERRORS, site="middleware.receive") == 4
    assert value(registry, INTERNAL_ERRORS, site="middleware.send") == 4
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="200") == 4
    assert len(crowdmon_errors(caplog, "middleware.receive")) == 1
    assert len(crowdmon_errors(caplog, "middleware.send")) == 1


async def test_when_reporting_the_failure_fails_too_the_request_still_succeeds(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    unmonitored_answers: list[tuple[int, bytes, list[tuple[str, str]]]],
) -> None:
    app, instrumentation = instrumented(registry)
    monkeypatch.setattr(instrumentation.requests, "record", boom)
    monkeypatch.setattr(instrumentation._shared, "internal_errors", None)  # its .labels() now fails
    monkeypatch.setattr(logging.getLogger("crowdmon"), "error", boom)

    assert await exchange(app) == unmonitored_answers


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"10", b"extra")],  # not a pair
        [(b"content-length",)],
        [b"content-length: 10"],
        [(b"content-length", 10)],  # not bytes
        17,  # not iterable
    ],
    ids=["triple", "single", "raw-line", "int-value", "int-headers"],
)
async def test_malformed_headers_from_a_buggy_upstream_leave_nothing_in_progress(
    registry: CollectorRegistry, headers: Any
) -> None:
    async def partial_reader(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the first chunk only: the size falls back to the headers
        await PlainTextResponse("ok")(scope, receive, send)

    app = PrometheusMiddleware(partial_reader, registry=registry)
    scope = http_scope("/upload", "POST")
    scope["headers"] = headers
    sent = await run_asgi(app, scope, [{"type": "http.request", "body": b"abc", "more_body": True}])

    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="200") == 1
    assert value(registry, "crowdfunding_api_request_size_bytes_sum", method="POST", handler="<unmatched>") == 3
    assert value(registry, "crowdfunding_api_requests_in_progress", method="POST") == 0
