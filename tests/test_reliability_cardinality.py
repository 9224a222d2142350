"""The cardinality attack: 100,000 hostile requests cannot grow crowdmon's series beyond a bound
computed from the app's routes and the guard's caps (request metrics, and the error metrics fed by
``@tracked_errors`` and ``track_application_error``), the folding shows in
``crowdmon_label_overflow_total``, nothing the client sent becomes a label, and memory stays flat.

The requests are driven straight into the ASGI app (no sockets), sequentially, with a fixed seed,
so the folding order is known and the expected series can be computed exactly.
"""

from __future__ import annotations

import asyncio
import random
import string
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from crowdmon import (
    PrometheusInstrumentation,
    PrometheusMiddleware,
    current_endpoint,
    tracked_errors,
)
from crowdmon.catalogue import (
    BY_NAME,
    CATALOGUE,
    CATEGORY_COUNTERS,
    ERROR_TYPES,
    OTHER_METHOD,
    OVERFLOW_VALUE,
    UNMATCHED_HANDLER,
    MetricKind,
)
from crowdmon.instrumentation import INTERNAL_ERROR_SITES
from crowdmon.middleware import STANDARD_METHODS
from tests.support import PYTHON, REPO_ROOT, scrape_samples, subprocess_env

REQUESTS = "crowdfunding_api_requests_total"
DETAILS = "application_error_details_total"
ERRORS = "application_errors_total"
ATTACK_REQUESTS = 100_000
#: Every secret the client sends (header values, query strings, bodies, exception messages)
#: carries this marker; no label value may ever contain it.
SECRET = "s3cr3t"
CAPS = {
    f"{REQUESTS}:status": 20,
    f"{DETAILS}:exception": 25,
    "application_errors_total:component": 10,
}


class AttackError(Exception):
    """Base of the generated exception classes; each has its own class name."""


#: 400 distinct exception classes the endpoints raise at random.
EXCEPTION_CLASSES: list[type[AttackError]] = [
    type(f"AttackError{n:03d}", (AttackError,), {}) for n in range(400)
]


def raised_class(number: int) -> type[AttackError]:
    return EXCEPTION_CLASSES[number % len(EXCEPTION_CLASSES)]


def build_app(instrumentation: PrometheusInstrumentation) -> Starlette:
    async def home(request: Request) -> Response:
        return PlainTextResponse("home")

    async def item(request: Request) -> Response:
        await request.body()
        return PlainTextResponse(str(request.path_params["item_id"]))

    async def order(request: Request) -> Response:
        return PlainTextResponse("order")

    @tracked_errors("api", instrumentation=instrumentation)
    def explode(number: int, query: str) -> None:
        raise raised_class(number)(f"{SECRET} {query} {number}")

    async def fail(request: Request) -> Response:
        explode(request.path_params["n"], request.url.query)
        return PlainTextResponse("unreachable")

    async def tracked(request: Request) -> Response:
        # A user handing attacker-controlled values to crowdmon: the guard must hold them.
        number = request.path_params["n"]
        error = raised_class(number)(f"{SECRET} message {number}")
        instrumentation.track_application_error(
            ERROR_TYPES[number % len(ERROR_TYPES)],
            request.headers.get("x-component", "api"),
            error,
            endpoint=current_endpoint() or "unknown",
            function="tracked",
        )
        return PlainTextResponse("tracked", status_code=503)

    async def status(request: Request) -> Response:
        return Response(b"", status_code=request.path_params["code"])

    async def static_files(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("file")(scope, receive, send)

    async def thing(request: Request) -> Response:
        return PlainTextResponse("thing")

    app = Starlette(
        routes=[
            Route("/", home),
            Route("/items/{item_id:int}", item, methods=["GET", "POST"]),
            Route("/users/{user}/orders/{order}", order),
            Route("/fail/{n:int}", fail),
            Route("/tracked/{n:int}", tracked),
            Route("/status/{code:int}", status),
            Mount("/static", app=static_files),
            Mount("/api", routes=[Route("/v1/{thing}", thing, methods=["GET", "DELETE"])]),
        ]
    )
    app.add_middleware(PrometheusMiddleware, instrumentation=instrumentation)
    return app


def handler_templates(routes: list[BaseRoute], prefix: str = "") -> set[str]:
    """Every ``handler`` value the app's routes can produce (converters stripped)."""
    templates: set[str] = set()
    for route in routes:
        if isinstance(route, Mount):
            if route.routes:
                templates |= handler_templates(list(route.routes), prefix + route.path)
            else:
                templates.add(prefix + route.path + "/{path}")
        elif isinstance(route, Route):
            templates.add(prefix + route.path_format)
    return templates


# -- the attacker ------------------------------------------------------------------------------

ALPHABET = string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@é漢字ü"
ODD_METHODS = ["PROPFIND", "BREW", "get", "G E T", "X" * 500, "MKCOL", "", "DELETE\x00"]


@dataclass
class Attack:
    """One hostile request and what the app will do with it."""

    method: str
    path: str
    handler: str
    status: int
    headers: list[tuple[bytes, bytes]]
    query: bytes
    body: bytes
    raises: type[BaseException] | None = None
    tracked: tuple[str, str, str, str] | None = None  # error_type, component, exception, endpoint


def token(rng: random.Random, size: int) -> str:
    return "".join(rng.choices(ALPHABET, k=size))


def attacks(seed: int, count: int) -> Iterator[Attack]:
    rng = random.Random(seed)
    for _ in range(count):
        method = rng.choice(STANDARD_METHODS) if rng.random() < 0.7 else rng.choice(ODD_METHODS) + token(rng, rng.randrange(3))
        headers = [
            (b"user-agent", f"{SECRET}-{rng.getrandbits(64):x}".encode()),
            (b"x-forwarded-for", f"{SECRET}-{rng.getrandbits(32)}".encode()),
            (b"cookie", f"session={SECRET}{rng.getrandbits(128):x}".encode()),
            (f"x-{rng.getrandbits(24):x}".encode(), f"{SECRET}-".encode() + rng.randbytes(rng.randrange(200))),
        ]
        if rng.random() < 0.3:
            headers.append((b"content-length", rng.choice([b"-1", b"12abc", b"9" * 40, str(rng.randrange(10**6)).encode()])))
        query = f"q={SECRET}{rng.getrandbits(40):x}".encode() if rng.random() < 0.5 else b""
        body = f"{SECRET}-".encode() + rng.randbytes(rng.randrange(64)) if rng.random() < 0.3 else b""
        kind = rng.randrange(9)
        routed_method = method if method in STANDARD_METHODS else None
        allowed: tuple[str, ...]
        if kind == 0:
            path = "/" + "/".join(token(rng, rng.randrange(1, 30)) for _ in range(rng.randrange(1, 5)))
            yield Attack(method, path, UNMATCHED_HANDLER, 404, headers, query, body)
            continue
        if kind == 1:
            path, handler, allowed = f"/items/{rng.randrange(10**9)}", "/items/{item_id}", ("GET", "POST", "HEAD")
        elif kind == 2:
            path, handler, allowed = f"/users/{token(rng, 10)}/orders/{token(rng, 6)}", "/users/{user}/orders/{order}", ("GET", "HEAD")
        elif kind == 3:
            n = rng.randrange(10**6)
            path, handler, allowed = f"/fail/{n}", "/fail/{n}", ("GET", "HEAD")
            if routed_method in allowed:
                yield Attack(method, path, handler, 500, headers, query, body, raises=raised_class(n))
                continue
        elif kind == 4:
            n = rng.randrange(10**6)
            path, handler, allowed = f"/tracked/{n}", "/tracked/{n}", ("GET", "HEAD")
            if routed_method in allowed:
                component = rng.choice(["api", "chat", "rag", f"attacker-{token(rng, 6)}"])
                headers.append((b"x-component", component.encode()))
                # Starlette decodes header values as latin-1.
                received = component.encode().decode("latin-1")
                tracked = (ERROR_TYPES[n % len(ERROR_TYPES)], received, raised_class(n).__name__, handler)
                yield Attack(method, path, handler, 503, headers, query, body, tracked=tracked)
                continue
        elif kind == 5:
            code = rng.randrange(200, 600)
            path, handler, allowed = f"/status/{code}", "/status/{code}", ("GET", "HEAD")
            if routed_method in allowed:
                yield Attack(method, path, handler, code, headers, query, body)
                continue
        elif kind == 6:
            # A static mount answers any method itself.
            yield Attack(method, f"/static/{token(rng, 20)}", "/static/{path}", 200, headers, query, body)
            continue
        elif kind == 7:
            path, handler, allowed = f"/api/v1/{token(rng, 15)}", "/api/v1/{thing}", ("GET", "DELETE", "HEAD")
        else:
            # A trailing-slash redirect must not leak the raw path.
            path, handler, allowed = f"/items/{rng.randrange(10**9)}/", UNMATCHED_HANDLER, ()
            yield Attack(method, path, handler, 307, headers, query, body)
            continue
        yield Attack(method, path, handler, 200 if routed_method in allowed else 405, headers, query, body)


# -- the expected folding ---------------------------------------------------------------------


@dataclass
class GuardModel:
    """The guard's documented rule: per (metric, label), the first ``cap`` distinct values are
    admitted; every later occurrence of another value is one fold."""

    instrumentation: PrometheusInstrumentation
    seen: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    folds: dict[tuple[str, str], int] = field(default_factory=dict)

    def admit(self, metric: str, label: str, value: str) -> str:
        seen = self.seen.setdefault((metric, label), set())
        if value in seen:
            return value
        if len(seen) < self.instrumentation.guard.cap_for(metric, label):
            seen.add(value)
            return value
        self.folds[(metric, label)] = self.folds.get((metric, label), 0) + 1
        return OVERFLOW_VALUE

    def admit_all(self, metric: str, values: tuple[str, ...]) -> tuple[str, ...]:
        labels = BY_NAME[metric].labels
        return tuple(self.admit(metric, name, item) for name, item in zip(labels, values, strict=True))


# -- driving the app ------------------------------------------------------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def send_attack(app: Any, attack: Attack) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": attack.method,
        "scheme": "http",
        "path": attack.path,
        "raw_path": attack.path.encode(),
        "root_path": "",
        "query_string": attack.query,
        "headers": attack.headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": attack.body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    try:
        await app(scope, receive, send)
    except AttackError as error:
        assert attack.raises is not None and type(error) is attack.raises, attack
    else:
        assert attack.raises is None, attack
    return status


def series_by_family(registry: CollectorRegistry) -> dict[str, set[tuple[str, frozenset[tuple[str, str]]]]]:
    families: dict[str, set[tuple[str, frozenset[tuple[str, str]]]]] = {}
    for family in registry.collect():
        series = families.setdefault(family.name, set())
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                series.add((sample.name, frozenset(sample.labels.items())))
    return families


def values_bound(instrumentation: PrometheusInstrumentation, metric: str, label: str, possible: int | None) -> int:
    """Distinct values a label can show: its possible values, or its cap plus the overflow value."""
    cap = instrumentation.guard.cap_for(metric, label)
    if possible is not None and possible <= cap:
        return possible
    return cap + 1


def test_hostile_traffic_cannot_grow_series_beyond_the_bound_from_routes_and_caps() -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps=CAPS)
    app = build_app(instrumentation)
    model = GuardModel(instrumentation)
    expected_requests: dict[tuple[str, ...], int] = {}
    expected_details: dict[tuple[str, ...], int] = {}

    async def attack_all() -> None:
        for attack in attacks(seed=7, count=ATTACK_REQUESTS):
            status = await send_attack(app, attack)
            assert status == attack.status, attack
            method = attack.method if attack.method in STANDARD_METHODS else OTHER_METHOD
            key = model.admit_all(REQUESTS, (method, attack.handler, str(status)))
            expected_requests[key] = expected_requests.get(key, 0) + 1
            if attack.raises is not None:  # counted by @tracked_errors on its way out
                model.admit_all(ERRORS, ("system", "api", "unknown"))
                details = model.admit_all(DETAILS, ("system", "api", attack.raises.__name__, attack.handler, "explode"))
                expected_details[details] = expected_details.get(details, 0) + 1
            if attack.tracked is not None:
                error_type, component, exception, endpoint = attack.tracked
                model.admit_all(ERRORS, (error_type, component, "unknown"))
                details = model.admit_all(DETAILS, (error_type, component, exception, endpoint, "tracked"))
                expected_details[details] = expected_details.get(details, 0) + 1
                category = CATEGORY_COUNTERS.get(error_type)
                if category == "external_service_errors_total":
                    model.admit_all(category, (component, endpoint, exception))
                elif category is not None:
                    model.admit_all(category, (component, exception))

    asyncio.run(attack_all())
    samples = scrape_samples(generate_latest(registry).decode())

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    # The requests series are exactly the folded keys the guard's rule predicts, with exact counts.
    recorded = {
        (labels["method"], labels["handler"], labels["status"]): sample_value
        for family in registry.collect() if family.name == "crowdfunding_api_requests"
        for sample_name, labels, sample_value, *_ in family.samples if sample_name == REQUESTS
    }
    assert recorded == {key: float(count) for key, count in expected_requests.items()}
    assert sum(recorded.values()) == ATTACK_REQUESTS
    assert {key: value(DETAILS, **dict(zip(BY_NAME[DETAILS].labels, key, strict=True))) for key in expected_details} == {
        key: float(count) for key, count in expected_details.items()
    }

    # The folding is visible, fold for fold.
    assert model.folds[(REQUESTS, "status")] > 1000
    assert model.folds[(DETAILS, "exception")] > 1000
    assert model.folds[(ERRORS, "component")] > 100
    for (metric, label), folds in model.folds.items():
        assert value("crowdmon_label_overflow_total", metric=metric, label=label) == folds
    overflow_series = {
        (labels["metric"], labels["label"])
        for family in registry.collect() if family.name == "crowdmon_label_overflow"
        for sample_name, labels, value_, *_ in family.samples if sample_name == "crowdmon_label_overflow_total" and value_
    }
    assert overflow_series == set(model.folds)
    assert len(overflow_series) <= sum(len(spec.labels) for spec in CATALOGUE)

    # Every family of the catalogue stays under the bound computed from routes and caps.
    handlers = handler_templates(app.routes) | {UNMATCHED_HANDLER}
    assert len(handlers) == 9
    possible = {
        "method": len(STANDARD_METHODS) + 1,
        "handler": len(handlers),
        "status": None,  # the app chooses any status code
        "error_type": len(ERROR_TYPES),
        "user_type": 1,
        "function": 2,  # explode, tracked
        "endpoint": len(handlers),
        "exception": None,
        "component": None,
        "service": None,
    }
    families = series_by_family(registry)
    for spec in CATALOGUE:
        if spec.name.startswith("crowdmon_"):
            continue
        family_name = spec.name.removesuffix("_total") if spec.kind == MetricKind.COUNTER else spec.name
        label_sets = 1
        for label in spec.labels:
            label_sets *= values_bound(instrumentation, spec.name, label, possible.get(label))
        samples_per_set = len(spec.buckets) + 3 if spec.kind == MetricKind.HISTOGRAM else 1
        bound = label_sets * samples_per_set
        assert len(families.get(family_name, ())) <= bound, (spec.name, len(families[family_name]), bound)
    # The exact bound for the requests counter: 10 methods x 9 handlers x (20 statuses + "<other>").
    assert values_bound(instrumentation, REQUESTS, "method", 10) * len(handlers) * values_bound(
        instrumentation, REQUESTS, "status", None
    ) == 1890
    assert len(families["crowdfunding_api_requests"]) <= 1890

    # No value the client sent (paths, headers, queries, bodies, exception messages) is a label.
    for family in registry.collect():
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                assert SECRET not in label_value, (sample.name, label, label_value)
                if label == "handler":
                    assert label_value in handlers | {OVERFLOW_VALUE}
    assert value("crowdfunding_api_requests_in_progress", method="GET") == 0
    assert value("crowdfunding_api_requests_in_progress", method=OTHER_METHOD) == 0
    assert sum(value("crowdmon_internal_errors_total", site=site) for site in INTERNAL_ERROR_SITES) == 0

    print(f"{len(families['crowdfunding_api_requests'])} request series (bound 1890), folds {model.folds}")


#: The same attack in a process of its own, RSS read after 20,000 requests and at the end: in the
#: suite's process, the heap earlier tests left moves RSS by more than this traffic does.
MEMORY_PROBE = """
import asyncio
from prometheus_client import CollectorRegistry
from crowdmon import PrometheusInstrumentation
from tests.test_reliability_cardinality import ATTACK_REQUESTS, CAPS, attacks, build_app, rss_bytes, send_attack

app = build_app(PrometheusInstrumentation(CollectorRegistry(), cardinality_caps=CAPS))
checkpoints = []

async def attack_all():
    for number, attack in enumerate(attacks(seed=7, count=ATTACK_REQUESTS), start=1):
        assert await send_attack(app, attack) == attack.status, attack
        if number in (20_000, ATTACK_REQUESTS):
            checkpoints.append(rss_bytes())

asyncio.run(attack_all())
print(checkpoints[0], checkpoints[1])
"""


def test_hostile_traffic_leaves_memory_flat() -> None:
    run = subprocess.run([PYTHON, "-c", MEMORY_PROBE], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    first, last = map(int, run.stdout.split())
    growth = last - first
    print(f"RSS {first / 2**20:.1f} MiB after 20,000 requests, +{growth / 2**20:.2f} MiB after {ATTACK_REQUESTS:,}")
    # 80,000 requests after the warm-up leave memory flat.
    assert growth < 8 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB over 80,000 hostile requests"


def test_hostile_traffic_against_fastapi_included_routers_stays_within_the_templates() -> None:
    """FastAPI's own routing (nested ``include_router`` prefixes, 422 for a bad path parameter,
    its 404 and 405): 20,000 hostile requests, every handler a template, the status set capped."""
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps={f"{REQUESTS}:status": 5})
    app = FastAPI()
    items = APIRouter(prefix="/items")

    @items.get("/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @items.post("/{item_id}/notes")
    def note(item_id: int, payload: dict[str, str]) -> dict[str, int]:
        return {"fields": len(payload)}

    v1 = APIRouter(prefix="/v1")
    v1.include_router(items)
    app.include_router(v1, prefix="/api")
    app.add_middleware(PrometheusMiddleware, instrumentation=instrumentation)
    templates = {"/api/v1/items/{item_id}", "/api/v1/items/{item_id}/notes", UNMATCHED_HANDLER}
    rng = random.Random(11)
    statuses: dict[int, int] = {}

    async def attack_all() -> None:
        for _ in range(20_000):
            method = rng.choice(("GET", "POST", "PUT", "BREW", "get"))
            item_id = str(rng.randrange(10**6)) if rng.random() < 0.6 else token(rng, 8)
            path = rng.choice((f"/api/v1/items/{item_id}", f"/api/v1/items/{item_id}/notes", f"/api/v{token(rng, 3)}/{item_id}", f"/api/v1/items/{item_id}/"))
            body = rng.choice((b'{"a": "b"}', b"{", f'{{"{SECRET}": 1}}'.encode()))
            attack = Attack(method, path, "", 0, [(b"content-type", b"application/json"), (b"x-token", SECRET.encode())], f"q={SECRET}".encode(), body)
            status = await send_attack(app, attack)
            statuses[status] = statuses.get(status, 0) + 1

    asyncio.run(attack_all())
    samples = scrape_samples(generate_latest(registry).decode())
    series = {labels: count for (name, labels), count in samples.items() if name == REQUESTS}

    assert {200, 404, 405, 422} <= set(statuses)
    assert sum(series.values()) == 20_000
    handlers = {dict(labels)["handler"] for labels in series}
    assert handlers <= templates and len(handlers) == 3
    recorded_statuses = {dict(labels)["status"] for labels in series}
    assert len(recorded_statuses - {OVERFLOW_VALUE}) <= 5
    assert len(series) <= (len(STANDARD_METHODS) + 1) * len(templates) * (5 + 1)
    assert not any(SECRET in label_value for _, labels in samples for _, label_value in labels)
