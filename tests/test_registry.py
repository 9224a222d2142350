"""One registry, owned once: building twice shares metrics; a name clash fails with a fix."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import weakref
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette

from crowdmon import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    PrometheusMiddleware,
    default_instrumentation,
    setup_monitoring,
)
from crowdmon.health import run_health_checks
from tests.support import PYTHON, REPO_ROOT, subprocess_env, value


def test_building_twice_on_one_registry_shares_the_metrics(registry: CollectorRegistry) -> None:
    first = PrometheusInstrumentation(registry)
    second = PrometheusInstrumentation(registry)
    first.track_chat_message("authenticated", "user", False, False)
    second.track_chat_message("authenticated", "user", False, False)

    assert first.metric("chat_messages_total").metric is second.metric("chat_messages_total").metric
    assert first.requests is second.requests
    labels = {"user_type": "authenticated", "message_type": "user", "cache_hit": "false", "rag_used": "false"}
    assert value(registry, "chat_messages_total", **labels) == 2


def test_isolated_registries_do_not_share_values() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    PrometheusInstrumentation(one).track_document_operation("add", "pdf", "success")

    assert value(one, "document_operations_total", operation="add", document_type="pdf", status="success") == 1
    assert value(two, "document_operations_total", operation="add", document_type="pdf", status="success") == 0


def test_a_registry_nobody_holds_is_let_go_of_with_its_metrics() -> None:
    """A test suite makes an isolated registry per test (crowdmon.testing does): each must be
    freed once its test lets go of it, not kept by crowdmon's table of registries."""
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry)
    instrumentation.track_chat_message("anonymous")
    instrumentation.register_health_check("database", lambda: True)
    asyncio.run(run_health_checks(instrumentation))
    freed = weakref.ref(registry)
    del registry, instrumentation
    gc.collect()

    assert freed() is None


def test_a_rebuilt_middleware_stack_reuses_the_registry(registry: CollectorRegistry) -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        pass

    for _ in range(3):
        PrometheusMiddleware(app, registry=registry)  # type: ignore[arg-type]

    assert generate_latest(registry).count(b"# TYPE crowdfunding_api_requests_total counter") == 1


def test_a_metric_name_clash_fails_at_set_up_with_a_fix(registry: CollectorRegistry) -> None:
    Counter("chat_messages", "the application's own metric", registry=registry)

    with pytest.raises(CrowdmonSetupError, match=r"registry=CollectorRegistry\(\)") as raised:
        PrometheusInstrumentation(registry)

    assert "chat_messages" in str(raised.value)
    # Nothing half-registered is left behind.
    names = {family.name for family in registry.collect()}
    assert names == {"chat_messages"}


def test_the_default_instance_is_the_one_setup_monitoring_returns() -> None:
    instrumentation = setup_monitoring(Starlette())

    assert instrumentation is default_instrumentation()
    assert instrumentation.registry is REGISTRY
    assert PrometheusInstrumentation().metric("chat_messages_total").metric is instrumentation.metric(
        "chat_messages_total"
    ).metric


def test_metric_lookup_errors_name_the_catalogue(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)

    with pytest.raises(KeyError, match="not a crowdmon metric"):
        instrumentation.metric("chat_messages")
    with pytest.raises(CrowdmonSetupError, match="recorded by the middleware"):
        instrumentation.metric("crowdfunding_api_requests_total")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cardinality_caps": {"chat_mesages_total:user_type": 3}}, r"names no catalogue metric \(did you mean 'chat_messages_total'\?\)"),
        ({"cardinality_caps": {"chat_messages_total:tenant": 3}}, "chat_messages_total has no label 'tenant'; its labels are user_type, message_type"),
        ({"cardinality_caps": {"chat_messages_total": 0}}, r"cardinality_caps\['chat_messages_total'\] must be a positive int, got 0"),
        # Caps the guard could not enforce: the request metrics share requests_total's labels,
        # crowdmon's own metrics are bounded by the catalogue, and a key needs a label after ':'.
        (
            {"cardinality_caps": {"crowdfunding_api_request_duration_seconds:handler": 2}},
            "every crowdfunding_api_\\* metric records a request under the labels admitted for "
            "crowdfunding_api_requests_total, so cap those instead, e.g. 'crowdfunding_api_requests_total:handler'",
        ),
        ({"cardinality_caps": {"crowdfunding_api_requests_in_progress": 2}}, "e.g. 'crowdfunding_api_requests_total:handler'"),
        ({"cardinality_caps": {"crowdmon_internal_errors_total:site": 2}}, "crowdmon's own metrics take their label values from the catalogue"),
        ({"cardinality_caps": {"chat_messages_total:": 1}}, "names no label; write 'chat_messages_total' to cap each of its labels"),
        ({"default_cap": "50"}, "default_cap must be a positive int .*, got '50'"),
        ({"default_cap": True}, "default_cap must be a positive int .*, got True"),
    ],
)
def test_cap_mistakes_fail_at_set_up_with_a_fix(options: dict[str, object], message: str) -> None:
    with pytest.raises(CrowdmonSetupError, match=message):
        PrometheusInstrumentation(CollectorRegistry(), **options)  # type: ignore[arg-type]


def test_caps_given_again_for_a_registry_set_up_with_others_fail_rather_than_being_ignored(registry: CollectorRegistry) -> None:
    first = PrometheusInstrumentation(registry, cardinality_caps={"chat_messages_total:user_type": 2})

    with pytest.raises(CrowdmonSetupError, match=r"set up already, with default_cap=200 and cardinality_caps=\{'chat_messages_total:user_type': 2\}"):
        PrometheusInstrumentation(registry, default_cap=5)
    with pytest.raises(CrowdmonSetupError, match="the caps are fixed by the first PrometheusInstrumentation"):
        PrometheusInstrumentation(registry, cardinality_caps={"chat_messages_total:user_type": 3})
    again = PrometheusInstrumentation(registry, cardinality_caps={"chat_messages_total:user_type": 2})
    plain = PrometheusInstrumentation(registry)

    assert again.guard is plain.guard is first.guard
    assert first.guard.cap_for("chat_messages_total", "user_type") == 2


CLASH_AT_REQUEST_TIME = """
import logging
import crowdmon
from prometheus_client import REGISTRY, Counter, generate_latest
from starlette.applications import Starlette

logging.basicConfig(format="%(levelname)s %(message)s")
Counter("chat_messages_total", "the application's own metric", ["x"]).labels("a").inc()

@crowdmon.tracked_external("openai")
def call():
    return "answer"

@crowdmon.tracked_session()
def chat():
    return "hello"

crowdmon.track_chat_message("free")
with crowdmon.track_vector_search("similarity"):
    pass
with crowdmon.track_session("free"):
    crowdmon.set_component_healthy("database")
print(call(), call(), chat(), crowdmon.component_health())
if crowdmon.instrumentation.values_in_files():
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    served = CollectorRegistry()
    MultiProcessCollector(served)
else:
    served = REGISTRY
print("served:", sorted(line for line in generate_latest(served).decode().splitlines() if not line.startswith("#")))
try:
    crowdmon.setup_monitoring(Starlette())
except crowdmon.CrowdmonSetupError as error:
    print("set-up:", error)
"""


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one process", "multiprocess"])
def test_a_name_clash_on_the_global_registry_is_logged_once_not_raised_into_requests(multiprocess: bool, tmp_path: Path) -> None:
    # Module-level tracking functions and decorators build the default instrumentation on first
    # use, inside a request: its set-up error must not become the request's 500.  It is logged
    # once, with the fix, and nothing is recorded (in multiprocess mode, anything recorded would
    # reach the shared files, and be served inside the clashing family); setup_monitoring(app),
    # which is set-up, still raises it.
    env = {**subprocess_env(), **({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)} if multiprocess else {})}
    if not multiprocess:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    run = subprocess.run([PYTHON, "-c", CLASH_AT_REQUEST_TIME], capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT)

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "answer answer hello {}"
    assert lines[1] == "served: ['chat_messages_total{x=\"a\"} 1.0']" if multiprocess else lines[1].startswith("served: [")
    assert "external_api" not in lines[1] and "active_sessions" not in lines[1] and "user_type" not in lines[1]
    assert lines[2].startswith("set-up: crowdmon cannot register its metrics on this registry")
    logged = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(logged) == 1, run.stderr
    assert "Another collector already uses a crowdmon metric name" in logged[0]
    assert "Until it is fixed, crowdmon's module-level tracking functions and the decorators given no instrumentation= record nothing" in logged[0]
