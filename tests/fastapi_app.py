"""A FastAPI app with nested included routers, a mount and a root route; run as a script it
drives requests through crowdmon and prints the recorded request counts as JSON.

The routing tests run it in-process with the installed FastAPI and in a subprocess with FastAPI
0.136 (before 0.137 changed how included routers are stored)."""

from __future__ import annotations

import asyncio
import json
import sys

import fastapi
import httpx
from fastapi import APIRouter, FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from crowdmon import setup_monitoring

REQUESTS = [
    ("GET", "/api/v1/items/7"),
    ("GET", "/api/v1/items/8"),
    ("GET", "/api/v1/items/404"),
    ("PUT", "/api/v1/items/7"),
    ("GET", "/api/v1/items/not-a-number"),
    ("POST", "/api/v1/users/3/orders"),
    ("GET", "/root"),
    ("GET", "/legacy/hello/world"),
    ("GET", "/no/such/path"),
    ("GET", "/api/v1/items"),
    ("GET", "/sub/things/5"),
]


def build_app(registry: CollectorRegistry) -> FastAPI:
    app = FastAPI()
    items = APIRouter(prefix="/items")

    @items.get("/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        if item_id == 404:
            raise HTTPException(status_code=404)
        return {"item_id": item_id}

    @items.get("/")
    async def list_items() -> list[int]:
        return []

    users = APIRouter()

    @users.post("/users/{user_id}/orders", status_code=201)
    def create_order(user_id: int) -> dict[str, int]:
        return {"user_id": user_id}

    v1 = APIRouter(prefix="/v1")
    v1.include_router(items)
    v1.include_router(users)
    app.include_router(v1, prefix="/api")

    @app.get("/root")
    async def root() -> str:
        return "root"

    things = APIRouter(prefix="/things")

    @things.get("/{thing_id}")
    async def get_thing(thing_id: int) -> int:
        return thing_id

    sub = FastAPI()
    sub_v = APIRouter()
    sub_v.include_router(things)
    sub.include_router(sub_v)
    app.mount("/sub", sub)

    legacy = Starlette(routes=[Route("/hello/{name}", lambda request: PlainTextResponse("hi"))])
    app.mount("/legacy", legacy)
    setup_monitoring(app, registry=registry)
    return app


async def drive() -> dict[str, float]:
    registry = CollectorRegistry()
    app = build_app(registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for method, path in REQUESTS:
            await client.request(method, path)
    counts = {}
    for family in registry.collect():
        if family.name == "crowdfunding_api_requests":
            for sample in family.samples:
                labels = sample.labels
                counts[f"{labels['method']} {labels['handler']} {labels['status']}"] = sample.value
    return counts


if __name__ == "__main__":
    print(json.dumps({"fastapi": fastapi.__version__, "counts": asyncio.run(drive())}))
    sys.exit(0)
