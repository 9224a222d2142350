"""The ``/metrics`` endpoint as an ASGI app.

Serves the Prometheus text format or OpenMetrics by content negotiation, gzips when the client
asks, answers ``HEAD``, and filters families with ``?name[]=``.  Under prometheus_client's
multiprocess mode every scrape reads the workers' files through a fresh ``MultiProcessCollector``.
"""

from __future__ import annotations

import gzip
import os
from urllib.parse import parse_qs

import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from crowdmon._types import Receive, Scope, Send
from crowdmon.instrumentation import PrometheusInstrumentation, default_instrumentation


class MetricsApp:
    """An ASGI app that exposes the instrumentation's registry."""

    def __init__(
        self,
        instrumentation: PrometheusInstrumentation | None = None,
        *,
        compress: bool = True,
    ) -> None:
        self.instrumentation = instrumentation or default_instrumentation()
        self.compress = compress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope.get("method")
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"Method Not Allowed\n", [(b"allow", b"GET, HEAD")], method)
            return
        headers = _headers(scope)
        accept = headers.get(b"accept", b"").decode("latin-1")
        names = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("name[]")
        body, content_type = await anyio.to_thread.run_sync(self.render, accept, names)
        extra = [(b"content-type", content_type.encode("latin-1"))]
        if self.compress and b"gzip" in headers.get(b"accept-encoding", b""):
            body = gzip.compress(body, compresslevel=5)
            extra.append((b"content-encoding", b"gzip"))
        extra.append((b"vary", b"Accept, Accept-Encoding"))
        await _respond(send, 200, body, extra, method)

    def render(self, accept: str = "", names: list[str] | None = None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header, and its content type."""
        registry = self._registry_for_scrape()
        if names:
            registry = registry.restricted_registry(names)  # type: ignore[assignment]
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    def _registry_for_scrape(self) -> CollectorRegistry:
        if self.instrumentation.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]
            return registry
        return self.instrumentation.registry


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers") or ()}


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], method: object
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
