"""``python3 -m crowdmon demo``: the README's first command, run for real on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx

from tests.support import REPO_ROOT, free_port, scrape_samples, subprocess_env, wait_for_http


def test_demo_serves_metrics_and_health_with_traffic_and_stops_by_itself() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "crowdmon", "demo", "--port", str(port), "--duration", "6", "--rate", "50"],
        cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_http(base_url + "/health", timeout=15, process=process)
        deadline = time.monotonic() + 4
        total = 0.0
        while time.monotonic() < deadline and total < 20:
            scrape = httpx.get(base_url + "/metrics").text
            total = sum(
                count for (name, labels), count in scrape_samples(scrape).items()
                if name == "crowdfunding_api_requests_total" and ("handler", "/chat") in labels
            )
            time.sleep(0.2)
        health = httpx.get(base_url + "/health")
        stdout, stderr = process.communicate(timeout=20)
    finally:
        process.kill()

    assert total >= 20, "the demo's traffic generator drove no /chat requests"
    assert health.status_code == 200
    assert process.returncode == 0, stderr.decode()
    assert f"http://127.0.0.1:{port}/metrics" in stdout.decode()


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crowdmon", "demo", *args],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )


def test_demo_help_gives_the_defaults() -> None:
    result = demo("--help")

    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert "address to listen on (default: 127.0.0.1)" in help_text
    assert "port to listen on (default: 8000)" in help_text


def test_meaningless_demo_settings_are_usage_errors() -> None:
    for args, message in (
        (["--duration", "-1"], "argument --duration: a number of seconds above 0, got -1"),
        (["--duration", "nan"], "argument --duration: a number of seconds above 0, got nan"),
        (["--rate", "-5"], "argument --rate: requests per second, 0 or more, got -5"),
        (["--port", "70000"], "argument --port: a TCP port is 1 to 65535, got 70000"),
        (["--port", "abc"], "argument --port: a TCP port is 1 to 65535, got 'abc'"),
        (["--duration", "5m"], "argument --duration: a number of seconds above 0, got '5m'"),
        (["--rate", "fast"], "argument --rate: requests per second, 0 or more, got 'fast'"),
        (["--host", ""], "argument --host: an address to listen on, such as 127.0.0.1 (0.0.0.0: every interface), got ''"),
    ):
        result = demo(*args)
        assert (result.returncode, result.stdout) == (2, ""), args
        assert message in result.stderr


def test_a_port_in_use_is_one_line_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = demo("--port", str(port), "--duration", "2")
    assert result.returncode == 1
    assert result.stderr.strip() == f"crowdmon demo cannot listen on 127.0.0.1:{port}: Address already in use"
