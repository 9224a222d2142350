"""Multiprocess mode set up right: clear errors at start, directory preparation, dead workers'
gauges removed, the catalogue's gauge modes, and the README's deployment snippets."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from crowdmon import CATALOGUE, CrowdmonSetupError, MetricKind
from crowdmon.cardinality import SharedAdmissions
from crowdmon.multiprocess import prepare_directory, prune_dead_processes, server_workers
from tests.production_support import (
    APP,
    Prometheus,
    gunicorn_command,
    hey,
    readme_command,
    readme_snippet,
    serve,
    server_env,
)
from tests.support import PYTHON, REPO_ROOT, free_port, scraped, subprocess_env

BUILD = "from prometheus_client import CollectorRegistry; from crowdmon import PrometheusInstrumentation; PrometheusInstrumentation(CollectorRegistry())"


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", code], env=subprocess_env(env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ("missing", "does not exist or is not a directory; create it before starting the server: mkdir -p"),
        ("file", "does not exist or is not a directory"),
        ("/proc/self", "is not writable by this process"),
    ],
)
def test_a_bad_directory_fails_at_setup(tmp_path: Path, directory: str, message: str) -> None:
    path = tmp_path / directory if not directory.startswith("/") else Path(directory)
    if directory == "file":
        path.write_text("")
    result = run_python(BUILD, {"PROMETHEUS_MULTIPROC_DIR": str(path)})

    assert result.returncode == 1
    assert "crowdmon.instrumentation.CrowdmonSetupError" in result.stderr
    assert message in result.stderr


def test_setting_the_variable_after_import_fails_at_setup(tmp_path: Path) -> None:
    code = f"import os, prometheus_client; os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}; {BUILD}"
    result = run_python(code, {})

    assert result.returncode == 1
    assert "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported" in result.stderr


def test_an_empty_variable_fails_at_setup_saying_so() -> None:
    result = run_python(BUILD, {"PROMETHEUS_MULTIPROC_DIR": ""})

    assert result.returncode == 1
    assert "PROMETHEUS_MULTIPROC_DIR is set but empty" in result.stderr


def test_gunicorn_refuses_to_start_without_the_directory(tmp_path: Path) -> None:
    env = server_env(tmp_path, multiprocess=False)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "missing")
    result = subprocess.run(gunicorn_command(free_port()), env=subprocess_env(env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "does not exist or is not a directory; create it before starting the server" in result.stderr


def test_gunicorn_refuses_to_start_without_the_variable(tmp_path: Path) -> None:
    env = subprocess_env(server_env(tmp_path, multiprocess=False))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(gunicorn_command(free_port()), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in result.stderr


def test_uvicorn_workers_refuse_to_start_without_the_variable(tmp_path: Path) -> None:
    env = subprocess_env(server_env(tmp_path, multiprocess=False))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "uvicorn.log"
    command = [PYTHON, "-m", "uvicorn", "--workers", "2", "--host", "127.0.0.1", "--port", str(free_port()), APP]
    with log.open("wb") as sink:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "CrowdmonSetupError" not in log.read_text() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)

    assert "this process is one of the 2 workers its server was started with" in log.read_text()
    assert "export PROMETHEUS_MULTIPROC_DIR=" in log.read_text()


RECORD_USER_TYPES = """
import sys
from prometheus_client import CollectorRegistry
from crowdmon import PrometheusInstrumentation
instrumentation = PrometheusInstrumentation(CollectorRegistry(), cardinality_caps={"chat_messages_total:user_type": 5})
for user_type in sys.argv[1:]:
    instrumentation.track_chat_message(user_type=user_type)
"""


def chat_counts(directory: Path) -> dict[str, float]:
    """``chat_messages_total`` by ``user_type``, summed over every worker's files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    counts: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "chat_messages_total":
                counts[sample.labels["user_type"]] = counts.get(sample.labels["user_type"], 0) + sample.value
    return counts


def test_a_label_cap_holds_for_all_the_workers_of_a_server_and_their_successors(tmp_path: Path) -> None:
    # Each worker is a process of its own, and a dead worker's series stay in the totals: the
    # cap must count the values every worker, alive or gone, admitted.
    env = subprocess_env({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    workers = [
        subprocess.Popen([PYTHON, "-c", RECORD_USER_TYPES, *(f"w{worker}-{n}" for n in range(20))], env=env, cwd=REPO_ROOT)
        for worker in range(3)
    ]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0, 0]
    successor = subprocess.run([PYTHON, "-c", RECORD_USER_TYPES, *(f"next-{n}" for n in range(20))], env=env, cwd=REPO_ROOT, timeout=60)
    assert successor.returncode == 0

    counts = chat_counts(tmp_path)
    assert sum(counts.values()) == 80  # every message counted
    assert len(counts) == 6  # five values admitted across the server, and <other>
    assert counts["<other>"] == 75
    assert not any(user_type.startswith("next-") for user_type in counts)

    prepare_directory(str(tmp_path))  # a new server start: the labels are empty again
    assert list(tmp_path.iterdir()) == []
    assert subprocess.run([PYTHON, "-c", RECORD_USER_TYPES, "fresh"], env=env, cwd=REPO_ROOT, timeout=60).returncode == 0
    assert chat_counts(tmp_path) == {"fresh": 1.0}


FAIL_IN_A_POOL = """
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
from crowdmon import default_instrumentation, tracked_errors

@tracked_errors(component="rag_system")
def index_documents() -> None:
    raise ConnectionError("the vector store is down")

@tracked_errors(component="rag_system")
def index_in_a_worker() -> None:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(sys.argv[1])) as pool:
        pool.submit(index_documents).result()

if __name__ == "__main__":
    default_instrumentation()
    try:
        index_in_a_worker()
    except ConnectionError:
        pass
"""


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_failure_in_a_pool_worker_is_counted_once_across_the_processes(tmp_path: Path, start: str) -> None:
    """In multiprocess mode the pool worker's count is in the files /metrics sums: the failure
    it raised is not counted again when it reaches the decorated caller."""
    script = tmp_path / "pool_failure.py"
    script.write_text(FAIL_IN_A_POOL)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = subprocess_env({"PROMETHEUS_MULTIPROC_DIR": str(metrics)})
    result = subprocess.run([PYTHON, str(script), start], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics))
    labels = {"error_type": "external_service", "component": "rag_system", "user_type": "unknown"}
    assert registry.get_sample_value("application_errors_total", labels) == 1


def test_shared_admissions_survive_a_line_left_unfinished_and_odd_values(tmp_path: Path) -> None:
    first, second = SharedAdmissions(str(tmp_path)), SharedAdmissions(str(tmp_path))
    assert first.admit("chat_messages_total", "user_type", "line\nbreak", 4) == (True, {"line\nbreak"})
    with open(first.path("chat_messages_total", "user_type"), "a", encoding="utf-8") as file:
        file.write('"torn')  # a worker killed mid-write

    assert second.admit("chat_messages_total", "user_type", "été", 4) == (True, {"line\nbreak", "été"})
    assert second.admit("chat_messages_total", "user_type", "", 4) == (True, {"line\nbreak", "été", ""})
    assert first.admit("chat_messages_total", "user_type", "fourth", 4)[0] is True
    assert first.admit("chat_messages_total", "user_type", "fifth", 4) == (False, {"line\nbreak", "été", "", "fourth"})
    assert second.admit("chat_messages_total", "user_type", "été", 4)[0] is True  # admitted already


@pytest.mark.parametrize(
    ("argv", "env", "workers"),
    [
        (["/usr/bin/uvicorn", "--workers", "4", "app:app"], {}, 4),
        (["/site-packages/uvicorn/__main__.py", "--workers=3", "app:app"], {}, 3),
        (["/usr/bin/uvicorn", "app:app"], {"WEB_CONCURRENCY": "2"}, 2),
        (["/usr/bin/uvicorn", "--workers", "1", "app:app"], {"WEB_CONCURRENCY": "2"}, 1),
        # gunicorn's config file or GUNICORN_CMD_ARGS may override WEB_CONCURRENCY: not certain
        (["/usr/bin/gunicorn", "-c", "gunicorn.conf.py", "app:app"], {"WEB_CONCURRENCY": "4"}, 1),
        (["/usr/bin/gunicorn", "--reload", "-w", "2", "app:app"], {}, 2),
        (["/usr/bin/uvicorn", "--workers", "4", "--reload", "app:app"], {}, 1),
        (["/usr/bin/gunicorn", "-w", "4", "app:app"], {}, 4),
        (["/usr/bin/gunicorn", "-w8", "app:app"], {}, 8),
        (["/usr/bin/uvicorn", "-w", "4", "app:app"], {}, 1),  # not a uvicorn option
        (["/usr/bin/hypercorn", "--workers", "4", "app:app"], {}, 1),
        (["/usr/bin/granian", "--interface", "asgi", "--workers", "3", "app:app"], {}, 3),
        (["/site-packages/granian/__main__.py", "--workers=2", "--workers-lifetime", "60", "app:app"], {}, 2),
        (["/usr/bin/granian", "--interface", "asgi", "app:app"], {"GRANIAN_WORKERS": "4"}, 4),
        (["/usr/bin/granian", "--workers", "2", "app:app"], {"WEB_CONCURRENCY": "4"}, 2),
        (["/usr/bin/granian", "app:app"], {"WEB_CONCURRENCY": "4"}, 1),  # not granian's variable
        (["/usr/bin/granian", "--reload", "--workers", "2", "app:app"], {}, 2),  # granian reloads them all
        (["serve.py", "--workers", "4"], {}, 1),
        (["/usr/bin/uvicorn", "--workers", "many"], {}, 1),
    ],
)
def test_the_workers_a_server_was_started_with(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], workers: int) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("GRANIAN_WORKERS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert server_workers() == workers


def test_the_prepare_command_explains_a_missing_variable() -> None:
    env = subprocess_env()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run([PYTHON, "-m", "crowdmon.multiprocess"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in result.stderr
    env["PROMETHEUS_MULTIPROC_DIR"] = ""
    result = subprocess.run([PYTHON, "-m", "crowdmon.multiprocess"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, "PROMETHEUS_MULTIPROC_DIR is set but empty" in result.stderr) == (2, True)


def test_the_prepare_command_answers_help_without_touching_the_directory(tmp_path: Path) -> None:
    (tmp_path / "counter_1.db").write_text("x")
    env = {**subprocess_env(), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run([PYTHON, "-m", "crowdmon.multiprocess", "--help"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python3 -m crowdmon.multiprocess")
    assert "PROMETHEUS_MULTIPROC_DIR" in result.stdout
    assert (tmp_path / "counter_1.db").exists()


def test_prepare_removes_only_metric_files(tmp_path: Path) -> None:
    for name in ("counter_1.db", "gauge_livesum_2.db", "notes.txt"):
        (tmp_path / name).write_text("x")
    prepare_directory(str(tmp_path))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(CrowdmonSetupError, match="mkdir -p"):
        prepare_directory(str(tmp_path / "missing"))


def test_pruning_removes_only_dead_processes_live_gauges(tmp_path: Path) -> None:
    finished = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead, alive = int(finished.stdout), os.getpid()
    names = [
        f"gauge_livesum_{dead}.db", f"gauge_livemostrecent_{dead}.db", f"counter_{dead}.db",
        f"histogram_{dead}.db", f"gauge_all_{dead}.db", f"gauge_livesum_{alive}.db", f"gauge_livesum_1{dead}.db",
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = prune_dead_processes(str(tmp_path))

    assert dead in removed
    left = {path.name for path in tmp_path.iterdir()}
    assert left == set(names) - {f"gauge_livesum_{dead}.db", f"gauge_livemostrecent_{dead}.db"} - (
        {f"gauge_livesum_1{dead}.db"} if int(f"1{dead}") in removed else set()
    )


def test_every_gauge_has_a_live_multiprocess_mode() -> None:
    modes = {spec.name: spec.multiprocess_mode for spec in CATALOGUE if spec.kind == MetricKind.GAUGE}

    assert modes == {
        "crowdfunding_api_requests_in_progress": "livesum",
        "active_sessions_current": "livesum",
        "component_health_status": "livemostrecent",
    }


def test_exemplars_in_multiprocess_mode_warn_and_record_as_usual(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import asyncio, warnings
        import httpx
        from prometheus_client import CollectorRegistry
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route
        from crowdmon import MetricsApp, PrometheusInstrumentation, setup_monitoring

        warnings.simplefilter("always")
        instrumentation = PrometheusInstrumentation(CollectorRegistry())
        app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
        setup_monitoring(app, instrumentation=instrumentation, exemplars="traceparent")

        async def main():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                await client.get("/", headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
            print(MetricsApp(instrumentation).render("application/openmetrics-text; version=1.0.0")[0].decode())

        asyncio.run(main())
    """)
    result = run_python(code, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})

    assert result.returncode == 0, result.stderr
    assert "ExemplarsUnavailableWarning: crowdmon records no exemplars in prometheus_client's multiprocess mode" in result.stderr
    assert 'crowdfunding_api_requests_total{handler="/",method="GET",status="200"} 1.0\n' in result.stdout
    assert " # {" not in result.stdout


def test_readme_gunicorn_conf_with_metrics_served_by_the_master(tmp_path: Path) -> None:
    metrics_port, port = free_port(), free_port()
    conf = readme_snippet("gunicorn-conf").replace('host="0.0.0.0"', 'host="127.0.0.1"').replace("port=9464", f"port={metrics_port}")
    (tmp_path / "gunicorn.conf.py").write_text(conf)
    env = server_env(tmp_path, multiprocess=True)
    argv = [PYTHON, "-m", "gunicorn", "-c", str(tmp_path / "gunicorn.conf.py"), "-w", "2", "-b", f"127.0.0.1:{port}", APP]
    with serve(argv, port, tmp_path, env) as server:
        server.wait_for_workers(2)
        assert hey(f"{server.base_url}/items/3", 200).statuses == {200: 200}
        scrapes = [httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) for _ in range(3)]

    for scrape in scrapes:
        assert scrape.status_code == 200
        assert "x-worker-pid" not in scrape.headers  # answered by the master, not a worker
        assert scraped(scrape.text, "crowdfunding_api_requests_total", method="GET", handler="/items/{item_id}", status="200") == 200


def test_readme_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    config = tmp_path / "prometheus.yml"
    config.write_text(readme_snippet("prometheus-yml").replace("/etc/prometheus/crowdmon-token", str(token)))
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_kubernetes_relabelling_keeps_annotated_pods_at_their_port_and_path(tmp_path: Path) -> None:
    # The pods Kubernetes discovery would report, as static targets with the same meta labels
    # (the Debian build of Prometheus has no Kubernetes discovery); the README's relabelling runs
    # on them in a real Prometheus.
    pods = textwrap.indent(textwrap.dedent("""\
        static_configs:
          - targets: ["127.0.0.1:9"]
            labels:
              __meta_kubernetes_pod_annotation_prometheus_io_scrape: "true"
              __meta_kubernetes_pod_annotation_prometheus_io_path: /custom/metrics
              __meta_kubernetes_pod_annotation_prometheus_io_port: "8123"
          - targets: ["127.0.0.2:9"]
            labels:
              __meta_kubernetes_pod_annotation_prometheus_io_port: "8124"
        """), "    ")
    snippet = readme_snippet("kubernetes-scrape")
    discovery = "    kubernetes_sd_configs:\n      - role: pod\n"
    assert discovery in snippet
    prometheus = Prometheus(snippet.replace(discovery, pods), tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            targets = prometheus.targets()
            if targets["activeTargets"] and targets["droppedTargets"]:
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.2)
    finally:
        prometheus.close()

    assert [target["scrapeUrl"] for target in targets["activeTargets"]] == ["http://127.0.0.1:8123/custom/metrics"]
    assert [target["discoveredLabels"]["__address__"] for target in targets["droppedTargets"]] == ["127.0.0.2:9"]


def test_readme_kubernetes_annotations_match_what_is_served() -> None:
    pod = readme_snippet("kubernetes-pod")
    annotations = dict(re.findall(r'prometheus\.io/(\w+): "?([^"\n]+)"?', pod))
    gunicorn_bind = readme_command("gunicorn", "gunicorn")
    uvicorn_port = readme_command("uvicorn-workers", "uvicorn")

    assert annotations == {"scrape": "true", "path": "/metrics", "port": "8000"}
    assert gunicorn_bind[gunicorn_bind.index("-b") + 1].endswith(":" + annotations["port"])
    assert uvicorn_port[uvicorn_port.index("--port") + 1] == annotations["port"]
    mount = re.search(r"mountPath: (\S+)", pod)
    directory = re.search(r"name: PROMETHEUS_MULTIPROC_DIR\s+value: (\S+)", pod)
    assert mount is not None and directory is not None and mount.group(1) == directory.group(1)
