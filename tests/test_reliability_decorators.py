"""The decorators and tracking calls under faults and hostile data.

Every decorator, on sync, async, generator and async-generator functions, with crowdmon's
cardinality guard failing: each call returns what the function returned, raises what it raised
(the same object), and each failed recording is counted in ``crowdmon_internal_errors_total{site}``
and logged once; so does every tracking call, around a block or alone.  Inside real requests, a
failing request-context lookup and a failing user ``user_type_resolver`` change no response.
Exception messages, query strings, header values and bodies never become label values; what a
user's resolver makes of them is held by the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import crowdmon.context
from crowdmon import (
    PrometheusInstrumentation,
    setup_monitoring,
    tracked_chat,
    tracked_database_query,
    tracked_document_operation,
    tracked_errors,
    tracked_external,
    tracked_memory_operation,
    tracked_session,
    tracked_vector_search,
)
from crowdmon.catalogue import OVERFLOW_VALUE
from tests.support import value

INTERNAL_ERRORS = "crowdmon_internal_errors_total"
SECRET = "s3cr3t"
CALLS = 3


class InjectedFault(RuntimeError):
    pass


class ServiceError(Exception):
    pass


def boom(*args: object, **kwargs: object) -> Any:
    raise InjectedFault("injected")


@dataclass
class Case:
    decorator: Callable[[PrometheusInstrumentation], Callable[[Any], Any]]
    site: str
    records_on: frozenset[str]  # the outcomes for which the decorator records anything


BOTH = frozenset({"success", "error"})
CASES = {
    "tracked_external": Case(lambda i: tracked_external("openai", "chat/completions", instrumentation=i), "tracked_external", BOTH),
    "tracked_errors": Case(lambda i: tracked_errors("rag_system", instrumentation=i), "tracked_errors", frozenset({"error"})),
    "tracked_chat": Case(lambda i: tracked_chat(instrumentation=i), "tracked_chat", BOTH),
    "tracked_vector_search": Case(lambda i: tracked_vector_search("similarity", instrumentation=i), "vector_search_duration_seconds", BOTH),
    "tracked_database_query": Case(lambda i: tracked_database_query("select", instrumentation=i), "database_query_duration_seconds", BOTH),
    "tracked_memory_operation": Case(lambda i: tracked_memory_operation("store", "conversation", instrumentation=i), "tracked_memory_operation", frozenset({"success"})),
    "tracked_document_operation": Case(lambda i: tracked_document_operation("ingest", "pdf", instrumentation=i), "tracked_document_operation", BOTH),
    "tracked_session": Case(lambda i: tracked_session(instrumentation=i), "tracked_session", BOTH),
}


def functions(decorate: Callable[[Any], Any]) -> dict[str, Callable[..., Any]]:
    """The same service function as sync, async, generator and async generator, decorated."""

    def sync(value: Any, error: BaseException | None) -> Any:
        if error is not None:
            raise error
        return value

    async def coroutine(value: Any, error: BaseException | None) -> Any:
        await asyncio.sleep(0)
        if error is not None:
            raise error
        return value

    def generator(value: Any, error: BaseException | None) -> Iterator[Any]:
        yield value
        if error is not None:
            raise error
        yield value

    async def async_generator(value: Any, error: BaseException | None) -> AsyncIterator[Any]:
        yield value
        await asyncio.sleep(0)
        if error is not None:
            raise error
        yield value

    return {
        "sync": decorate(sync),
        "async": decorate(coroutine),
        "generator": decorate(generator),
        "async generator": decorate(async_generator),
    }


async def call(kind: str, function: Callable[..., Any], value: Any, error: BaseException | None) -> Any:
    """What the caller gets: the result (every item, for generators)."""
    if kind == "sync":
        return function(value, error)
    if kind == "async":
        return await function(value, error)
    if kind == "generator":
        return list(function(value, error))
    return [item async for item in function(value, error)]


@pytest.mark.parametrize("name", list(CASES))
async def test_a_decorator_whose_recording_fails_returns_and_raises_exactly_as_undecorated(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    case = CASES[name]
    instrumentation = PrometheusInstrumentation(registry)
    monkeypatch.setattr(instrumentation.guard, "admit", boom)
    decorated = functions(case.decorator(instrumentation))

    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        for kind, function in decorated.items():
            for _ in range(CALLS):
                result = object()
                got = await call(kind, function, result, None)
                assert got is result if kind in ("sync", "async") else got == [result, result]
                failure = ServiceError(f"{SECRET} in a message")
                with pytest.raises(ServiceError) as raised:
                    await call(kind, function, result, failure)
                assert raised.value is failure

    expected = CALLS * len(decorated) * len(case.records_on)
    assert value(registry, INTERNAL_ERRORS, site=case.site) == expected
    logged = [r for r in caplog.records if r.name == "crowdmon" and repr(case.site) in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and isinstance(logged[0].exc_info[1], InjectedFault)


# -- inside real requests ----------------------------------------------------------------------


def build_service(instrumentation: PrometheusInstrumentation, **middleware_options: Any) -> FastAPI:
    """A chat service whose endpoint goes through decorated functions that read the request
    context (endpoint and user type)."""

    @tracked_chat(instrumentation=instrumentation)
    async def answer(question: str) -> str:
        await remember(question)
        return question.upper()

    @tracked_memory_operation("store", "conversation", instrumentation=instrumentation)
    async def remember(question: str) -> None:
        await asyncio.sleep(0)

    @tracked_errors("rag_system", instrumentation=instrumentation)
    def retrieve(question: str) -> list[str]:
        raise ServiceError(f"{SECRET}: no documents for {question!r}")

    @tracked_session(instrumentation=instrumentation)
    async def session() -> None:
        await asyncio.sleep(0)

    app = FastAPI()

    @app.post("/chat/{conversation}")
    async def chat(conversation: str, request: Request) -> PlainTextResponse:
        question = (await request.body()).decode()
        await session()
        with contextlib.suppress(ServiceError):
            retrieve(question)
        return PlainTextResponse(await answer(question), headers={"x-conversation": conversation})

    setup_monitoring(app, instrumentation=instrumentation, **middleware_options)
    return app


async def converse(app: FastAPI, requests: int = 6) -> list[tuple[int, str, str | None]]:
    answers = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for number in range(requests):
            response = await client.post(
                f"/chat/{SECRET}-{number}",
                params={"token": f"{SECRET}-{number}"},
                headers={"authorization": f"Bearer {SECRET}-{number}", "x-user": f"user-{SECRET}-{number}"},
                content=f"question {SECRET} {number}".encode(),
            )
            answers.append((response.status_code, response.text, response.headers.get("x-conversation")))
    return answers


def expected_answers(requests: int = 6) -> list[tuple[int, str, str | None]]:
    return [(200, f"QUESTION {SECRET.upper()} {n}", f"{SECRET}-{n}") for n in range(requests)]


async def test_a_failing_request_context_lookup_changes_no_response(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    instrumentation = PrometheusInstrumentation(registry)
    app = build_service(instrumentation)
    monkeypatch.setattr(crowdmon.context, "handler_label_for", boom)

    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        assert await converse(app) == expected_answers()

    # The endpoint label cannot be read: what needs it is reported, what does not is recorded.
    assert value(registry, INTERNAL_ERRORS, site="tracked_chat") == 6
    assert value(registry, INTERNAL_ERRORS, site="tracked_errors") == 6
    assert value(registry, "memory_operations_total", operation="store", memory_type="conversation", user_type="unknown") == 6
    assert value(registry, "crowdfunding_api_requests_total", method="POST", handler="/chat/{conversation}", status="200") == 6
    for site in ("tracked_chat", "tracked_errors"):
        assert len([r for r in caplog.records if repr(site) in r.getMessage()]) == 1


async def test_a_failing_user_type_resolver_changes_no_response(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    instrumentation = PrometheusInstrumentation(registry)
    app = build_service(instrumentation, user_type_resolver=boom)

    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        assert await converse(app) == expected_answers()

    # The resolver is asked once per request, and fails once: each of the 6 requests reads the
    # user type four times (session, memory, errors and chat), as "unknown" after the failure.
    assert value(registry, INTERNAL_ERRORS, site="user_type_resolver") == 6
    assert len([r for r in caplog.records if "'user_type_resolver'" in r.getMessage()]) == 1
    assert value(registry, "chat_processing_duration_seconds_count", endpoint="/chat/{conversation}", user_type="unknown") == 6
    assert value(registry, "application_errors_total", error_type="system", component="rag_system", user_type="unknown") == 6
    assert value(registry, "active_sessions_current", user_type="unknown") == 0


# -- data protection ---------------------------------------------------------------------------


def label_values(registry: CollectorRegistry) -> set[tuple[str, str, str]]:
    return {
        (sample.name, name, label_value)
        for family in registry.collect()
        for sample in family.samples
        for name, label_value in sample.labels.items()
    }


async def test_messages_queries_headers_and_bodies_never_become_labels(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)
    app = build_service(instrumentation)

    @tracked_external("vector_db", instrumentation=instrumentation)
    def search(question: str) -> None:
        raise ConnectionError(f"{SECRET}: cannot reach the store for {question}")

    with pytest.raises(ConnectionError):
        search(f"{SECRET} question")
    instrumentation.track_application_error(None, "api", ValueError(f"{SECRET} bad input"))
    with pytest.raises(TimeoutError), instrumentation.track_external_api_call("openai", "chat/completions"):
        raise TimeoutError(f"{SECRET} took too long")
    assert await converse(app) == expected_answers()

    labels = label_values(registry)
    leaked = {entry for entry in labels if SECRET in entry[2]}
    assert not leaked
    # The exception label is the class name, as promised.
    exceptions = {label_value for _, name, label_value in labels if name == "exception"}
    assert exceptions == {"ConnectionError", "ValueError", "TimeoutError", "ServiceError"}
    assert value(registry, "application_error_details_total", error_type="system", component="rag_system",
                 exception="ServiceError", endpoint="/chat/{conversation}", function="retrieve") == 6


async def test_user_type_from_client_data_is_held_by_the_guard() -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps={"active_sessions_current:user_type": 3})

    def from_header(scope: Any) -> str:
        # A risky resolver: the user type is whatever the client claims.
        claimed: bytes = dict(scope["headers"]).get(b"x-user", b"anonymous")
        return claimed.decode()

    app = build_service(instrumentation, user_type_resolver=from_header)
    assert await converse(app, requests=10) == expected_answers(10)

    users = {label_value for sample_name, name, label_value in label_values(registry)
             if sample_name == "active_sessions_current" and name == "user_type"}
    assert len(users) == 4 and OVERFLOW_VALUE in users
    # The last 7 sessions open and close under the folded value, one fold each.
    assert value(registry, "crowdmon_label_overflow_total", metric="active_sessions_current", label="user_type") == 7
    assert value(registry, "active_sessions_current", user_type=OVERFLOW_VALUE) == 0


# -- hostile exception objects -----------------------------------------------------------------

TRAITS = ("refuses_attributes", "attribute_lookup_fails", "str_fails", "eq_fails", "cause_cycle", "long_context_chain")


def hostile_exception(base: type[BaseException], traits: frozenset[str]) -> BaseException:
    """An exception of a class built to make error accounting fail."""
    namespace: dict[str, Any] = {}
    if "refuses_attributes" in traits:
        def __setattr__(self: BaseException, name: str, value: object) -> None:
            raise TypeError("read-only exception")
        namespace["__setattr__"] = __setattr__
    if "attribute_lookup_fails" in traits:
        def __getattribute__(self: BaseException, name: str) -> Any:
            if name.startswith("_crowdmon"):
                raise RuntimeError(f"no {name} here")
            return base.__getattribute__(self, name)
        namespace["__getattribute__"] = __getattribute__
    if "str_fails" in traits:
        namespace["__str__"] = lambda self: 1 / 0
        namespace["__repr__"] = lambda self: 1 / 0
    if "eq_fails" in traits:
        namespace["__eq__"] = lambda self, other: 1 / 0
        namespace["__hash__"] = lambda self: 1 / 0
    cls = type(f"Hostile{base.__name__}", (base,), namespace)
    error: BaseException = cls(f"{SECRET} hostile")
    if "cause_cycle" in traits:
        other = ValueError("cycle")
        BaseException.__setattr__(error, "__cause__", other)
        other.__cause__ = error
    if "long_context_chain" in traits:
        current: BaseException = error
        for depth in range(200):
            link = OSError(f"link {depth}")
            BaseException.__setattr__(current, "__context__", link)
            current = link
    return error


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([Exception, ValueError, KeyError, OSError, TimeoutError, ConnectionError, PermissionError, KeyboardInterrupt, GeneratorExit]),
    traits=st.frozensets(st.sampled_from(TRAITS)),
)
def test_any_exception_object_passes_through_and_is_counted_at_most_once(base: type[BaseException], traits: frozenset[str]) -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry)

    @tracked_errors("rag_system", instrumentation=instrumentation)
    @tracked_external("openai", "chat/completions", instrumentation=instrumentation)
    def call_out(error: BaseException) -> None:
        raise error

    error = hostile_exception(base, traits)
    for _ in range(2):
        with pytest.raises(base) as raised:
            call_out(error)
        assert raised.value is error
        if isinstance(error, Exception):
            instrumentation.track_application_error(None, "api", error)

    counted = sum(s.value for f in registry.collect() if f.name == "application_errors" for s in f.samples if s.name.endswith("_total"))
    failures = sum(s.value for f in registry.collect() if f.name == "crowdmon_internal_errors" for s in f.samples if s.name.endswith("_total"))
    exceptions = {v for f in registry.collect() for s in f.samples for n, v in s.labels.items() if n == "exception"}
    if not isinstance(error, Exception):
        assert counted == 0 and failures == 0 and exceptions == set()
    elif "attribute_lookup_fails" in traits:
        # Whether it was counted before cannot be read: a contained, counted failure instead.
        assert counted == 0 and failures >= 2
    else:
        # Once per failed call: neither the second decorator nor the tracking call after it counts
        # it again (also when its class refuses attributes: the mark goes past its __setattr__),
        # but the second call raising the same object is a failure of its own.
        assert counted == 2 and failures == 0 and exceptions == {type(error).__name__}


# -- the tracking calls ------------------------------------------------------------------------

#: Every tracking call that resolves labels through the guard: how to run it around a block
#: (None: a plain call), and the site its contained failure is counted under.
TRACKING_CALLS: dict[str, tuple[Callable[[PrometheusInstrumentation], Any], str]] = {
    "track_request_performance": (lambda i: i.track_request_performance(), "timing"),
    "track_external_api_call": (lambda i: i.track_external_api_call("openai", "chat"), "timing"),
    "track_vector_search": (lambda i: i.track_vector_search("query"), "timing"),
    "track_database_query": (lambda i: i.track_database_query("select"), "timing"),
    "track_session": (lambda i: i.track_session(), "session"),
    "start_session": (lambda i: i.start_session(), "session"),
    "end_session": (lambda i: i.end_session(), "session"),
    "track_chat_message": (lambda i: i.track_chat_message(), "track_chat_message"),
    "track_memory_operation": (lambda i: i.track_memory_operation("store", "conversation"), "track_memory_operation"),
    "track_document_operation": (lambda i: i.track_document_operation("upload", "pdf"), "track_document_operation"),
    "set_component_healthy": (lambda i: i.set_component_healthy("vector_db"), "health"),
}


@pytest.mark.parametrize("name", list(TRACKING_CALLS))
async def test_a_tracking_call_whose_recording_fails_never_raises_into_the_app(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    track, site = TRACKING_CALLS[name]
    instrumentation = PrometheusInstrumentation(registry)
    monkeypatch.setattr(instrumentation.guard, "admit", boom)
    ran = 0

    for _ in range(CALLS):
        made = track(instrumentation)
        if made is None:
            ran += 1
            continue
        with made:
            ran += 1
        failure = ServiceError("the block's own")
        with pytest.raises(ServiceError) as raised:
            async with track(instrumentation):
                raise failure
        assert raised.value is failure

    assert ran == CALLS
    assert value(registry, INTERNAL_ERRORS, site=site) == CALLS * (1 if made is None else 2)
    if name == "set_component_healthy":
        assert instrumentation.component_health() == {"vector_db": "healthy"}  # /health still knows
