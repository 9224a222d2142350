"""What decorated functions keep (signature, name, inspect answers, types), what every decorator
records, and the mistakes that fail at decoration time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import textwrap
import warnings
from collections.abc import AsyncIterator, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import crowdmon
from crowdmon import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    instrumented_metrics,
    tracked_chat,
    tracked_database_query,
    tracked_document_operation,
    tracked_errors,
    tracked_external,
    tracked_memory_operation,
    tracked_session,
    tracked_vector_search,
)
from tests.support import REPO_ROOT, uvicorn_in_thread, value


def test_decorated_functions_keep_signature_name_doc_and_inspect_answers(
    instrumentation: PrometheusInstrumentation,
) -> None:
    def plain(question: str, *, top_k: int = 3) -> list[str]:
        """Find chunks."""
        return []

    async def coroutine(question: str, *, top_k: int = 3) -> list[str]:
        """Find chunks."""
        return []

    def generator(question: str) -> Iterator[str]:
        """Stream chunks."""
        yield question

    async def async_generator(question: str) -> AsyncIterator[str]:
        """Stream tokens."""
        yield question

    checks = {
        plain: inspect.isfunction,
        coroutine: inspect.iscoroutinefunction,
        generator: inspect.isgeneratorfunction,
        async_generator: inspect.isasyncgenfunction,
    }
    for original, predicate in checks.items():
        decorated = tracked_vector_search("similarity_search", instrumentation=instrumentation)(original)
        assert decorated.__name__ == original.__name__
        assert decorated.__qualname__ == original.__qualname__
        assert decorated.__doc__ == original.__doc__
        assert decorated.__wrapped__ is original
        assert inspect.signature(decorated) == inspect.signature(original)
        assert predicate(decorated), original.__name__
        assert inspect.iscoroutinefunction(decorated) == inspect.iscoroutinefunction(original)
        assert inspect.isasyncgenfunction(decorated) == inspect.isasyncgenfunction(original)
        # What a call makes carries the names too, as tracebacks, reprs and warnings show them.
        if original is not plain:
            made = decorated("q")
            assert (made.__name__, made.__qualname__) == (original.__name__, original.__qualname__)
            if inspect.iscoroutine(made):
                made.close()


def test_the_coroutine_of_a_def_returning_one_is_named_after_it_when_never_awaited(
    instrumentation: PrometheusInstrumentation,
) -> None:
    async def fetch_quote() -> str:
        return "42"

    @tracked_external("quotes", instrumentation=instrumentation)
    @functools.wraps(fetch_quote)
    def quote() -> Any:
        return fetch_quote()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quote()
        gc.collect()
    assert [str(warning.message) for warning in caught] == [f"coroutine '{fetch_quote.__qualname__}' was never awaited"]


def test_methods_classmethods_and_staticmethods_in_either_order(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    def search(operation: str) -> Any:
        return tracked_vector_search(operation, instrumentation=instrumentation)

    class VectorStore:
        scale = 10

        def __init__(self) -> None:
            self.offset = 1

        @search("method")
        def method(self, x: int) -> int:
            return x + self.offset

        @search("async_method")
        async def async_method(self, x: int) -> int:
            return x + self.offset

        @search("classmethod_inside")
        @classmethod
        def outer_classmethod(cls, x: int) -> int:
            return x * cls.scale

        @classmethod
        @search("classmethod_outside")
        def inner_classmethod(cls, x: int) -> int:
            return x * cls.scale

        @search("staticmethod_inside")
        @staticmethod
        def outer_staticmethod(x: int) -> int:
            return -x

        @staticmethod
        @search("staticmethod_outside")
        def inner_staticmethod(x: int) -> int:
            return -x

    store = VectorStore()
    assert store.method(1) == 2
    assert asyncio.run(store.async_method(1)) == 2
    assert VectorStore.outer_classmethod(2) == store.outer_classmethod(2) == 20
    assert VectorStore.inner_classmethod(2) == store.inner_classmethod(2) == 20
    assert VectorStore.outer_staticmethod(3) == store.outer_staticmethod(3) == -3
    assert VectorStore.inner_staticmethod(3) == store.inner_staticmethod(3) == -3

    counts = {
        operation: value(registry, "vector_search_duration_seconds_count", operation=operation)
        for operation in (
            "method", "async_method", "classmethod_inside", "classmethod_outside",
            "staticmethod_inside", "staticmethod_outside",
        )
    }
    assert counts == {
        "method": 1, "async_method": 1, "classmethod_inside": 2, "classmethod_outside": 2,
        "staticmethod_inside": 2, "staticmethod_outside": 2,
    }
    assert inspect.iscoroutinefunction(store.async_method)
    assert inspect.signature(store.method) == inspect.signature(VectorStore.__dict__["method"].__wrapped__).replace(
        parameters=list(inspect.signature(VectorStore.__dict__["method"].__wrapped__).parameters.values())[1:]
    )
    assert instrumented_metrics(store.method) == ("vector_search_duration_seconds",)
    assert instrumented_metrics(VectorStore.outer_classmethod) == ("vector_search_duration_seconds",)


def test_fastapi_treats_a_decorated_async_endpoint_as_async_and_reads_its_signature() -> None:
    registry = CollectorRegistry()
    app = FastAPI()
    monitoring = crowdmon.setup_monitoring(app, registry=registry)
    event_loop_threads: list[bool] = []

    @app.get("/items/{item_id}")
    @tracked_errors(component="items", instrumentation=monitoring)
    @tracked_chat(instrumentation=monitoring)
    async def read_item(item_id: int, q: str | None = None) -> dict[str, Any]:
        # An async endpoint runs on the event loop; a sync one would run in a worker thread.
        try:
            asyncio.get_running_loop()
            event_loop_threads.append(True)
        except RuntimeError:
            event_loop_threads.append(False)
        if item_id == 0:
            raise PermissionError("item 0 is private")
        return {"item_id": item_id, "q": q}

    with uvicorn_in_thread(app) as base_url:
        ok = httpx.get(f"{base_url}/items/7", params={"q": "kiis"})
        invalid = httpx.get(f"{base_url}/items/seven")
        forbidden = httpx.get(f"{base_url}/items/0")

    assert ok.status_code == 200
    assert ok.json() == {"item_id": 7, "q": "kiis"}
    assert invalid.status_code == 422  # FastAPI validated against the original signature
    assert forbidden.status_code == 500
    assert event_loop_threads == [True, True]
    assert value(registry, "chat_processing_duration_seconds_count", endpoint="/items/{item_id}", user_type="unknown") == 2
    assert value(registry, "auth_errors_total", component="items", exception="PermissionError") == 1
    assert value(
        registry, "application_error_details_total", error_type="auth", component="items",
        exception="PermissionError", endpoint="/items/{item_id}", function="read_item",
    ) == 1


def test_each_decorator_records_into_its_metric(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    inst = instrumentation

    @tracked_chat(endpoint="/chat", user_type="premium", instrumentation=inst)
    def chat() -> str:
        return "answer"

    @tracked_database_query("select_user", instrumentation=inst)
    def query() -> int:
        return 1

    @tracked_memory_operation("store", "conversation", user_type="premium", instrumentation=inst)
    def remember(fail: bool) -> None:
        if fail:
            raise KeyError("slot")

    @tracked_document_operation("add", "eu_crowdfunding", instrumentation=inst)
    def add(fail: bool) -> None:
        if fail:
            raise ValueError("empty document")

    chat()
    query()
    remember(False)
    add(False)
    with pytest.raises(KeyError):
        remember(True)
    with pytest.raises(ValueError):
        add(True)

    assert value(registry, "chat_processing_duration_seconds_count", endpoint="/chat", user_type="premium") == 1
    assert value(registry, "database_query_duration_seconds_count", operation="select_user") == 1
    # A memory operation counts when it succeeds; a document operation counts with its outcome.
    assert value(registry, "memory_operations_total", operation="store", memory_type="conversation", user_type="premium") == 1
    assert value(registry, "document_operations_total", operation="add", document_type="eu_crowdfunding", status="success") == 1
    assert value(registry, "document_operations_total", operation="add", document_type="eu_crowdfunding", status="error") == 1


def test_tracked_errors_with_a_fixed_error_type_overrides_the_taxonomy(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="rag_system", error_type="ai_system", instrumentation=instrumentation)
    def retrieve() -> None:
        raise KeyError("chunk")

    with pytest.raises(KeyError):
        retrieve()

    assert value(registry, "ai_system_errors_total", component="rag_system", exception="KeyError") == 1
    assert value(registry, "application_errors_total", error_type="ai_system", component="rag_system", user_type="unknown") == 1


def test_decorators_without_an_instrumentation_record_into_the_default_one() -> None:
    from crowdmon.testing import isolated_instrumentation

    @tracked_external("openai", endpoint="chat/completions")
    def complete() -> str:
        return "ok"

    with isolated_instrumentation() as first:
        complete()
    with isolated_instrumentation() as second:
        complete()
        complete()

    def calls(inst: PrometheusInstrumentation) -> float:
        return value(
            inst.registry, "external_api_duration_seconds_count",
            service="openai", endpoint="chat/completions", outcome="success",
        )

    assert (calls(first), calls(second)) == (1, 2)


class Service(str, Enum):
    OPENAI = "openai"


def test_enum_label_values_are_accepted(registry: CollectorRegistry, instrumentation: PrometheusInstrumentation) -> None:
    @tracked_external(Service.OPENAI, endpoint="embeddings", instrumentation=instrumentation)
    def embed() -> None:
        return None

    embed()
    assert value(registry, "external_api_duration_seconds_count", service="openai", endpoint="embeddings", outcome="success") == 1


def _transaction() -> Iterator[None]:
    yield


async def _async_transaction() -> AsyncIterator[None]:
    yield


def test_below_contextmanager_a_decorator_times_the_block_and_its_failure(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @contextlib.contextmanager
    @tracked_external("database", endpoint="transaction", instrumentation=instrumentation)
    def transaction() -> Iterator[None]:
        yield

    with transaction():
        pass
    with pytest.raises(ConnectionError), transaction():
        raise ConnectionError("the commit failed")

    def count(outcome: str) -> float:
        return value(registry, "external_api_duration_seconds_count", service="database", endpoint="transaction", outcome=outcome)

    assert (count("success"), count("error")) == (1, 1)
    assert value(registry, "external_service_errors_total", service="database", endpoint="transaction", exception="ConnectionError") == 1


@pytest.mark.parametrize(
    ("apply", "error", "message"),
    [
        (lambda: tracked_errors(component="rag")(42), TypeError, "can only decorate a function"),
        (lambda: tracked_errors(component="rag")(Service), TypeError, "decorate its methods instead"),
        (lambda: tracked_errors(lambda: None), CrowdmonSetupError, "write @tracked_errors(component=...)"),  # type: ignore[arg-type]
        (lambda: tracked_errors(component="rag", error_type="network"), CrowdmonSetupError, "use one of: auth, database"),
        (lambda: tracked_external("openai", endpoint=3), TypeError, "must be a str"),  # type: ignore[arg-type]
        (lambda: tracked_vector_search(""), CrowdmonSetupError, "non-empty"),
        (lambda: tracked_session(enabled="yes"), CrowdmonSetupError, "True, False or None"),  # type: ignore[arg-type]
        (lambda: tracked_errors(component="rag", taxonomy={"x": "auth"}), CrowdmonSetupError, "ErrorTaxonomy"),  # type: ignore[arg-type]
        (lambda: tracked_memory_operation(lambda: None), CrowdmonSetupError, "write @tracked_memory_operation(operation=...) above the function, not a bare @tracked_memory_operation"),  # type: ignore[arg-type]
        (lambda: tracked_chat(lambda: None), CrowdmonSetupError, "@tracked_chat needs its parentheses: write @tracked_chat() above the function (its arguments are optional), not a bare @tracked_chat"),  # type: ignore[arg-type]
        (lambda: tracked_session(lambda: None), CrowdmonSetupError, "write @tracked_session() above the function"),  # type: ignore[arg-type]
        (lambda: tracked_document_operation("add"), CrowdmonSetupError, "@tracked_document_operation needs document_type=...: write @tracked_document_operation(operation=..., document_type=...)"),
        (lambda: tracked_external("openai", instrumentation="default")(lambda: None), CrowdmonSetupError, "instrumentation= takes a PrometheusInstrumentation (or None for the default one), got 'default'"),  # type: ignore[arg-type]
        (lambda: tracked_external("db", endpoint="tx")(contextlib.contextmanager(_transaction)), TypeError, "above @contextmanager or @asynccontextmanager would time only the making of the context manager _transaction, not its block: put @tracked_external(...) below it"),
        (lambda: tracked_errors(component="database")(contextlib.asynccontextmanager(_async_transaction)), TypeError, "put @tracked_errors(...) below it, directly above the generator function"),
        (lambda: tracked_errors(component="database")(classmethod(contextlib.contextmanager(_transaction))), TypeError, "would time only the making of the context manager _transaction"),
        (lambda: tracked_errors(component="database")(functools.partial(contextlib.contextmanager(_transaction))), TypeError, "would time only the making of the context manager _transaction"),
    ],
    ids=["not-callable", "class", "bare-decorator", "unknown-category", "int-label", "empty-label", "enabled-type", "taxonomy-type", "bare-with-two-labels", "bare-all-optional", "bare-session", "missing-label", "instrumentation-type", "above-contextmanager", "above-asynccontextmanager", "above-classmethod-contextmanager", "above-partial-contextmanager"],
)
def test_mistakes_fail_at_decoration_time_with_the_fix(apply: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        apply()
    assert message in str(raised.value)


def test_enabled_false_returns_the_function_itself(instrumentation: PrometheusInstrumentation) -> None:
    def answer() -> str:
        return "42"

    assert tracked_external("openai", enabled=False, instrumentation=instrumentation)(answer) is answer


def test_crowdmon_disabled_environment_variable_returns_the_function_itself(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    def answer() -> str:
        return "42"

    monkeypatch.setenv("CROWDMON_DISABLED", "1")
    disabled = tracked_database_query("select", instrumentation=instrumentation)(answer)
    forced = tracked_database_query("select", instrumentation=instrumentation, enabled=True)(answer)
    disabled()
    forced()

    assert disabled is answer
    assert forced is not answer
    assert value(registry, "database_query_duration_seconds_count", operation="select") == 1


def test_mypy_sees_the_original_signature_through_every_decorator(tmp_path: Path) -> None:
    from mypy import api

    source = tmp_path / "typed_use.py"
    source.write_text(textwrap.dedent('''
        from collections.abc import AsyncIterator
        from crowdmon import tracked_errors, tracked_external, tracked_session

        @tracked_errors(component="rag")
        @tracked_external("openai", endpoint="chat/completions")
        async def complete(prompt: str, *, temperature: float = 0.0) -> int:
            return 1

        @tracked_session()
        async def tokens(prompt: str) -> AsyncIterator[str]:
            yield prompt

        class Store:
            @tracked_external("db")
            def get(self, key: int) -> str:
                return ""

            @tracked_external("db")
            @classmethod
            def build(cls, size: int) -> "Store":
                return cls()

        reveal_type(complete)
        reveal_type(tokens)
        reveal_type(Store().get)
        reveal_type(Store.build)
        _ = complete(1)
    '''))
    stdout, stderr, status = api.run(
        ["--strict", "--no-error-summary", "--python-version", "3.11", "--cache-dir", str(REPO_ROOT / ".mypy_cache"), str(source)]
    )
    # mypy prints "builtins.str" or "str" depending on its version.
    lines = [line.split(": ", 2)[-1].replace("builtins.", "") for line in stdout.splitlines()]

    assert status == 1, stdout + stderr
    assert lines == [
        'Revealed type is "def (prompt: str, *, temperature: float =) -> typing.Coroutine[Any, Any, int]"',
        'Revealed type is "def (prompt: str) -> typing.AsyncIterator[str]"',
        'Revealed type is "def (key: int) -> str"',
        f'Revealed type is "def (size: int) -> {source.stem}.Store"',
        'Argument 1 to "complete" has incompatible type "int"; expected "str"  [arg-type]',
    ], stdout


def test_the_decorator_benchmark_runs_and_reports_every_decorator() -> None:
    import subprocess
    import sys

    from tests.support import subprocess_env

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "decorators.py"), "--rounds", "1", "--calls", "20"],
        env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:2]) for line in result.stdout.splitlines() if line.startswith(("sync", "async", "generator"))}
    for name in ("Histogram.time()", "@tracked_external", "@tracked_errors", "@tracked_session", "@tracked_database_query"):
        assert ("sync", name) in rows, result.stdout
    assert ("async", "@tracked_external") in rows
    assert "median of 1 interleaved rounds x 20 calls (cpu time)" in result.stdout


def test_a_callable_object_with_an_async_call_is_timed_as_a_coroutine(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    class Embedder:
        async def __call__(self, text: str) -> list[float]:
            await asyncio.sleep(0.01)
            return [0.0]

    embed = tracked_external("openai", endpoint="embeddings", instrumentation=instrumentation)(Embedder())

    assert asyncio.run(embed("kiis")) == [0.0]
    assert value(registry, "external_api_duration_seconds_count", service="openai", endpoint="embeddings", outcome="success") == 1
    assert value(registry, "external_api_duration_seconds_sum", service="openai", endpoint="embeddings", outcome="success") >= 0.009  # the await was timed
