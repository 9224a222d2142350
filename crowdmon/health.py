"""The ``/health`` endpoint: every component's state and an overall status, as JSON."""

from __future__ import annotations

import json

from crowdmon._types import Receive, Scope, Send
from crowdmon.instrumentation import PrometheusInstrumentation, default_instrumentation


def overall_status(states: dict[str, str]) -> str:
    """``unhealthy`` if any component is, else ``degraded`` if any is, else ``healthy``."""
    values = set(states.values())
    for state in ("unhealthy", "degraded"):
        if state in values:
            return state
    return "healthy"


class HealthApp:
    """An ASGI app answering 200 with the components' states, or 503 when one is unhealthy."""

    def __init__(self, instrumentation: PrometheusInstrumentation | None = None) -> None:
        self.instrumentation = instrumentation or default_instrumentation()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        components = self.instrumentation.component_health()
        status = overall_status(components)
        body = json.dumps({"status": status, "components": components}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503 if status == "unhealthy" else 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})
