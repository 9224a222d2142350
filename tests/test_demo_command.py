"""``python3 -m crowdmon demo``: the README's first command, run for real on 127.0.0.1."""

from __future__ import annotations

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
