"""Helpers for tests: reading metrics back, and real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` read back from the registry; 0.0 when it does not exist."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def scrape_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and label set."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scraped(text: str, name: str, **labels: str) -> float:
    return scrape_samples(text).get((name, frozenset(labels.items())), 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def uvicorn_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """A real uvicorn server for ``app`` on 127.0.0.1, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a server subprocess: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def wait_for_http(url: str, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


PYTHON = sys.executable


def run_threads_while(beside: Callable[[], None], workers: list[Callable[[], None]]) -> None:
    """``workers`` each in a thread of its own, and ``beside`` called over and over in one more
    (a scraper, say) until they are all done."""
    done = threading.Event()

    def repeat() -> None:
        while not done.is_set():
            beside()

    alongside = threading.Thread(target=repeat)
    threads = [threading.Thread(target=work) for work in workers]
    alongside.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    alongside.join()
