"""Real servers on 127.0.0.1 (gunicorn with 2 uvicorn workers, ``uvicorn --workers 2``,
``granian --workers 2``, hypercorn), driven by ``hey``, scraped over HTTP and by a real
Prometheus: every total is exact, whichever worker answers, and a worker killed mid-run leaves no
gauge behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.production_support import (
    AUTH,
    TOKEN,
    Prometheus,
    Server,
    granian_workers_command,
    gunicorn_command,
    hey,
    hypercorn_command,
    prepare_directory_as_readme_says,
    prometheus_config,
    serve,
    server_env,
    uvicorn_workers_command,
)
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)

ITEMS = 1500
CHATS = 500
ITEMS_AFTER_RESTART = 1000
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
ITEM_LABELS = {"method": "GET", "handler": "/items/{item_id}", "status": "200"}
DOCUMENT_LABELS = {"operation": "retrieve", "document_type": "eu_crowdfunding", "status": "success"}
CHAT_LABELS = {"user_type": "authenticated", "message_type": "assistant", "cache_hit": "true", "rag_used": "true"}


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for prometheus in started:
        prometheus.close()


def start_prometheus(port: int, tmp_path: Path, started: list[Prometheus], *flags: str) -> Prometheus:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    prometheus = Prometheus(prometheus_config(f"127.0.0.1:{port}", token_file), tmp_path, *flags)
    started.append(prometheus)
    return prometheus


def drive_load(server: Server, items: int, chats: int = 0) -> None:
    load = hey(f"{server.base_url}/items/7", items)
    assert load.statuses == {200: items}
    if chats:
        load = hey(f"{server.base_url}/chat", chats, method="POST", body='{"text": "What is an ECSP licence?"}')
        assert load.statuses == {200: chats}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def assert_every_worker_reports(server: Server, workers: int, expected: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> int:
    """Scrape over fresh connections until ``workers`` distinct workers answered; every scrape
    must show exactly ``expected``.  Returns the number of scrapes.

    The workers share one listening socket and the kernel hands each connection to whichever
    accepts first, so one scrape at a time can keep landing on the same idle worker: scrapes
    go out in pairs, and a worker busy with one leaves the other to another worker."""
    answered: set[int] = set()
    scrapes = 0
    with ThreadPoolExecutor(2) as pool:
        while len(answered) < workers or scrapes < 3:
            for samples, pid in pool.map(lambda _: server.scrape(), range(2)):
                answered.add(pid)
                scrapes += 1
                got = {key: samples.get(key, 0.0) for key in expected}
                assert got == expected, f"scrape {scrapes} answered by worker {pid}"
            assert scrapes < 200, f"only workers {answered} answered 200 scrapes"
    return scrapes


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def hold_requests(server: Server, hold_dir: Path, pool: ThreadPoolExecutor, wanted_pid: int | None, count: int) -> list[Future[httpx.Response]]:
    """Start ``/hold`` requests until ``count`` are held, at least one by ``wanted_pid``."""

    def one_hold() -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=40) as client:
            return client.get("/hold")

    futures = []
    deadline = time.monotonic() + 30
    while True:
        while len(futures) < count:
            futures.append(pool.submit(one_hold))
        while len(markers(hold_dir)) < len(futures):
            assert time.monotonic() < deadline, f"holds did not arrive: {markers(hold_dir)}"
            time.sleep(0.02)
        if wanted_pid is None or wanted_pid in markers(hold_dir).values():
            return futures
        count += 2
        assert count <= 40, "no hold reached the chosen worker"


def markers(hold_dir: Path) -> dict[str, int]:
    return {path.name: int(path.name.split("-")[0]) for path in hold_dir.iterdir() if path.name != "release"}


def put_component(server: Server, state: str) -> int:
    with server.client() as client:
        response = client.put(f"/components/database/{state}")
    assert response.status_code == 200
    return int(response.json()["pid"])


def run_multiworker_matrix(server: Server, tmp_path: Path, prometheus: Prometheus) -> None:
    hold_dir = tmp_path / "hold"
    workers = server.wait_for_workers(2)

    # 1. Load from a bounded concurrent client: every scrape, whichever worker answers, is exact.
    drive_load(server, ITEMS, CHATS)
    assert_every_worker_reports(server, 2, {
        key("crowdfunding_api_requests_total", **ITEM_LABELS): ITEMS,
        key("crowdfunding_api_request_duration_seconds_count", method="GET", handler="/items/{item_id}"): ITEMS,
        key("chat_messages_total", **CHAT_LABELS): CHATS,
        key("document_operations_total", **DOCUMENT_LABELS): CHATS,
        key("crowdfunding_api_requests_in_progress", method="GET"): 0,
    })

    # OpenMetrics, gzip and name[] filtering work the same from the workers' files.
    with server.client() as client:
        filtered = client.get("/metrics", params={"name[]": "chat_messages_total"}, headers={
            **AUTH, "accept": "application/openmetrics-text; version=1.0.0", "accept-encoding": "gzip"})
    assert filtered.headers["content-encoding"] == "gzip"
    assert filtered.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert [line for line in filtered.text.splitlines() if not line.startswith("#")] == [
        f'chat_messages_total{{cache_hit="true",message_type="assistant",rag_used="true",user_type="authenticated"}} {CHATS}.0']

    # 2. Every worker says the database is healthy; then one of them, the victim, says unhealthy.
    healthy: set[int] = set()
    with ThreadPoolExecutor(2) as pairs:  # in pairs, as assert_every_worker_reports scrapes
        for _ in range(100):
            healthy.update(pairs.map(lambda _: put_component(server, "healthy"), range(2)))
            if healthy == workers:
                break
    assert healthy == workers
    victim = put_component(server, "unhealthy")

    # 3. Requests and sessions held in flight, some on the victim; the gauges show them all.
    with ThreadPoolExecutor(max_workers=40) as pool:
        holds = hold_requests(server, hold_dir, pool, victim, count=6)
        held = markers(hold_dir)
        held_by_victim = sum(1 for pid in held.values() if pid == victim)
        samples, _ = server.scrape()
        assert sample(samples, "crowdfunding_api_requests_in_progress", method="GET") == len(held)
        assert sample(samples, "active_sessions_current", user_type="authenticated") == len(held)
        assert sample(samples, "component_health_status", component="database", status="unhealthy") == 1

        # 4. Kill the victim mid-run; the server starts a replacement; more load arrives.
        os.kill(victim, signal.SIGKILL)
        replacement = server.wait_for_workers(2, timeout=30)
        assert victim not in replacement
        drive_load(server, ITEMS_AFTER_RESTART)

        (hold_dir / "release").touch()
        outcomes = [future.exception() or future.result() for future in holds]
    completed = sum(1 for outcome in outcomes if isinstance(outcome, httpx.Response) and outcome.status_code == 200)
    assert completed == len(held) - held_by_victim

    # 5. Totals exact (the dead worker's counts included), no gauge keeps the dead worker's value.
    total = ITEMS + ITEMS_AFTER_RESTART
    assert_every_worker_reports(server, 2, {
        key("crowdfunding_api_requests_total", **ITEM_LABELS): total,
        key("chat_messages_total", **CHAT_LABELS): CHATS,
        key("document_operations_total", **DOCUMENT_LABELS): CHATS,
        key("crowdfunding_api_requests_total", method="GET", handler="/hold", status="200"): completed,
        key("crowdfunding_api_requests_in_progress", method="GET"): 0,
        key("active_sessions_current", user_type="authenticated"): 0,
        key("component_health_status", component="database", status="unhealthy"): 0,
        key("component_health_status", component="database", status="healthy"): 1,
    })

    # 6. A real Prometheus scraping the server reads the same exact totals.
    assert_prometheus_reads(prometheus, total, CHATS)


def assert_prometheus_reads(prometheus: Prometheus, items: int, chats: int) -> None:
    query = 'sum(crowdfunding_api_requests_total{handler="/items/{item_id}",status="200"})'
    assert prometheus.wait_for(query, items) == items, prometheus.targets_health()
    assert prometheus.wait_for("sum(chat_messages_total)", chats) == chats
    assert prometheus.wait_for('sum(document_operations_total{status="success"})', chats) == chats
    # A scrape taken while requests were held showed them; a later one must not.
    assert prometheus.wait_for("sum(crowdfunding_api_requests_in_progress)", 0) == 0


def test_gunicorn_with_two_uvicorn_workers(tmp_path: Path, prometheus_for: list[Prometheus]) -> None:
    port = free_port()
    env = server_env(tmp_path, multiprocess=True)
    env["CROWDMON_TEST_PRUNE"] = "0"  # gunicorn's child_exit hook alone must clean up
    stale = Path(env["PROMETHEUS_MULTIPROC_DIR"]) / "counter_999999.db"
    stale.write_bytes(b"a previous run")  # emptied by the on_starting hook, or the scrape fails
    prometheus = start_prometheus(port, tmp_path, prometheus_for)
    with serve(gunicorn_command(port), port, tmp_path, env) as server:
        assert not stale.exists()
        run_multiworker_matrix(server, tmp_path, prometheus)
    assert "crowdmon: multiprocess metrics in" in server.log.read_text()


def test_uvicorn_with_two_workers(tmp_path: Path, prometheus_for: list[Prometheus]) -> None:
    port = free_port()
    env = server_env(tmp_path, multiprocess=True)
    (Path(env["PROMETHEUS_MULTIPROC_DIR"]) / "counter_999999.db").write_bytes(b"a previous run")
    prepare_directory_as_readme_says(env)
    prometheus = start_prometheus(port, tmp_path, prometheus_for)
    with serve(uvicorn_workers_command(port), port, tmp_path, env) as server:
        run_multiworker_matrix(server, tmp_path, prometheus)


def test_granian_with_two_workers(tmp_path: Path, prometheus_for: list[Prometheus]) -> None:
    port = free_port()
    env = server_env(tmp_path, multiprocess=True)
    (Path(env["PROMETHEUS_MULTIPROC_DIR"]) / "counter_999999.db").write_bytes(b"a previous run")
    prepare_directory_as_readme_says(env, "granian-workers")
    prometheus = start_prometheus(port, tmp_path, prometheus_for)
    with serve(granian_workers_command(port), port, tmp_path, env) as server:
        run_multiworker_matrix(server, tmp_path, prometheus)


def test_hypercorn_single_worker(tmp_path: Path, prometheus_for: list[Prometheus]) -> None:
    port = free_port()
    env = server_env(tmp_path, multiprocess=False)
    env["CROWDMON_TEST_EXEMPLARS"] = "traceparent"
    prometheus = start_prometheus(port, tmp_path, prometheus_for, "--enable-feature=exemplar-storage")
    with serve(hypercorn_command(port), port, tmp_path, env) as server:
        load = hey(f"{server.base_url}/items/7", ITEMS, headers=(f"traceparent: 00-{TRACE_ID}-{SPAN_ID}-01",))
        assert load.statuses == {200: ITEMS}
        load = hey(f"{server.base_url}/chat", CHATS, method="POST", body='{"text": "What is an ECSP licence?"}')
        assert load.statuses == {200: CHATS}
        hold_dir = tmp_path / "hold"
        with ThreadPoolExecutor(max_workers=8) as pool:
            holds = hold_requests(server, hold_dir, pool, None, count=4)
            samples, _ = server.scrape()
            assert sample(samples, "crowdfunding_api_requests_in_progress", method="GET") == 4
            assert sample(samples, "active_sessions_current", user_type="authenticated") == 4
            (hold_dir / "release").touch()
            assert [future.result().status_code for future in holds] == [200] * 4
        assert_every_worker_reports(server, 1, {
            key("crowdfunding_api_requests_total", **ITEM_LABELS): ITEMS,
            key("crowdfunding_api_request_duration_seconds_count", method="GET", handler="/items/{item_id}"): ITEMS,
            key("chat_messages_total", **CHAT_LABELS): CHATS,
        key("document_operations_total", **DOCUMENT_LABELS): CHATS,
            key("crowdfunding_api_requests_total", method="GET", handler="/hold", status="200"): 4,
            key("crowdfunding_api_requests_in_progress", method="GET"): 0,
            key("active_sessions_current", user_type="authenticated"): 0,
        })
        assert_prometheus_reads(prometheus, ITEMS, CHATS)
        # The trace id of the load's traceparent header reached Prometheus as an exemplar.
        series = prometheus.exemplars('crowdfunding_api_requests_total{handler="/items/{item_id}"}')
        traces = {exemplar["labels"]["trace_id"] for entry in series for exemplar in entry["exemplars"]}
        assert traces == {TRACE_ID}
        with server.client() as client:
            assert client.get("/metrics").status_code == 401
            assert client.get("/metrics", headers=AUTH).status_code == 200
