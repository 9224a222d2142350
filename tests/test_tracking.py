"""The seed's tracking API, on an instrumentation and as module-level functions, and the request
context that supplies ``endpoint`` and ``user_type``."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import sqlite3
import threading
import time
import warnings
from typing import Any

import httpx
import numpy
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import crowdmon
from crowdmon import PrometheusInstrumentation, setup_monitoring, tracked_chat, tracked_errors
from crowdmon.testing import isolated_instrumentation
from tests.support import scraped, uvicorn_in_thread, value


def test_context_managers_work_with_with_and_async_with(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    with instrumentation.track_request_performance("/chat", "authenticated"):
        pass
    with instrumentation.track_vector_search("similarity_search"):
        pass

    async def asynchronous() -> None:
        async with instrumentation.track_database_query("select"):
            await asyncio.sleep(0)
        async with instrumentation.track_external_api_call("openai", "chat/completions"):
            await asyncio.sleep(0)

    asyncio.run(asynchronous())

    assert value(registry, "chat_processing_duration_seconds_count", endpoint="/chat", user_type="authenticated") == 1
    assert value(registry, "vector_search_duration_seconds_count", operation="similarity_search") == 1
    assert value(registry, "database_query_duration_seconds_count", operation="select") == 1
    assert value(registry, "external_api_duration_seconds_count", service="openai", endpoint="chat/completions", outcome="success") == 1


def test_external_call_context_manager_follows_the_outcome_rule(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    error = ConnectionError("reset")
    with pytest.raises(ConnectionError) as raised, instrumentation.track_external_api_call("openai", "embeddings"):
        raise error

    async def cancelled() -> None:
        async def call() -> None:
            async with instrumentation.track_external_api_call("openai", "embeddings"):
                await asyncio.sleep(30)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    with pytest.raises(KeyboardInterrupt), instrumentation.track_external_api_call("openai", "embeddings"):
        raise KeyboardInterrupt

    def durations(outcome: str) -> float:
        return value(registry, "external_api_duration_seconds_count", service="openai", endpoint="embeddings", outcome=outcome)

    assert raised.value is error
    assert (durations("success"), durations("error"), durations("cancelled")) == (0, 1, 1)
    assert value(registry, "external_service_errors_total", service="openai", endpoint="embeddings", exception="ConnectionError") == 1


def test_business_counters(registry: CollectorRegistry, instrumentation: PrometheusInstrumentation) -> None:
    instrumentation.track_chat_message(user_type="authenticated", message_type="assistant", cache_hit=True, rag_used=True)
    instrumentation.track_chat_message("authenticated", "assistant", True, True)
    instrumentation.track_memory_operation("store", "conversation", "authenticated")
    instrumentation.track_document_operation("add", "eu_crowdfunding", "success")

    assert value(
        registry, "chat_messages_total", user_type="authenticated", message_type="assistant", cache_hit="true", rag_used="true"
    ) == 2
    assert value(registry, "memory_operations_total", operation="store", memory_type="conversation", user_type="authenticated") == 1
    assert value(registry, "document_operations_total", operation="add", document_type="eu_crowdfunding", status="success") == 1


def test_yes_or_no_labels_read_numpy_and_database_booleans_as_true_and_false(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    scores = numpy.array([0.93, 0.2], dtype=numpy.float32)
    with sqlite3.connect(":memory:") as database:
        cached, retrieved = database.execute("SELECT 1 = 1, 1 = 2").fetchone()
    instrumentation.track_chat_message("authenticated", "assistant", cache_hit=scores[0] > 0.9, rag_used=scores[1] > 0.9)
    instrumentation.track_chat_message("authenticated", "assistant", cache_hit=cached, rag_used=retrieved)
    instrumentation.track_chat_message("authenticated", "assistant", cache_hit=scores > 0.9, rag_used="maybe")

    def messages(cache_hit: str, rag_used: str) -> float:
        return value(
            registry, "chat_messages_total", user_type="authenticated", message_type="assistant", cache_hit=cache_hit, rag_used=rag_used
        )

    assert messages("true", "false") == 2
    # An array has no single truth: written as it is, never raised.
    assert messages("[ True False]", "maybe") == 1


@pytest.mark.parametrize(
    ("error_type", "category_metric", "category_labels"),
    [
        ("auth", "auth_errors_total", {"component": "chat_endpoint"}),
        ("database", "database_errors_total", {"component": "chat_endpoint"}),
        ("ai_system", "ai_system_errors_total", {"component": "chat_endpoint"}),
        ("session", "session_errors_total", {"component": "chat_endpoint"}),
        ("external_service", "external_service_errors_total", {"service": "chat_endpoint", "endpoint": "/chat"}),
        ("validation", None, {}),
        ("system", None, {}),
    ],
)
def test_track_application_error_feeds_the_totals_details_and_category_counter(
    error_type: str,
    category_metric: str | None,
    category_labels: dict[str, str],
    registry: CollectorRegistry,
    instrumentation: PrometheusInstrumentation,
) -> None:
    instrumentation.track_application_error(
        error_type=error_type, component="chat_endpoint", error=LookupError("secret user text"),
        user_type="authenticated", endpoint="/chat", function="chat",
    )

    assert value(registry, "application_errors_total", error_type=error_type, component="chat_endpoint", user_type="authenticated") == 1
    assert value(
        registry, "application_error_details_total", error_type=error_type, component="chat_endpoint",
        exception="LookupError", endpoint="/chat", function="chat",
    ) == 1
    if category_metric is not None:
        assert value(registry, category_metric, exception="LookupError", **category_labels) == 1


def test_track_application_error_classifies_when_no_error_type_is_given_and_is_not_counted_twice(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="db_layer", instrumentation=instrumentation)
    def save() -> None:
        try:
            raise sqlite3.OperationalError("locked")
        except sqlite3.Error as error:
            instrumentation.track_application_error(None, "repository", error, function="save")
            raise

    with pytest.raises(sqlite3.OperationalError):
        save()

    # Counted by the explicit call; the decorator it then passed through does not count it again.
    assert value(registry, "database_errors_total", component="repository", exception="OperationalError") == 1
    assert value(registry, "database_errors_total", component="db_layer", exception="OperationalError") == 0


def test_an_unknown_error_type_at_call_time_is_recorded_as_system_and_reported_not_raised(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        instrumentation.track_application_error("netwrok", "chat", KeyError("k"))

    assert value(registry, "application_errors_total", error_type="system", component="chat", user_type="unknown") == 1
    assert value(registry, "crowdmon_internal_errors_total", site="track_application_error") == 1
    assert "error_type must be one of" in caplog.text


def test_sessions_explicit_and_as_a_context_manager_always_come_back_down(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    def active() -> float:
        return value(registry, "active_sessions_current", user_type="authenticated")

    instrumentation.start_session("authenticated")
    instrumentation.start_session("authenticated")
    instrumentation.end_session("authenticated")
    assert active() == 1
    with pytest.raises(ValueError), instrumentation.track_session("authenticated"):
        assert active() == 2
        raise ValueError("session failed")
    assert active() == 1

    async def in_async() -> float:
        async with instrumentation.track_session("authenticated"):
            return active()

    assert asyncio.run(in_async()) == 2
    assert active() == 1


def test_component_health_is_one_hot_and_starts_unknown(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    instrumentation.register_component("rag_system")
    instrumentation.register_component("auth0")
    instrumentation.set_component_degraded("auth0")

    def states(component: str) -> dict[str, float]:
        return {
            state: value(registry, "component_health_status", component=component, status=state)
            for state in ("healthy", "degraded", "unhealthy", "unknown")
        }

    assert states("rag_system") == {"healthy": 0, "degraded": 0, "unhealthy": 0, "unknown": 1}
    assert states("auth0") == {"healthy": 0, "degraded": 1, "unhealthy": 0, "unknown": 0}
    instrumentation.set_component_unhealthy("auth0")
    instrumentation.set_component_healthy("rag_system")
    assert instrumentation.component_health() == {"rag_system": "healthy", "auth0": "unhealthy"}
    with pytest.raises(ValueError, match="health state must be one of"):
        instrumentation.set_component_health("auth0", "sick")


def test_module_level_functions_record_into_the_default_instrumentation() -> None:
    with isolated_instrumentation() as default:
        registry = default.registry
        crowdmon.track_chat_message("anonymous", "user")
        crowdmon.track_memory_operation("retrieve", "conversation", "anonymous")
        crowdmon.track_document_operation("delete", "eu_crowdfunding", "error")
        crowdmon.track_application_error("auth", "auth0", PermissionError())
        with crowdmon.track_request_performance("/chat", "anonymous"):
            pass
        with crowdmon.track_external_api_call("stripe", "charges"):
            pass
        with crowdmon.track_vector_search("upsert"), crowdmon.track_database_query("insert"):
            pass
        crowdmon.start_session("anonymous")
        with crowdmon.track_session("anonymous"):
            sessions_inside = value(registry, "active_sessions_current", user_type="anonymous")
        crowdmon.end_session("anonymous")
        crowdmon.register_component("vector_store")
        crowdmon.set_component_degraded("vector_store")
        health = crowdmon.component_health()

    assert value(registry, "chat_messages_total", user_type="anonymous", message_type="user", cache_hit="false", rag_used="false") == 1
    assert value(registry, "memory_operations_total", operation="retrieve", memory_type="conversation", user_type="anonymous") == 1
    assert value(registry, "document_operations_total", operation="delete", document_type="eu_crowdfunding", status="error") == 1
    assert value(registry, "auth_errors_total", component="auth0", exception="PermissionError") == 1
    assert value(registry, "chat_processing_duration_seconds_count", endpoint="/chat", user_type="anonymous") == 1
    assert value(registry, "external_api_duration_seconds_count", service="stripe", endpoint="charges", outcome="success") == 1
    assert value(registry, "vector_search_duration_seconds_count", operation="upsert") == 1
    assert value(registry, "database_query_duration_seconds_count", operation="insert") == 1
    assert sessions_inside == 2
    assert value(registry, "active_sessions_current", user_type="anonymous") == 0
    assert health == {"vector_store": "degraded"}


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if "x-user" in conn.headers:
            return AuthCredentials(["authenticated"]), SimpleUser(conn.headers["x-user"])
        return None


def test_request_context_supplies_endpoint_and_user_type_from_the_default_resolver() -> None:
    """A decorator applied before the app is set up lands on that app's /metrics."""
    with isolated_instrumentation():

        @tracked_chat()
        @tracked_errors(component="chat_endpoint")
        async def answer(question: str) -> str:
            crowdmon.track_chat_message(message_type="user")
            if question == "fail":
                raise PermissionError("not yours")
            return "ok"

        async def chat(request: Request) -> Response:
            try:
                return JSONResponse({"answer": await answer(request.path_params["question"])})
            except PermissionError:
                return JSONResponse({}, status_code=403)

        app = Starlette(
            routes=[Route("/chat/{question}", chat)],
            middleware=[Middleware(AuthenticationMiddleware, backend=HeaderAuth())],
        )
        setup_monitoring(app)
        with uvicorn_in_thread(app) as base_url:
            httpx.get(f"{base_url}/chat/hello", headers={"x-user": "ann"})
            httpx.get(f"{base_url}/chat/hello")
            httpx.get(f"{base_url}/chat/fail")
            scrape = httpx.get(f"{base_url}/metrics").text

    assert scraped(scrape, "chat_processing_duration_seconds_count", endpoint="/chat/{question}", user_type="authenticated") == 1
    assert scraped(scrape, "chat_processing_duration_seconds_count", endpoint="/chat/{question}", user_type="anonymous") == 2
    assert scraped(scrape, "chat_messages_total", user_type="anonymous", message_type="user", cache_hit="false", rag_used="false") == 2
    assert scraped(
        scrape, "application_error_details_total", error_type="auth", component="chat_endpoint",
        exception="PermissionError", endpoint="/chat/{question}", function="answer",
    ) == 1
    assert scraped(scrape, "application_errors_total", error_type="auth", component="chat_endpoint", user_type="anonymous") == 1


def test_user_type_resolver_passed_to_setup_monitoring_and_its_failures_contained() -> None:
    registry = CollectorRegistry()

    def plan_of(scope: dict[str, object]) -> str:
        for name, header in scope["headers"]:  # type: ignore[attr-defined]
            if name == b"x-plan":
                if header == b"broken":
                    raise LookupError("no such plan")
                return str(header.decode())
        return "free"

    monitoring: PrometheusInstrumentation

    async def chat(request: Request) -> Response:
        monitoring.track_chat_message(message_type="user")
        with monitoring.track_request_performance():
            pass
        return JSONResponse({"ok": True})

    async def plan(request: Request) -> Response:  # the app asks first
        return JSONResponse({"plan": crowdmon.current_user_type()})

    app = Starlette(routes=[Route("/chat", chat), Route("/plan", plan)])
    monitoring = setup_monitoring(app, registry=registry, user_type_resolver=plan_of)
    with uvicorn_in_thread(app) as base_url:
        statuses = [
            httpx.get(f"{base_url}/chat", headers=headers).status_code
            for headers in ({"x-plan": "premium"}, {}, {"x-plan": "broken"})
        ]
        asked = httpx.get(f"{base_url}/plan", headers={"x-plan": "broken"})

    def messages(user_type: str) -> float:
        return value(registry, "chat_messages_total", user_type=user_type, message_type="user", cache_hit="false", rag_used="false")

    assert statuses == [200, 200, 200]
    assert (messages("premium"), messages("free"), messages("unknown")) == (1, 1, 1)
    assert value(registry, "chat_processing_duration_seconds_count", endpoint="/chat", user_type="premium") == 1
    # The broken request asked its resolver once: two reads of the user type, one failure; so
    # did the one whose app asked first, through current_user_type().
    assert (asked.status_code, asked.json()) == (200, {"plan": "unknown"})
    assert value(registry, "crowdmon_internal_errors_total", site="user_type_resolver") == 2


def test_a_resolver_answering_nothing_or_an_awaitable_gives_unknown_and_an_async_one_is_refused() -> None:
    registry = CollectorRegistry()

    class Plan(enum.Enum):
        PREMIUM = "premium"

    async def lookup(plan: bytes) -> str:
        return plan.decode()

    def plan_of(scope: dict[str, Any]) -> object:
        plan = dict(scope["headers"]).get(b"x-plan", b"")
        answers: dict[bytes, object] = {b"": None, b"blank": "", b"enum": Plan.PREMIUM, b"tier": 2}
        # A plain function handing back an async lookup's coroutine, by mistake.
        return answers[plan] if plan in answers else lookup(plan)

    async def plan(request: Request) -> Response:
        return JSONResponse({"plan": crowdmon.current_user_type()})

    app = Starlette(routes=[Route("/plan", plan)])
    setup_monitoring(app, registry=registry, user_type_resolver=plan_of)
    with uvicorn_in_thread(app) as base_url, warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed, never left unawaited
        answers = [
            httpx.get(f"{base_url}/plan", headers=headers).json()["plan"]
            for headers in ({}, {"x-plan": "blank"}, {"x-plan": "enum"}, {"x-plan": "tier"}, {"x-plan": "gold"})
        ]

    assert answers == ["unknown", "unknown", "premium", "2", "unknown"]
    assert value(registry, "crowdmon_internal_errors_total", site="user_type_resolver") == 1

    async def async_plan(scope: dict[str, Any]) -> str:
        return "premium"

    class AsyncResolver:
        async def __call__(self, scope: dict[str, Any]) -> str:
            return "premium"

    for resolver in (async_plan, functools.partial(async_plan), AsyncResolver()):
        for option in ("user_type_resolver", "handler_resolver"):
            with pytest.raises(crowdmon.CrowdmonSetupError, match=f"{option} must be a plain function returning the label, not an async one"):
                setup_monitoring(Starlette(), registry=CollectorRegistry(), **{option: resolver})


def test_a_request_that_hands_work_to_threads_asks_its_resolver_once() -> None:
    """``asyncio.to_thread`` workers share the request's context: the first to need the user type
    asks the resolver, the others wait for its answer."""
    registry = CollectorRegistry()
    asked: list[str] = []

    def slow_plan(scope: dict[str, object]) -> str:
        asked.append(threading.current_thread().name)
        time.sleep(0.05)  # a lookup of the user's plan
        return "premium"

    monitoring: PrometheusInstrumentation

    def store(index: int) -> None:
        monitoring.track_chat_message(message_type="user")

    async def fan_out(request: Request) -> Response:
        await asyncio.gather(*(asyncio.to_thread(store, index) for index in range(4)))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/fan-out", fan_out)])
    monitoring = setup_monitoring(app, registry=registry, user_type_resolver=slow_plan)
    with uvicorn_in_thread(app) as base_url:
        assert httpx.get(f"{base_url}/fan-out").status_code == 200

    assert len(asked) == 1
    assert value(registry, "chat_messages_total", user_type="premium", message_type="user", cache_hit="false", rag_used="false") == 4


def test_a_resolver_that_blocks_holds_up_only_its_own_request() -> None:
    """While one request's resolver waits (in the threadpool, for a sync endpoint), another
    request asking for its own user type on the event loop is answered at once."""
    registry = CollectorRegistry()
    release = threading.Event()

    def plan_of(scope: dict[str, object]) -> str:
        if scope["path"] == "/slow":
            release.wait(10)  # a lookup that hangs
        return "premium" if scope["path"] == "/slow" else "free"

    def slow(request: Request) -> Response:
        return JSONResponse({"user_type": crowdmon.current_user_type()})

    async def fast(request: Request) -> Response:
        return JSONResponse({"user_type": crowdmon.current_user_type()})

    app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])
    setup_monitoring(app, registry=registry, user_type_resolver=plan_of)
    with uvicorn_in_thread(app) as base_url, httpx.Client(base_url=base_url, timeout=5) as client:
        waiting = threading.Thread(target=lambda: client.get("/slow"))
        waiting.start()
        try:
            deadline = time.monotonic() + 5
            while value(registry, "crowdfunding_api_requests_in_progress", method="GET") != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert client.get("/fast").json() == {"user_type": "free"}  # before the slow one ends
            assert not release.is_set()
        finally:
            release.set()
            waiting.join(10)


def test_a_failing_resolver_is_counted_where_the_call_that_asked_records() -> None:
    """A tracking call into another registry than the middleware's counts the failure there;
    the app asking through current_user_type() is counted by the request's middleware."""
    served, other = CollectorRegistry(), CollectorRegistry()
    elsewhere = PrometheusInstrumentation(other)

    def broken(scope: dict[str, object]) -> str:
        raise LookupError("no such plan")

    async def chat(request: Request) -> Response:
        elsewhere.track_chat_message(message_type="user")
        return JSONResponse({"ok": True})

    async def plan(request: Request) -> Response:
        return JSONResponse({"plan": crowdmon.current_user_type()})

    app = Starlette(routes=[Route("/chat", chat), Route("/plan", plan)])
    setup_monitoring(app, registry=served, user_type_resolver=broken)
    with uvicorn_in_thread(app) as base_url:
        assert httpx.get(f"{base_url}/chat").status_code == 200
        assert httpx.get(f"{base_url}/plan").json() == {"plan": "unknown"}

    def failures(registry: CollectorRegistry) -> float:
        return value(registry, "crowdmon_internal_errors_total", site="user_type_resolver")

    assert (failures(other), failures(served)) == (1, 1)
    assert value(other, "chat_messages_total", user_type="unknown", message_type="user", cache_hit="false", rag_used="false") == 1


def test_a_resolver_asking_its_own_request_gets_unknown_once_not_a_recursion(registry: CollectorRegistry) -> None:
    asked: list[str | None] = []

    def plan_of(scope: dict[str, object]) -> str:
        asked.append(crowdmon.current_user_type())  # its own request's: no answer yet
        return "premium"

    async def plan(request: Request) -> Response:
        return JSONResponse({"plan": crowdmon.current_user_type()})

    app = Starlette(routes=[Route("/plan", plan)])
    setup_monitoring(app, registry=registry, user_type_resolver=plan_of)
    with uvicorn_in_thread(app) as base_url:
        assert httpx.get(f"{base_url}/plan").json() == {"plan": "premium"}

    assert asked == ["unknown"]
    assert value(registry, "crowdmon_internal_errors_total", site="user_type_resolver") == 0


def test_resolvers_asking_each_others_request_do_not_wait_for_each_other() -> None:
    """Request a's resolver asks b's user type while b's asks a's: neither waits for the other
    (they would wait for good); the one that finds the other resolving gets ``unknown``."""
    from crowdmon.context import RequestContext

    class Request_(RequestContext):
        def __init__(self, name: str, resolver: Any) -> None:
            self.scope, self.user_type_resolver, self._user_type = {"name": name}, resolver, None
            self.entry_root_path, self._endpoint = "", "/"

    both_resolving = threading.Barrier(2)

    def ask_the_other(scope: dict[str, str]) -> str:
        both_resolving.wait(5)
        return scope["name"] + "+" + (b if scope["name"] == "a" else a).user_type()

    a, b = Request_("a", ask_the_other), Request_("b", ask_the_other)
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda r=r, n=n: answers.__setitem__(n, r.user_type()), daemon=True) for n, r in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert not any(thread.is_alive() for thread in threads)
    assert sorted(answers.values()) in (["a+b+unknown", "b+unknown"], ["a+unknown", "b+a+unknown"], ["a+unknown", "b+unknown"])

    # In one thread: a's resolver asks b's, whose resolver asks a's again, which has no answer
    # yet. Each resolver runs once, and nothing recurses.
    calls: list[str] = []

    def ask_the_other_once(scope: dict[str, str]) -> str:
        calls.append(scope["name"])
        return scope["name"] + "+" + (d if scope["name"] == "c" else c).user_type()

    c, d = Request_("c", ask_the_other_once), Request_("d", ask_the_other_once)
    assert (c.user_type(), d.user_type(), calls) == ("c+d+unknown", "d+unknown", ["c", "d"])


def test_outside_a_request_endpoint_and_user_type_are_unknown(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    assert crowdmon.current_endpoint() is None
    assert crowdmon.current_user_type() is None
    with instrumentation.track_request_performance():
        pass
    assert value(registry, "chat_processing_duration_seconds_count", endpoint="unknown", user_type="unknown") == 1


def test_demo_traffic_gives_every_metric_family_of_the_catalogue_data() -> None:
    from crowdmon.catalogue import CATALOGUE
    from crowdmon.demo import DEMO_CARDINALITY_CAPS, build_demo_app, generate_traffic

    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps=DEMO_CARDINALITY_CAPS)
    app = build_demo_app(instrumentation)

    def families_without_data() -> list[str]:
        seen = {sample.name for family in registry.collect() for sample in family.samples}
        return [
            item.name for item in CATALOGUE
            if not any(name == item.name or name.startswith(item.name.removesuffix("_total") + "_") for name in seen)
        ]

    async def drive(base_url: str) -> list[str]:
        traffic = asyncio.create_task(generate_traffic(base_url, rate=50))
        try:
            for _ in range(60):  # at most ~15 s; the opening requests need about one
                await asyncio.sleep(0.25)
                missing = families_without_data()
                if not missing:
                    break
        finally:
            traffic.cancel()
            with pytest.raises(asyncio.CancelledError):
                await traffic
        return missing

    with uvicorn_in_thread(app) as base_url:
        missing = asyncio.run(drive(base_url))
        health = httpx.get(base_url + "/health")

    assert missing == []
    assert set(health.json()["components"]) == {"database", "vector_store", "openai", "rag_system", "auth0"}
