"""The ``handler`` label: the route template from the router's own match, never a raw path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Host, Mount, Route, Router
from starlette.staticfiles import StaticFiles

import crowdmon
from crowdmon import PrometheusInstrumentation, PrometheusMiddleware, setup_monitoring
from crowdmon._types import ASGIApp, Receive, Scope, Send
from tests import fastapi_app
from tests.asgi import http_scope, run_asgi
from tests.support import REPO_ROOT, subprocess_env, value

REQUESTS = "crowdfunding_api_requests_total"
LEGACY_FASTAPI = "0.136.1"

EXPECTED_FASTAPI_COUNTS = {
    "GET /api/v1/items/{item_id} 200": 2.0,
    "GET /api/v1/items/{item_id} 404": 1.0,  # the route matched; the endpoint said 404
    "PUT /api/v1/items/{item_id} 405": 1.0,  # 405 keeps the template
    "GET /api/v1/items/{item_id} 422": 1.0,
    "POST /api/v1/users/{user_id}/orders 201": 1.0,
    "GET /root 200": 1.0,
    "GET /legacy/hello/{name} 200": 1.0,  # a Starlette app mounted in FastAPI
    "GET /sub/things/{thing_id} 200": 1.0,  # a FastAPI app with nested routers, mounted
    "GET <unmatched> 404": 1.0,
    "GET <unmatched> 307": 1.0,  # trailing-slash redirect: no route matched the raw path
}


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def get_all(app: Starlette | PrometheusMiddleware, *paths: str, root_path: str = "") -> list[int]:
    statuses = []
    for path in paths:
        sent = await run_asgi(app, http_scope(path, root_path=root_path))
        statuses.append(sent[0]["status"])
    return statuses


def instrumented(registry: CollectorRegistry, *routes: Route | Mount) -> Starlette:
    app = Starlette(routes=list(routes))
    app.add_middleware(PrometheusMiddleware, registry=registry)
    return app


async def test_starlette_route_template_without_converters(registry: CollectorRegistry) -> None:
    app = instrumented(registry, Route("/users/{user_id:int}/files/{name:path}", ok))
    assert await get_all(app, "/users/1/files/a/b.txt", "/users/2/files/c") == [200, 200]

    assert value(registry, REQUESTS, method="GET", handler="/users/{user_id}/files/{name}", status="200") == 2


async def test_mounted_sub_apps_get_the_full_template(registry: CollectorRegistry) -> None:
    inner = Starlette(routes=[Route("/reports/{report_id}", ok)])
    middle = Starlette(routes=[Mount("/orgs/admin", inner), Route("/ping", ok)])
    app = instrumented(registry, Mount("/v2", middle))

    assert await get_all(app, "/v2/orgs/admin/reports/9", "/v2/ping", "/v2/nothing") == [200, 200, 404]

    assert value(registry, REQUESTS, method="GET", handler="/v2/orgs/admin/reports/{report_id}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/v2/ping", status="200") == 1
    # A 404 inside a mount matched no route: the sentinel, not the raw path.
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == 1


async def test_a_mounted_non_router_app_is_labelled_by_its_mount(registry: CollectorRegistry, tmp_path: Path) -> None:
    (tmp_path / "app.css").write_text("body {}")
    app = instrumented(registry, Mount("/static", StaticFiles(directory=tmp_path)))

    assert await get_all(app, "/static/app.css", "/static/missing-1.css", "/static/missing-2.css") == [200, 404, 404]

    assert value(registry, REQUESTS, method="GET", handler="/static/{path}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == 2


async def test_a_mount_with_path_parameters_gives_its_template_not_the_values(registry: CollectorRegistry, tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_bytes(b"png")
    teams = Mount("/teams/{team:int}", routes=[Route("/members/{member}", ok)])
    app = instrumented(
        registry,
        Route("/health", ok),
        Mount("/orgs/{org}", routes=[Route("/items/{item_id}", ok), teams]),
        Mount("/assets/{bucket}", StaticFiles(directory=tmp_path)),
    )
    tenants = [f"/orgs/tenant-{n}/items/{n}" for n in range(250)]

    statuses = await get_all(app, *tenants, "/orgs/acme/teams/7/members/ann", "/assets/eu/logo.png", "/health", root_path="/proxy")

    assert statuses == [200] * 253
    assert value(registry, REQUESTS, method="GET", handler="/orgs/{org}/items/{item_id}", status="200") == 250
    assert value(registry, REQUESTS, method="GET", handler="/orgs/{org}/teams/{team}/members/{member}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/assets/{bucket}/{path}", status="200") == 1
    # 250 tenants took one handler value, so a route seen after them is still recorded by name.
    assert value(registry, REQUESTS, method="GET", handler="/health", status="200") == 1
    assert value(registry, "crowdmon_label_overflow_total", metric=REQUESTS, label="handler") == 0


class ScopeCopyingMiddleware:
    """Changes the scope the way the ASGI spec asks: on a copy, which it hands inward."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "copied": True}, receive, send)


async def test_a_middleware_handing_the_router_a_copy_hides_the_route_unless_crowdmon_is_inside_it(registry: CollectorRegistry) -> None:
    # setup_monitoring's middleware is outside the app's own: the router records its match in a
    # copy it never sees, and the request is <unmatched> (asking the routes again could name a
    # route the copy's rewritten path did not take).  Added inside the copying middleware, the
    # middleware sees the router's match.
    async def item(request: Request) -> Response:
        return PlainTextResponse(crowdmon.current_endpoint() or "none")

    outside = Starlette(routes=[Route("/items/{item_id:int}", item)], middleware=[Middleware(ScopeCopyingMiddleware)])
    setup_monitoring(outside, registry=registry, metrics_path=None, health_path=None)
    inside_registry = CollectorRegistry()
    inside = Starlette(
        routes=[Route("/items/{item_id:int}", item)],
        middleware=[Middleware(ScopeCopyingMiddleware), Middleware(PrometheusMiddleware, registry=inside_registry)],
    )

    hidden = await run_asgi(outside, http_scope("/items/3"))
    seen = await run_asgi(inside, http_scope("/items/3"))

    assert hidden[1]["body"] == b"<unmatched>" and seen[1]["body"] == b"/items/{item_id}"
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 1
    assert value(inside_registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == 1


async def test_a_mounted_router_that_matched_nothing_is_unmatched_and_its_unrecorded_routes_are_found(registry: CollectorRegistry) -> None:
    # The outer router records the Mount.  The mounted router recorded nothing: it matched
    # nothing (its trailing-slash redirect), it saw only a copy of the scope (a middleware of
    # the mounted app), or it matched a route it does not record (FastAPI's plain routes).
    from fastapi import FastAPI

    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    copying = Starlette(routes=[Route("/items/{i}", item)], middleware=[Middleware(ScopeCopyingMiddleware)])
    orders = FastAPI()
    orders.add_api_route("/orders/{o}", item)
    orders.add_route("/plain/{p}", item)
    app = instrumented(
        registry,
        Mount("/t/{tenant}", app=copying),
        Mount("/api", app=orders),
        Mount("/tenants/{tenant}", routes=[Route("/items", item)]),
    )

    statuses = await get_all(app, "/t/acme/items/1", "/api/orders/7", "/api/plain/7", "/tenants/acme/items/", "/api/orders/7/")

    assert statuses == [200, 200, 200, 307, 307]
    assert value(registry, REQUESTS, method="GET", handler="/api/orders/{o}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/api/plain/{p}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 1  # the copy
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="307") == 2


async def test_a_response_a_middleware_sends_before_routing_is_unmatched(registry: CollectorRegistry) -> None:
    class Gate:
        """Answers 401 itself, before the router sees the request, unless it carries a token."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and (b"authorization", b"token") not in scope["headers"]:
                await PlainTextResponse("no", status_code=401)(scope, receive, send)
                return
            await self.app(scope, receive, send)

    app = Starlette(routes=[Route("/items/{item_id:int}", ok)], middleware=[Middleware(Gate)])
    setup_monitoring(app, registry=registry, metrics_path=None, health_path=None)

    statuses = [(await run_asgi(app, http_scope(path)))[0]["status"] for path in ("/items/1", "/random/7")]
    statuses.append((await run_asgi(app, http_scope("/items/3", headers=[(b"authorization", b"token")])))[0]["status"])

    assert statuses == [401, 401, 200]
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="401") == 2
    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == 1


class Passthrough:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@pytest.mark.parametrize(
    ("routes", "path", "host", "handler"),
    [
        ([Host("api.example.com", app=Router([Mount("/{tenant}", routes=[Route("/items/{id}", ok)])]))], "/acme/items/1", "api.example.com", "/{tenant}/items/{id}"),
        ([Host("{sub}.example.com", app=Router([Mount("/api", routes=[Route("/items/{id}", ok)])]))], "/api/items/1", "acme.example.com", "/api/items/{id}"),
        ([Mount("/{tenant}", routes=[Route("/items/{id}", ok)], middleware=[Middleware(Passthrough)])], "/acme/items/1", "t", "/{tenant}/items/{id}"),
        ([Mount("/{tenant}", app=Passthrough(Router([Route("/items/{id}", ok)])))], "/acme/items/1", "t", "/{tenant}/items/{id}"),
        # The route's own {id} hides the mount's in path_params: the template still has both.
        ([Mount("/orgs/{id}", routes=[Route("/items/{id}", ok)])], "/orgs/acme/items/1", "t", "/orgs/{id}/items/{id}"),
    ],
)
async def test_mount_templates_through_hosts_middleware_and_shadowed_names(
    registry: CollectorRegistry, routes: list[BaseRoute], path: str, host: str, handler: str
) -> None:
    app = instrumented(registry, *routes)
    for _ in range(2):  # found by asking the routes again, then confirmed from what was kept
        assert (await run_asgi(app, http_scope(path, headers=[(b"host", host.encode())])))[0]["status"] == 200

    assert value(registry, REQUESTS, method="GET", handler=handler, status="200") == 2


async def test_a_middleware_on_a_sub_app_mounted_with_parameters_labels_from_its_own_entry(registry: CollectorRegistry) -> None:
    sub = Starlette(routes=[Mount("/teams/{team}", routes=[Route("/members/{member}", ok)])])
    sub.add_middleware(PrometheusMiddleware, registry=registry)
    app = Starlette(routes=[Mount("/{tenant}", sub)])

    assert await get_all(app, "/acme/teams/7/members/ann", "/globex/teams/8/members/bob") == [200, 200]

    assert value(registry, REQUESTS, method="GET", handler="/teams/{team}/members/{member}", status="200") == 2


async def test_a_fastapi_app_mounted_with_path_parameters_gives_its_template(registry: CollectorRegistry) -> None:
    from fastapi import APIRouter, FastAPI

    things = APIRouter(prefix="/things")

    @things.get("/{thing_id}")
    async def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    tenant_app = FastAPI()
    tenant_app.include_router(things)
    app = FastAPI()
    app.mount("/tenants/{tenant}", tenant_app)
    app.add_middleware(PrometheusMiddleware, registry=registry)

    assert await get_all(app, "/tenants/a/things/1", "/tenants/b/things/2", "/tenants/b/nothing") == [200, 200, 404]

    assert value(registry, REQUESTS, method="GET", handler="/tenants/{tenant}/things/{thing_id}", status="200") == 2
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == 1


async def test_root_path_is_not_part_of_the_template(registry: CollectorRegistry) -> None:
    app = instrumented(registry, Route("/items/{item_id}", ok), Mount("/sub", Starlette(routes=[Route("/x/{y}", ok)])))

    assert await get_all(app, "/items/1", "/sub/x/2", root_path="/proxy") == [200, 200]

    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/sub/x/{y}", status="200") == 1


async def test_unmatched_paths_share_one_sentinel(registry: CollectorRegistry) -> None:
    app = instrumented(registry, Route("/known", ok))
    paths = [f"/random/{n}" for n in range(50)]

    assert set(await get_all(app, *paths)) == {404}

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == 50


async def test_bare_asgi_app_gets_the_sentinel_unless_given_a_resolver(registry: CollectorRegistry) -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("bare")(scope, receive, send)

    await get_all(PrometheusMiddleware(bare, registry=registry), "/a/1", "/b/2")
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 2

    other = CollectorRegistry()
    resolved = PrometheusMiddleware(bare, registry=other, handler_resolver=lambda scope: "/" + scope["path"].split("/")[1])
    await get_all(resolved, "/a/1", "/a/2", "/b/2")
    assert value(other, REQUESTS, method="GET", handler="/a", status="200") == 2
    assert value(other, REQUESTS, method="GET", handler="/b", status="200") == 1


async def test_an_unbounded_resolver_is_folded_by_the_guard() -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps={"crowdfunding_api_requests_total:handler": 5})

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("bare")(scope, receive, send)

    app = PrometheusMiddleware(bare, instrumentation=instrumentation, handler_resolver=lambda scope: scope["path"])
    await get_all(app, *[f"/p/{n}" for n in range(20)])

    assert value(registry, REQUESTS, method="GET", handler="/p/4", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="<other>", status="200") == 15
    assert value(registry, "crowdmon_label_overflow_total", metric=REQUESTS, label="handler") == 15


async def test_fastapi_plain_routes_and_the_health_route_get_their_templates(registry: CollectorRegistry) -> None:
    """FastAPI records the matched route in the scope only for its own ``APIRoute``: a plain
    ``Route`` (``app.add_route``, the ``/health`` that ``setup_monitoring`` adds) is found again
    with the routes' ``matches()``, inside mounts too."""
    from fastapi import APIRouter, FastAPI

    from crowdmon import setup_monitoring

    app = FastAPI()
    app.add_route("/plain/{x}", ok)
    app.mount("/sub", Starlette(routes=[Mount("/deeper", routes=[Route("/items/{i}", ok)])]))
    router, nested = APIRouter(), APIRouter()
    router.add_api_route("/orders/{order_id}", lambda order_id: {"order_id": order_id})
    router.add_route("/receipts/{receipt_id}", ok)  # a plain route in an included router
    nested.add_route("/lines/{line}", ok)
    router.include_router(nested, prefix="/nested")
    app.include_router(router, prefix="/api")
    setup_monitoring(app, instrumentation=PrometheusInstrumentation(registry))

    paths = ("/plain/1", "/plain/2", "/sub/deeper/items/5", "/api/orders/7", "/api/receipts/8", "/api/nested/lines/9", "/health", "/metrics", "/nope")
    statuses = await get_all(app, *paths)

    assert statuses == [200, 200, 200, 200, 200, 200, 200, 200, 404]
    assert value(registry, REQUESTS, method="GET", handler="/api/receipts/{receipt_id}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/api/nested/lines/{line}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/plain/{x}", status="200") == 2
    assert value(registry, REQUESTS, method="GET", handler="/sub/deeper/items/{i}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/api/orders/{order_id}", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/health", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 0


async def test_fastapi_include_router_templates_with_the_installed_fastapi() -> None:
    counts = await fastapi_app.drive()
    assert counts == EXPECTED_FASTAPI_COUNTS


@pytest.fixture(scope="session")
def legacy_fastapi_path() -> Path:
    """FastAPI 0.136 (before include_router changed in 0.137), installed beside the suite."""
    target = REPO_ROOT / ".cache" / f"fastapi-{LEGACY_FASTAPI}"
    if not (target / "fastapi" / "__init__.py").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
             "--target", str(target), f"fastapi=={LEGACY_FASTAPI}"],
            check=True,
            timeout=300,
        )
    return target


def test_fastapi_include_router_templates_before_0_137(legacy_fastapi_path: Path) -> None:
    env = subprocess_env()
    env["PYTHONPATH"] = f"{legacy_fastapi_path}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [sys.executable, "-m", "tests.fastapi_app"], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=True,
    )
    report = json.loads(result.stdout)

    assert report["fastapi"] == LEGACY_FASTAPI
    assert report["counts"] == EXPECTED_FASTAPI_COUNTS


async def test_handler_label_through_a_real_client_with_query_strings(registry: CollectorRegistry) -> None:
    app = instrumented(registry, Route("/search", ok))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for n in range(3):
            await client.get(f"/search?q=secret-{n}")

    assert value(registry, REQUESTS, method="GET", handler="/search", status="200") == 3


async def test_a_request_no_route_matched_is_not_routed_again(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing again costs what routing costs: only a request some route matched (its scope names
    the route's endpoint) but whose router did not record the route is asked again."""
    from fastapi import FastAPI

    import crowdmon.routes

    asked: list[str] = []
    route_by_matching = crowdmon.routes._route_by_matching

    def counting(scope: Scope, entry_root_path: str) -> object | None:
        asked.append(scope["path"])
        return route_by_matching(scope, entry_root_path)

    monkeypatch.setattr(crowdmon.routes, "_route_by_matching", counting)
    app = FastAPI()
    app.add_route("/plain/{x}", ok)
    app.add_middleware(PrometheusMiddleware, registry=registry)

    statuses = await get_all(app, *[f"/random/{n}" for n in range(20)], "/plain/1", "/plain/1/")

    assert statuses == [404] * 20 + [200, 307]
    assert asked == ["/plain/1"]
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="404") == 20
    assert value(registry, REQUESTS, method="GET", handler="/plain/{x}", status="200") == 1
