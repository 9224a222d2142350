"""Exact counts under load: a real uvicorn server on 127.0.0.1, and gunicorn with two uvicorn workers
in prometheus_client's multiprocess mode, with async endpoints and sync ones in
the threadpool, hit at once by several bounded ``hey`` clients (hey counts exactly).  Every request
counter and histogram ``_count`` equals what the clients sent and received: nothing lost, nothing
doubled, nothing left in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry

from crowdmon import (
    MetricsApp,
    PrometheusInstrumentation,
    default_instrumentation,
    setup_monitoring,
)
from crowdmon._types import ASGIApp, Message, Receive, Scope, Send
from tests.production_support import gunicorn_command, serve, server_env
from tests.support import free_port, scrape_samples, uvicorn_in_thread

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

UPLOAD = b"u" * 3000
ECHO = b'{"name": "load", "kind": "sync"}'


class LoadError(Exception):
    pass


def build_app(instrumentation: PrometheusInstrumentation, **options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/async/{item_id}")
    async def read_async(item_id: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"item_id": item_id}

    @app.get("/sync/{item_id}")
    def read_sync(item_id: int) -> dict[str, int]:  # runs in the threadpool
        return {"item_id": item_id}

    @app.post("/sync-echo")
    def echo(payload: dict[str, str]) -> dict[str, str]:  # threadpool, body parsed by FastAPI
        return payload

    @app.post("/upload")
    async def upload(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                await asyncio.sleep(0)
                yield b"c" * 1000

        return StreamingResponse(chunks())

    @app.get("/fail")
    def fail() -> None:  # an exception in the threadpool: 500
        raise LoadError("expected under load")

    @app.get("/pid")
    async def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    setup_monitoring(app, instrumentation=instrumentation, **options)
    return app


def multiworker_app() -> ASGIApp:
    """The same app for each worker of a multi-worker server (a factory: importing this module
    records nothing); ``/metrics`` sums the workers' files and wants ``METRICS_TOKEN``, and every
    response names its worker in ``x-worker-pid``."""
    instrumentation = default_instrumentation()
    app = build_app(instrumentation, metrics_app=MetricsApp(instrumentation, bearer_token=os.environ["METRICS_TOKEN"]))
    worker = (b"x-worker-pid", str(os.getpid()).encode())

    async def naming_the_worker(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), worker]
            await send(message)

        await app(scope, receive, send_with_pid)

    return naming_the_worker


@dataclass
class Load:
    """One hey client: ``requests`` requests with ``concurrency`` workers."""

    method: str
    path: str
    handler: str
    requests: int
    concurrency: int
    status: int
    body: bytes = b""
    response_bytes: int | None = None  # per request, when fixed

    def command(self, base_url: str) -> list[str]:
        command = ["hey", "-n", str(self.requests), "-c", str(self.concurrency), "-m", self.method, "-t", "20"]
        if self.body:
            command += ["-T", "application/json", "-d", self.body.decode()]
        return [*command, base_url + self.path]


# hey sends requests // concurrency per worker: every count here divides exactly.
LOADS = [
    Load("GET", "/async/7", "/async/{item_id}", 1600, 16, 200, response_bytes=len(b'{"item_id":7}')),
    Load("GET", "/sync/8", "/sync/{item_id}", 960, 12, 200, response_bytes=len(b'{"item_id":8}')),
    Load("POST", "/sync-echo", "/sync-echo", 480, 8, 200, ECHO, response_bytes=len(b'{"name":"load","kind":"sync"}')),
    Load("POST", "/upload", "/upload", 400, 8, 200, UPLOAD, response_bytes=4),
    Load("GET", "/stream", "/stream", 300, 6, 200, response_bytes=4000),
    Load("GET", "/fail", "/fail", 100, 4, 500),
    Load("GET", "/missing/route", "<unmatched>", 200, 4, 404),
]


STATUS_LINE = re.compile(r"^\s+\[(\d+)\]\s+(\d+) responses$", re.MULTILINE)


def statuses_seen(output: str) -> dict[int, int]:
    """The ``Status code distribution`` of hey's summary; hey reports transport errors apart."""
    assert "Error distribution" not in output, output
    return {int(status): int(count) for status, count in STATUS_LINE.findall(output)}


@pytest.fixture(scope="module")
def hey() -> str:
    found = shutil.which("hey")
    assert found, "hey is installed by tests/install-deps.sh"
    return found


def drive(base_url: str) -> list[str]:
    """All the hey clients at once; their summaries."""
    assert all(load.requests % load.concurrency == 0 for load in LOADS)
    clients = [
        subprocess.Popen(load.command(base_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for load in LOADS
    ]
    return [client.communicate(timeout=90)[0] for client in clients]


def assert_exact(samples: Samples, outputs: list[str]) -> None:
    """Every count equals what hey sent and received; nothing else, nothing in progress."""

    def sample(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    for load, output in zip(LOADS, outputs, strict=True):
        assert statuses_seen(output) == {load.status: load.requests}, (load.path, output)
        route = {"method": load.method, "handler": load.handler}
        assert sample("crowdfunding_api_requests_total", status=str(load.status), **route) == load.requests, load.path
        for histogram in ("request_duration_seconds", "request_size_bytes", "response_size_bytes"):
            assert sample(f"crowdfunding_api_{histogram}_count", **route) == load.requests, (load.path, histogram)
            assert sample(f"crowdfunding_api_{histogram}_bucket", le="+Inf", **route) == load.requests
        assert sample("crowdfunding_api_request_size_bytes_sum", **route) == load.requests * len(load.body)
        if load.response_bytes is not None:
            assert sample("crowdfunding_api_response_size_bytes_sum", **route) == load.requests * load.response_bytes

    # Nothing else was recorded (but the servers' own readiness polls of /pid), nothing counted
    # twice, nothing left in progress.
    total = sum(
        v for (name, labels), v in samples.items()
        if name == "crowdfunding_api_requests_total" and ("handler", "/pid") not in labels
    )
    assert total == sum(load.requests for load in LOADS)
    assert sample("crowdfunding_api_requests_in_progress", method="GET") == 0
    assert sample("crowdfunding_api_requests_in_progress", method="POST") == 0
    assert [v for (name, _), v in samples.items() if name == "crowdmon_internal_errors_total" and v] == []


def test_every_request_under_concurrent_load_is_counted_exactly_once(
    registry: CollectorRegistry, hey: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The expected tracebacks of /fail would flood the log.
    monkeypatch.setattr(logging.getLogger("uvicorn.error"), "disabled", True)
    with uvicorn_in_thread(build_app(PrometheusInstrumentation(registry)), log_config=None) as base_url:
        outputs = drive(base_url)
        scrape = httpx.get(base_url + "/metrics", timeout=10).text

    assert_exact(scrape_samples(scrape), outputs)


def test_every_request_across_two_gunicorn_workers_is_counted_exactly_once(tmp_path: Path, hey: str) -> None:
    port = free_port()
    env = server_env(tmp_path, multiprocess=True)
    # The README's gunicorn command (crowdmon's hooks, uvicorn workers), serving this module's app.
    argv = [*gunicorn_command(port, workers=2)[:-1], f"{__name__}:multiworker_app()"]
    with serve(argv, port, tmp_path, env) as server:
        server.wait_for_workers(2)
        outputs = drive(server.base_url)
        answered: set[int] = set()
        # Whichever worker answers the scrape, the sums of both are exact.  Scraped in pairs:
        # the kernel may hand one scrape at a time to the same idle worker again and again.
        with ThreadPoolExecutor(2) as pairs:
            for _ in range(100):
                for samples, pid in pairs.map(lambda _: server.scrape(), range(2)):
                    assert_exact(samples, outputs)
                    answered.add(pid)
                if len(answered) == 2:
                    break
        assert len(answered) == 2
        # Each worker kept its values in prometheus_client's multiprocess files.
        assert len(list(Path(env["PROMETHEUS_MULTIPROC_DIR"]).glob("counter_*.db"))) >= 2
