"""A minimal ASGI server in-process: full control over what the app receives, and a record of
every message it sends, for pinning the middleware's semantics exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from crowdmon._types import ASGIApp, Message


def http_scope(
    path: str = "/",
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    root_path: str = "",
    query_string: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": query_string,
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def run_asgi(
    app: ASGIApp,
    scope: dict[str, Any],
    incoming: Sequence[Message] = ({"type": "http.request", "body": b"", "more_body": False},),
) -> list[Message]:
    """Run one request; ``incoming`` is what ``receive`` returns in turn, then, as a server does
    for a client that stays, a disconnect once the response is complete (a receive before then
    waits for it)."""
    pending = list(incoming)
    sent: list[Message] = []
    response_complete = asyncio.Event()

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await response_complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        # dict's own get: a test's message may refuse to be read through its class's get
        if message["type"] == "http.response.body" and not dict.get(message, "more_body", False):
            response_complete.set()

    await app(scope, receive, send)
    return sent
