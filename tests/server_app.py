"""Routes whose recording depends on what the server does (HEAD and 204 bodies it does not send,
an upload abandoned halfway, a client gone before a 500, a streamed response), for
``tests/test_server.py`` (uvicorn, in a thread) and ``tests/test_server_granian.py`` (granian,
serving :func:`build_app`).  ``ABANDONED`` and ``RAISED`` note what the routes saw."""

from __future__ import annotations

import asyncio
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from crowdmon import current_endpoint, setup_monitoring, tracked_external


@tracked_external("openai", endpoint="chat/completions")
async def ask_model(question: str) -> str:
    await asyncio.sleep(0)
    return question.upper()


async def item(request: Request) -> Response:
    answer = await ask_model(request.path_params["item_id"])
    return JSONResponse({"item": answer, "endpoint": current_endpoint()})


async def text(request: Request) -> Response:
    return PlainTextResponse("x" * 1000)


async def no_content(request: Request) -> Response:
    return Response(b"ignored by the server", status_code=204)


#: The bytes each abandoned upload had received; the ``wait`` of each failed work.
ABANDONED: list[int] = []
RAISED: list[str] = []


async def upload(request: Request) -> Response:
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
    except ClientDisconnect:
        ABANDONED.append(size)
        print(f"upload abandoned after {size} bytes", flush=True)
        raise
    return PlainTextResponse("the whole body")


async def work(request: Request) -> Response:
    await request.body()
    if request.query_params.get("wait") == "gone":
        deadline = time.monotonic() + 5
        while not await request.is_disconnected():
            if time.monotonic() > deadline:
                raise TimeoutError("the client did not leave")
            await asyncio.sleep(0.01)
    RAISED.append(request.query_params.get("wait", ""))
    raise RuntimeError("the work failed")


async def stream(request: Request) -> Response:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            await asyncio.sleep(0.01)
            yield b"c" * 2500

    return StreamingResponse(chunks())


def build_app() -> Starlette:
    """Every route, monitored: what granian serves (``--factory tests.server_app:build_app``)."""
    app = Starlette(routes=[
        Route("/items/{item_id}", item),
        Route("/text", text, methods=["GET", "HEAD"]),
        Route("/none", no_content),
        Route("/upload", upload, methods=["POST"]),
        Route("/work", work, methods=["POST"]),
        Route("/stream", stream),
    ])
    setup_monitoring(app)
    return app
