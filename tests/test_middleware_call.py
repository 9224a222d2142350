"""``await middleware(scope, receive, send)`` behaves as a coroutine does, whichever core runs it:
servers recognise the middleware as an ASGI 3 app, nothing happens until it is awaited, and a
call cancelled, closed, thrown into or awaited twice ends the request as the Python core would."""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
import types
from collections.abc import Generator
from typing import Any

import pytest
from hypercorn.utils import is_asgi
from prometheus_client import CollectorRegistry
from uvicorn.config import Config

from crowdmon import PrometheusMiddleware
from crowdmon._types import Message, Receive, Scope, Send
from crowdmon.context import current_request
from tests.asgi import http_scope
from tests.support import value

REQUESTS = "crowdfunding_api_requests_total"
IN_PROGRESS = "crowdfunding_api_requests_in_progress"


class AppError(Exception):
    pass


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"made"})


async def receive_nothing() -> Message:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


@types.coroutine
def pause() -> Generator[str, None, None]:
    """Suspend the awaiting coroutine once, handing "paused" to whoever drives it."""
    yield "paused"


def collect() -> tuple[list[Message], Any]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    return sent, send


def recorded(registry: CollectorRegistry, status: str) -> float:
    return value(registry, REQUESTS, method="GET", handler="<unmatched>", status=status)


def test_servers_recognise_the_middleware_as_an_asgi_3_app() -> None:
    middleware = PrometheusMiddleware(answer, registry=CollectorRegistry())

    assert asyncio.iscoroutinefunction(middleware.__call__)
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert is_asgi(middleware)  # hypercorn's own test
    config = Config(app=middleware)
    config.load()
    assert config.interface == "asgi3"


async def test_the_call_records_nothing_until_it_is_awaited() -> None:
    registry = CollectorRegistry()
    middleware = PrometheusMiddleware(answer, registry=registry)
    sent, send = collect()

    call = middleware(http_scope("/x"), receive_nothing, send)
    assert current_request.get() is None
    assert value(registry, IN_PROGRESS, method="GET") == 0
    call.close()  # type: ignore[attr-defined]  # as for a coroutine never awaited
    del call
    gc.collect()

    assert sent == []
    assert recorded(registry, "201") == 0
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_asyncio_runs_the_call_as_a_task() -> None:
    registry = CollectorRegistry()
    middleware = PrometheusMiddleware(answer, registry=registry)
    sent, send = collect()

    await asyncio.create_task(middleware(http_scope("/x"), receive_nothing, send))  # type: ignore[arg-type]

    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert recorded(registry, "201") == 1
    assert current_request.get() is None


async def test_the_call_takes_keywords_and_a_call_of_a_subclass_or_one_assigned_later_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    _sent, send = collect()

    await PrometheusMiddleware(answer, registry=registry)(scope=http_scope("/x"), receive=receive_nothing, send=send)
    assert recorded(registry, "201") == 1
    with pytest.raises(TypeError, match="__call__"):
        PrometheusMiddleware(answer, registry=registry)(http_scope("/x"), receive_nothing)  # type: ignore[call-arg]

    calls: list[str] = []
    compiled_call = PrometheusMiddleware.__call__

    class Declared(PrometheusMiddleware):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            calls.append("declared")
            await super().__call__(scope, receive, send)

    async def assigned(self: PrometheusMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        calls.append("assigned")
        await compiled_call(self, scope, receive, send)

    await Declared(answer, registry=registry)(http_scope("/x"), receive_nothing, send)
    # Assigned once the class is made, which Python before 3.12 does not tell the compiled call.
    monkeypatch.setattr(PrometheusMiddleware, "__call__", assigned)
    await PrometheusMiddleware(answer, registry=registry)(http_scope("/x"), receive_nothing, send)

    assert calls == ["declared", "assigned"]
    assert recorded(registry, "201") == 3


async def test_a_call_awaited_twice_is_refused_and_counted_once() -> None:
    registry = CollectorRegistry()
    middleware = PrometheusMiddleware(answer, registry=registry)
    sent, send = collect()
    call = middleware(http_scope("/x"), receive_nothing, send)

    await call
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        await call

    assert recorded(registry, "201") == 1
    assert len(sent) == 2


async def test_a_request_cancelled_while_the_app_waits_is_a_499_and_the_context_is_reset() -> None:
    registry = CollectorRegistry()
    started = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        await receive()

    middleware = PrometheusMiddleware(slow, registry=registry)
    sent, send = collect()
    task = asyncio.create_task(middleware(http_scope("/x"), receive_nothing, send))  # type: ignore[arg-type]
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert sent == []
    assert recorded(registry, "499") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0
    assert current_request.get() is None


def test_a_call_closed_while_the_app_waits_ends_the_request_as_a_500() -> None:
    registry = CollectorRegistry()
    closed: list[str] = []

    async def waiting(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await pause()
        finally:
            closed.append("app")

    middleware = PrometheusMiddleware(waiting, registry=registry)
    sent, send = collect()
    call = middleware(http_scope("/x"), receive_nothing, send)
    assert call.send(None) == "paused"  # type: ignore[attr-defined]
    call.close()  # type: ignore[attr-defined]
    call.close()  # type: ignore[attr-defined]  # closing again changes nothing

    assert closed == ["app"]
    assert sent == []
    assert recorded(registry, "500") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


def test_a_generator_exit_thrown_into_a_call_closes_the_app_and_is_raised_as_a_coroutine_raises_it() -> None:
    """A coroutine delegating with ``await`` closes the awaitable it waits on and raises the
    GeneratorExit itself, even where that awaitable makes something else of it."""
    registry = CollectorRegistry()

    async def quits_quietly(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await pause()
        except GeneratorExit:
            return

    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        await quits_quietly(scope, receive, send)

    for app in (plain, PrometheusMiddleware(quits_quietly, registry=registry)):
        sent, send = collect()
        call = app(http_scope("/x"), receive_nothing, send)
        assert call.send(None) == "paused"  # type: ignore[attr-defined]
        with pytest.raises(GeneratorExit):
            call.throw(GeneratorExit())  # type: ignore[attr-defined]
        assert sent == []
    assert recorded(registry, "500") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


def test_an_exception_thrown_into_a_call_not_yet_started_is_raised_and_nothing_recorded() -> None:
    registry = CollectorRegistry()
    middleware = PrometheusMiddleware(answer, registry=registry)
    sent, send = collect()
    call = middleware(http_scope("/x"), receive_nothing, send)
    error = AppError("thrown")

    with pytest.raises(AppError) as raised:
        call.throw(error)  # type: ignore[attr-defined]

    assert raised.value is error
    assert sent == []
    assert recorded(registry, "500") == 0
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_an_app_raising_at_once_or_returning_no_awaitable_is_a_500_with_its_own_error() -> None:
    registry = CollectorRegistry()
    error = AppError("at once")

    def raising(scope: Scope, receive: Receive, send: Send) -> Any:
        raise error

    def not_awaitable(scope: Scope, receive: Receive, send: Send) -> Any:
        return 42

    sent, send = collect()
    with pytest.raises(AppError) as raised:
        await PrometheusMiddleware(raising, registry=registry)(http_scope("/x"), receive_nothing, send)
    assert raised.value is error
    with pytest.raises(TypeError, match="can't be used in 'await' expression"):
        await PrometheusMiddleware(not_awaitable, registry=registry)(http_scope("/x"), receive_nothing, send)

    assert sent == []
    assert recorded(registry, "500") == 2
    assert value(registry, IN_PROGRESS, method="GET") == 0
    assert current_request.get() is None


async def test_the_apps_receive_asks_the_server_only_when_awaited_and_runs_as_a_task() -> None:
    registry = CollectorRegistry()
    asked: list[str] = []

    async def server_receive() -> Message:
        asked.append("receive")
        return {"type": "http.request", "body": b"12345", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        unawaited = receive()
        unawaited.close()  # type: ignore[attr-defined]  # as for a coroutine never awaited
        assert asked == []
        message = await asyncio.create_task(receive())  # type: ignore[arg-type]
        assert message == {"type": "http.request", "body": b"12345", "more_body": False}
        await answer(scope, receive, send)

    sent, send = collect()
    await PrometheusMiddleware(app, registry=registry)(http_scope("/x", method="POST"), server_receive, send)

    assert len(sent) == 2
    assert asked == ["receive"]
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="201") == 1
    assert value(registry, "crowdfunding_api_request_size_bytes_sum", method="POST", handler="<unmatched>") == 5


def test_an_exception_thrown_into_a_waiting_receive_reaches_the_app() -> None:
    registry = CollectorRegistry()
    error = AppError("thrown")
    caught: list[BaseException] = []

    async def server_receive() -> Message:
        await pause()
        raise AssertionError("unreachable")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await receive()
        except AppError as raised:
            caught.append(raised)
        await answer(scope, receive, send)

    sent, send = collect()
    call = PrometheusMiddleware(app, registry=registry)(http_scope("/x"), server_receive, send)
    assert call.send(None) == "paused"  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        call.throw(error)  # type: ignore[attr-defined]

    assert caught == [error]
    assert len(sent) == 2
    assert recorded(registry, "201") == 1


async def test_the_apps_return_value_and_a_thrown_exception_reach_the_awaiting_code() -> None:
    registry = CollectorRegistry()

    async def returning(scope: Scope, receive: Receive, send: Send) -> Any:
        await answer(scope, receive, send)
        return "ignored"

    sent, send = collect()
    assert await PrometheusMiddleware(returning, registry=registry)(http_scope("/x"), receive_nothing, send) is None
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]

    error = AppError("from outside")

    async def waiting(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await pause()

    call = PrometheusMiddleware(waiting, registry=registry)(http_scope("/x"), receive_nothing, send)
    assert call.send(None) == "paused"  # type: ignore[attr-defined]
    with pytest.raises(AppError) as raised:
        call.throw(error)  # type: ignore[attr-defined]
    assert raised.value is error
    assert recorded(registry, "202") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_under_a_tracer_the_app_still_gets_its_message_and_its_own_exception_context() -> None:
    # A trace function (pdb, coverage) makes the interpreter drive an awaitable through __next__.
    registry = CollectorRegistry()
    got: list[Message] = []

    async def reading(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await receive())
        await answer(scope, receive, send)
        try:
            raise KeyError("the app's own")
        except KeyError:
            raise AppError("after the response")  # noqa: B904  # its __context__ is the KeyError

    async def server_receive() -> Message:
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"abc", "more_body": False}

    sent, send = collect()
    sys.settrace(lambda *args: None)
    try:
        with pytest.raises(AppError) as raised:
            await PrometheusMiddleware(reading, registry=registry)(http_scope("/x", method="POST"), server_receive, send)
    finally:
        sys.settrace(None)

    assert got == [{"type": "http.request", "body": b"abc", "more_body": False}]
    assert isinstance(raised.value.__context__, KeyError)
    assert len(sent) == 2
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="201") == 1


def test_a_call_resumed_while_it_runs_is_refused_and_one_finished_refuses_a_throw() -> None:
    registry = CollectorRegistry()
    middleware_call: list[Any] = []
    refused: list[str] = []

    async def reentering(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            middleware_call[0].send(None)
        except ValueError as error:
            refused.append(str(error))
        await answer(scope, receive, send)

    sent, send = collect()
    call = PrometheusMiddleware(reentering, registry=registry)(http_scope("/x"), receive_nothing, send)
    middleware_call.append(call)
    with pytest.raises(StopIteration):
        call.send(None)  # type: ignore[attr-defined]

    assert refused == ["coroutine already executing"]
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        call.throw(AppError("late"))  # type: ignore[attr-defined]
    assert len(sent) == 2
    assert recorded(registry, "201") == 1
