"""``crowdmon demo``: an instrumented example app on 127.0.0.1, with generated traffic.

The app is a small stand-in for the chat / RAG service crowdmon grew from, instrumented the way
that service would be: decorators on the service functions (chat processing, memory, vector search,
an LLM call that streams, database queries, document operations, sessions), the tracking API for
chat messages and sessions, categorised errors from dependencies that fail now and then, health
checks behind ``/health``, and a ``user_type`` read from a request header.  Within a few seconds of
traffic every metric family of the catalogue has data.  Serving it needs the ``demo`` extra
(uvicorn, httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from crowdmon._types import Scope
from crowdmon.decorators import (
    tracked_chat,
    tracked_database_query,
    tracked_document_operation,
    tracked_errors,
    tracked_external,
    tracked_memory_operation,
    tracked_session,
    tracked_vector_search,
)
from crowdmon.errors import ErrorTaxonomy
from crowdmon.instrumentation import PrometheusInstrumentation, replace_default_instrumentation
from crowdmon.integration import setup_monitoring

logger = logging.getLogger("crowdmon.demo")

#: The user types the demo knows; any other header value reaches the cardinality guard as it is.
USER_TYPES = ("authenticated", "anonymous", "premium")
#: Small caps on a few ``user_type`` labels, so the demo shows folding within seconds.
DEMO_CARDINALITY_CAPS = {
    f"{metric}:user_type": 4
    for metric in (
        "chat_messages_total",
        "chat_processing_duration_seconds",
        "memory_operations_total",
        "application_errors_total",
    )
}
USER_HEADER = b"x-demo-user"


class RetrievalError(Exception):
    """The RAG pipeline found nothing usable."""


class SessionExpired(Exception):
    """A session id that is unknown or has ended."""


#: The demo's own exceptions, classified by name as a user would for a library's.
DEMO_TAXONOMY = ErrorTaxonomy(
    [
        (f"{__name__}.RetrievalError", "ai_system"),
        (f"{__name__}.SessionExpired", "session"),
    ]
)


def demo_user_type(scope: Scope) -> str:
    """The ``x-demo-user`` header; a malformed one fails, and crowdmon contains the failure."""
    for name, value in scope.get("headers") or ():
        if name == USER_HEADER:
            text: str = value.decode("latin-1")
            if not text.isprintable() or "!" in text:
                raise ValueError("malformed x-demo-user header")
            return text
    return "anonymous"


@dataclass
class DemoServices:
    """The business functions of the demo, decorated once per instrumentation."""

    instrumentation: PrometheusInstrumentation
    database: sqlite3.Connection
    sessions: dict[int, str] = field(default_factory=dict)
    llm_last_failure: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    functions: dict[str, Any] = field(default_factory=dict)


def build_services(instrumentation: PrometheusInstrumentation) -> DemoServices:
    database = sqlite3.connect(":memory:", check_same_thread=False)
    database.execute("CREATE TABLE documents (id INTEGER PRIMARY KEY, title TEXT)")
    database.executemany(
        "INSERT INTO documents VALUES (?, ?)",
        [(n, f"Regulation (EU) 2020/1503, part {n}") for n in range(1, 901)],
    )
    services = DemoServices(instrumentation, database)
    inst = instrumentation

    @tracked_memory_operation("retrieve", "conversation", instrumentation=inst)
    async def load_memory(user: str) -> list[str]:
        await asyncio.sleep(0.001)
        return [f"earlier question of {user}"]

    @tracked_memory_operation("store", "conversation", instrumentation=inst)
    async def store_memory(user: str, answer: str) -> None:
        await asyncio.sleep(0.001)

    @tracked_vector_search("similarity_search", instrumentation=inst)
    async def search_chunks(question: str, fail: bool) -> list[str]:
        await asyncio.sleep(random.uniform(0.002, 0.02))
        if fail or random.random() < 0.04:
            raise RetrievalError("no chunk above the similarity threshold")
        return [f"chunk {n}" for n in range(random.randint(1, 5))]

    @tracked_external("openai", endpoint="chat/completions", instrumentation=inst)
    async def complete(question: str, chunks: list[str], fail: bool) -> str:
        await asyncio.sleep(random.uniform(0.01, 0.08))
        if fail or random.random() < 0.05:
            services.llm_last_failure = time.monotonic()
            raise ConnectionError("LLM provider unreachable")
        return f"Under Regulation (EU) 2020/1503 ({len(chunks)} sources): {question[:60]}"

    @tracked_errors(component="rag_system", taxonomy=DEMO_TAXONOMY, instrumentation=inst)
    @tracked_chat(instrumentation=inst)
    async def answer(question: str, fail: str = "") -> dict[str, Any]:
        inst.track_chat_message(message_type="user")
        cache_hit = not fail and random.random() < 0.2
        rag_used = not cache_hit
        await load_memory("demo-user")
        text = "cached answer"
        if rag_used:
            chunks = await search_chunks(question, fail == "retrieval")
            text = await complete(question, chunks, fail == "llm")
        await store_memory("demo-user", text)
        inst.track_chat_message(message_type="assistant", cache_hit=cache_hit, rag_used=rag_used)
        return {"answer": text, "cache_hit": cache_hit, "rag_used": rag_used}

    @tracked_session(instrumentation=inst)
    @tracked_external("openai", endpoint="chat/completions/stream", instrumentation=inst)
    async def stream_completion(question: str) -> AsyncIterator[bytes]:
        words = ["EU", "crowdfunding", "platforms", "must", "publish", "a", "key", "investment", "information", "sheet"]
        for word in words:
            await asyncio.sleep(0.002)
            yield word.encode() + b" "

    @tracked_errors(component="document_store", taxonomy=DEMO_TAXONOMY, instrumentation=inst)
    @tracked_database_query("select_document", instrumentation=inst)
    def fetch_document(doc_id: int, fail: bool) -> tuple[int, str] | None:
        bad_migration = fail or random.random() < 0.03
        table = "documents_archive" if bad_migration else "documents"
        with services.lock:
            row = database.execute(f"SELECT id, title FROM {table} WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    @tracked_errors(component="document_ingest", taxonomy=DEMO_TAXONOMY, instrumentation=inst)
    @tracked_document_operation("add", "eu_crowdfunding", instrumentation=inst)
    @tracked_database_query("insert_document", instrumentation=inst)
    def add_document(title: str) -> int:
        if not title.strip():
            raise ValueError("a document needs a title")
        with services.lock:
            cursor = database.execute("INSERT INTO documents (title) VALUES (?)", (title,))
        return int(cursor.lastrowid or 0)

    @tracked_errors(component="auth0", taxonomy=DEMO_TAXONOMY, instrumentation=inst)
    def authorise(user_type: str, fail: bool) -> None:
        if fail or (user_type != "premium" and random.random() < 0.3):
            raise PermissionError("the account page needs a premium subscription")

    @tracked_errors(component="session_manager", taxonomy=DEMO_TAXONOMY, instrumentation=inst)
    def end_session(session_id: int) -> None:
        with services.lock:
            user_type = services.sessions.pop(session_id, None)
        if user_type is None:
            raise SessionExpired("unknown or expired session")
        inst.end_session(user_type)

    services.functions.update(
        answer=answer,
        stream_completion=stream_completion,
        fetch_document=fetch_document,
        add_document=add_document,
        authorise=authorise,
        end_session=end_session,
    )
    return services


def _failure(request: Request) -> str:
    """The failure the traffic generator asks for (``x-demo-fail``), so every path is shown soon."""
    return request.headers.get("x-demo-fail", "")


def _routes(services: DemoServices) -> list[Route | Mount]:
    functions = services.functions
    inst = services.instrumentation

    async def chat(request: Request) -> Response:
        payload = await request.json()
        try:
            result = await functions["answer"](str(payload.get("message", "")), _failure(request))
        except Exception as error:
            return JSONResponse({"detail": f"chat failed: {type(error).__name__}"}, status_code=502)
        return JSONResponse(result)

    async def chat_stream(request: Request) -> Response:
        return StreamingResponse(functions["stream_completion"]("stream"), media_type="text/plain")

    async def document(request: Request) -> Response:
        doc_id = request.path_params["doc_id"]
        try:
            found = functions["fetch_document"](doc_id, bool(_failure(request)))
        except sqlite3.Error:
            return JSONResponse({"detail": "document store unavailable"}, status_code=503)
        if found is None:
            return JSONResponse({"detail": "no such document"}, status_code=404)
        return JSONResponse({"id": found[0], "title": found[1]})

    async def add_document(request: Request) -> Response:
        payload = await request.json()
        try:
            doc_id = functions["add_document"](str(payload.get("title", "")))
        except ValueError as error:
            return JSONResponse({"detail": str(error)}, status_code=422)
        return JSONResponse({"id": doc_id}, status_code=201)

    async def search(request: Request) -> Response:
        try:
            async with inst.track_external_api_call("vector_store", "query"):
                await asyncio.sleep(random.uniform(0.001, 0.01))
                if _failure(request) or random.random() < 0.05:
                    raise TimeoutError("vector store did not answer")
        except TimeoutError:
            return JSONResponse({"detail": "search unavailable"}, status_code=503)
        return JSONResponse({"hits": random.randint(0, 10)})

    async def account(request: Request) -> Response:
        try:
            functions["authorise"](inst.user_type_label(), bool(_failure(request)))
        except PermissionError:
            return JSONResponse({"detail": "forbidden"}, status_code=403)
        return JSONResponse({"plan": "premium"})

    async def start_session(request: Request) -> Response:
        user_type = inst.user_type_label()
        session_id = next(services.ids)
        with services.lock:
            services.sessions[session_id] = user_type
        inst.start_session(user_type)
        return JSONResponse({"session": session_id}, status_code=201)

    async def end_session(request: Request) -> Response:
        try:
            functions["end_session"](request.path_params["session_id"])
        except SessionExpired:
            return JSONResponse({"detail": "session expired"}, status_code=410)
        return Response(status_code=204)

    async def ping(request: Request) -> Response:
        return PlainTextResponse("pong")

    admin = Starlette(routes=[Route("/ping", ping)])
    return [
        Route("/chat", chat, methods=["POST"]),
        Route("/chat/stream", chat_stream),
        Route("/documents", add_document, methods=["POST"]),
        Route("/documents/{doc_id:int}", document),
        Route("/search", search),
        Route("/account", account),
        Route("/sessions", start_session, methods=["POST"]),
        Route("/sessions/{session_id:int}", end_session, methods=["DELETE"]),
        Mount("/admin", admin),
    ]


def build_demo_app(instrumentation: PrometheusInstrumentation | None = None) -> Starlette:
    """The demo app with crowdmon set up on it (on the process-wide default instrumentation
    unless one is given)."""
    if instrumentation is None:
        instrumentation = _default_with_demo_caps()
    services = build_services(instrumentation)
    app = Starlette(routes=_routes(services))
    monitoring = setup_monitoring(app, instrumentation=instrumentation, user_type_resolver=demo_user_type)

    def database_check() -> bool:
        with services.lock:
            return bool(services.database.execute("SELECT 1").fetchone() == (1,))

    async def vector_store_check() -> bool:
        await asyncio.sleep(0.001)
        return True

    def openai_check() -> str:
        return "degraded" if time.monotonic() - services.llm_last_failure < 2.0 else "healthy"

    monitoring.register_health_check("database", database_check)
    monitoring.register_health_check("vector_store", vector_store_check, timeout=1.0)
    monitoring.register_health_check("openai", openai_check)
    for component in ("rag_system", "auth0"):
        monitoring.register_component(component)
        monitoring.set_component_healthy(component)
    return app


def _default_with_demo_caps() -> PrometheusInstrumentation:
    """The process-wide default instrumentation; built here with the demo's caps unless it exists
    (the first instrumentation on a registry fixes the caps; later ones share them)."""
    current = replace_default_instrumentation(None)
    if current is None:
        current = PrometheusInstrumentation(cardinality_caps=DEMO_CARDINALITY_CAPS)
    replace_default_instrumentation(current)
    return current


#: The first requests of the generated traffic: every path of the demo, failures included, so
#: every metric family has data within a few seconds.  (method, path, JSON body, failure, user)
OPENING: tuple[tuple[str, str, dict[str, str] | None, str, str], ...] = (
    ("GET", "/health", None, "", "anonymous"),
    ("POST", "/chat", {"message": "What is an ECSP licence?"}, "", "authenticated"),
    ("POST", "/chat", {"message": "Who supervises platforms?"}, "llm", "premium"),
    ("POST", "/chat", {"message": "What is a KIIS?"}, "retrieval", "anonymous"),
    ("GET", "/chat/stream", None, "", "authenticated"),
    ("GET", "/documents/7", None, "", "authenticated"),
    ("GET", "/documents/8", None, "database", "authenticated"),
    ("POST", "/documents", {"title": "Key investment information sheet"}, "", "premium"),
    ("POST", "/documents", {"title": ""}, "", "premium"),
    ("GET", "/search", None, "", "anonymous"),
    ("GET", "/search", None, "timeout", "anonymous"),
    ("GET", "/account", None, "auth", "anonymous"),
    ("POST", "/sessions", None, "", "authenticated"),
    ("DELETE", "/sessions/1000000000", None, "", "authenticated"),
    ("POST", "/chat", {"message": "Hello"}, "", "!!!"),
    ("POST", "/chat", {"message": "Hello"}, "", "bot-1"),
    ("POST", "/chat", {"message": "Hello"}, "", "bot-2"),
    ("GET", "/admin/ping", None, "", "anonymous"),
    ("GET", "/no-such-page/1", None, "", "anonymous"),
    ("GET", "/health", None, "", "anonymous"),
)


async def generate_traffic(base_url: str, rate: float) -> None:
    """Send a mix of requests to the demo app, ``rate`` per second, until cancelled.

    Requests start on schedule whatever their latency (at most 64 in flight)."""
    import httpx

    sessions: list[int] = []
    in_flight = asyncio.Semaphore(64)
    tasks: set[asyncio.Task[None]] = set()

    async def send(step: int) -> None:
        try:
            if step < len(OPENING):
                method, path, body, failure, user = OPENING[step]
                headers = {"x-demo-user": user, "x-demo-fail": failure}
                await client.request(method, path, json=body, headers=headers)
            else:
                await _random_request(client, step, sessions)
        except (httpx.HTTPError, ValueError, KeyError) as error:
            logger.debug("demo request failed: %s", error)
        finally:
            in_flight.release()

    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        try:
            for step in itertools.count():
                await in_flight.acquire()
                task = asyncio.create_task(send(step))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1.0 / rate)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _random_request(client: Any, step: int, sessions: list[int]) -> None:
    choice = random.random()
    user = random.choice(USER_TYPES)
    bot = step % 10 == 7
    if bot:
        user = f"bot-{random.randint(1, 10**6)}"  # unbounded values: the guard folds them
    elif step % 97 == 13:
        user = "!!!"  # a malformed header: the resolver fails, the request does not
    headers = {"x-demo-user": user}
    if step % 25 == 0:
        await client.get("/health")
    elif bot or choice < 0.3:
        await client.post("/chat", json={"message": "What is an ECSP licence?"}, headers=headers)
    elif choice < 0.38:
        await client.get("/chat/stream", headers=headers)
    elif choice < 0.5:
        await client.get(f"/documents/{random.randint(1, 1000)}", headers=headers)
    elif choice < 0.55:
        title = "" if random.random() < 0.2 else "Key investment information sheet"
        await client.post("/documents", json={"title": title}, headers=headers)
    elif choice < 0.68:
        await client.get("/search", headers=headers)
    elif choice < 0.75:
        await client.get("/account", headers=headers)
    elif choice < 0.83:
        response = await client.post("/sessions", headers=headers)
        sessions.append(int(response.json()["session"]))
    elif choice < 0.9:
        # Mostly real sessions; now and then one that never existed.
        session_id = sessions.pop(0) if sessions and random.random() < 0.8 else 10**9
        await client.delete(f"/sessions/{session_id}", headers=headers)
    elif choice < 0.95:
        await client.get("/admin/ping", headers=headers)
    else:
        await client.get(f"/no-such-page/{random.randint(1, 10**6)}", headers=headers)


def _check_address(host: str, port: int) -> None:
    """One line and exit status 1, rather than uvicorn's tracebacks, when the demo cannot listen:
    every address the host names is bound as asyncio's ``create_server`` binds it."""
    try:
        for family, kind, protocol, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as error:
        raise SystemExit(f"crowdmon demo cannot listen on {host}:{port}: {error.strerror or error}") from None


def run_demo(host: str = "127.0.0.1", port: int = 8000, duration: float | None = None, rate: float = 20.0) -> int:
    """Serve the demo app and drive traffic at it, for ``duration`` seconds or until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("crowdmon demo needs uvicorn and httpx: pip install 'crowdmon[demo]'") from None

    _check_address(host, port)

    async def serve() -> None:
        server = uvicorn.Server(uvicorn.Config(build_demo_app(), host=host, port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving  # startup failed: surface uvicorn's error
                return
            await asyncio.sleep(0.05)
        base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
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
