"""The lock-free histograms and the plain-function decorator path: exact under threads and
asyncio, identical in what they expose to prometheus_client's own histograms."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from crowdmon import PrometheusInstrumentation, instrumented_metrics
from crowdmon._sharded import ShardedHistogram
from crowdmon.decorators import tracked_database_query, tracked_external
from tests.support import PYTHON, run_threads_while, subprocess_env, value

QUERY = "database_query_duration_seconds"
EXTERNAL = "external_api_duration_seconds"


def test_sharded_histogram_exposes_what_prometheus_client_exposes_for_the_same_values() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = ShardedHistogram("latency_seconds", "Latency.", ["op"], (0.1, 0.5, 1.0))
    ours_registry.register(ours)
    theirs = Histogram("latency_seconds", "Latency.", ["op"], buckets=(0.1, 0.5, 1.0), registry=theirs_registry)
    for amount in (0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 0.0):  # bounds included: "le"
        ours.labels("read").observe(amount)
        theirs.labels("read").observe(amount)

    for le in ("0.1", "0.5", "1.0", "+Inf"):
        assert value(ours_registry, "latency_seconds_bucket", op="read", le=le) == value(
            theirs_registry, "latency_seconds_bucket", op="read", le=le
        )
    assert value(ours_registry, "latency_seconds_bucket", op="read", le="0.1") == 3
    assert value(ours_registry, "latency_seconds_count", op="read") == 8
    assert value(ours_registry, "latency_seconds_sum", op="read") == pytest.approx(4.65)
    with pytest.raises(ValueError, match=r"takes labels \('op',\)"):
        ours.labels("read", "extra")


def test_threads_that_ended_leave_their_counts_and_not_their_cells() -> None:
    registry = CollectorRegistry()
    histogram = ShardedHistogram("latency_seconds", "Latency.", ["op"], (0.1, 0.5, 1.0))
    registry.register(histogram)
    child = histogram.labels("read")
    child.observe(0.3)  # this thread's cells stay: it is still running

    for batch in range(3):
        threads = [threading.Thread(target=child.observe, args=(0.05 * batch,)) for _ in range(200)]
        for thread in threads:  # one at a time: each new one folds the cells of those that ended
            thread.start()
            thread.join()
        assert len(child._all) <= 2
    value(registry, "latency_seconds_count", op="read")  # a scrape folds the last one too

    assert len(child._all) == 1
    assert value(registry, "latency_seconds_count", op="read") == 601
    assert value(registry, "latency_seconds_bucket", op="read", le="0.1") == 600
    assert value(registry, "latency_seconds_sum", op="read") == pytest.approx(0.3 + 200 * 0.05 + 200 * 0.1)


def test_the_main_thread_keeps_its_cells_in_atexit_handlers() -> None:
    # At interpreter exit the main thread counts as ended, yet atexit handlers (a batch job's
    # last push to a Pushgateway) still observe and scrape on it.
    script = """
import atexit
from crowdmon._sharded import HistogramChild
child = HistogramChild((0.1, 1.0))
child.observe(0.05)

@atexit.register
def last_push():
    first = child.totals()[0]
    child.observe(0.05)
    print(first, child.totals()[0])
"""
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60, env=subprocess_env(), check=True)

    assert result.stdout.split() == ["1.0", "2.0"]


def test_decorated_function_counts_exactly_from_many_threads_while_scraped(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)

    @tracked_database_query("select", instrumentation=instrumentation)
    def query(n: int) -> int:
        if n % 10 == 0:
            raise LookupError(n)
        return n

    threads, calls = 8, 2000

    def work() -> None:
        for n in range(calls):
            with contextlib.suppress(LookupError):
                query(n)

    run_threads_while(lambda: generate_latest(registry), [work] * threads)

    # Errors are observed too (the outcome rule); the duration has no outcome label.
    assert value(registry, QUERY + "_count", operation="select") == threads * calls
    assert value(registry, QUERY + "_bucket", operation="select", le="+Inf") == threads * calls


async def test_decorated_coroutines_count_exactly_with_their_outcomes(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)

    @tracked_external("openai", endpoint="chat/completions", instrumentation=instrumentation)
    async def complete(n: int) -> int:
        await asyncio.sleep(0)
        if n % 4 == 0:
            raise TimeoutError
        return n

    results = await asyncio.gather(*(complete(n) for n in range(400)), return_exceptions=True)

    assert sum(isinstance(r, TimeoutError) for r in results) == 100
    labels = {"service": "openai", "endpoint": "chat/completions"}
    assert value(registry, EXTERNAL + "_count", outcome="success", **labels) == 300
    assert value(registry, EXTERNAL + "_count", outcome="error", **labels) == 100
    assert value(registry, "external_service_errors_total", exception="TimeoutError", **labels) == 100


def test_plain_function_path_keeps_the_functions_globals_and_identity() -> None:
    def original(item_id: ItemId) -> ItemId:  # noqa: F821 - a name only this module would resolve
        """Docs."""
        return item_id

    decorated = tracked_database_query("select", instrumentation=PrometheusInstrumentation(CollectorRegistry()))(original)

    assert inspect.isfunction(decorated)
    assert decorated.__globals__ is original.__globals__  # string annotations resolve as before
    assert decorated.__wrapped__ is original
    assert (decorated.__name__, decorated.__doc__) == ("original", "Docs.")
    assert instrumented_metrics(decorated) == (QUERY,)


def test_stacked_decorators_report_both_metrics_and_both_record(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)

    @tracked_external("search", endpoint="query", instrumentation=instrumentation)
    @tracked_database_query("select", instrumentation=instrumentation)
    def lookup() -> str:
        return "found"

    assert lookup() == "found"
    assert instrumented_metrics(lookup) == (EXTERNAL, "external_service_errors_total", QUERY)
    assert value(registry, QUERY + "_count", operation="select") == 1
    assert value(registry, EXTERNAL + "_count", service="search", endpoint="query", outcome="success") == 1


def test_multiprocess_mode_keeps_prometheus_client_histograms(tmp_path: Path) -> None:
    script = (
        "from prometheus_client import CollectorRegistry\n"
        "from crowdmon import PrometheusInstrumentation\n"
        "metric = PrometheusInstrumentation(CollectorRegistry()).metric('database_query_duration_seconds')\n"
        "print(type(metric.metric).__name__)\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", script],
        env=subprocess_env({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}),
        capture_output=True, text=True, timeout=60, check=True,
    )

    assert result.stdout.strip() == "Histogram"
    assert isinstance(PrometheusInstrumentation(CollectorRegistry()).metric(QUERY).metric, ShardedHistogram)
