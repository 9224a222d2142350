"""Protocol fuzzing of PrometheusMiddleware with hypothesis.

Generated ASGI scopes (optional keys missing, odd methods, non-ASCII and percent-encoded paths,
huge and malformed headers, bogus ``Content-Length``) meet generated app behaviours (raise before
or after ``http.response.start``, never respond, body chunks of every size, client disconnect at
every point, a server whose ``send`` fails, cancellation).  For every example: crowdmon raises
nothing of its own, the app's exception reaches the server as the same object, every message
passes unchanged and in order both ways, and the one recorded request has exactly the status,
sizes and counts of what happened.
"""

from __future__ import annotations

import asyncio
import copy
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from crowdmon import PrometheusInstrumentation, PrometheusMiddleware
from crowdmon._types import Message, Receive, Scope, Send
from crowdmon.catalogue import OTHER_METHOD, UNMATCHED_HANDLER
from crowdmon.exemplars import traceparent_exemplar
from crowdmon.middleware import STANDARD_METHODS
from crowdmon.routes import MountTemplates, handler_label_for
from tests.support import value

REQUESTS = "crowdfunding_api_requests_total"
DURATION = "crowdfunding_api_request_duration_seconds"
REQUEST_SIZE = "crowdfunding_api_request_size_bytes"
RESPONSE_SIZE = "crowdfunding_api_response_size_bytes"
IN_PROGRESS = "crowdfunding_api_requests_in_progress"

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


class AppError(Exception):
    pass


class AppAbort(BaseException):
    """An exception outside ``Exception``: crowdmon must not swallow or replace it either."""


class ServerSendError(OSError):
    """What a server raises from ``send`` when the client has gone."""


# -- scopes ------------------------------------------------------------------------------------

ODD_METHODS = ("get", "PROPFIND", "BREW", "", " ", "GET\r\n", "Ĝet", "X" * 2000)
methods = st.one_of(st.sampled_from(STANDARD_METHODS), st.sampled_from(ODD_METHODS), st.text(max_size=20))
paths = st.one_of(
    st.sampled_from(["/", "/metrics", "/items/1", "//", "/%2F", "/../etc/passwd"]),
    st.text(max_size=40).map(lambda text: "/" + text),
    st.binary(max_size=40).map(lambda raw: "/" + quote(raw)),
    st.text(alphabet="é漢字ü\u0000\ud7ff/%", max_size=30).map(lambda text: "/" + text),
)
header_names = st.one_of(
    st.sampled_from([b"content-length", b"host", b"user-agent", b"content-type", b"Content-Length"]),
    st.binary(max_size=30),
)
content_lengths = st.one_of(
    st.integers(0, 10**6).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"-1", b"12abc", b" 12", b"1e3", b"9" * 40, "١٢".encode(), b"0x10", b"12, 12"]),
)
header_values = st.one_of(st.binary(max_size=60), st.integers(8_000, 70_000).map(lambda n: b"\xff" * n))
headers = st.one_of(
    st.lists(
        st.one_of(
            st.tuples(header_names, header_values),
            st.tuples(st.just(b"content-length"), content_lengths),
            st.lists(st.binary(max_size=5), min_size=2, max_size=2),  # lists, not tuples
        ),
        max_size=6,
    ),
    # Out of the ASGI spec, as a buggy upstream middleware might leave them.
    st.sampled_from([[(b"content-length", b"5", b"x")], [b"content-length: 5"], [(b"content-length", 5)], ()]),
)
OPTIONAL_KEYS = ("asgi", "http_version", "scheme", "raw_path", "query_string", "root_path", "headers", "client", "server")


@st.composite
def scopes(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(paths)
    root_path = draw(st.sampled_from(["", "/prefix", path[: len(path) // 2]]))
    full: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": draw(st.sampled_from(["2.0", "2.4"]))},
        "http_version": draw(st.sampled_from(["1.0", "1.1", "2"])),
        "method": draw(methods),
        "scheme": draw(st.sampled_from(["http", "https"])),
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "query_string": draw(st.binary(max_size=50)),
        "root_path": root_path,
        "headers": draw(headers),
        "client": draw(st.sampled_from([("127.0.0.1", 50000), None])),
        "server": draw(st.sampled_from([("127.0.0.1", 8000), None])),
    }
    missing = draw(st.sets(st.sampled_from(OPTIONAL_KEYS)))
    return {key: item for key, item in full.items() if key not in missing}


# -- what the client sends ---------------------------------------------------------------------

body_sizes = st.one_of(st.integers(0, 100), st.integers(0, 70_000), st.just(1 << 20))


@st.composite
def incoming_messages(draw: st.DrawFn) -> list[Message]:
    """The request body in chunks, possibly cut short by a disconnect at any point."""
    sizes = draw(st.lists(body_sizes, max_size=4))
    messages: list[Message] = [
        {"type": "http.request", "body": b"q" * size, "more_body": True} for size in sizes
    ]
    ending = draw(st.sampled_from(["complete", "complete-no-flag", "disconnect", "nothing"]))
    if ending == "complete":
        messages.append({"type": "http.request", "body": b"", "more_body": False})
    elif ending == "complete-no-flag":
        messages.append({"type": "http.request", "body": b"end"})
    elif ending == "disconnect":
        messages.append({"type": "http.disconnect"})
    return messages


# -- what the app does -------------------------------------------------------------------------


@dataclass
class Behaviour:
    reads: int
    outgoing: list[Message]
    then: str  # "return", "raise", "hang" (cancelled by the server)
    error: BaseException | None = None
    send_fails_at: int | None = None  # index into outgoing where the server's send raises


statuses = st.one_of(st.sampled_from([200, 201, 204, 304, 404, 500, 503]), st.integers(100, 999))


@st.composite
def behaviours(draw: st.DrawFn) -> Behaviour:
    outgoing: list[Message] = []
    responds = draw(st.sampled_from(["full", "partial", "none"]))
    if responds != "none":
        trailers = draw(st.booleans())
        outgoing.append(
            {"type": "http.response.start", "status": draw(statuses), "headers": [(b"x-n", b"1")], "trailers": trailers}
        )
        sizes = draw(st.lists(body_sizes, max_size=4))
        for size in sizes:
            chunk: Message = {"type": "http.response.body", "body": b"r" * size, "more_body": True}
            if draw(st.booleans()):
                chunk["extension"] = object()
            outgoing.append(chunk)
        if responds == "full":
            last: Message = draw(
                st.sampled_from([{"type": "http.response.body"}, {"type": "http.response.body", "body": b"end", "more_body": False}])
            )
            outgoing.append(dict(last))
            if trailers:
                outgoing.append({"type": "http.response.trailers", "headers": [], "more_trailers": False})
    then = draw(st.sampled_from(["return", "raise", "hang"]))
    error: BaseException | None = None
    if then == "raise":
        error = draw(st.sampled_from([AppError, AppAbort, KeyError, ValueError]))("app failure")
    send_fails_at = draw(st.none() | st.integers(0, max(len(outgoing) - 1, 0))) if outgoing else None
    return Behaviour(draw(st.integers(0, 6)), outgoing, then, error, send_fails_at)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the server saw, and what the app saw."""

    delivered: list[Message] = field(default_factory=list)  # messages given to the app
    sent: list[Message] = field(default_factory=list)  # messages the server got from the app
    raised: BaseException | None = None
    cancelled: bool = False


async def drive(
    app: Any,
    scope: Scope,
    incoming: list[Message],
    send_fails_at: int | None = None,
    hang: asyncio.Event | None = None,
) -> Run:
    """Serve one request; once the app sets ``hang`` the request is cancelled (a server shutting
    down), and ``send`` raises at message ``send_fails_at`` (a client gone mid-response)."""
    run = Run()
    pending = list(incoming)

    async def receive() -> Message:
        message = pending.pop(0) if pending else {"type": "http.disconnect"}
        run.delivered.append(message)
        return message

    async def send(message: Message) -> None:
        run.sent.append(message)
        if send_fails_at == len(run.sent) - 1:
            raise ServerSendError("client gone")

    task = asyncio.ensure_future(app(scope, receive, send))
    if hang is not None:
        await _wait_for(hang, task)
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        run.cancelled = True
    except BaseException as error:
        run.raised = error
    return run


async def _wait_for(event: asyncio.Event, task: asyncio.Future[Any]) -> None:
    waiter: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def behaving_app(behaviour: Behaviour, hang: asyncio.Event | None = None) -> Any:
    """A bare ASGI app acting out ``behaviour``; records what it received from ``receive``."""
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(behaviour.reads):
            received.append(await receive())
        for message in behaviour.outgoing:
            await send(message)
        if behaviour.then == "raise":
            assert behaviour.error is not None
            raise behaviour.error
        if behaviour.then == "hang":
            assert hang is not None
            hang.set()
            await asyncio.Event().wait()

    app.received = received  # type: ignore[attr-defined]
    return app


def expected_request_bytes(scope: Scope, delivered: list[Message]) -> int:
    """Bytes received; for a body not read to the end (nor cut short by the client leaving), a
    larger well-formed Content-Length."""
    received = sum(len(m.get("body", b"")) for m in delivered if m["type"] == "http.request")
    complete = any(
        (m["type"] == "http.request" and not m.get("more_body", False)) or m["type"] == "http.disconnect"
        for m in delivered
    )
    if complete:
        return received
    for header in scope.get("headers", []):
        if not (isinstance(header, (tuple, list)) and len(header) == 2 and all(isinstance(part, bytes) for part in header)):
            return received  # malformed headers declare nothing
        name, header_value = header
        if name == b"content-length":
            if header_value.isdigit() and len(header_value) <= 15:
                return max(received, int(header_value))
            break
    return received


def expected_status(behaviour: Behaviour, run: Run, received_by_app: list[Message], asked: list[Message]) -> int:
    """``asked``: what the middleware asked the server itself, once the body was complete: before
    a 5xx starts, or after an app that started no response."""
    if any(message["type"] == "http.disconnect" for message in received_by_app):
        # The app reads before it sends: it saw the client leave before its response started,
        # during the body or after it.  Whatever it starts afterwards, the client never gets it.
        return 499
    for message in run.sent:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            if not 100 <= status <= 599:
                return 0  # not an HTTP status: recorded as "0", one label for every such number
            if status >= 500 and asked and asked[0]["type"] == "http.disconnect":
                return 499  # gone before the error response started
            return status
    went_away = run.cancelled or any(m["type"] == "http.disconnect" for m in run.delivered)
    return 499 if went_away else 500


def is_excluded(scope: Scope) -> bool:
    path: str = scope["path"]
    root_path = scope.get("root_path") or ""
    if root_path and path.startswith(root_path) and path[len(root_path) : len(root_path) + 1] in ("", "/"):
        path = path[len(root_path) :]
    return path == "/metrics"


@FUZZ
@given(scope=scopes(), incoming=incoming_messages(), behaviour=behaviours())
def test_any_scope_and_app_behaviour_pass_through_and_record_exactly_what_happened(
    scope: dict[str, Any], incoming: list[Message], behaviour: Behaviour
) -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry)
    event(f"then={behaviour.then}, send fails={behaviour.send_fails_at is not None}, excluded={is_excluded(scope)}")

    async def scenario() -> tuple[Run, list[Message]]:
        hang = asyncio.Event()
        app = behaving_app(behaviour, hang)
        middleware = PrometheusMiddleware(app, instrumentation=instrumentation)
        run = await drive(middleware, scope, incoming, behaviour.send_fails_at, hang)
        return run, app.received

    run, received_by_app = asyncio.run(scenario())

    # Exceptions: the app's own, the server's send failure, or cancellation; never crowdmon's.
    send_failed = behaviour.send_fails_at is not None
    if send_failed:
        assert isinstance(run.raised, ServerSendError)
        assert run.sent[-1] is behaviour.outgoing[behaviour.send_fails_at]  # type: ignore[index]
    elif behaviour.then == "raise":
        assert run.raised is behaviour.error
    elif behaviour.then == "hang":
        assert run.cancelled and run.raised is None
    else:
        assert run.raised is None and not run.cancelled
    # Messages: the same objects, in order, both ways.
    expected_sent = behaviour.outgoing[: behaviour.send_fails_at + 1] if send_failed else behaviour.outgoing  # type: ignore[operator]
    assert [id(m) for m in run.sent] == [id(m) for m in expected_sent]
    # The app received everything the server delivered.  The one exception: an app that read the
    # whole body and ended without a response; the middleware then asks the server once whether
    # the client is gone (all it can deliver is a disconnect), to tell 499 from 500.
    assert [id(m) for m in received_by_app] == [id(m) for m in run.delivered[: len(received_by_app)]]
    asked = run.delivered[len(received_by_app) :]
    if asked:
        assert len(asked) == 1
        assert any(m["type"] == "http.request" and not m.get("more_body", False) for m in received_by_app)
        started = [m for m in run.sent if m["type"] == "http.response.start"]
        if started:  # asked before a 5xx started
            assert int(started[0]["status"]) >= 500
        else:
            assert asked[0]["type"] == "http.disconnect" and not run.cancelled

    # The record: one request, its status, sizes and counts, nothing in progress, no own failure.
    assert value(registry, "crowdmon_internal_errors_total", site="middleware.start") == 0
    assert sum(
        sample.value for family in registry.collect() if family.name == "crowdmon_internal_errors"
        for sample in family.samples if sample.name.endswith("_total")
    ) == 0
    total = sum(
        sample.value for family in registry.collect() if family.name == "crowdfunding_api_requests"
        for sample in family.samples
    )
    if is_excluded(scope):
        assert total == 0
        return
    method = scope["method"] if scope["method"] in STANDARD_METHODS else OTHER_METHOD
    status = expected_status(behaviour, run, received_by_app, asked)
    labels = {"method": method, "handler": UNMATCHED_HANDLER}
    assert total == 1
    assert value(registry, REQUESTS, status=str(status), **labels) == 1
    assert value(registry, DURATION + "_count", **labels) == 1
    assert value(registry, REQUEST_SIZE + "_sum", **labels) == expected_request_bytes(scope, run.delivered)
    sent_bytes = sum(len(m.get("body", b"")) for m in run.sent if m["type"] == "http.response.body")
    if scope["method"] == "HEAD" or 100 <= status < 200 or status in (204, 304):
        sent_bytes = 0  # the server sends no body, whatever the app hands it
    assert value(registry, RESPONSE_SIZE + "_sum", **labels) == sent_bytes
    assert value(registry, IN_PROGRESS, method=method) == 0


# -- the same requests through a real FastAPI app, with and without crowdmon --------------------


def build_fastapi() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.post("/echo")
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    @app.get("/sync")
    def sync() -> dict[str, str]:  # runs in the threadpool
        return {"ok": "yes"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Any:
            for size in (0, 10, 5000):
                yield b"s" * size

        return StreamingResponse(chunks())

    @app.get("/boom")
    async def boom() -> None:
        raise AppError("boom")

    return app


FASTAPI_REGISTRY = CollectorRegistry()
BARE_FASTAPI = build_fastapi()
MONITORED_FASTAPI = build_fastapi()
MONITORED_FASTAPI.add_middleware(PrometheusMiddleware, registry=FASTAPI_REGISTRY)
fastapi_paths = st.one_of(
    st.sampled_from(["/items/1", "/items/x", "/echo", "/sync", "/stream", "/boom", "/items/1/", "/nowhere"]),
    paths,
)


def outcome(run: Run) -> tuple[Any, ...]:
    raised = None if run.raised is None else (type(run.raised), str(run.raised))
    return run.sent, run.delivered, raised, run.cancelled


def recorded_total(registry: CollectorRegistry, family_name: str) -> float:
    return sum(
        sample.value for family in registry.collect() if family.name == family_name
        for sample in family.samples if not sample.name.endswith("_created")
    )


@settings(FUZZ, max_examples=150)
@given(
    scope=scopes(),
    path=fastapi_paths,
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "BREW"]),
    incoming=incoming_messages(),
    send_fails_at=st.none() | st.integers(0, 3),
)
def test_a_fastapi_app_behaves_identically_with_and_without_crowdmon(
    scope: dict[str, Any], path: str, method: str, incoming: list[Message], send_fails_at: int | None
) -> None:
    scope = {**scope, "path": path, "method": method}
    before = recorded_total(FASTAPI_REGISTRY, "crowdfunding_api_requests")

    async def both() -> tuple[Run, Run]:
        bare = await drive(BARE_FASTAPI, copy.deepcopy(scope), incoming, send_fails_at)
        monitored = await drive(MONITORED_FASTAPI, copy.deepcopy(scope), incoming, send_fails_at)
        return bare, monitored

    bare, monitored = asyncio.run(both())

    assert outcome(monitored) == outcome(bare)
    assert recorded_total(FASTAPI_REGISTRY, "crowdfunding_api_requests") == before + (0 if is_excluded(scope) else 1)
    assert recorded_total(FASTAPI_REGISTRY, "crowdmon_internal_errors") == 0
    assert recorded_total(FASTAPI_REGISTRY, IN_PROGRESS) == 0


# -- route resolution on whatever a router left in the scope ------------------------------------


class OddRoute:
    """A third-party router's route object, with attributes of any type."""

    def __init__(self, path_format: object, path: object) -> None:
        self.path_format = path_format
        self.path = path


class EffectiveContext:
    def __init__(self, original_route: object, path_format: object) -> None:
        self.original_route = original_route
        self.path_format = path_format


odd_values = st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=10), st.integers(), st.just(object()))
routes = st.one_of(
    st.none(),
    odd_values,
    st.builds(OddRoute, odd_values, odd_values),
    st.sampled_from([Route("/items/{item_id:int}", PlainTextResponse), Mount("/static", app=PlainTextResponse("x"))]),
)


@settings(FUZZ, max_examples=100)
@given(
    route=routes,
    root_path=odd_values,
    entry_root_path=st.text(max_size=10),
    fastapi_scope=st.one_of(odd_values, st.builds(lambda path: {"effective_route_context": EffectiveContext(None, path)}, odd_values)),
    status=st.integers(0, 999),
    share_route=st.booleans(),
)
def test_route_resolution_never_raises_and_returns_a_string(
    route: object, root_path: object, entry_root_path: str, fastapi_scope: object, status: int, share_route: bool
) -> None:
    if share_route and isinstance(fastapi_scope, dict):
        fastapi_scope["effective_route_context"].original_route = route
    scope: dict[str, Any] = {"type": "http", "route": route, "root_path": root_path, "fastapi": fastapi_scope}

    handler = handler_label_for(scope, entry_root_path, status, MountTemplates())

    assert isinstance(handler, str)
    described_by_fastapi = share_route and isinstance(fastapi_scope, dict)
    if route is None or not (isinstance(route, (Route, Mount, OddRoute)) or described_by_fastapi):
        assert handler == UNMATCHED_HANDLER


class OddApp:
    """An app in ``scope["app"]`` whose router is anything at all."""

    def __init__(self, router: object) -> None:
        self.router = router


ROUTED_APP = Starlette(routes=[Route("/items/{item_id:int}", PlainTextResponse), Mount("/orgs/{org}", routes=[Route("/x", PlainTextResponse)])])


@settings(FUZZ, max_examples=100)
@given(
    app=st.one_of(odd_values, st.builds(OddApp, st.one_of(odd_values, st.builds(OddRoute, odd_values, odd_values))), st.just(ROUTED_APP)),
    path=st.one_of(odd_values, st.sampled_from(["/items/1", "/orgs/a/x", "/orgs/a/y", "/"])),
    method=odd_values,
    root_path=odd_values,
    entry_root_path=st.text(max_size=10),
    status=st.integers(0, 999),
)
def test_a_scope_no_router_recorded_a_route_in_is_unmatched_whatever_the_app_in_it(
    app: object, path: object, method: object, root_path: object, entry_root_path: str, status: int
) -> None:
    scope: dict[str, Any] = {"type": "http", "app": app, "path": path, "method": method, "root_path": root_path, "headers": []}

    handler = handler_label_for(scope, entry_root_path, status, MountTemplates())

    assert handler == UNMATCHED_HANDLER  # a router that never saw this scope cannot be asked what it did


# -- the one opt-in path from a request header into /metrics -----------------------------------

HEX = "0123456789abcdef"
W3C_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@settings(FUZZ, max_examples=200)
@given(
    trace=st.text(HEX, min_size=32, max_size=32) | st.just("0" * 32),
    span=st.text(HEX, min_size=16, max_size=16),
    flags=st.sampled_from(["00", "01", "03", "fe", "ff"]),
    mutation=st.none() | st.tuples(st.integers(0, 54), st.sampled_from(["-", "x", "G", "\n", "\x00", " ", "\u00e9", "0", ""])),
    suffix=st.sampled_from(["", " ", "-00", "x", "\n\n"]),
    upper=st.booleans(),
    raw=st.none() | st.binary(max_size=80),
)
def test_only_a_well_formed_sampled_traceparent_becomes_an_exemplar(
    trace: str, span: str, flags: str, mutation: tuple[int, str] | None, suffix: str, upper: bool, raw: bytes | None
) -> None:
    text = f"00-{trace}-{span}-{flags}"
    if mutation is not None:
        text = text[: mutation[0]] + mutation[1] + text[mutation[0] + 1 :]
    text += suffix
    header = raw if raw is not None else (text.upper() if upper else text).encode()

    exemplar = traceparent_exemplar({"headers": [(b"traceparent", header)]})

    # The W3C format exactly (surrounding whitespace aside; lower-case hex), a known version
    # (not ff; 00 with no more fields), sampled, non-zero ids.
    match = W3C_TRACEPARENT.fullmatch(header.strip().decode("latin-1"))
    if (
        match is None
        or match.group(1) == "ff"
        or (match.group(1) == "00" and match.group(5))
        or not int(match.group(4), 16) & 1
        or match.group(2) == "0" * 32
        or match.group(3) == "0" * 16
    ):
        assert exemplar is None
    else:
        assert exemplar == {"trace_id": match.group(2), "span_id": match.group(3)}
