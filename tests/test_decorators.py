"""The outcome rule of the decorators, for every kind of callable they wrap.

| what leaves the call          | duration                  | counted as error | re-raised           |
| return, or stream exhausted   | observed, outcome success | no               | —                   |
| an Exception                  | observed, outcome error   | once per metric  | unchanged           |
| cancellation (asyncio/anyio)  | observed, outcome cancelled | no             | unchanged           |
| GeneratorExit (stream closed) | observed                  | no               | unchanged           |
| KeyboardInterrupt, SystemExit | —                         | no               | unchanged           |
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import gc
import sqlite3
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette._utils import is_async_callable
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from crowdmon import (
    PrometheusInstrumentation,
    PrometheusMiddleware,
    tracked_database_query,
    tracked_errors,
    tracked_external,
    tracked_session,
)
from tests.support import value

KINDS = ("sync", "async", "generator", "async_generator")


def drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that only awaits ``asyncio.sleep(0)``, without an event loop, so that
    ``KeyboardInterrupt`` and ``SystemExit`` reach the test exactly as raised."""
    try:
        while True:
            coroutine.send(None)
    except StopIteration as stop:
        return stop.value


def external_function(kind: str, instrumentation: PrometheusInstrumentation) -> Callable[..., Any]:
    """A function of ``kind`` decorated with ``@tracked_external``; it raises ``error`` if given."""
    decorate = tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    if kind == "sync":

        def sync(error: BaseException | None = None) -> int:
            if error is not None:
                raise error
            return 42

        return decorate(sync)
    if kind == "async":

        async def coroutine(error: BaseException | None = None) -> int:
            await asyncio.sleep(0)
            if error is not None:
                raise error
            return 42

        return decorate(coroutine)
    if kind == "generator":

        def generator(error: BaseException | None = None) -> Iterator[int]:
            yield 41
            if error is not None:
                raise error
            yield 42

        return decorate(generator)

    async def async_generator(error: BaseException | None = None) -> AsyncIterator[int]:
        await asyncio.sleep(0)
        yield 41
        if error is not None:
            raise error
        yield 42

    return decorate(async_generator)


def call(kind: str, function: Callable[..., Any], error: BaseException | None = None) -> Any:
    if kind == "sync":
        return function(error)
    if kind == "async":
        return drive(function(error))
    if kind == "generator":
        return list(function(error))

    async def collect() -> list[int]:
        return [item async for item in function(error)]

    return drive(collect())


def durations(registry: CollectorRegistry, outcome: str) -> float:
    return value(
        registry, "external_api_duration_seconds_count", service="llm", endpoint="complete", outcome=outcome
    )


def all_durations(registry: CollectorRegistry) -> float:
    return sum(durations(registry, outcome) for outcome in ("success", "error", "cancelled"))


@pytest.mark.parametrize("kind", KINDS)
def test_return_or_exhausted_stream_is_observed_as_success(
    kind: str, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    result = call(kind, external_function(kind, instrumentation))

    assert result == (42 if kind in ("sync", "async") else [41, 42])
    assert durations(registry, "success") == 1
    assert durations(registry, "error") == 0
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="ValueError") == 0


@pytest.mark.parametrize("kind", KINDS)
def test_exception_is_observed_as_error_counted_once_and_reraised_unchanged(
    kind: str, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    error = ValueError("the model said no")

    with pytest.raises(ValueError) as raised:
        call(kind, external_function(kind, instrumentation), error)

    assert raised.value is error
    assert durations(registry, "error") == 1
    assert durations(registry, "success") == 0
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="ValueError") == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("exit_type", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_are_not_observed_and_reraised(
    kind: str, exit_type: type[BaseException], registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    error = exit_type()

    with pytest.raises(exit_type) as raised:
        call(kind, external_function(kind, instrumentation), error)

    assert raised.value is error
    assert all_durations(registry) == 0


def test_closing_a_generator_early_is_observed_as_success_not_error(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    stream = external_function("generator", instrumentation)()
    assert next(stream) == 41

    stream.close()

    assert durations(registry, "success") == 1
    assert durations(registry, "error") == 0


def test_closing_an_async_generator_early_is_observed_and_closes_the_inner_one(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    closed = []

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def tokens() -> AsyncIterator[str]:
        try:
            yield "EU"
            yield "crowdfunding"
        finally:
            closed.append(True)

    async def consume_one() -> str:
        stream = tokens()
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(consume_one()) == "EU"
    assert closed == [True]
    assert durations(registry, "success") == 1
    assert durations(registry, "error") == 0


@pytest.mark.parametrize("first", ["inner", "wrapper"])
def test_an_async_generator_left_open_when_the_loop_shuts_down_is_closed_once_as_success(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation, first: str
) -> None:
    # The loop's shutdown closes every live async generator at once: the decorated one and the
    # one it wraps, in either order, while an async clean-up is under way.
    cleaned = []

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def tokens() -> AsyncIterator[str]:
        try:
            yield "EU"
        finally:
            await asyncio.sleep(0)
            cleaned.append(True)

    async def shutdown_while_open() -> list[object]:
        stream = tokens()
        assert await stream.__anext__() == "EU"
        inner = stream.ag_frame.f_locals["generator"]  # type: ignore[attr-defined]
        closing = [inner.aclose(), stream.aclose()]
        return await asyncio.gather(*(closing if first == "inner" else closing[::-1]), return_exceptions=True)

    outcomes = asyncio.run(shutdown_while_open())

    assert cleaned == [True]
    if first == "inner":
        assert outcomes == [None, None]
    assert durations(registry, "success") == 1
    assert durations(registry, "error") == 0
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="RuntimeError") == 0


def test_async_generator_passes_sent_and_thrown_values_through(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def echo() -> AsyncIterator[str]:
        received = yield "ready"
        try:
            yield f"got {received}"
        except KeyError:
            yield "recovered"

    async def exchange() -> list[str]:
        stream = echo()
        seen = [await stream.__anext__(), await stream.asend("ping"), await stream.athrow(KeyError("k"))]
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return seen

    assert asyncio.run(exchange()) == ["ready", "got ping", "recovered"]
    assert durations(registry, "success") == 1


def test_generator_return_value_and_send_pass_through(instrumentation: PrometheusInstrumentation) -> None:
    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    def accumulate() -> Iterator[int]:
        total = 0
        while True:
            received = yield total
            if received is None:
                return
            total += received

    stream = accumulate()
    next(stream)
    assert stream.send(2) == 2
    assert stream.send(3) == 5


@pytest.mark.parametrize("kind", ["async", "async_generator"])
def test_asyncio_cancellation_is_observed_as_cancelled_and_never_swallowed(
    kind: str, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    started = asyncio.Event()

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def slow_stream() -> AsyncIterator[int]:
        started.set()
        await asyncio.sleep(30)
        yield 1

    async def consume() -> None:
        if kind == "async":
            await slow()
        else:
            async for _ in slow_stream():
                pass

    async def main() -> None:
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert durations(registry, "cancelled") == 1
    assert durations(registry, "error") == 0
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="CancelledError") == 0


def test_a_task_group_of_counted_failures_is_not_counted_again_by_an_outer_decorator(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    """Two decorated calls fail in a ``TaskGroup``: each failure is counted where it was raised,
    and the ``ExceptionGroup`` carrying them adds nothing to the same metric on its way out of
    an outer decorator; a group with a failure nobody counted is counted."""

    @tracked_external("openai", endpoint="chat/completions", instrumentation=instrumentation)
    async def call_llm(index: int) -> None:
        raise ConnectionError(f"down {index}")

    async def uncounted() -> None:
        raise ConnectionError("not decorated")

    @tracked_errors(component="rag_system", instrumentation=instrumentation)
    async def fan_out(also_uncounted: bool) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(call_llm(1))
            group.create_task(call_llm(2))
            if also_uncounted:
                group.create_task(uncounted())

    def errors(service: str) -> float:
        return sum(
            value(registry, "external_service_errors_total", service=service, endpoint=endpoint, exception=exception)
            for endpoint in ("chat/completions", "unknown")
            for exception in ("ConnectionError", "ExceptionGroup")
        )

    with pytest.raises(builtins.ExceptionGroup):
        asyncio.run(fan_out(False))
    assert (errors("openai"), errors("rag_system")) == (2, 0)
    with pytest.raises(builtins.ExceptionGroup):
        asyncio.run(fan_out(True))
    assert (errors("openai"), errors("rag_system")) == (4, 1)


def test_a_group_of_failures_and_cancellations_is_an_error_counted_only_where_it_failed(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    """What a cancelled nursery holding one failure raises: the outer call's outcome is
    ``error``, and only the failure, where it was raised, is counted; the same through the
    context manager."""

    @tracked_external("openai", endpoint="chat/completions", instrumentation=instrumentation)
    async def call_llm() -> None:
        raise ConnectionError("down")

    @tracked_external("openai", endpoint="chat/completions", instrumentation=instrumentation)
    async def fan_out() -> None:
        try:
            await call_llm()
        except ConnectionError as failure:
            raise builtins.BaseExceptionGroup("nursery", [failure, asyncio.CancelledError()]) from None

    with pytest.raises(builtins.BaseExceptionGroup):
        asyncio.run(fan_out())
    with pytest.raises(builtins.BaseExceptionGroup), instrumentation.track_external_api_call("openai", "chat/completions"):
        raise builtins.BaseExceptionGroup("nursery", [ValueError("bad"), asyncio.CancelledError()])

    def errors(exception: str) -> float:
        return value(registry, "external_service_errors_total", service="openai", endpoint="chat/completions", exception=exception)

    assert (errors("ConnectionError"), errors("BaseExceptionGroup"), errors("ValueError")) == (1, 0, 0)
    assert value(registry, "external_api_duration_seconds_count", service="openai", endpoint="chat/completions", outcome="error") == 3


def _fail_in_a_worker_process() -> None:
    from crowdmon import default_instrumentation

    @tracked_errors(component="rag_system", instrumentation=default_instrumentation())
    def index_documents() -> None:
        raise ConnectionError("the vector store is down")

    index_documents()


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_failure_counted_in_a_worker_process_is_counted_again_in_this_one(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation, start: str
) -> None:
    """The worker's count stays in the worker's own registry; the exception pickled back to this
    process keeps crowdmon's mark, which must not pass for a count made here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    @tracked_errors(component="rag_system", instrumentation=instrumentation)
    def index_in_a_worker() -> None:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(start)) as pool:
            pool.submit(_fail_in_a_worker_process).result()

    with pytest.raises(ConnectionError) as raised:
        index_in_a_worker()
    assert str(raised.value) == "the vector store is down"
    assert value(registry, "application_errors_total", error_type="external_service", component="rag_system", user_type="unknown") == 1


@tracked_database_query("scan")
def _scan(count: int) -> Iterator[int]:
    yield from range(count)


class _Catalogue:
    @tracked_database_query("lookup")
    @staticmethod
    def lookup(key: str) -> str:
        return key.upper()

    @tracked_database_query("count")
    @classmethod
    def count(cls, key: str) -> int:
        return len(key)


def test_decorated_functions_pickle_by_reference_and_copy_as_themselves_as_functions_do() -> None:
    """A process pool pickles what it runs: a decorated generator function, staticmethod or
    classmethod goes through as it would undecorated."""
    import copy
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    for decorated in (_scan, _Catalogue.lookup, _Catalogue.count, _Catalogue().lookup):
        assert pickle.loads(pickle.dumps(decorated)) == decorated
        assert copy.copy(decorated) is decorated
        assert copy.deepcopy(decorated) is decorated
    with ProcessPoolExecutor(1) as pool:
        assert pool.submit(_Catalogue.lookup, "eu").result() == "EU"
        assert pool.submit(_Catalogue.count, "eu").result() == 2
    assert list(pickle.loads(pickle.dumps(_scan))(3)) == [0, 1, 2]
    partial = tracked_database_query("sum")(functools.partial(sum, start=1))
    with pytest.raises(pickle.PicklingError, match=r"it pickles by reference, as a function does, and has no __qualname__ to be found by; decorate a module-level def that calls it"):
        pickle.dumps(partial)


def test_a_group_of_cancellations_and_nothing_else_is_cancelled() -> None:
    from crowdmon.timing import outcome_of

    assert outcome_of(builtins.BaseExceptionGroup("g", [asyncio.CancelledError(), builtins.BaseExceptionGroup("h", [asyncio.CancelledError()])])) == "cancelled"
    assert outcome_of(builtins.BaseExceptionGroup("g", [asyncio.CancelledError(), KeyboardInterrupt()])) is None
    assert outcome_of(builtins.BaseExceptionGroup("g", [asyncio.CancelledError(), ValueError()])) == "error"
    assert outcome_of(builtins.ExceptionGroup("g", [ValueError()])) == "error"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["async", "async_generator", "task_group"])
def test_anyio_cancel_scope_is_observed_as_cancelled(
    backend: str, kind: str, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    """Also a task group inside the call (a trio nursery raises a group of cancellations): the
    call was cancelled, not failed."""

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def slow() -> str:
        await anyio.sleep(30)
        return "never"

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def fan_out() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.sleep, 30)
            await anyio.sleep(30)

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def slow_stream() -> AsyncIterator[str]:
        yield "first"
        await anyio.sleep(30)
        yield "never"

    async def main() -> bool:
        with anyio.move_on_after(0.01) as scope:
            if kind == "async":
                await slow()
            elif kind == "task_group":
                await fan_out()
            else:
                stream = slow_stream()
                try:
                    async for _ in stream:
                        pass
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
        return scope.cancelled_caught

    assert anyio.run(main, backend=backend) is True
    assert durations(registry, "cancelled") == 1
    assert durations(registry, "error") == 0


def test_exception_through_nested_decorators_is_counted_once_per_metric(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="chat_endpoint", instrumentation=instrumentation)
    @tracked_errors(component="rag_system", instrumentation=instrumentation)
    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    def ask() -> None:
        raise ConnectionError("provider unreachable")

    with pytest.raises(ConnectionError):
        ask()

    # Both timing layers observe the call; the error is counted once in each error metric, by the
    # innermost decorator that counts into it.
    assert durations(registry, "error") == 2
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="ConnectionError") == 1
    assert value(registry, "application_errors_total", error_type="external_service", component="rag_system", user_type="unknown") == 1
    assert value(registry, "application_errors_total", error_type="external_service", component="chat_endpoint", user_type="unknown") == 0
    assert value(
        registry, "application_error_details_total", error_type="external_service", component="rag_system",
        exception="ConnectionError", endpoint="unknown", function="ask",
    ) == 1


def test_a_frozen_dataclass_exception_through_nested_decorators_is_counted_once(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @dataclasses.dataclass(frozen=True)
    class PaymentDeclined(Exception):
        code: int

    @tracked_errors(component="checkout", instrumentation=instrumentation)
    @tracked_errors(component="billing", instrumentation=instrumentation)
    def charge() -> None:
        raise PaymentDeclined(402)

    with pytest.raises(PaymentDeclined) as raised:
        charge()

    assert raised.value.code == 402
    assert value(registry, "application_errors_total", error_type="system", component="billing", user_type="unknown") == 1
    assert value(registry, "application_errors_total", error_type="system", component="checkout", user_type="unknown") == 0


def test_error_raised_from_a_counted_one_is_not_counted_again(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    class DocumentUnavailable(Exception):
        pass

    @tracked_errors(component="document_store", instrumentation=instrumentation)
    def query() -> None:
        raise sqlite3.OperationalError("no such table")

    @tracked_errors(component="documents_api", instrumentation=instrumentation)
    def fetch() -> None:
        try:
            query()
        except sqlite3.Error as error:
            raise DocumentUnavailable("try later") from error

    with pytest.raises(DocumentUnavailable):
        fetch()

    assert value(registry, "database_errors_total", component="document_store", exception="OperationalError") == 1
    assert value(registry, "application_errors_total", error_type="database", component="document_store", user_type="unknown") == 1
    assert value(registry, "application_errors_total", error_type="database", component="documents_api", user_type="unknown") == 0


def test_the_same_error_in_separate_calls_counts_each_time(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="auth0", instrumentation=instrumentation)
    def check(user: str) -> None:
        raise PermissionError(f"{user} may not")

    for user in ("ann", "bob", "cy"):
        with pytest.raises(PermissionError):
            check(user)

    assert value(registry, "auth_errors_total", component="auth0", exception="PermissionError") == 3


NOT_CONFIGURED = LookupError("retriever not configured")  # one object, raised again and again


def test_one_exception_object_raised_by_several_calls_counts_each_call(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="rag_system", instrumentation=instrumentation)
    def retrieve() -> None:
        raise NOT_CONFIGURED

    upstream: asyncio.Future[None] | None = None

    async def fetch() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("upstream down")

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    async def complete() -> None:
        nonlocal upstream
        if upstream is None:  # one shared upstream call: every awaiter gets its one exception
            upstream = asyncio.ensure_future(fetch())
        await upstream

    async def call_three_times() -> None:
        for _ in range(3):
            with pytest.raises(ConnectionError):
                await complete()

    for _ in range(3):
        with pytest.raises(LookupError) as raised:
            retrieve()
        assert raised.value is NOT_CONFIGURED
    asyncio.run(call_three_times())

    assert value(registry, "application_errors_total", error_type="system", component="rag_system", user_type="unknown") == 3
    assert durations(registry, "error") == 3
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="ConnectionError") == 3


def test_one_exception_object_leaving_several_timed_blocks_counts_each_block(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    unreachable = ConnectionError("provider unreachable")
    for _ in range(3):
        with pytest.raises(ConnectionError), instrumentation.track_external_api_call("llm", "complete"):
            raise unreachable

    assert durations(registry, "error") == 3
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="ConnectionError") == 3


def test_inside_a_request_a_tracked_error_is_counted_once_and_again_in_the_next_request(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="rag_system", instrumentation=instrumentation)
    def retrieve() -> None:
        raise NOT_CONFIGURED

    async def answer(request: Request) -> Response:
        try:
            retrieve()
        except LookupError as error:  # counted by the decorator: the explicit call adds nothing
            instrumentation.track_application_error("system", "rag_system", error)
        return PlainTextResponse("fallback answer")

    app = Starlette(routes=[Route("/answer", answer)])
    app.add_middleware(PrometheusMiddleware, instrumentation=instrumentation)

    async def two_requests() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return [(await client.get("/answer")).status_code for _ in range(2)]

    assert asyncio.run(two_requests()) == [200, 200]
    assert value(registry, "application_errors_total", error_type="system", component="rag_system", user_type="unknown") == 2


def test_an_async_function_behind_a_plain_wrapper_is_timed_until_it_is_awaited(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    def plain_wrapper(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return call

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    @plain_wrapper
    async def complete(fail: bool) -> str:
        await asyncio.sleep(0.05)
        if fail:
            raise ConnectionError("provider unreachable")
        return "answer"

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    @functools.wraps(complete)
    def complete_blocking(fail: bool) -> str:  # a sync facade: returns a result, not a coroutine
        return asyncio.run(complete.__wrapped__(fail))

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    @functools.wraps(complete)
    def complete_later(fail: bool) -> asyncio.Future[str]:  # a task the caller keeps and polls
        return asyncio.ensure_future(complete.__wrapped__(fail))

    async def keep_the_task() -> bool:
        task = complete_later(False)
        await task
        return isinstance(task, asyncio.Task) and task.done() and task.result() == "answer"

    assert asyncio.run(complete(False)) == "answer"
    with pytest.raises(ConnectionError):
        asyncio.run(complete(True))
    assert complete_blocking(False) == "answer"
    assert asyncio.run(keep_the_task())

    assert durations(registry, "success") == 3
    assert durations(registry, "error") == 1
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="ConnectionError") == 1
    error_time = value(registry, "external_api_duration_seconds_sum", service="llm", endpoint="complete", outcome="error")
    assert error_time >= 0.05


def session_function(kind: str, instrumentation: PrometheusInstrumentation, seen: list[float], registry: CollectorRegistry) -> Callable[..., Any]:
    decorate = tracked_session(user_type="authenticated", instrumentation=instrumentation)

    def during() -> None:
        seen.append(value(registry, "active_sessions_current", user_type="authenticated"))

    if kind == "sync":

        def sync(error: BaseException | None = None) -> int:
            during()
            if error is not None:
                raise error
            return 42

        return decorate(sync)
    if kind == "async":

        async def coroutine(error: BaseException | None = None) -> int:
            during()
            await asyncio.sleep(0)
            if error is not None:
                raise error
            return 42

        return decorate(coroutine)
    if kind == "generator":

        def generator(error: BaseException | None = None) -> Iterator[int]:
            during()
            yield 41
            if error is not None:
                raise error
            yield 42

        return decorate(generator)

    async def async_generator(error: BaseException | None = None) -> AsyncIterator[int]:
        during()
        yield 41
        if error is not None:
            raise error
        yield 42

    return decorate(async_generator)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("error", [None, ValueError("bad"), KeyboardInterrupt(), SystemExit(1)], ids=repr)
def test_session_gauge_is_up_during_the_call_and_always_comes_back_down(
    kind: str, error: BaseException | None, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    seen: list[float] = []
    function = session_function(kind, instrumentation, seen, registry)

    if error is None:
        call(kind, function)
    else:
        with pytest.raises(type(error)):
            call(kind, function, error)

    assert seen == [1.0]
    assert value(registry, "active_sessions_current", user_type="authenticated") == 0


def test_session_gauge_comes_back_down_on_cancellation_and_on_a_closed_stream(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    started = asyncio.Event()

    @tracked_session(user_type="premium", instrumentation=instrumentation)
    async def chat() -> None:
        started.set()
        await asyncio.sleep(30)

    @tracked_session(user_type="premium", instrumentation=instrumentation)
    async def stream() -> AsyncIterator[int]:
        yield 1
        yield 2

    async def main() -> list[float]:
        task = asyncio.create_task(chat())
        await started.wait()
        during = value(registry, "active_sessions_current", user_type="premium")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        tokens = stream()
        await tokens.__anext__()
        streaming = value(registry, "active_sessions_current", user_type="premium")
        await tokens.aclose()
        return [during, streaming]

    assert asyncio.run(main()) == [1.0, 1.0]
    assert value(registry, "active_sessions_current", user_type="premium") == 0


def test_a_failure_inside_crowdmon_is_counted_and_the_business_error_still_propagates(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    class HostileError(Exception):
        """Refuses crowdmon's bookkeeping attribute."""

        def __getattribute__(self, name: str) -> Any:
            if name == "_crowdmon_counted":
                raise RuntimeError("no attributes for you")
            return super().__getattribute__(name)

    error = HostileError("business failure")

    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    def call_model() -> None:
        raise error

    with pytest.raises(HostileError) as raised:
        call_model()

    assert raised.value is error
    assert durations(registry, "error") == 1
    assert value(registry, "crowdmon_internal_errors_total", site="tracked_external") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_tracked_errors_counts_an_exception_of_every_kind_of_callable_and_nothing_else(
    kind: str, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    function = external_function(kind, instrumentation)
    guarded = tracked_errors(component="rag_system", instrumentation=instrumentation)(function.__wrapped__)

    call(kind, guarded)
    with pytest.raises(KeyboardInterrupt):
        call(kind, guarded, KeyboardInterrupt())
    with pytest.raises(PermissionError):
        call(kind, guarded, PermissionError("no"))

    assert value(registry, "application_errors_total", error_type="auth", component="rag_system", user_type="unknown") == 1
    assert value(registry, "auth_errors_total", component="rag_system", exception="PermissionError") == 1
    assert value(registry, "application_errors_total", error_type="system", component="rag_system", user_type="unknown") == 0


ERROR_METRICS = (
    "application_errors_total", "application_error_details_total", "auth_errors_total", "database_errors_total",
    "external_service_errors_total", "ai_system_errors_total", "session_errors_total",
)


def error_totals(registry: CollectorRegistry) -> dict[str, float]:
    totals = dict.fromkeys(ERROR_METRICS, 0.0)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


@given(
    layers=st.lists(st.sampled_from(["errors:a", "errors:b", "external:x", "external:y"]), min_size=1, max_size=6),
    error=st.sampled_from([PermissionError, sqlite3.OperationalError, TimeoutError, ValueError, KeyError]),
    asynchronous=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_any_stack_of_decorators_counts_one_exception_at_most_once_per_metric(
    layers: list[str], error: type[Exception], asynchronous: bool
) -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry)

    def body() -> None:
        raise error("failure")

    async def async_body() -> None:
        raise error("failure")

    function: Any = async_body if asynchronous else body
    for layer in layers:
        kind, name = layer.split(":")
        if kind == "errors":
            function = tracked_errors(component=name, instrumentation=instrumentation)(function)
        else:
            function = tracked_external(name, endpoint="call", instrumentation=instrumentation)(function)

    with pytest.raises(error):
        drive(function()) if asynchronous else function()

    totals = error_totals(registry)
    assert all(total <= 1 for total in totals.values()), totals
    has_errors_layer = any(layer.startswith("errors") for layer in layers)
    has_external_layer = any(layer.startswith("external") for layer in layers)
    assert totals["application_errors_total"] == (1 if has_errors_layer else 0)
    assert totals["application_error_details_total"] == (1 if has_errors_layer else 0)
    expected_external = has_external_layer or (has_errors_layer and error is TimeoutError)
    assert totals["external_service_errors_total"] == (1 if expected_external else 0)
    timing_layers = sum(layer.startswith("external") for layer in layers)
    assert sum(
        value(registry, "external_api_duration_seconds_count", service=service, endpoint="call", outcome="error")
        for service in ("x", "y")
    ) == timing_layers


def test_a_plain_wrapper_coroutine_never_awaited_or_cancelled_first_leaves_the_session_gauge_at_zero(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    async def chat() -> str:
        await asyncio.sleep(0)
        return "answer"

    @tracked_session("free", instrumentation=instrumentation)
    @functools.wraps(chat)
    def facade() -> Coroutine[Any, Any, str]:
        return chat()

    async def scenario() -> str:
        task = asyncio.ensure_future(facade())
        task.cancel()  # before its first step: no code of the wrapper ever runs
        await asyncio.gather(task, return_exceptions=True)
        never_awaited = facade()
        never_awaited.close()
        return await facade()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(scenario()) == "answer"
        gc.collect()
    assert value(registry, "active_sessions_current", user_type="free") == 0
    # The coroutines facade() made were closed as the caller closed ours, as undecorated.
    assert [str(warning.message) for warning in caught if "never awaited" in str(warning.message)] == []


async def test_a_callable_object_with_an_async_call_stays_one_that_frameworks_await(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    sent: list[str] = []

    class SendEmail:
        async def __call__(self, to: str) -> None:
            await asyncio.sleep(0)
            sent.append(to)

    send_email = tracked_external("smtp", endpoint="send", instrumentation=instrumentation)(SendEmail())

    async def signup(request: Request) -> Response:
        # Starlette runs a background task whose __call__ is not a coroutine function in a
        # worker thread, where its coroutine would never be awaited.
        return PlainTextResponse("welcome", background=BackgroundTask(send_email, "ann@example.com"))

    app = Starlette(routes=[Route("/signup", signup, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/signup")).text == "welcome"

    assert is_async_callable(send_email)
    assert sent == ["ann@example.com"]
    assert value(registry, "external_api_duration_seconds_count", service="smtp", endpoint="send", outcome="success") == 1


@pytest.mark.parametrize("stack", ["alone", "under tracked_errors"])
def test_a_wrong_argument_to_a_decorated_coroutine_function_is_not_a_failure(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation, stack: str
) -> None:
    async def fetch(url: str) -> str:
        return url

    decorated = tracked_external("llm", endpoint="complete", instrumentation=instrumentation)(fetch)
    if stack != "alone":
        decorated = tracked_errors(component="rag_system", instrumentation=instrumentation)(decorated)
    bare = tracked_errors(component="rag_system", instrumentation=instrumentation)(fetch)

    for function in (decorated, bare):
        with pytest.raises(TypeError, match="takes 1 positional argument but 3 were given"):
            asyncio.run(function(1, 2, 3))

    assert all_durations(registry) == 0
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="TypeError") == 0
    # Only the outer decorator of a stack sees the inner wrapper's coroutine fail: it counts it.
    expected = 0 if stack == "alone" else 1
    assert value(registry, "application_errors_total", error_type="system", component="rag_system", user_type="unknown") == expected


def test_the_end_of_an_iterator_is_not_a_failure(registry: CollectorRegistry, instrumentation: PrometheusInstrumentation) -> None:
    class Tokens:
        def __init__(self) -> None:
            self.left = ["a", "b"]

        def __aiter__(self) -> Tokens:
            return self

        @tracked_errors(component="llm", instrumentation=instrumentation)
        @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
        async def __anext__(self) -> str:
            if not self.left:
                raise StopAsyncIteration
            return self.left.pop(0)

        def __iter__(self) -> Tokens:
            return self

        @tracked_errors(component="llm", instrumentation=instrumentation)
        @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
        def __next__(self) -> str:
            if not self.left:
                raise StopIteration
            return self.left.pop(0)

    async def consume() -> list[str]:
        return [token async for token in Tokens()]

    assert asyncio.run(consume()) == ["a", "b"]
    assert list(Tokens()) == ["a", "b"]
    assert durations(registry, "success") == 6
    assert durations(registry, "error") == 0
    assert value(registry, "application_errors_total", error_type="system", component="llm", user_type="unknown") == 0


def test_a_partial_is_labelled_by_the_function_it_calls(registry: CollectorRegistry, instrumentation: PrometheusInstrumentation) -> None:
    def get_user(client: str, user_id: int) -> int:
        return user_id

    def get_order(client: str, order_id: int) -> int:
        raise LookupError(order_id)

    user = tracked_external("crm", instrumentation=instrumentation)(functools.partial(get_user, "crm-client"))
    order = tracked_errors(component="crm", instrumentation=instrumentation)(functools.partial(functools.partial(get_order, "crm-client")))
    assert user(7) == 7
    with pytest.raises(LookupError):
        order(8)

    assert value(registry, "external_api_duration_seconds_count", service="crm", endpoint="get_user", outcome="success") == 1
    details = {"component": "crm", "function": "get_order", "exception": "LookupError", "endpoint": "unknown"}
    assert value(registry, "application_error_details_total", error_type="system", **details) == 1


def test_a_stop_iteration_leaking_from_an_ordinary_function_is_a_failure(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="llm", instrumentation=instrumentation)
    @tracked_external("llm", endpoint="complete", instrumentation=instrumentation)
    def first_row(rows: list[str]) -> str:
        return next(iter(rows))  # a bug on an empty list

    with pytest.raises(StopIteration):
        first_row([])

    assert durations(registry, "error") == 1
    assert durations(registry, "success") == 0
    assert value(registry, "external_service_errors_total", service="llm", endpoint="complete", exception="StopIteration") == 1
    assert value(registry, "application_errors_total", error_type="system", component="llm", user_type="unknown") == 1
