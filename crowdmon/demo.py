"""``crowdmon demo``: an instrumented example app on 127.0.0.1, with generated traffic.

The app is a small stand-in for the chat / RAG service crowdmon grew from: a chat endpoint, a
streaming answer, documents, a search, and a dependency that fails now and then.  Serving it
needs the ``demo`` extra (uvicorn, httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from crowdmon.instrumentation import PrometheusInstrumentation
from crowdmon.integration import setup_monitoring

logger = logging.getLogger("crowdmon.demo")


async def chat(request: Request) -> Response:
    payload = await request.json()
    await asyncio.sleep(random.uniform(0.005, 0.05))
    return JSONResponse({"answer": f"You asked: {str(payload.get('message', ''))[:80]}"})


async def chat_stream(request: Request) -> Response:
    async def tokens() -> AsyncIterator[bytes]:
        for word in ["EU", "crowdfunding", "platforms", "must", "publish", "a", "key", "investment", "information", "sheet"]:
            await asyncio.sleep(0.002)
            yield word.encode() + b" "

    return StreamingResponse(tokens(), media_type="text/plain")


async def document(request: Request) -> Response:
    doc_id = request.path_params["doc_id"]
    if doc_id > 900:
        return JSONResponse({"detail": "no such document"}, status_code=404)
    return JSONResponse({"id": doc_id, "title": f"Regulation (EU) 2020/1503, part {doc_id}"})


async def search(request: Request) -> Response:
    if random.random() < 0.05:
        raise ConnectionError("vector store unreachable")
    return JSONResponse({"hits": random.randint(0, 10)})


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


def build_demo_app(instrumentation: PrometheusInstrumentation | None = None) -> Starlette:
    """The demo app with crowdmon set up on it."""
    admin = Starlette(routes=[Route("/ping", ping)])
    app = Starlette(
        routes=[
            Route("/chat", chat, methods=["POST"]),
            Route("/chat/stream", chat_stream),
            Route("/documents/{doc_id:int}", document),
            Route("/search", search),
            Mount("/admin", admin),
        ]
    )
    monitoring = setup_monitoring(app, instrumentation=instrumentation)
    for component in ("rag_system", "vector_store", "database", "openai"):
        monitoring.register_component(component)
        monitoring.set_component_healthy(component)
    return app


async def generate_traffic(base_url: str, rate: float) -> None:
    """Send a mix of requests to the demo app, ``rate`` per second, until cancelled."""
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while True:
            choice = random.random()
            try:
                if choice < 0.3:
                    await client.post("/chat", json={"message": "What is an ECSP licence?"})
                elif choice < 0.45:
                    await client.get("/chat/stream")
                elif choice < 0.7:
                    await client.get(f"/documents/{random.randint(1, 1000)}")
                elif choice < 0.9:
                    await client.get("/search")
                elif choice < 0.95:
                    await client.get("/admin/ping")
                else:
                    await client.get(f"/no-such-page/{random.randint(1, 10**6)}")
            except httpx.HTTPError as error:
                logger.debug("demo request failed: %s", error)
            await asyncio.sleep(1.0 / rate)


def run_demo(host: str = "127.0.0.1", port: int = 8000, duration: float | None = None, rate: float = 20.0) -> int:
    """Serve the demo app and drive traffic at it, for ``duration`` seconds or until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("crowdmon demo needs uvicorn and httpx: pip install 'crowdmon[demo]'") from None

    async def serve() -> None:
        server = uvicorn.Server(uvicorn.Config(build_demo_app(), host=host, port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving  # startup failed: surface uvicorn's error
                return
            await asyncio.sleep(0.05)
        base_url = f"http://{host}:{port}"
        print(f"crowdmon demo serving {base_url}  (metrics: {base_url}/metrics, health: {base_url}/health)", flush=True)
        traffic = asyncio.create_task(generate_traffic(base_url, rate)) if rate > 0 else None
        try:
            if duration is None:
                await serving
            else:
                await asyncio.wait({serving}, timeout=duration)
        finally:
            if traffic is not None:
                traffic.cancel()
            server.should_exit = True
            await serving

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
