"""The middleware remembers each matched route's label: the same route reached another way
(through a mount, through a second include_router prefix) still gets its own template."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from crowdmon import PrometheusInstrumentation, PrometheusMiddleware
from crowdmon._types import ASGIApp, Receive, Scope, Send
from tests.asgi import http_scope, run_asgi
from tests.support import value

REQUESTS = "crowdfunding_api_requests_total"


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def test_one_route_object_at_top_level_and_under_a_mount_keeps_both_templates(registry: CollectorRegistry) -> None:
    shared = Route("/items/{item_id:int}", ok)
    app = Starlette(routes=[shared, Mount("/v2", routes=[shared]), Mount("/{tenant}", routes=[shared])])
    app.add_middleware(PrometheusMiddleware, registry=registry)
    for path in ["/items/1", "/v2/items/2", "/items/3", "/acme/items/4", "/v2/items/5", "/items/6"]:
        assert (await run_asgi(app, http_scope(path)))[0]["status"] == 200

    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == 3
    assert value(registry, REQUESTS, method="GET", handler="/v2/items/{item_id}", status="200") == 2
    # A parameterised mount's root_path holds the raw value: its template is found, never remembered.
    assert value(registry, REQUESTS, method="GET", handler="/{tenant}/items/{item_id}", status="200") == 1


async def test_one_router_included_under_two_prefixes_keeps_both_templates(registry: CollectorRegistry) -> None:
    router = APIRouter()

    @router.get("/things/{thing_id}")
    async def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    app = FastAPI()
    app.include_router(router, prefix="/a")
    app.include_router(router, prefix="/b")
    app.add_middleware(PrometheusMiddleware, registry=registry)
    for path in ["/a/things/1", "/b/things/2", "/a/things/3", "/b/things/4", "/b/things/5"]:
        assert (await run_asgi(app, http_scope(path)))[0]["status"] == 200

    assert value(registry, REQUESTS, method="GET", handler="/a/things/{thing_id}", status="200") == 2
    assert value(registry, REQUESTS, method="GET", handler="/b/things/{thing_id}", status="200") == 3


async def test_route_label_memory_is_bounded(registry: CollectorRegistry) -> None:
    from crowdmon import middleware

    routes = [Route(f"/r{n}", ok) for n in range(middleware._ROUTE_LABELS_CAP + 10)]
    inner = Starlette(routes=routes)
    app = PrometheusMiddleware(inner, instrumentation=PrometheusInstrumentation(registry, default_cap=2000))
    for n in range(len(routes)):
        await run_asgi(app, http_scope(f"/r{n}"))
    await run_asgi(app, http_scope(f"/r{len(routes) - 1}"))

    assert len(app._route_labels) == middleware._ROUTE_LABELS_CAP
    assert value(registry, REQUESTS, method="GET", handler=f"/r{len(routes) - 1}", status="200") == 2


async def test_a_root_path_an_app_middleware_takes_from_the_client_never_becomes_a_label(registry: CollectorRegistry) -> None:
    # An app's own middleware that sets root_path from a proxy header: its value comes from the
    # client.  The route's mount is known from a first request, but each new prefix is confirmed
    # against the mount again, not trusted.
    def prefix_from_header(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            for name, header in scope["headers"]:
                if name == b"x-forwarded-prefix":
                    scope["root_path"] = header.decode()
            await app(scope, receive, send)

        return middleware

    app = Starlette(routes=[Mount("/api", routes=[Route("/items", ok)])], middleware=[Middleware(prefix_from_header)])
    app.add_middleware(PrometheusMiddleware, registry=registry)
    assert (await run_asgi(app, http_scope("/api/items")))[0]["status"] == 200
    for n in range(20):
        scope = http_scope(f"/evil{n}/api/items", headers=[(b"x-forwarded-prefix", f"/evil{n}".encode())])
        assert (await run_asgi(app, scope))[0]["status"] == 200

    handlers = {
        sample.labels["handler"] for family in registry.collect() if family.name == "crowdfunding_api_requests"
        for sample in family.samples if sample.name == REQUESTS
    }
    assert handlers == {"/api/items", "/{mount}/items"}
    assert value(registry, REQUESTS, method="GET", handler="/api/items", status="200") == 1
