"""Real servers, a real load client and a real Prometheus for the production tests."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import PYTHON, REPO_ROOT, free_port, scrape_samples, subprocess_env

APP = "tests.production_app:app"
TOKEN = "s3cr3t-scrape-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def readme_snippet(name: str) -> str:
    """The fenced block after ``<!-- snippet: name -->`` in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert match is not None, f"README.md has no snippet {name!r}"
    return match.group(1)


def readme_command(name: str, program: str) -> list[str]:
    """The ``program ...`` command line of README snippet ``name``, split into arguments."""
    for line in readme_snippet(name).splitlines():
        if line.startswith(program + " "):
            return shlex.split(line, comments=True)  # as a shell reads it: "#" starts a comment
    raise AssertionError(f"README snippet {name!r} has no {program} command")


def with_options(argv: list[str], **options: str) -> list[str]:
    """``argv`` with the value after each given option replaced (``b="127.0.0.1:1"`` → ``-b``)."""
    argv = list(argv)
    for option, value in options.items():
        flag = ("-" if len(option) == 1 else "--") + option.replace("_", "-")
        index = argv.index(flag)
        argv[index + 1] = value
    return argv


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    workers: set[int] = field(default_factory=set)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10)

    def scrape(self, name: str | None = None, **labels: str) -> tuple[dict[tuple[str, frozenset[tuple[str, str]]], float], int]:
        """One scrape over a fresh connection: its samples and the worker that answered."""
        with self.client() as client:
            response = client.get("/metrics", headers=AUTH)
        assert response.status_code == 200, response.text
        return scrape_samples(response.text), int(response.headers["x-worker-pid"])

    def wait_for_workers(self, count: int, timeout: float = 30.0) -> set[int]:
        """Poll ``/pid`` over fresh connections until ``count`` distinct workers answered."""
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while len(seen) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"saw workers {seen}, wanted {count}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError), self.client() as client:
                seen.add(client.get("/pid").json()["pid"])
            time.sleep(0.02)
        return seen


@contextlib.contextmanager
def serve(argv: list[str], port: int, tmp_path: Path, env: dict[str, str]) -> Iterator[Server]:
    """Run a server command from the repository root until the block ends; stop it with SIGTERM."""
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=subprocess_env(env), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                httpx.get(server.base_url + "/pid", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[:3]} did not answer in 30 s:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group this test started
                process.wait(5)


def server_env(tmp_path: Path, multiprocess: bool) -> dict[str, str]:
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir(exist_ok=True)
    env = {"HOLD_DIR": str(hold_dir), "METRICS_TOKEN": TOKEN}
    if multiprocess:
        metrics_dir = tmp_path / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def gunicorn_command(port: int, workers: int = 2) -> list[str]:
    """The README's gunicorn command, on 127.0.0.1:``port`` with the test app."""
    argv = readme_command("gunicorn", "gunicorn")
    argv = with_options(argv, w=str(workers), b=f"127.0.0.1:{port}")
    return [PYTHON, "-m", "gunicorn", *argv[1:-1], "--graceful-timeout", "3", APP]


def uvicorn_workers_command(port: int) -> list[str]:
    """The README's ``uvicorn --workers`` command, on 127.0.0.1:``port`` with the test app."""
    argv = readme_command("uvicorn-workers", "uvicorn")
    argv = with_options(argv, workers="2", host="127.0.0.1", port=str(port))
    return [PYTHON, "-m", "uvicorn", *argv[1:-1], "--log-level", "warning", APP]


def granian_workers_command(port: int) -> list[str]:
    """The README's ``granian --workers`` command, on 127.0.0.1:``port`` with the test app."""
    argv = readme_command("granian-workers", "granian")
    argv = with_options(argv, workers="2", host="127.0.0.1", port=str(port))
    return [PYTHON, "-m", "granian", *argv[1:-1], "--log-level", "warning", APP]


def hypercorn_command(port: int) -> list[str]:
    return [PYTHON, "-m", "hypercorn", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "3", APP]


def prepare_directory_as_readme_says(env: dict[str, str], snippet: str = "uvicorn-workers") -> None:
    """The README's step before ``uvicorn --workers`` (or another server without hooks): check
    and empty the directory."""
    argv = readme_command(snippet, "python3")
    result = subprocess.run([PYTHON, *argv[1:]], env=subprocess_env(env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert "is ready for a multi-worker server" in result.stdout


@dataclass
class Load:
    """What ``hey`` sent and what came back."""

    sent: int
    statuses: dict[int, int]


def hey(url: str, requests: int, concurrency: int = 20, method: str = "GET", body: str | None = None, headers: tuple[str, ...] = ()) -> Load:
    """``hey`` against ``url``: ``requests`` requests, at most ``concurrency`` at a time."""
    # hey gives each of its workers requests // concurrency requests: keep the total exact.
    assert requests % concurrency == 0, "requests must be a multiple of concurrency"
    argv = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", method, "-t", "30"]
    if body is not None:
        argv += ["-d", body, "-T", "application/json"]
    for header in headers:
        argv += ["-H", header]
    result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    statuses = {int(code): int(count) for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", result.stdout)}
    errors = re.search(r"Error distribution:(.*)", result.stdout, re.S)
    assert errors is None, result.stdout[-2000:]
    return Load(requests, statuses)


class Prometheus:
    """A real Prometheus on 127.0.0.1 with its own config and storage under a temp dir."""

    def __init__(self, config: str, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        directory = tmp_path / "prometheus"
        directory.mkdir()
        (directory / "prometheus.yml").write_text(config)
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    *flags,
                ],
                stdout=sink, stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def query(self, expression: str) -> float | None:
        """The single value of an instant query, or ``None`` while it has no result."""
        try:
            response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        result = response.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expression: str, expected: float, timeout: float = 30.0) -> float | None:
        """Poll ``expression`` until it equals ``expected`` or ``timeout`` passes; the last value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            last = self.query(expression)
            if last == expected:
                return last
            time.sleep(0.25)
        return last

    def exemplars(self, expression: str) -> list[dict[str, Any]]:
        """The query-exemplars API's answer for ``expression`` over the last minute."""
        now = time.time()
        try:
            response = httpx.get(f"{self.url}/api/v1/query_exemplars", params={"query": expression, "start": now - 60, "end": now + 60}, timeout=5)
        except httpx.HTTPError:
            return []
        return list(response.json().get("data") or []) if response.status_code == 200 else []

    def targets(self) -> dict[str, list[dict[str, Any]]]:
        """The targets API's answer: ``activeTargets`` and ``droppedTargets``; empty until ready."""
        try:
            response = httpx.get(f"{self.url}/api/v1/targets", timeout=5)
        except httpx.HTTPError:
            return {"activeTargets": [], "droppedTargets": []}
        return response.json()["data"] if response.status_code == 200 else {"activeTargets": [], "droppedTargets": []}

    def targets_health(self) -> list[str]:
        return [target["health"] + ":" + target.get("lastError", "") for target in self.targets()["activeTargets"]]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def prometheus_config(target: str, token_file: Path) -> str:
    """The README's ``prometheus.yml`` scrape config, pointed at ``target``, scraping every second."""
    snippet = readme_snippet("prometheus-yml")
    snippet = snippet.replace("app.internal:8000", target)
    snippet = snippet.replace("/etc/prometheus/crowdmon-token", str(token_file))
    snippet = snippet.replace("scrape_interval: 15s", "scrape_interval: 1s").replace("scrape_timeout: 10s", "scrape_timeout: 1s")
    return snippet
