"""``/health``: components' states, registered checks (sync or async, with a timeout), 503."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.to_thread
import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from crowdmon import CrowdmonSetupError, HealthApp, PrometheusInstrumentation, setup_monitoring
from tests.support import uvicorn_in_thread, value


def served(registry: CollectorRegistry) -> tuple[Starlette, PrometheusInstrumentation]:
    app = Starlette()
    return app, setup_monitoring(app, registry=registry)


def status_of(registry: CollectorRegistry, component: str) -> str:
    states = [
        state
        for state in ("healthy", "degraded", "unhealthy", "unknown")
        if value(registry, "component_health_status", component=component, status=state) == 1
    ]
    assert len(states) == 1, states
    return states[0]


def test_health_lists_components_and_is_healthy_without_any(registry: CollectorRegistry) -> None:
    app, monitoring = served(registry)
    with uvicorn_in_thread(app) as base_url:
        empty = httpx.get(base_url + "/health")
        monitoring.register_component("rag_system")
        monitoring.register_component("auth0")
        monitoring.set_component_degraded("auth0")
        degraded = httpx.get(base_url + "/health")
        monitoring.set_component_unhealthy("rag_system")
        unhealthy = httpx.get(base_url + "/health")
        head = httpx.head(base_url + "/health")

    assert (empty.status_code, empty.json()) == (200, {"status": "healthy", "components": {}})
    assert (degraded.status_code, degraded.json()) == (
        200, {"status": "degraded", "components": {"rag_system": "unknown", "auth0": "degraded"}}
    )
    assert unhealthy.status_code == 503
    assert unhealthy.json()["status"] == "unhealthy"
    assert (head.status_code, head.content) == (503, b"")


def test_registered_checks_run_on_each_request_and_set_component_health(registry: CollectorRegistry) -> None:
    app, monitoring = served(registry)
    database_up = threading.Event()
    database_up.set()
    check_threads: list[str] = []

    def database() -> bool:
        check_threads.append(threading.current_thread().name)
        return database_up.is_set()

    async def vector_store() -> str:
        await asyncio.sleep(0)
        return "degraded"

    async def cache() -> None:
        return None

    monitoring.register_health_check("database", database)
    monitoring.register_health_check("vector_store", vector_store)
    monitoring.register_health_check("cache", cache)
    assert status_of(registry, "database") == "unknown"

    with uvicorn_in_thread(app) as base_url:
        first = httpx.get(base_url + "/health")
        database_up.clear()
        second = httpx.get(base_url + "/health")

    assert (first.status_code, first.json()["components"]) == (
        200, {"database": "healthy", "vector_store": "degraded", "cache": "healthy"}
    )
    assert first.json()["status"] == "degraded"
    assert second.status_code == 503
    assert second.json()["failures"] == {"database": "check returned False", "vector_store": "check returned 'degraded'"}
    assert status_of(registry, "database") == "unhealthy"
    assert status_of(registry, "vector_store") == "degraded"
    assert status_of(registry, "cache") == "healthy"
    # A sync check runs in a worker thread, never blocking the event loop.
    assert all(name != "MainThread" for name in check_threads) and len(check_threads) == 2


def test_a_check_that_raises_or_times_out_makes_its_component_unhealthy(registry: CollectorRegistry) -> None:
    app, monitoring = served(registry)

    async def hangs() -> bool:
        await asyncio.sleep(30)
        return True

    release = threading.Event()

    def blocks() -> bool:
        release.wait(30)  # held until the test has its answer: /health must not wait for it
        return True

    def raises() -> bool:
        raise ConnectionError("postgres://admin:secret@db refused")

    monitoring.register_health_check("llm", hangs, timeout=0.2)
    monitoring.register_health_check("stripe", blocks, timeout=0.2)
    monitoring.register_health_check("database", raises)

    with uvicorn_in_thread(app) as base_url:
        try:
            response = httpx.get(base_url + "/health", timeout=10)
        finally:
            release.set()

    assert response.status_code == 503
    assert response.json()["failures"] == {
        "llm": "timed out after 0.2 s",
        "stripe": "timed out after 0.2 s",
        "database": "raised ConnectionError",
    }
    assert "secret" not in response.text
    assert [status_of(registry, name) for name in ("llm", "stripe", "database")] == ["unhealthy"] * 3


async def test_a_failing_check_is_logged_when_it_starts_failing_not_at_every_probe(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    monitoring = PrometheusInstrumentation(registry)
    answers = iter([RuntimeError("down"), RuntimeError("down"), RuntimeError("down"), False, RuntimeError("down again"), RuntimeError("down again")])

    async def database() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monitoring.register_health_check("database", database)
    app = HealthApp(monitoring)
    with caplog.at_level("WARNING", logger="crowdmon"):
        statuses = [(await health(app))[0] for _ in range(5)]
        monitoring.register_health_check("database", database)  # registered again: a new check
        statuses.append((await health(app))[0])

    assert statuses == [503] * 6
    logged = [record for record in caplog.records if "health check for 'database' failed" in record.getMessage()]
    assert [str(record.exc_info[1]) for record in logged if record.exc_info] == ["down", "down again", "down again"]


def test_components_past_the_cap_are_on_health_but_not_folded_into_one_gauge() -> None:
    """One ``<other>`` series cannot be one-hot for several components: past the cap a
    component's state is on /health only, and the fold is counted."""
    registry = CollectorRegistry()
    monitoring = PrometheusInstrumentation(registry, cardinality_caps={"component_health_status:component": 2})
    monitoring.set_component_healthy("database")
    monitoring.set_component_healthy("openai")
    monitoring.set_component_unhealthy("vector_store")
    monitoring.set_component_healthy("stripe")

    assert monitoring.component_health() == {"database": "healthy", "openai": "healthy", "vector_store": "unhealthy", "stripe": "healthy"}
    assert status_of(registry, "database") == "healthy"
    assert [registry.get_sample_value("component_health_status", {"component": "<other>", "status": state}) for state in ("healthy", "unhealthy")] == [None, None]
    assert value(registry, "crowdmon_label_overflow_total", metric="component_health_status", label="component") == 2


def test_components_are_named_by_non_empty_strings(instrumentation: PrometheusInstrumentation) -> None:
    for call in (instrumentation.register_component, instrumentation.set_component_healthy, instrumentation.set_component_unhealthy):
        for component in (None, "", 42):
            with pytest.raises(CrowdmonSetupError, match="a component is named by a non-empty string"):
                call(component)  # type: ignore[arg-type]
    assert instrumentation.component_health() == {}


async def test_a_sync_check_exiting_its_thread_has_failed_for_every_probe_it_holds(registry: CollectorRegistry) -> None:
    """``SystemExit`` in a worker thread ends only that thread: the check failed, the server
    goes on, and the probes that shared the run see the same failure."""
    monitoring = PrometheusInstrumentation(registry)

    def database() -> bool:
        time.sleep(0.2)
        raise SystemExit(3)

    monitoring.register_health_check("database", database)
    app = HealthApp(monitoring)

    answers = await asyncio.gather(health(app), health(app))

    failed = {"status": "unhealthy", "components": {"database": "unhealthy"}, "failures": {"database": "raised SystemExit"}}
    assert answers == [(503, failed)] * 2
    assert status_of(registry, "database") == "unhealthy"


def _yielding_check() -> Iterator[bool]:
    yield True


async def _async_yielding_check() -> AsyncIterator[bool]:
    yield True


@pytest.mark.parametrize(
    ("component", "check", "timeout", "message"),
    [
        ("db", "SELECT 1", 1.0, "must be a callable"),
        ("db", lambda: True, 0, "positive, finite number of seconds, got 0"),
        ("db", lambda: True, "5", "positive, finite number of seconds, got '5'"),
        ("db", lambda: True, float("nan"), "positive, finite number of seconds, got nan"),
        ("db", lambda: True, float("inf"), "positive, finite number of seconds, got inf"),
        ("", lambda: True, 1.0, "non-empty string"),
        (None, lambda: True, 1.0, "non-empty string such as 'database', got None"),
        ("db", lambda connection: True, 1.0, "cannot be called so (missing a required argument: 'connection')"),
        ("db", _yielding_check, 1.0, "return, do not yield"),
        ("db", _async_yielding_check, 1.0, "return, do not yield"),
    ],
)
def test_bad_health_checks_fail_at_registration(
    component: str, check: object, timeout: object, message: str, instrumentation: PrometheusInstrumentation
) -> None:
    with pytest.raises(CrowdmonSetupError) as raised:
        instrumentation.register_health_check(component, check, timeout=timeout)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_a_hung_sync_check_holds_one_thread_not_one_per_request(registry: CollectorRegistry) -> None:
    app, monitoring = served(registry)
    release = threading.Event()
    lock = threading.Lock()
    started = [0]

    def hangs() -> bool:
        with lock:
            started[0] += 1
        release.wait(30)
        return True

    monitoring.register_health_check("database", hangs, timeout=0.05)
    with uvicorn_in_thread(app) as base_url:
        try:
            answers = [httpx.get(base_url + "/health", timeout=10) for _ in range(4)]
            # Registered again (a start-up hook run twice): it waits for the same run too.
            monitoring.register_health_check("database", hangs, timeout=0.05)
            answers.append(httpx.get(base_url + "/health", timeout=10))
            started_while_hung = started[0]
        finally:
            release.set()
        recovered = 0
        for _ in range(100):  # once the thread has returned, the next request runs the check again
            recovered = httpx.get(base_url + "/health", timeout=10).status_code
            if recovered == 200:
                break

    assert [answer.status_code for answer in answers] == [503] * 5
    assert answers[0].json()["failures"] == {"database": "timed out after 0.05 s"}
    # Later requests wait for the run under way, within their own timeout: no second thread.
    assert answers[4].json()["failures"] == {"database": "timed out after 0.05 s"}
    assert started_while_hung == 1
    assert recovered == 200


async def health(app: HealthApp) -> tuple[int, dict[str, object]]:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/health")
    return response.status_code, response.json()


async def test_probes_at_the_same_moment_share_one_run_of_a_sync_check(registry: CollectorRegistry) -> None:
    monitoring = PrometheusInstrumentation(registry)
    runs = [0]

    def database() -> bool:  # healthy, and slow enough for the probes to overlap
        runs[0] += 1
        time.sleep(0.2)
        return True

    monitoring.register_health_check("database", database)
    app = HealthApp(monitoring)

    answers = await asyncio.gather(health(app), health(app), health(app))

    assert answers == [(200, {"status": "healthy", "components": {"database": "healthy"}})] * 3
    assert runs == [1]


async def test_a_sync_check_that_never_got_a_thread_runs_again_at_the_next_request(registry: CollectorRegistry) -> None:
    monitoring = PrometheusInstrumentation(registry)
    monitoring.register_health_check("database", lambda: True, timeout=0.2)
    app = HealthApp(monitoring)
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 2
    try:
        async with anyio.create_task_group() as busy:  # the app's own sync work holds every thread
            for _ in range(2):
                busy.start_soon(anyio.to_thread.run_sync, time.sleep, 0.6)
            await anyio.sleep(0.05)
            starved = await health(app)
        recovered = await health(app)
    finally:
        limiter.total_tokens = tokens

    assert starved[0] == 503 and starved[1]["failures"] == {"database": "timed out after 0.2 s"}
    assert recovered == (200, {"status": "healthy", "components": {"database": "healthy"}})


async def test_a_check_raising_a_cancellation_of_its_own_has_failed(registry: CollectorRegistry) -> None:
    monitoring = PrometheusInstrumentation(registry)
    elsewhere = asyncio.ensure_future(asyncio.sleep(60))
    elsewhere.cancel()

    async def cache() -> bool:
        return await elsewhere  # cancelled by someone else: raises CancelledError here

    async def database() -> bool:
        return False

    monitoring.register_health_check("cache", cache)
    monitoring.register_health_check("database", database)

    status, document = await health(HealthApp(monitoring))

    assert status == 503
    assert document["failures"] == {"cache": "raised CancelledError", "database": "check returned False"}
    assert status_of(registry, "database") == "unhealthy"


async def test_a_sync_check_returning_a_coroutine_gives_each_probe_a_coroutine_of_its_own(registry: CollectorRegistry) -> None:
    monitoring = PrometheusInstrumentation(registry)
    pings = [0]

    async def ping() -> bool:
        pings[0] += 1
        await asyncio.sleep(0.2)  # slow enough for the probes to overlap
        return True

    monitoring.register_health_check("database", lambda: ping())
    app = HealthApp(monitoring)

    answers = await asyncio.gather(health(app), health(app), health(app))

    assert answers == [(200, {"status": "healthy", "components": {"database": "healthy"}})] * 3
    assert pings == [3]  # a coroutine can be awaited once


async def test_a_hung_coroutine_of_a_sync_check_fails_every_probe_it_holds_and_not_the_next(registry: CollectorRegistry) -> None:
    monitoring = PrometheusInstrumentation(registry)
    backend_up = [False]

    async def ping() -> bool:
        if not backend_up[0]:
            await asyncio.Event().wait()  # hangs while the backend is down
        return True

    monitoring.register_health_check("database", lambda: ping(), timeout=0.3)
    app = HealthApp(monitoring)

    first, second = await asyncio.gather(health(app), health(app))
    backend_up[0] = True
    third = await health(app)

    timed_out = (503, {"status": "unhealthy", "components": {"database": "unhealthy"}, "failures": {"database": "timed out after 0.3 s"}})
    assert (first, second) == (timed_out, timed_out)
    assert third == (200, {"status": "healthy", "components": {"database": "healthy"}})


async def test_a_timeout_error_the_check_raises_is_its_own_failure_not_the_deadline(registry: CollectorRegistry) -> None:
    monitoring = PrometheusInstrumentation(registry)

    async def database() -> bool:
        raise TimeoutError("socket timed out")

    monitoring.register_health_check("database", database, timeout=5)

    assert await health(HealthApp(monitoring)) == (
        503, {"status": "unhealthy", "components": {"database": "unhealthy"}, "failures": {"database": "raised TimeoutError"}},
    )


async def test_an_answer_agrees_with_its_own_failures_when_a_later_probe_finishes_first(registry: CollectorRegistry) -> None:
    """Probe 1 finds the API down and waits for a slow check; meanwhile probe 2 finds it up.
    Probe 1 answers with what it found, not with the state probe 2 set."""
    monitoring = PrometheusInstrumentation(registry)
    api_answers = [False, True]
    slow_release = asyncio.Event()
    api_checked = [asyncio.Event(), asyncio.Event()]

    async def api() -> bool:
        answer = api_answers.pop(0)
        api_checked[0 if not answer else 1].set()
        return answer

    async def slow() -> bool:
        await slow_release.wait()
        return True

    monitoring.register_health_check("api", api)
    monitoring.register_health_check("slow", slow)
    app = HealthApp(monitoring)

    first = asyncio.ensure_future(health(app))
    await api_checked[0].wait()
    second = asyncio.ensure_future(health(app))
    await api_checked[1].wait()
    slow_release.set()

    assert await first == (503, {"status": "unhealthy", "components": {"api": "unhealthy", "slow": "healthy"}, "failures": {"api": "check returned False"}})
    assert await second == (200, {"status": "healthy", "components": {"api": "healthy", "slow": "healthy"}})
