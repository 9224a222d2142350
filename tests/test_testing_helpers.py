"""``crowdmon.testing``: the helpers users import into their own test suites."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

import crowdmon
from crowdmon import (
    PrometheusInstrumentation,
    default_instrumentation,
    tracked_errors,
    tracked_external,
)
from crowdmon.testing import (
    assert_instrumented,
    assert_metric,
    isolated_instrumentation,
    metric_delta,
    metric_value,
)
from tests.support import REPO_ROOT, subprocess_env


@tracked_errors(component="billing")
@tracked_external("stripe", endpoint="charges")
def charge(amount: int) -> str:
    """A module-level function decorated at import time, before any test runs."""
    if amount < 0:
        raise ValueError("negative amount")
    return "charged"


def test_fixture_isolates_each_test_and_catches_import_time_decorators(
    crowdmon_instrumentation: PrometheusInstrumentation,
) -> None:
    assert default_instrumentation() is crowdmon_instrumentation
    charge(5)
    assert_metric(
        "external_api_duration_seconds", {"service": "stripe", "endpoint": "charges", "outcome": "success"}, 1
    )


def test_fixture_starts_from_zero_in_the_next_test(crowdmon_instrumentation: PrometheusInstrumentation) -> None:
    labels = {"service": "stripe", "endpoint": "charges", "outcome": "success"}
    with metric_delta("external_api_duration_seconds", labels) as delta:
        charge(1)
        charge(2)
    delta.assert_incremented(2)
    assert_metric("external_api_duration_seconds", labels, 2)


def test_assert_metric_explains_a_mismatch_with_the_samples_that_exist(
    crowdmon_instrumentation: PrometheusInstrumentation,
) -> None:
    with pytest.raises(ValueError):
        charge(-1)

    with pytest.raises(AssertionError) as wrong_label:
        assert_metric("external_service_errors_total", {"service": "stripe", "endpoint": "charge", "exception": "ValueError"}, 1)
    with pytest.raises(AssertionError) as wrong_value:
        assert_metric("external_service_errors_total", {"service": "stripe", "endpoint": "charges", "exception": "ValueError"}, 2)

    assert 'expected external_service_errors_total{endpoint="charge",exception="ValueError",service="stripe"} to be 1' in str(wrong_label.value)
    assert "it does not exist" in str(wrong_label.value)
    assert 'external_service_errors_total{endpoint="charges",exception="ValueError",service="stripe"} 1' in str(wrong_label.value)
    assert "to be 2, but it is 1" in str(wrong_value.value)
    assert assert_metric(
        "application_errors_total", {"error_type": "validation", "component": "billing", "user_type": "unknown"}
    ) == 1


def test_metric_delta_reports_the_change_and_fails_clearly() -> None:
    with isolated_instrumentation() as instrumentation:
        labels = {"user_type": "anonymous", "message_type": "user", "cache_hit": "false", "rag_used": "false"}
        with metric_delta("chat_messages_total", labels) as delta:
            crowdmon.track_chat_message("anonymous")
            assert delta.value == 1
            crowdmon.track_chat_message("anonymous")
        with metric_delta("chat_messages_total", labels, instrumentation=instrumentation) as unchanged:
            pass

    delta.assert_incremented(by=2)
    unchanged.assert_unchanged()
    with pytest.raises(AssertionError, match=r"to grow by 1.0, but it changed by 2.0 \(from 0.0\)") as raised:
        delta.assert_incremented()
    # The family's samples, from the block's own registry, at full precision.
    assert 'chat_messages_total{cache_hit="false",message_type="user",rag_used="false",user_type="anonymous"} 2.0' in str(raised.value)


def test_without_labels_the_helpers_add_up_the_family_and_a_wrong_label_name_is_refused() -> None:
    with isolated_instrumentation():
        with metric_delta("chat_messages_total") as every:
            crowdmon.track_chat_message("anonymous")
            crowdmon.track_chat_message("authenticated", message_type="assistant")
        every.assert_incremented(by=2)
        assert metric_value("chat_messages_total") == 2
        with pytest.raises(ValueError, match="chat_messages_total has no label 'endpoint'; its labels are: user_type, message_type, cache_hit, rag_used"):
            metric_value("chat_messages_total", {"endpoint": "/chat"})
        with pytest.raises(ValueError, match="vector_search_duration_seconds_bucket needs its labels, le included"):
            metric_value("vector_search_duration_seconds_bucket")
        crowdmon.start_session("free")
        crowdmon.start_session("free")
        crowdmon.end_session("free")
        # 1 and 1.0000001 differ: the message shows both as they are.
        with pytest.raises(AssertionError, match=r"to be 1.0000001, but it is 1.0"):
            assert_metric("active_sessions_current", {"user_type": "free"}, 1.0000001)


def test_a_metric_name_no_metric_has_is_refused_with_the_closest_one() -> None:
    with isolated_instrumentation():

        @tracked_errors(component="billing")
        def charge() -> None:
            raise RuntimeError("declined")

        # prometheus_client's family name, and a typo: both could only ever read 0, so an
        # "unchanged" assertion on them would pass whatever the code did.
        for name, meant in (("application_errors", "application_errors_total"), ("application_error_total", "application_errors_total")):
            refused = f"no metric in this registry has a sample named '{name}', so it could only ever read 0; did you mean '{meant}'"
            with pytest.raises(ValueError, match=refused), metric_delta(name, {"component": "billing"}):
                raise AssertionError("refused on entry, before the block runs")
            with pytest.raises(ValueError, match=f"sample named '{name}'"):
                assert_metric(name)
        with pytest.raises(ValueError, match=r"sample named 'process_cpu_seconds_total', so it could only ever read 0$"):
            metric_value("process_cpu_seconds_total")
        # Names of samples that do not exist yet are fine: they read 0.
        assert metric_value("external_api_duration_seconds_sum") == 0
        assert metric_value("crowdmon_internal_errors_total") == 0
        with pytest.raises(RuntimeError):
            charge()
        assert metric_value("application_errors_total", {"component": "billing"}) == 1


def test_some_of_the_labels_add_up_the_samples_that_have_them_and_odd_values_are_refused() -> None:
    with isolated_instrumentation():
        with metric_delta("application_errors_total", {"component": "billing"}) as billing:
            crowdmon.track_application_error(None, "billing", PermissionError("denied"))
            crowdmon.track_application_error(None, "billing", ValueError("bad"))
            crowdmon.track_application_error(None, "search", ValueError("bad"))
        billing.assert_incremented(by=2)
        with pytest.raises(AssertionError, match=r"to grow by 0\.0, but it changed by 2\.0"):
            billing.assert_unchanged()
        assert metric_value("application_errors_total", {"error_type": "validation"}) == 2
        assert_metric("application_errors_total", {"error_type": "auth", "component": "billing", "user_type": "unknown"}, 1)
        with pytest.raises(ValueError, match="label values are strings: cache_hit=False can never match; write cache_hit='false'"):
            metric_value("chat_messages_total", {"cache_hit": False})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="vector_search_duration_seconds_bucket needs its le label"):
            metric_value("vector_search_duration_seconds_bucket", {"operation": "query"})
        with pytest.raises(ValueError, match=r"le=1 can never match; write le='1\.0'"):
            metric_value("vector_search_duration_seconds_bucket", {"operation": "query", "le": 1})  # type: ignore[dict-item]


def test_isolation_is_refused_in_multiprocess_mode(tmp_path: Path) -> None:
    """In multiprocess mode values live in files that outlive each test's registry: a test
    would read the counts of the tests before it, so the fixture says so instead."""
    code = "from crowdmon.testing import isolated_instrumentation\nwith isolated_instrumentation():\n    pass\n"
    env = subprocess_env({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "PROMETHEUS_MULTIPROC_DIR is set, so prometheus_client keeps every value in files that outlive each test's registry" in result.stderr
    assert "env -u PROMETHEUS_MULTIPROC_DIR pytest" in result.stderr


def test_assert_instrumented_names_what_a_function_records() -> None:
    def plain() -> None:
        pass

    class Service:
        @tracked_external("openai")
        def complete(self) -> None:
            pass

    # Classified by the taxonomy, an error may go to any category's counter besides the two.
    assert assert_instrumented(charge, "external_api_duration_seconds", "application_errors_total", "auth_errors_total") == (
        "application_errors_total", "application_error_details_total",
        "auth_errors_total", "database_errors_total", "external_service_errors_total", "ai_system_errors_total", "session_errors_total",
        "external_api_duration_seconds",
    )

    @tracked_errors(component="login", error_type="auth")
    def sign_in() -> None:
        pass

    assert assert_instrumented(sign_in) == ("application_errors_total", "application_error_details_total", "auth_errors_total")
    with pytest.raises(AssertionError, match="not into database_errors_total"):
        assert_instrumented(sign_in, "database_errors_total")
    assert_instrumented(Service().complete, "external_api_duration_seconds")
    with pytest.raises(AssertionError, match="carries no crowdmon decorator"):
        assert_instrumented(plain)
    with pytest.raises(AssertionError, match="not into chat_messages_total"):
        assert_instrumented(charge, "chat_messages_total")


def test_isolated_instrumentation_restores_the_previous_default() -> None:
    before = default_instrumentation()
    with isolated_instrumentation(cardinality_caps={"chat_messages_total": 2}) as inner:
        assert default_instrumentation() is inner
        assert inner.registry is not before.registry
        assert inner.guard.cap_for("chat_messages_total", "user_type") == 2
    assert default_instrumentation() is before


def test_the_pytest_plugin_gives_a_users_suite_the_fixture(tmp_path: Path) -> None:
    (tmp_path / "test_user_suite.py").write_text(textwrap.dedent('''
        from crowdmon import track_document_operation
        from crowdmon.testing import assert_metric

        def test_counts(crowdmon_instrumentation):
            track_document_operation("add", "pdf", "success")
            assert_metric("document_operations_total", {"operation": "add", "document_type": "pdf", "status": "success"}, 1)

        def test_isolated(crowdmon_instrumentation):
            track_document_operation("add", "pdf", "success")
            assert_metric("document_operations_total", {"operation": "add", "document_type": "pdf", "status": "success"}, 1)
    '''))
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["crowdmon.testing"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_fixture_reaches_an_app_built_at_import_time(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(textwrap.dedent('''
        from fastapi import FastAPI
        from crowdmon import setup_monitoring, track_chat_message

        app = FastAPI()
        setup_monitoring(app)  # at import, as most apps are built

        @app.post("/chat")
        async def chat():
            track_chat_message("free")
            return {"ok": True}
    '''))
    (tmp_path / "test_shop.py").write_text(textwrap.dedent('''
        import pytest
        from fastapi.testclient import TestClient
        from crowdmon.testing import assert_metric
        from shop import app

        client = TestClient(app)
        REQUEST = {"method": "POST", "handler": "/chat", "status": "200"}

        @pytest.mark.parametrize("attempt", [1, 2])
        def test_each_test_counts_from_zero(crowdmon_instrumentation, attempt):
            client.post("/chat")
            assert_metric("crowdfunding_api_requests_total", REQUEST, 1)
            assert_metric("chat_messages_total", value=1)  # any labels, added up
            assert 'chat_messages_total{' in client.get("/metrics").text
    '''))
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["crowdmon.testing"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-W", "ignore", str(tmp_path)],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"crowdmon.testing": "crowdmon.testing"}
