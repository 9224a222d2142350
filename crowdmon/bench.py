"""``crowdmon bench``: what crowdmon costs, against the bare app and the peers, measured in one run.

Five benchmarks, each printing a table:

- ``asgi``: in-process requests through Starlette and FastAPI apps, bare and wrapped by crowdmon,
  a pass-through middleware, a middleware that only learns each status, a naive two-call
  prometheus_client middleware and the peers.
- ``decorators``: per-call cost of crowdmon's decorators, ``Histogram.time()`` and
  prometheus-async's ``aio.time``.
- ``server``: real uvicorn servers on 127.0.0.1 under ``hey``, serving the Starlette and the FastAPI
  app: bare, a pass-through middleware, the naive middleware and crowdmon, on plain uvicorn or on
  uvicorn[standard] (:data:`SERVER_STACKS`).
- ``scrape``: rendering ``/metrics`` over thousands of series.
- ``memory``: RSS while a million requests hit random paths with random methods.

In-process timings are CPU time of this process (``time.process_time``), so other processes on a
shared machine add less noise; the server benchmark is wall-clock by nature.  Every timing is
taken in rounds, variants interleaved in a shuffled order each round, and reported as the median over rounds of the difference (and ratio) against the bare baseline of the same round.
Peers come from the ``bench`` extra; a peer that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from crowdmon._types import ASGIApp, Message, Receive, Scope, Send
from crowdmon.exposition import MetricsApp
from crowdmon.instrumentation import PrometheusInstrumentation
from crowdmon.middleware import PrometheusMiddleware

BENCHMARKS = ("asgi", "decorators", "server", "scrape", "memory")
FRAMEWORKS = ("starlette", "fastapi")
ROUTES = {"json": "/items/42", "text": "/text", "stream": "/stream"}
VARIANTS = ("bare", "passthrough", "status_only", "naive", "crowdmon", "instrumentator", "starlette_exporter", "opentelemetry")
PEER_PACKAGES = {
    "instrumentator": "prometheus-fastapi-instrumentator",
    "starlette_exporter": "starlette-exporter",
    "opentelemetry": "opentelemetry-instrumentation-asgi",
    "prometheus_async": "prometheus-async",
}


class Skipped(Exception):
    """A variant that cannot run here (its package is not installed)."""


# -- the apps under test: identical routes on Starlette and FastAPI ----------------------------------


async def _chunks() -> Any:
    for _ in range(3):
        yield b"chunk of a streamed body\n"


def starlette_app() -> Starlette:
    async def item(request: Request) -> Response:
        return JSONResponse({"id": int(request.path_params["item_id"]), "name": "item"})

    async def text(request: Request) -> Response:
        return PlainTextResponse("hello, world")

    async def stream(request: Request) -> Response:
        return StreamingResponse(_chunks(), media_type="text/plain")

    return Starlette(
        routes=[Route("/items/{item_id:int}", item), Route("/text", text), Route("/stream", stream)]
    )


def fastapi_app() -> Starlette:
    try:
        from fastapi import FastAPI
    except ImportError as error:
        raise Skipped("fastapi is not installed") from error

    app = FastAPI(openapi_url=None)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return {"id": item_id, "name": "item"}

    @app.get("/text", response_class=PlainTextResponse)
    async def text() -> str:
        return "hello, world"

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(_chunks(), media_type="text/plain")

    return app


def make_app(framework: str) -> Starlette:
    return starlette_app() if framework == "starlette" else fastapi_app()


# -- the middlewares compared --------------------------------------------------------------------------


class PassThroughMiddleware:
    """Records nothing: the floor any middleware pays for one more ASGI layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class StatusOnlyMiddleware:
    """Learns each response's status through a ``send`` of its own, and records nothing: the
    least any middleware that counts responses by status adds to one more ASGI layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        def send_status(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        await self.app(scope, receive, send_status)


class NaiveMiddleware:
    """What most hand-written middlewares do: ``labels().inc()`` and ``labels().observe()``."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter("naive_requests", "Requests.", ["method", "handler", "status"], registry=registry)
        self.duration = Histogram("naive_request_duration_seconds", "Latency.", ["method", "handler"], registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", "none")
            self.requests.labels(scope["method"], handler, str(status)).inc()
            self.duration.labels(scope["method"], handler).observe(perf_counter() - start)


@dataclass
class Variant:
    name: str
    app: ASGIApp
    #: The number of requests the variant's own request counter holds; None for the baselines.
    recorded: Callable[[], float] | None = None


def counter_total(registry: CollectorRegistry, sample_name: str) -> float:
    """The sum of every sample called ``sample_name`` in ``registry``."""
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == sample_name
    )


def build_variant(name: str, framework: str) -> Variant:
    """``name`` (one of :data:`VARIANTS`) wrapped around a fresh ``framework`` app."""
    app = make_app(framework)
    if name == "bare":
        return Variant(name, app)
    if name == "passthrough":
        app.add_middleware(PassThroughMiddleware)
        return Variant(name, app)
    if name == "status_only":
        app.add_middleware(StatusOnlyMiddleware)
        return Variant(name, app)
    registry = CollectorRegistry()
    if name == "naive":
        app.add_middleware(NaiveMiddleware, registry=registry)
        return Variant(name, app, lambda: counter_total(registry, "naive_requests_total"))
    if name == "crowdmon":
        app.add_middleware(PrometheusMiddleware, registry=registry)
        return Variant(name, app, lambda: counter_total(registry, "crowdfunding_api_requests_total"))
    if name == "instrumentator":
        try:
            from prometheus_fastapi_instrumentator import Instrumentator
        except ImportError as error:
            raise Skipped(f"{PEER_PACKAGES[name]} is not installed") from error
        Instrumentator(registry=registry).instrument(app)
        return Variant(name, app, lambda: counter_total(registry, "http_requests_total"))
    if name == "starlette_exporter":
        try:
            from prometheus_client import REGISTRY
            from starlette_exporter import PrometheusMiddleware as ExporterMiddleware
        except ImportError as error:
            raise Skipped(f"{PEER_PACKAGES[name]} is not installed") from error
        # It always registers on the global registry; a prefix of its own keeps variants apart.
        prefix = f"exporter_{framework}_{id(app)}"
        app.add_middleware(ExporterMiddleware, prefix=prefix)
        return Variant(name, app, lambda: counter_total(REGISTRY, f"{prefix}_requests_total"))
    if name == "opentelemetry":
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
            from opentelemetry.sdk.metrics import MeterProvider
        except ImportError as error:
            raise Skipped(
                f"{PEER_PACKAGES[name]}, opentelemetry-exporter-prometheus or opentelemetry-sdk is not installed"
            ) from error
        provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
        app.add_middleware(OpenTelemetryMiddleware, meter_provider=provider)
        return Variant(name, app, lambda: _otel_requests(registry))
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def _otel_requests(registry: CollectorRegistry) -> float:
    # The duration histogram's count is OpenTelemetry's request count (old or new conventions).
    for family in registry.collect():
        if family.type == "histogram" and "duration" in family.name:
            return sum(s.value for s in family.samples if s.name.endswith("_count"))
    return 0.0


# -- driving ASGI apps in-process -----------------------------------------------------------------------


def http_scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"crowdmon-bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def serve(app: ASGIApp, scope: Scope) -> int:
    """One request as a server would run it; returns the status the app sent."""
    received = False
    status = 0

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return _REQUEST
        # Like a server whose client stays connected: wait until cancelled.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def time_requests(app: ASGIApp, path: str, count: int) -> float:
    """Seconds per request, over ``count`` requests to ``path``."""
    template = http_scope(path)
    copy = dict.copy
    started = process_time()
    for _ in range(count):
        await serve(app, copy(template))
    return (process_time() - started) / count


# -- reporting ---------------------------------------------------------------------------------------


def settle_heap() -> None:
    """Collect once and freeze what is left, so the timed batches share a small, equal heap."""
    gc.collect()
    gc.freeze()


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if index and _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.]+[x%]?", text))


@dataclass
class Target:
    what: str
    measured: float
    limit: float
    #: The measurement must reach the limit rather than stay under it.
    at_least: bool = False

    @property
    def met(self) -> bool:
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def line(self) -> str:
        bound = ">=" if self.at_least else "<="
        return f"[{'met' if self.met else 'MISSED'}] {self.what}: {self.measured:.3f} (target {bound} {self.limit:.2f})"


@dataclass
class Report:
    name: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"== {self.name} ==", self.text]
        lines.extend(target.line() for target in self.targets)
        return "\n".join(lines) + "\n"


# -- 1. in-process ASGI overhead -----------------------------------------------------------------------


def bench_asgi(
    *,
    frameworks: Sequence[str] = FRAMEWORKS,
    routes: Sequence[str] = tuple(ROUTES),
    variants: Sequence[str] = VARIANTS,
    rounds: int = 31,
    requests: int = 150,
    seed: int = 1,
) -> Report:
    """Per-request cost of each variant, as overhead over the bare app of the same round."""
    built: dict[tuple[str, str], Variant] = {}
    skipped: dict[str, str] = {}
    for framework in frameworks:
        for name in variants:
            try:
                built[(framework, name)] = build_variant(name, framework)
            except Skipped as error:
                skipped[name] = str(error)
    if "bare" not in variants:
        raise ValueError("the asgi benchmark needs the bare variant as its baseline")
    served: dict[tuple[str, str], int] = dict.fromkeys(built, 0)
    timings: dict[tuple[str, str, str], list[float]] = {}
    shuffler = random.Random(seed)

    async def run() -> None:
        for (framework, name), variant in built.items():
            for route in routes:
                status = await serve(variant.app, http_scope(ROUTES[route]))
                if status != 200:
                    raise RuntimeError(f"{name} on {framework} answered {ROUTES[route]} with {status}")
                served[(framework, name)] += 1
        settle_heap()
        cases = [(framework, route) for framework in frameworks for route in routes]
        for _ in range(rounds + 1):  # the first round warms up and is discarded
            shuffler.shuffle(cases)
            for framework, route in cases:
                # Every variant of one case back to back: the pairs compared are seconds apart.
                names = [name for (f, name) in built if f == framework]
                shuffler.shuffle(names)
                for name in names:
                    gc.collect(0)
                    seconds = await time_requests(built[(framework, name)].app, ROUTES[route], requests)
                    served[(framework, name)] += requests
                    timings.setdefault((framework, route, name), []).append(seconds * 1e6)

    try:
        asyncio.run(run())
    finally:
        gc.unfreeze()
    for samples in timings.values():
        del samples[0]

    counts: dict[str, Any] = {}
    for (framework, name), variant in built.items():
        if variant.recorded is not None:
            recorded = variant.recorded()
            counts[f"{framework}/{name}"] = {"served": served[(framework, name)], "recorded": recorded}
            if recorded != served[(framework, name)]:
                raise RuntimeError(
                    f"{name} on {framework} recorded {recorded:.0f} requests but served "
                    f"{served[(framework, name)]}: its numbers would not be comparable"
                )

    rows: list[list[object]] = []
    overhead: dict[tuple[str, str, str], float] = {}
    data: dict[str, Any] = {"rounds": rounds, "requests": requests, "counts": counts, "skipped": skipped, "results": []}
    for framework in frameworks:
        for route in routes:
            bare = timings.get((framework, route, "bare"))
            if bare is None:
                continue
            for name in variants:
                runs = timings.get((framework, route, name))
                if runs is None:
                    continue
                added = median(s - b for s, b in zip(runs, bare, strict=True))
                ratio = median(s / b for s, b in zip(runs, bare, strict=True))
                overhead[(framework, route, name)] = added
                rows.append([framework, route, name, median(runs), added if name != "bare" else None, f"{ratio:.2f}x"])
                data["results"].append({"framework": framework, "route": route, "variant": name, "us_per_request": median(runs), "overhead_us": added, "ratio_vs_bare": ratio})
    text = table(["framework", "route", "variant", "µs/request", "overhead µs", "vs bare"], rows)
    text += f"\n(median of {rounds} interleaved rounds x {requests} requests; overhead = variant - bare of the same round)"
    for name, reason in skipped.items():
        text += f"\nskipped {name}: {reason}"
    text += "\nrequest counters checked: " + ", ".join(f"{k}={v['recorded']:.0f}" for k, v in counts.items())

    # The targets compare overheads averaged over every framework and route measured.
    averages = {
        name: statistics.fmean(v for (_, _, n), v in overhead.items() if n == name)
        for name in variants
        if any(n == name for (_, _, n) in overhead)
    }
    data["mean_overhead_us"] = averages
    targets = []
    if "crowdmon" in averages:
        ours = averages["crowdmon"]
        if "naive" in averages:
            targets.append(Target("crowdmon overhead / naive two-call overhead", ours / averages["naive"], 1.0))
        if "instrumentator" in averages:
            targets.append(Target("crowdmon overhead / prometheus-fastapi-instrumentator overhead", ours / averages["instrumentator"], 0.15))
        if "passthrough" in averages:
            # Floored at 0.5 µs: a pass-through lost in the noise must not make the ratio explode.
            targets.append(Target("crowdmon overhead / pass-through overhead (goal)", ours / max(averages["passthrough"], 0.5), 2.0))
    summary = table(["variant", "mean overhead µs"], [[n, v] for n, v in averages.items()])
    return Report("in-process ASGI overhead", text + "\n\n" + summary, data, targets)


# -- 2. decorators -------------------------------------------------------------------------------------


def _decorator_variants(registry: CollectorRegistry) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Awaitable[Any]]], dict[str, str]]:
    """(sync functions, async functions, skipped) to time; each does the same trivial work."""
    skipped: dict[str, str] = {}

    def work() -> int:
        return 42

    async def async_work() -> int:
        return 42

    histogram = Histogram("bench_time_seconds", "Histogram.time().", registry=registry)
    sync: dict[str, Callable[[], Any]] = {"bare": work, "Histogram.time()": histogram.time()(work)}
    asynchronous: dict[str, Callable[[], Awaitable[Any]]] = {"bare": async_work}
    try:
        from prometheus_async import aio

        aio_histogram = Histogram("bench_aio_seconds", "aio.time.", registry=registry)
        asynchronous["prometheus_async aio.time"] = aio.time(aio_histogram)(async_work)
    except ImportError:
        skipped["prometheus_async aio.time"] = f"{PEER_PACKAGES['prometheus_async']} is not installed"
    for name, decorate in _crowdmon_decorators(registry, skipped).items():
        sync[name] = decorate(work)
        asynchronous[name] = decorate(async_work)
    return sync, asynchronous, skipped


def _crowdmon_decorators(registry: CollectorRegistry, skipped: dict[str, str]) -> dict[str, Callable[[Any], Any]]:
    try:
        decorators: Any = importlib.import_module("crowdmon.decorators")
    except ImportError:
        skipped["crowdmon decorators"] = "crowdmon.decorators is not part of this checkout"
        return {}
    instrumentation = PrometheusInstrumentation(registry)
    found: dict[str, Callable[[Any], Any]] = {}
    factories: dict[str, Callable[[], Callable[[Any], Any]]] = {
        "crowdmon @tracked_database_query": lambda: decorators.tracked_database_query("select", instrumentation=instrumentation),
        "crowdmon @tracked_external": lambda: decorators.tracked_external("openai", endpoint="chat/completions", instrumentation=instrumentation),
    }
    for name, factory in factories.items():
        try:
            found[name] = factory()
        except (AttributeError, TypeError) as error:
            skipped[name] = f"not available: {error}"
    return found


def bench_decorators(*, rounds: int = 21, calls: int = 10000, seed: int = 1) -> Report:
    """Per-call cost of each decorator on a trivial sync and async function."""
    registry = CollectorRegistry()
    sync, asynchronous, skipped = _decorator_variants(registry)
    timings: dict[tuple[str, str], list[float]] = {}
    shuffler = random.Random(seed)

    def time_sync(function: Callable[[], Any]) -> float:
        started = process_time()
        for _ in range(calls):
            function()
        return (process_time() - started) / calls

    async def time_async(function: Callable[[], Awaitable[Any]]) -> float:
        started = process_time()
        for _ in range(calls):
            await function()
        return (process_time() - started) / calls

    async def run() -> None:
        jobs = [("sync", n) for n in sync] + [("async", n) for n in asynchronous]
        settle_heap()
        for _ in range(rounds + 1):
            shuffler.shuffle(jobs)
            for kind, name in jobs:
                gc.collect(0)
                seconds = time_sync(sync[name]) if kind == "sync" else await time_async(asynchronous[name])
                timings.setdefault((kind, name), []).append(seconds * 1e6)

    try:
        asyncio.run(run())
    finally:
        gc.unfreeze()
    for samples in timings.values():
        del samples[0]
    rows: list[list[object]] = []
    overhead: dict[tuple[str, str], float] = {}
    for kind, functions in (("sync", sync), ("async", asynchronous)):
        bare = timings[(kind, "bare")]
        for name in functions:
            samples = timings[(kind, name)]
            added = median(s - b for s, b in zip(samples, bare, strict=True))
            overhead[(kind, name)] = added
            rows.append([kind, name, median(samples), added if name != "bare" else None])
    text = table(["kind", "function", "µs/call", "overhead µs"], rows)
    text += f"\n(median of {rounds} interleaved rounds x {calls} calls; overhead = decorated - bare of the same round)"
    for name, reason in skipped.items():
        text += f"\nskipped {name}: {reason}"
    targets = []
    ours_sync = [v for (k, n), v in overhead.items() if k == "sync" and n.startswith("crowdmon")]
    ours_async = [v for (k, n), v in overhead.items() if k == "async" and n.startswith("crowdmon")]
    if ours_sync:
        targets.append(Target("crowdmon sync decorator overhead / Histogram.time()", max(ours_sync) / overhead[("sync", "Histogram.time()")], 0.5))
    if ours_async and ("async", "prometheus_async aio.time") in overhead:
        targets.append(Target("crowdmon async decorator overhead / aio.time", max(ours_async) / overhead[("async", "prometheus_async aio.time")], 0.5))
    data = {"rounds": rounds, "calls": calls, "skipped": skipped, "overhead_us": {f"{k}/{n}": v for (k, n), v in overhead.items()}}
    return Report("decorators", text, data, targets)


# -- 3. a real server ----------------------------------------------------------------------------------


def server_app(variant: str, framework: str = "starlette") -> ASGIApp:
    """The app ``python -m uvicorn --factory crowdmon.bench:<server name>_server_app`` serves
    (see :func:`server_name`)."""
    return build_variant(variant, framework).app


def server_name(variant: str, framework: str = "starlette") -> str:
    """The name of a server variant: ``crowdmon`` (Starlette), ``fastapi_crowdmon`` (FastAPI)."""
    return variant if framework == "starlette" else f"{framework}_{variant}"


def bare_server_app() -> ASGIApp:
    return server_app("bare")


def crowdmon_server_app() -> ASGIApp:
    return server_app("crowdmon")


def passthrough_server_app() -> ASGIApp:
    return server_app("passthrough")


def naive_server_app() -> ASGIApp:
    return server_app("naive")


def fastapi_bare_server_app() -> ASGIApp:
    return server_app("bare", "fastapi")


def fastapi_crowdmon_server_app() -> ASGIApp:
    return server_app("crowdmon", "fastapi")


def fastapi_passthrough_server_app() -> ASGIApp:
    return server_app("passthrough", "fastapi")


def fastapi_naive_server_app() -> ASGIApp:
    return server_app("naive", "fastapi")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The uvicorn set-ups ``crowdmon bench server`` runs on, as ``(--http, --loop)``: ``plain`` is
#: what ``pip install uvicorn`` gives; ``standard`` is ``pip install 'uvicorn[standard]'``, the
#: usual production set-up, whose C parser and event loop leave a middleware a larger share of
#: what a request costs.  Each is named explicitly, so what is installed does not change the run.
SERVER_STACKS: dict[str, tuple[str, str]] = {"plain": ("h11", "asyncio"), "standard": ("httptools", "uvloop")}
#: The modules each stack needs beyond uvicorn's own dependencies.
_STACK_MODULES: dict[str, tuple[str, ...]] = {"plain": (), "standard": ("httptools", "uvloop")}


def _check_stack(stack: str) -> None:
    if stack not in SERVER_STACKS:
        raise ValueError(f"the server stack is one of {', '.join(SERVER_STACKS)}, got {stack!r}")


def missing_for_stack(stack: str) -> str | None:
    """Why uvicorn cannot run on ``stack`` here (the modules it lacks, and what to do about it),
    or ``None`` if it can."""
    _check_stack(stack)
    missing = [module for module in _STACK_MODULES[stack] if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: pip install"
        " 'uvicorn[standard]' (or crowdmon's bench extra), or run on --stack plain"
    )


def describe_stack(stack: str) -> str:
    """``stack`` as the uvicorn options it runs with, e.g. ``uvicorn --http h11 --loop asyncio (plain)``."""
    _check_stack(stack)
    http, loop = SERVER_STACKS[stack]
    return f"uvicorn --http {http} --loop {loop} ({stack})"


def _launch_server(
    name: str, env: dict[str, str], stack: str, runner: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    """A uvicorn worker serving ``crowdmon.bench:<name>_server_app`` on ``stack``, just started
    (under ``runner``, e.g. valgrind, if one is given)."""
    port = _free_port()
    http, loop = SERVER_STACKS[stack]
    process = subprocess.Popen(
        [*runner, sys.executable, "-m", "uvicorn", "--factory", f"crowdmon.bench:{name}_server_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
         "--lifespan", "off", "--http", http, "--loop", loop],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return process, f"http://127.0.0.1:{port}"


def _wait_until_serving(name: str, process: subprocess.Popen[bytes], url: str, deadline: float) -> None:
    """Until the worker answers ``GET /text``; raises if it exits or ``deadline`` (monotonic) passes."""
    import urllib.request

    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the {name} server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            with urllib.request.urlopen(url + "/text", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {name} server did not answer within {deadline - started:.0f} s") from None
            time.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process so far (Linux): its main thread's, in nanoseconds from the scheduler
    if it reports them (a uvicorn worker serves on that thread), else user plus system time in
    clock ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: hey's throughput line, in the output of ``hey -n`` and ``hey -z`` alike.
_HEY_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")


def _hey(url: str, requests: int, concurrency: int) -> dict[str, float]:
    output = subprocess.run(
        ["hey", "-n", str(requests), "-c", str(concurrency), "-t", "10", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    found = {
        "rps": _HEY_RATE.search(output),
        "p50": re.search(r"50% in ([\d.]+) secs", output),
        "p95": re.search(r"95% in ([\d.]+) secs", output),
        "ok": re.search(r"\[200\]\s+(\d+) responses", output),
    }
    if not all(found.values()):
        raise RuntimeError(f"could not read hey's output:\n{output}")
    return {key: float(match.group(1)) for key, match in found.items() if match}


SERVER_VARIANTS = ("bare", "passthrough", "naive", "crowdmon")
SERVER_FRAMEWORKS = ("starlette", "fastapi")


def pin(pid: int, cpus: set[int]) -> None:
    """Run process ``pid`` (0: this one) on ``cpus`` only; nothing if none are given."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cpus)


@contextmanager
def running_servers(
    names: Sequence[str], cpus: set[int], concurrency: int, stack: str = "plain",
) -> Iterator[dict[str, tuple[subprocess.Popen[bytes], str]]]:
    """A fresh uvicorn worker on ``stack`` per server name (:func:`server_name`), each on ``cpus``
    and warmed up: ``{name: (process, base URL)}``.  They are stopped on leaving, whatever
    happened."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name in names:  # started at once, each pinned once it serves
            servers[name] = _launch_server(name, env, stack)
        deadline = time.monotonic() + 30
        for name, (process, url) in servers.items():
            _wait_until_serving(name, process, url, deadline)
            pin(process.pid, cpus)
        for _, url in servers.values():
            _hey(url + ROUTES["json"], concurrency * 20, concurrency)  # warm-up
        yield servers
    finally:
        for process, _ in servers.values():
            _stop(process)


def _stop(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _rate(name: str, output: str) -> float:
    """Requests per second from the output of ``hey -z``, whose every response must be a 200."""
    found = _HEY_RATE.search(output)
    statuses = re.findall(r"\[(\d+)\]\s+\d+ responses", output)
    if found is None or statuses != ["200"] or "Error distribution" in output:
        raise RuntimeError(f"{name}: not every response was a 200, or hey gave no rate:\n{output}")
    return float(found.group(1))


def loaded_together(
    names: Sequence[str], *, rounds: int, seconds: float, concurrency: int = 16, stack: str = "plain",
) -> dict[str, list[float]]:
    """Requests per second of each server in each round, all of them loaded at the same time.

    The workers (fresh ones each round) share the first CPU and each gets its own ``hey`` on
    the others for the same ``seconds``: what else the machine runs then falls on all of them
    alike, and the scheduler gives each the same CPU time, so the ratio of two throughputs is
    the inverse ratio of what a request costs each.  Needs two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("loading servers together needs two CPUs: one for the workers, one for the load clients")
    throughput: dict[str, list[float]] = {name: [] for name in names}
    pin(0, set(cpus[1:]))
    try:
        for _ in range(rounds):
            with running_servers(names, {cpus[0]}, concurrency, stack) as servers:
                clients = {
                    name: subprocess.Popen(
                        ["hey", "-z", f"{seconds}s", "-c", str(concurrency), url + ROUTES["json"]],
                        stdout=subprocess.PIPE, text=True,
                    )
                    for name, (_, url) in servers.items()
                }
                try:
                    for name, client in clients.items():
                        throughput[name].append(_rate(name, client.communicate(timeout=seconds + 60)[0]))
                finally:
                    for client in clients.values():
                        if client.poll() is None:
                            _stop(client)
    finally:
        pin(0, set(cpus))
    return throughput


def bench_server(
    *, rounds: int = 3, windows: int = 4, requests: int = 2400, concurrency: int = 16,
    together_rounds: int = 5, seconds: float = 4.0, frameworks: Sequence[str] = SERVER_FRAMEWORKS,
    stack: str = "plain",
) -> Report:
    """uvicorn serving the Starlette and the FastAPI app: bare, a pass-through middleware, the
    naive two-call middleware and crowdmon, measured two ways.

    Alone (:func:`_loaded_alone`): one worker at a time, as a worker runs; it gives latency and
    CPU per request, but what else the machine runs moves single windows by ±10%.  Together
    (:func:`loaded_together`): every variant of a framework loaded at the same time on one shared
    CPU, which cancels that noise (rounds agree within about ±0.02); its throughput ratio is the
    one the target is checked on.  Sharing a CPU also shares its caches, so it is the harsher of
    the two on a larger memory footprint.  With fewer than two CPUs only the alone measure runs,
    and the target is checked on it.  ``stack`` is the uvicorn set-up (:data:`SERVER_STACKS`).
    """
    unknown = [framework for framework in frameworks if framework not in SERVER_FRAMEWORKS]
    if unknown or not frameworks:
        raise ValueError(f"frameworks are any of {', '.join(SERVER_FRAMEWORKS)}, got {list(frameworks)}")
    if min(rounds, windows, requests, concurrency, together_rounds) < 1 or seconds <= 0:
        raise ValueError("rounds, windows, requests, concurrency and together_rounds must be at least 1, seconds above 0")
    missing = missing_for_stack(stack)
    title = f"uvicorn on 127.0.0.1 ({stack})"
    if missing is not None:
        return Report(title, f"skipped: {describe_stack(stack)}: {missing}")
    if shutil.which("hey") is None:
        return Report(title, "skipped: the load client hey is not installed (apt-get install hey)")
    requests = max(requests // concurrency, 1) * concurrency  # hey splits -n evenly over -c
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    servers_of = {(framework, variant): server_name(variant, framework) for framework in frameworks for variant in SERVER_VARIANTS}
    results, ratios = _loaded_alone(servers_of, available, rounds=rounds, windows=windows, requests=requests, concurrency=concurrency, stack=stack)
    together: dict[str, list[float]] = {}
    if len(available) >= 2:
        for framework in frameworks:
            names = [servers_of[(framework, variant)] for variant in SERVER_VARIANTS]
            together.update(loaded_together(names, rounds=together_rounds, seconds=seconds, concurrency=concurrency, stack=stack))
    each_round = {
        name: [value / baseline for value, baseline in zip(together[name], together[servers_of[(framework, "bare")]], strict=True)]
        for (framework, _), name in servers_of.items()
        if name in together
    }
    together_ratio = {name: median(values) for name, values in each_round.items()}
    median_ratio = {name: {key: median(values) for key, values in by_key.items()} for name, by_key in ratios.items()}

    rows = [
        [
            framework,
            variant,
            median(r["rps"] for r in results[name]),
            median(r["p50"] for r in results[name]) * 1e3,
            median(r["p95"] for r in results[name]) * 1e3,
            median(r["cpu_us"] for r in results[name]),
            median_ratio[name]["rps"],
            median_ratio[name]["cpu_us"],
            together_ratio.get(name, "-"),
        ]
        for (framework, variant), name in servers_of.items()
    ]
    lines = [table(
        ["app", "variant", "requests/s", "p50 ms", "p95 ms", "server CPU µs/request", "throughput / bare", "CPU / bare", "together: throughput / bare"],
        rows,
    )]
    targets = []
    on = "uvicorn" if stack == "plain" else f"uvicorn[{stack}]"
    for framework in frameworks:
        name = servers_of[(framework, "crowdmon")]
        ours = median_ratio[name]
        spread = ratios[name]["rps"]
        low, _, high = statistics.quantiles(spread, n=4) if len(spread) > 1 else (spread[0], None, spread[0])
        line = (
            f"{framework}: crowdmon / bare alone: throughput {ours['rps']:.3f}x (middle half of windows {low:.3f}-{high:.3f}),"
            f" p50 latency {ours['p50']:.3f}x, p95 latency {ours['p95']:.3f}x, server CPU per request {ours['cpu_us']:.3f}x"
        )
        if name in together_ratio:
            line += f"; loaded together: throughput {together_ratio[name]:.3f}x (each round {' '.join(f'{r:.3f}' for r in each_round[name])})"
        lines.append(line)
        how = "loaded together" if name in together_ratio else "alone"
        suffix = "" if framework == "starlette" else f" ({framework})"
        targets.append(Target(f"crowdmon throughput / bare throughput, {on}, {how}{suffix}", together_ratio.get(name, ours["rps"]), 0.95, at_least=True))
    placement = f"servers on CPU {available[0]}, hey on the others" if len(available) >= 2 else "no CPU pinning"
    together_how = (
        f"Together: median of {together_rounds} rounds, the four workers of an app loaded at once for {seconds:g} s, one hey -c {concurrency} each."
        if together else "Together: not run, it needs two CPUs and Linux's CPU affinity."
    )
    lines.append(
        f"(alone: medians over {rounds} rounds x {windows} alternating windows of hey -n {requests} -c {concurrency} on GET {ROUTES['json']},"
        f" a fresh worker per variant each round, {describe_stack(stack)}; {placement}. {together_how})"
    )
    data = {
        "rounds": rounds, "windows": windows, "requests": requests, "concurrency": concurrency, "frameworks": list(frameworks),
        "together_rounds": together_rounds, "seconds": seconds, "stack": stack,
        "ratios": median_ratio, "together_ratios": together_ratio, "runs": results, "together": together,
    }
    return Report(title, "\n".join(lines), data, targets)


def _loaded_alone(
    servers_of: dict[tuple[str, str], str], available: list[int], *, rounds: int, windows: int, requests: int, concurrency: int,
    stack: str,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, list[float]]]]:
    """Every server loaded on its own, in short alternating windows: each window's hey results
    and CPU per request, and its ratios against the bare server of its framework in the same cycle.

    Each round starts fresh workers (so no variant keeps one process's luck of memory layout).
    With two or more CPUs the workers share the first one and ``hey`` gets the others, so the
    load client never takes CPU from the worker it measures."""
    names = list(servers_of.values())
    server_cpus, client_cpus = ({available[0]}, set(available[1:])) if len(available) >= 2 else (set(), set())
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    ratios: dict[str, dict[str, list[float]]] = {name: {"rps": [], "p50": [], "p95": [], "cpu_us": []} for name in names}
    pin(0, client_cpus)
    try:
        for _ in range(rounds):
            with running_servers(names, server_cpus, concurrency, stack) as servers:
                for window in range(windows):
                    cycle: dict[str, dict[str, float]] = {}
                    for name in names if window % 2 == 0 else names[::-1]:
                        process, url = servers[name]
                        cpu_before = _cpu_seconds(process.pid)
                        result = _hey(url + ROUTES["json"], requests, concurrency)
                        result["cpu_us"] = (_cpu_seconds(process.pid) - cpu_before) / requests * 1e6
                        if result["ok"] != requests:
                            raise RuntimeError(f"{name}: {result['ok']:.0f} of {requests} requests answered 200")
                        cycle[name] = result
                        results[name].append(result)
                    for (framework, _), name in servers_of.items():
                        bare = cycle[servers_of[(framework, "bare")]]
                        for key in ratios[name]:
                            ratios[name][key].append(cycle[name][key] / bare[key] if bare[key] else 1.0)
    finally:
        pin(0, set(available))
    return results, ratios


# -- 4. scrape cost ------------------------------------------------------------------------------------


def populated_registries(handlers: int = 100, statuses: Sequence[int] = (200, 201, 204, 400, 404, 500), methods: Sequence[str] = ("GET", "POST", "PUT", "DELETE")) -> tuple[PrometheusInstrumentation, CollectorRegistry, int]:
    """crowdmon with ``handlers x methods x statuses`` request series recorded, and a
    prometheus_client registry holding the same series as ordinary metrics."""
    instrumentation = PrometheusInstrumentation(CollectorRegistry(), default_cap=max(handlers, 200))
    native = CollectorRegistry()
    requests = Counter("crowdfunding_api_requests", "Requests.", ["method", "handler", "status"], registry=native)
    from crowdmon._recorder import DURATION, REQUEST_SIZE, RESPONSE_SIZE

    histograms = [Histogram(spec.name, spec.help, ["method", "handler"], registry=native, buckets=spec.buckets) for spec in (DURATION, REQUEST_SIZE, RESPONSE_SIZE)]
    record = instrumentation.requests
    for index in range(handlers):
        handler = f"/api/v1/resource{index}/{{item_id}}"
        for method in methods:
            for status in statuses:
                record.start(method)
                record.record((method, handler, status, 0.012, 120, 2048))
                requests.labels(method, handler, str(status)).inc()
                for histogram, value in zip(histograms, (0.012, 120, 2048), strict=True):
                    histogram.labels(method, handler).observe(value)
    series = sum(1 for line in generate_latest(instrumentation.registry).splitlines() if line and not line.startswith(b"#"))
    return instrumentation, native, series


def bench_scrape(*, rounds: int = 9, handlers: int = 100) -> Report:
    """Time to render ``/metrics`` over thousands of series."""
    instrumentation, native, series = populated_registries(handlers)
    app = MetricsApp(instrumentation, compress=False)
    renders: dict[str, Callable[[], bytes]] = {
        "generate_latest, crowdmon registry": lambda: generate_latest(instrumentation.registry),
        "crowdmon MetricsApp.render": lambda: app.render("")[0],
        "generate_latest, same series as prometheus_client metrics": lambda: generate_latest(native),
        "crowdmon MetricsApp.render, OpenMetrics": lambda: app.render("application/openmetrics-text")[0],
    }
    timings: dict[str, list[float]] = {name: [] for name in renders}
    settle_heap()
    for _ in range(rounds + 1):
        for name, render in renders.items():
            gc.collect(0)
            started = perf_counter()
            render()
            timings[name].append((perf_counter() - started) * 1e3)
    gc.unfreeze()
    for samples in timings.values():
        del samples[0]
    base = timings["generate_latest, crowdmon registry"]
    rows = [[name, median(samples), f"{median(s / b for s, b in zip(samples, base, strict=True)):.2f}x"] for name, samples in timings.items()]
    text = table(["render", "ms/scrape", "vs generate_latest"], rows)
    text += f"\n({series} samples; {handlers} handlers x 4 methods x 6 statuses; median of {rounds} rounds)"
    native_ratio = median(s / n for s, n in zip(timings["crowdmon MetricsApp.render"], timings["generate_latest, same series as prometheus_client metrics"], strict=True))
    data = {"samples": series, "ms": {name: median(s) for name, s in timings.items()}, "crowdmon_vs_native": native_ratio}
    text += f"\ncrowdmon /metrics / prometheus_client metrics with the same series: {native_ratio:.2f}x"
    return Report("scrape cost", text, data)


# -- 5. memory -----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """The resident set size of this process."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_memory(*, requests: int = 1_000_000, checkpoints: int = 10, seed: int = 1) -> Report:
    """RSS while ``requests`` random paths and methods go through crowdmon on a Starlette app."""
    variant = build_variant("crowdmon", "starlette")
    app = variant.app
    chooser = random.Random(seed)
    methods = ["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "BREW"]
    samples: list[tuple[int, int]] = []
    step = max(requests // checkpoints, 1)

    def random_path() -> str:
        kind = chooser.random()
        if kind < 0.4:
            return f"/items/{chooser.randrange(10**9)}"
        if kind < 0.6:
            return "/text"
        return "/" + "/".join(f"{chooser.getrandbits(40):x}" for _ in range(chooser.randint(1, 3)))

    async def run() -> None:
        done = 0
        while done < requests:
            for _ in range(min(step, requests - done)):
                await serve(app, http_scope(random_path(), chooser.choice(methods)))
            done += min(step, requests - done)
            gc.collect()
            samples.append((done, rss_bytes()))

    asyncio.run(run())
    recorded = variant.recorded() if variant.recorded else 0.0
    if recorded != requests:
        raise RuntimeError(f"crowdmon recorded {recorded:.0f} of {requests} requests")
    first = samples[0][1]
    growth = (samples[-1][1] - first) / 2**20
    rows = [[count, rss / 2**20, (rss - first) / 2**20] for count, rss in samples]
    text = table(["requests", "RSS MiB", "since first checkpoint MiB"], rows)
    text += f"\n(random /items/<id>, /text and unmatched paths; methods incl. PROPFIND, BREW; {requests} requests, all recorded)"
    data = {"requests": requests, "rss_mib": [(c, r / 2**20) for c, r in samples], "growth_mib": growth}
    return Report("memory", text, data, [Target("RSS growth after the first checkpoint, MiB", growth, 2.0)])


# -- the command ---------------------------------------------------------------------------------------


def environment() -> str:
    """The machine and the versions the numbers were taken with."""
    from importlib import metadata

    names = ["starlette", "fastapi", "prometheus-client", "uvicorn", "httptools", "uvloop", *sorted(set(PEER_PACKAGES.values())), "opentelemetry-sdk"]
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = re.search(r"model name\s*:\s*(.+)", info.read())
            cpu = model.group(1) if model else cpu
    except OSError:
        pass
    return f"Python {platform.python_version()} on {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs\n" + ", ".join(versions)


QUICK: dict[str, dict[str, Any]] = {
    "asgi": {"rounds": 1, "requests": 10},
    "decorators": {"rounds": 2, "calls": 200},
    "server": {"rounds": 1, "windows": 1, "requests": 200, "concurrency": 4, "together_rounds": 1, "seconds": 1.0},
    "scrape": {"rounds": 2, "handlers": 10},
    "memory": {"requests": 2000, "checkpoints": 2},
}


def run_benchmark(name: str, *, quick: bool = False, **options: Any) -> Report:
    settings = {**(QUICK[name] if quick else {}), **{k: v for k, v in options.items() if v is not None}}
    functions: dict[str, Callable[..., Report]] = {
        "asgi": bench_asgi,
        "decorators": bench_decorators,
        "server": bench_server,
        "scrape": bench_scrape,
        "memory": bench_memory,
    }
    return functions[name](**settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmarks", nargs="*", metavar="BENCHMARK", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few iterations of each, to check they run (numbers meaningless)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per benchmark")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--stack", choices=tuple(SERVER_STACKS), default=None,
        help="the uvicorn set-up of the server benchmark: plain (h11, asyncio; the default) or standard (httptools, uvloop)",
    )


def main(args: argparse.Namespace) -> int:
    unknown = [name for name in args.benchmarks if name not in (*BENCHMARKS, "all")]
    if unknown:
        print(f"crowdmon bench: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1:
        print(f"crowdmon bench: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    chosen = BENCHMARKS if not args.benchmarks or "all" in args.benchmarks else tuple(dict.fromkeys(args.benchmarks))
    if args.stack is not None:
        if "server" not in chosen:
            print(f"crowdmon bench: --stack is a setting of the server benchmark; add server to {' '.join(chosen)}", file=sys.stderr)
            return 2
        missing = missing_for_stack(args.stack)
        if missing is not None:
            print(f"crowdmon bench: {describe_stack(args.stack)}: {missing}", file=sys.stderr)
            return 2
    if args.json is not None and not (
        os.access(args.json, os.W_OK) and args.json.is_file()
        if args.json.exists()
        else args.json.parent.is_dir() and os.access(args.json.parent, os.W_OK)
    ):
        print(f"crowdmon bench: --json {args.json}: not a file that can be written in an existing directory", file=sys.stderr)
        return 2
    print(environment(), flush=True)
    reports = []
    for name in chosen:
        options: dict[str, Any] = {}
        if args.rounds is not None and name != "memory":
            options["rounds"] = args.rounds
            if name == "server":
                options["together_rounds"] = args.rounds
        if args.stack is not None and name == "server":
            options["stack"] = args.stack
        report = run_benchmark(name, quick=args.quick, **options)
        reports.append(report)
        print("\n" + report.render(), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": environment(), "reports": [{"name": r.name, "data": r.data, "targets": [asdict(t) | {"met": t.met} for t in r.targets]} for r in reports]}, indent=2, default=str))
    return 0
