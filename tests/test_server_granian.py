"""Through a real granian server on 127.0.0.1 (one worker, its default asyncio tasks): the same
exact values as under uvicorn (``tests/test_server.py``) for what depends on the server, and the
request context inside granian's tasks."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.production_support import serve
from tests.support import PYTHON, free_port, scrape_samples, scraped

pytestmark = pytest.mark.timeout(60)


def granian(port: int) -> list[str]:
    return [PYTHON, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--factory", "tests.server_app:build_app"]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_granian_records_what_it_sends_and_receives(tmp_path: Path) -> None:
    port = free_port()
    with serve(granian(port), port, tmp_path, {}) as server, httpx.Client(base_url=server.base_url) as client:
        assert client.get("/items/7").json() == {"item": "7", "endpoint": "/items/{item_id}"}
        assert [len(client.get("/text").content), len(client.head("/text").content)] == [1000, 0]
        assert client.get("/none").status_code == 204
        assert len(client.get("/stream").content) == 10_000
        answered = client.post("/work", content=b"hello")
        assert (answered.status_code, answered.text) == (500, "Internal Server Error")

        # An upload the client abandons after 100 of 10,000 bytes, and a client gone before a 500.
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10000\r\n\r\n" + b"a" * 100)
            wait_until(lambda: scraped(client.get("/metrics").text, "crowdfunding_api_requests_in_progress", method="POST") == 1,
                       "the upload did not start")
        wait_until(lambda: "upload abandoned after 100 bytes" in server.log.read_text(), "the upload was not abandoned")
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /work?wait=gone HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            wait_until(lambda: scraped(client.get("/metrics").text, "crowdfunding_api_requests_in_progress", method="POST") == 1,
                       "the work did not start")
        wait_until(lambda: scraped(client.get("/metrics").text, "crowdfunding_api_requests_in_progress", method="POST") == 0,
                   "the work did not end")
        text = client.get("/metrics").text

    def requests(method: str, handler: str, status: int) -> float:
        return scraped(text, "crowdfunding_api_requests_total", method=method, handler=handler, status=str(status))

    def size(kind: str, method: str, handler: str) -> float:
        return scraped(text, f"crowdfunding_api_{kind}_size_bytes_sum", method=method, handler=handler)

    assert requests("GET", "/items/{item_id}", 200) == 1
    assert scraped(text, "external_api_duration_seconds_count", service="openai", endpoint="chat/completions", outcome="success") == 1
    assert (size("response", "GET", "/text"), size("response", "HEAD", "/text"), size("response", "GET", "/none")) == (1000, 0, 0)
    assert (requests("HEAD", "/text", 200), requests("GET", "/none", 204)) == (1, 1)
    assert (requests("GET", "/stream", 200), size("response", "GET", "/stream")) == (1, 10_000)
    assert (requests("POST", "/upload", 499), size("request", "POST", "/upload")) == (1, 100)
    assert (requests("POST", "/work", 500), requests("POST", "/work", 499), size("request", "POST", "/work")) == (1, 1, 10)
    assert scraped(text, "crowdfunding_api_requests_in_progress", method="POST") == 0
    assert sum(value for (name, _), value in scrape_samples(text).items() if name == "crowdmon_internal_errors_total") == 0
