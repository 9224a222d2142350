"""Smoke tests: every benchmark runs a few iterations end to end.  Nothing here asserts on speed;
the assertions are on what the benchmarks check and report (counts served, tables, skips)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from crowdmon import bench
from crowdmon._types import Receive, Scope, Send
from crowdmon.cli import main
from tests.support import PYTHON, REPO_ROOT, subprocess_env


def test_asgi_benchmark_runs_every_variant_and_checks_their_counters() -> None:
    report = bench.run_benchmark("asgi", quick=True)

    assert report.data["skipped"] == {}  # the bench extra is installed by tests/install-deps.sh
    measured = {(r["framework"], r["route"], r["variant"]) for r in report.data["results"]}
    assert measured == {(f, r, v) for f in bench.FRAMEWORKS for r in bench.ROUTES for v in bench.VARIANTS}
    # Warm-up (one per route) plus (rounds + 1) x requests per route, recorded by every peer.
    served = len(bench.ROUTES) * (1 + (1 + 1) * 10)
    assert report.data["counts"]["starlette/crowdmon"] == {"served": served, "recorded": served}
    assert all(count["recorded"] == served for count in report.data["counts"].values())
    assert len(report.data["counts"]) == len(bench.FRAMEWORKS) * 5  # all but the two baselines
    assert [t.what.split(" / ")[1] for t in report.targets] == [
        "naive two-call overhead",
        "prometheus-fastapi-instrumentator overhead",
        "pass-through overhead (goal)",
    ]


def test_a_variant_that_does_not_record_every_request_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench.build_variant

    def losing(name: str, framework: str) -> bench.Variant:
        variant = real(name, framework)
        if variant.recorded is not None:
            recorded = variant.recorded
            variant.recorded = lambda: recorded() - 1
        return variant

    monkeypatch.setattr(bench, "build_variant", losing)
    with pytest.raises(RuntimeError, match="naive on starlette recorded 60 requests but served 61"):
        bench.bench_asgi(frameworks=("starlette",), routes=("json",), variants=("bare", "naive"), rounds=2, requests=20)


def test_the_status_only_middleware_hands_the_app_its_own_send_and_changes_no_response() -> None:
    sends: list[object] = []
    inner = bench.starlette_app()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sends.append(send)
        await inner(scope, receive, send)

    middleware = bench.StatusOnlyMiddleware(app)

    assert asyncio.run(bench.serve(middleware, bench.http_scope("/items/42"))) == 200
    assert asyncio.run(bench.serve(middleware, bench.http_scope("/no-such-page"))) == 404
    assert len(sends) == 2 and all(getattr(send, "__name__", "") == "send_status" for send in sends)


def test_decorator_benchmark_times_prometheus_client_and_prometheus_async() -> None:
    report = bench.run_benchmark("decorators", quick=True)

    assert {"sync/Histogram.time()", "async/prometheus_async aio.time"} <= set(report.data["overhead_us"])
    assert "µs/call" in report.text


@pytest.mark.parametrize(("stack", "on"), [("plain", "uvicorn"), ("standard", "uvicorn[standard]")])
def test_server_benchmark_serves_every_request_under_uvicorn(stack: str, on: str) -> None:
    report = bench.run_benchmark("server", quick=True, stack=stack)

    assert {name: len(runs) for name, runs in report.data["runs"].items()} == {
        "bare": 1, "passthrough": 1, "naive": 1, "crowdmon": 1,
        "fastapi_bare": 1, "fastapi_passthrough": 1, "fastapi_naive": 1, "fastapi_crowdmon": 1,
    }
    assert all(run["ok"] == 200 for runs in report.data["runs"].values() for run in runs)
    how = "loaded together" if len(os.sched_getaffinity(0)) >= 2 else "alone"  # together needs two CPUs
    assert [target.what for target in report.targets] == [
        f"crowdmon throughput / bare throughput, {on}, {how}",
        f"crowdmon throughput / bare throughput, {on}, {how} (fastapi)",
    ]
    assert report.data["stack"] == stack
    assert bench.describe_stack(stack) in report.text
    if how == "loaded together":
        assert {name: len(rates) for name, rates in report.data["together"].items()} == {name: 1 for name in report.data["runs"]}
        assert report.data["together_ratios"]["bare"] == report.data["together_ratios"]["fastapi_bare"] == 1.0
    assert "starlette: crowdmon / bare alone: throughput" in report.text
    assert "fastapi: crowdmon / bare alone: throughput" in report.text


HEY_OUTPUT = """
Summary:
  Requests/sec:\t1234.5678

Status code distribution:
  [200]\t4938 responses
"""


def test_a_loaded_together_rate_counts_only_when_every_response_was_a_200() -> None:
    assert bench._rate("crowdmon", HEY_OUTPUT) == 1234.5678

    with pytest.raises(RuntimeError, match="crowdmon: not every response was a 200"):
        bench._rate("crowdmon", HEY_OUTPUT + "  [500]\t12 responses\n")
    with pytest.raises(RuntimeError, match="naive: not every response was a 200"):
        bench._rate("naive", HEY_OUTPUT + "\nError distribution:\n  [3]\tdial tcp: connection refused\n")


def test_a_server_stack_that_is_not_installed_is_reported_as_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "uvloop" else find_spec(name, *args))

    report = bench.bench_server(stack="standard")

    assert report.text == (
        "skipped: uvicorn --http httptools --loop uvloop (standard): uvloop is not installed:"
        " pip install 'uvicorn[standard]' (or crowdmon's bench extra), or run on --stack plain"
    )
    assert report.targets == []


def test_the_server_stack_is_checked_before_any_benchmark_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "asgi", "--stack", "standard"]) == 2
    assert "--stack is a setting of the server benchmark; add server to asgi" in capsys.readouterr().err

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "httptools" else find_spec(name, *args))
    assert main(["bench", "--stack", "standard"]) == 2
    assert "httptools is not installed" in capsys.readouterr().err


def test_server_benchmark_settings_are_checked_before_any_server_starts() -> None:
    with pytest.raises(ValueError, match="together_rounds must be at least 1"):
        bench.bench_server(together_rounds=0)
    with pytest.raises(ValueError, match="frameworks are any of starlette, fastapi, got \\['django'\\]"):
        bench.bench_server(frameworks=["django"])
    with pytest.raises(ValueError, match="the server stack is one of plain, standard, got 'gunicorn'"):
        bench.bench_server(stack="gunicorn")


def test_scrape_benchmark_renders_the_same_series_both_ways() -> None:
    instrumentation, native, samples = bench.populated_registries(handlers=3)
    ours = bench.MetricsApp(instrumentation).render("")[0].decode()
    theirs = bench.generate_latest(native).decode()

    # 3 handlers x 4 methods x 6 statuses counters, 3 histograms over 3 x 4 routes.
    assert ours.count("crowdfunding_api_requests_total{") == 72
    assert ours.count("crowdfunding_api_request_duration_seconds_count{") == theirs.count(
        "crowdfunding_api_request_duration_seconds_count{"
    ) == 12
    assert samples > 72
    assert bench.run_benchmark("scrape", quick=True).data["samples"] > 1000


def test_memory_benchmark_records_every_random_request() -> None:
    report = bench.run_benchmark("memory", quick=True)

    assert [count for count, _ in report.data["rss_mib"]] == [1000, 2000]
    assert report.targets[0].what.startswith("RSS growth")


def test_crowdmon_bench_command_prints_the_tables_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    assert main(["bench", "scrape", "memory", "--quick", "--json", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "== scrape cost ==" in printed and "== memory ==" in printed
    assert "prometheus-client" in printed  # the versions the numbers were taken with
    assert [r["name"] for r in json.loads(out.read_text())["reports"]] == ["scrape cost", "memory"]


def test_an_unknown_benchmark_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scrape", "latency"]) == 2
    assert "unknown benchmark latency; choose from asgi, decorators, server, scrape, memory" in capsys.readouterr().err


def test_benchmarks_run_script_is_the_same_command() -> None:
    result = subprocess.run(
        [PYTHON, str(REPO_ROOT / "benchmarks" / "run.py"), "scrape", "--quick"],
        env=subprocess_env(), capture_output=True, text=True, timeout=60, check=True,
    )
    assert "== scrape cost ==" in result.stdout


def test_a_json_path_that_cannot_be_written_is_refused_before_any_benchmark_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "memory", "--quick", "--json", str(tmp_path / "no-such-dir" / "out.json")]) == 2
    captured = capsys.readouterr()
    assert "--json" in captured.err and "not a file that can be written in an existing directory" in captured.err
    assert "== memory ==" not in captured.out


def test_rounds_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "server", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("stack", "options"), [("plain", "h11 --loop asyncio"), ("standard", "httptools --loop uvloop")])
def test_paired_server_run_reports_every_variant_against_the_first(stack: str, options: str) -> None:
    result = subprocess.run(
        [PYTHON, str(REPO_ROOT / "benchmarks" / "paired_server.py"), "--variants", "bare,crowdmon", "--rounds", "1", "--seconds", "1",
         "--framework", "fastapi", "--stack", stack],
        capture_output=True, text=True, timeout=120, env=subprocess_env(), check=True,
    )
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("bare ", "crowdmon "))}

    assert rows["bare"][2:] == ["1.000", "1.000"]
    assert 0 < float(rows["crowdmon"][2]) < 2
    assert f"every fastapi worker, uvicorn --http {options} ({stack}), loaded at once for 1 s" in result.stdout


def _instructions_module() -> Any:
    spec = importlib.util.spec_from_file_location("instructions", REPO_ROOT / "benchmarks" / "instructions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_instruction_counts_keep_alive_client_reads_whole_responses_from_a_uvicorn_worker() -> None:
    instructions = _instructions_module()
    with bench.running_servers(["crowdmon"], set(), 2) as servers:
        _, url = servers["crowdmon"]
        port = int(url.rsplit(":", 1)[1])
        for path in bench.ROUTES.values():  # Content-Length, and chunked for the stream
            instructions.keep_alive_client(port, path, 25, timeout=10)
        with pytest.raises(RuntimeError, match=re.escape("answered b'HTTP/1.1 404 Not Found'")):
            instructions.keep_alive_client(port, "/missing", 1, timeout=10)


def test_the_instruction_counts_body_end_waits_for_the_whole_body() -> None:
    body_end = _instructions_module().body_end

    assert body_end(b"HTTP/1.1 200 OK\r\ncontent-length: 4", b"abcdHTTP") == 4
    assert body_end(b"HTTP/1.1 200 OK\r\ncontent-length: 4", b"abc") is None
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked"
    assert body_end(chunked, b"3\r\nabc\r\n0\r\n\r\nHTTP") == 13
    assert body_end(chunked, b"3\r\nabc\r\n") is None
    assert body_end(chunked, b"0\r\n\r\n") == 5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--server", "--variants", "bare", "status_only"], "--server runs the server variants, bare, passthrough, naive, crowdmon; not status_only"),
        (["--variants", "crowdmon"], "the variants include bare: every overhead is counted from it"),
    ],
)
def test_the_instruction_counts_refuse_variants_they_cannot_count(arguments: list[str], message: str) -> None:
    result = subprocess.run(
        [PYTHON, str(REPO_ROOT / "benchmarks" / "instructions.py"), *arguments],
        capture_output=True, text=True, timeout=60, env=subprocess_env(),
    )

    assert result.returncode == 2
    assert message in result.stderr
