"""The app the production tests serve with gunicorn, ``uvicorn --workers``, granian and hypercorn.

``METRICS_TOKEN`` in the environment protects ``/metrics`` with that bearer token (the README's
"Protecting /metrics" set-up).  ``HOLD_DIR`` is where ``/hold`` requests leave a marker naming
their worker while they wait for ``HOLD_DIR/release``; they hold an active session meanwhile.
Every response names the worker that served it in ``x-worker-pid``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from fastapi import FastAPI

from crowdmon import (
    MetricsApp,
    default_instrumentation,
    setup_monitoring,
    tracked_document_operation,
)
from crowdmon._types import Message, Receive, Scope, Send

api = FastAPI()
monitoring = default_instrumentation()
setup_monitoring(
    api,
    metrics_app=MetricsApp(
        monitoring,
        bearer_token=os.environ.get("METRICS_TOKEN") or None,
        prune_dead_workers=os.environ.get("CROWDMON_TEST_PRUNE", "1") == "1",
    ),
    exemplars=os.environ.get("CROWDMON_TEST_EXEMPLARS") or None,
)


@api.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@tracked_document_operation("retrieve", "eu_crowdfunding")
async def retrieve_documents(question: str) -> list[str]:
    return [question[:10]]


@api.post("/chat")
async def chat(message: dict[str, str]) -> dict[str, str]:
    documents = await retrieve_documents(message.get("text", ""))
    monitoring.track_chat_message("authenticated", "assistant", cache_hit=True, rag_used=True)
    return {"answer": documents[0]}


@api.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@api.put("/components/{component}/{state}")
async def set_component(component: str, state: str) -> dict[str, int]:
    monitoring.set_component_health(component, state)
    return {"pid": os.getpid()}


@api.get("/hold")
async def hold() -> dict[str, int]:
    hold_dir = Path(os.environ["HOLD_DIR"])
    marker = hold_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
    async with monitoring.track_session("authenticated"):
        marker.touch()
        try:
            for _ in range(600):
                if (hold_dir / "release").exists():
                    break
                await asyncio.sleep(0.05)
        finally:
            marker.unlink()
    return {"pid": os.getpid()}


class WorkerPidHeader:
    """Adds ``x-worker-pid`` to every response, so a test knows which worker answered."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.header = (b"x-worker-pid", str(os.getpid()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_pid)


app = WorkerPidHeader(api)
