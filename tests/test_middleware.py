"""The request middleware's semantics, each pinned by an exact value read back from the registry."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from crowdmon import PrometheusInstrumentation, PrometheusMiddleware
from crowdmon._types import Message, Receive, Scope, Send
from crowdmon.context import current_request
from tests.asgi import http_scope, run_asgi
from tests.support import value

REQUESTS = "crowdfunding_api_requests_total"
DURATION = "crowdfunding_api_request_duration_seconds"
REQUEST_SIZE = "crowdfunding_api_request_size_bytes"
RESPONSE_SIZE = "crowdfunding_api_response_size_bytes"
IN_PROGRESS = "crowdfunding_api_requests_in_progress"


async def get(app: Any, path: str, method: str = "GET", **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.request(method, path, **kwargs)


def starlette_app(registry: CollectorRegistry, *routes: Route, **options: Any) -> Starlette:
    app = Starlette(routes=list(routes))
    app.add_middleware(PrometheusMiddleware, registry=registry, **options)
    return app


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["item_id"]})


async def test_counts_each_request_by_method_route_template_and_status(registry: CollectorRegistry) -> None:
    app = starlette_app(registry, Route("/items/{item_id:int}", item, methods=["GET", "POST"]))
    for path in ("/items/1", "/items/2", "/items/3"):
        assert (await get(app, path)).status_code == 200
    await get(app, "/items/4", method="POST")

    assert value(registry, REQUESTS, method="GET", handler="/items/{item_id}", status="200") == 3
    assert value(registry, REQUESTS, method="POST", handler="/items/{item_id}", status="200") == 1
    assert value(registry, DURATION + "_count", method="GET", handler="/items/{item_id}") == 3
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_an_empty_body_is_in_the_zero_bucket_before_and_after_its_label_set_is_admitted(registry: CollectorRegistry) -> None:
    """A GET without a body and a 204 have 0 bytes: in the ``le="0.0"`` bucket, so a size
    quantile over them is 0, not an interpolation up to the next bound; the same once the label
    set is admitted and the compiled path adds its requests to its sums."""

    async def nothing(request: Request) -> Response:
        return Response(status_code=204)

    app = starlette_app(registry, Route("/nothing", nothing))
    for _ in range(1100):  # past the first absorption (1,024), which admits the label set
        assert (await run_asgi(app, http_scope("/nothing")))[0]["status"] == 204
    for kind in (REQUEST_SIZE, RESPONSE_SIZE):
        assert value(registry, kind + "_bucket", method="GET", handler="/nothing", le="0.0") == 1100
        assert value(registry, kind + "_bucket", method="GET", handler="/nothing", le="64.0") == 1100
        assert value(registry, kind + "_sum", method="GET", handler="/nothing") == 0


async def test_unusual_methods_are_recorded_as_one_fixed_value(registry: CollectorRegistry) -> None:
    app = starlette_app(registry, Route("/items/{item_id:int}", item))
    for method in ("PROPFIND", "BREW", "X" * 300):
        await get(app, "/items/1", method=method)
    await run_asgi(app, http_scope("/items/1", method="get"))

    assert value(registry, REQUESTS, method="OTHER", handler="/items/{item_id}", status="405") == 4
    assert value(registry, IN_PROGRESS, method="OTHER") == 0


async def test_streaming_response_is_timed_until_last_chunk(registry: CollectorRegistry) -> None:
    async def slow_stream(request: Request) -> Response:
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(3):
                await asyncio.sleep(0.05)
                yield b"x" * 1000

        return StreamingResponse(chunks())

    app = starlette_app(registry, Route("/stream", slow_stream))
    response = await get(app, "/stream")

    assert len(response.content) == 3000
    assert value(registry, DURATION + "_sum", method="GET", handler="/stream") >= 0.15
    # Nothing under 0.1 s: the time of every chunk is included.
    assert value(registry, DURATION + "_bucket", method="GET", handler="/stream", le="0.1") == 0
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/stream") == 3000


async def test_background_task_after_the_response_is_not_timed(registry: CollectorRegistry) -> None:
    async def pause() -> None:
        await asyncio.sleep(0.3)

    async def with_background(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(pause))

    app = starlette_app(registry, Route("/bg", with_background))
    await get(app, "/bg")

    assert value(registry, DURATION + "_count", method="GET", handler="/bg") == 1
    assert value(registry, DURATION + "_bucket", method="GET", handler="/bg", le="0.25") == 1


async def test_request_size_is_the_bytes_received_in_every_chunk(registry: CollectorRegistry) -> None:
    async def echo_length(request: Request) -> Response:
        return PlainTextResponse(str(len(await request.body())))

    app = starlette_app(registry, Route("/upload", echo_length, methods=["POST"]))
    chunks = [{"type": "http.request", "body": b"a" * 700, "more_body": True} for _ in range(4)]
    chunks.append({"type": "http.request", "body": b"b" * 100, "more_body": False})
    # Chunked upload: no Content-Length at all.
    sent = await run_asgi(app, http_scope("/upload", "POST"), chunks)

    assert sent[1]["body"] == b"2900"
    assert value(registry, REQUEST_SIZE + "_sum", method="POST", handler="/upload") == 2900
    assert value(registry, REQUEST_SIZE + "_bucket", method="POST", handler="/upload", le="1024.0") == 0
    assert value(registry, REQUEST_SIZE + "_bucket", method="POST", handler="/upload", le="4096.0") == 1


async def test_request_size_falls_back_to_content_length_for_a_body_never_read(registry: CollectorRegistry) -> None:
    async def ignore_body(request: Request) -> Response:
        return PlainTextResponse("ignored")

    app = starlette_app(registry, Route("/ignore", ignore_body, methods=["POST"]))
    await get(app, "/ignore", method="POST", content=b"z" * 5000)
    # A bogus Content-Length is no size at all.
    await run_asgi(app, http_scope("/ignore", "POST", headers=[(b"content-length", b"12abc")]))

    assert value(registry, REQUEST_SIZE + "_sum", method="POST", handler="/ignore") == 5000
    assert value(registry, REQUEST_SIZE + "_count", method="POST", handler="/ignore") == 2


async def test_response_size_is_the_bytes_sent_without_content_length(registry: CollectorRegistry) -> None:
    async def raw_chunks(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for size in (10, 0, 2000, 5):
            await send({"type": "http.response.body", "body": b"r" * size, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = PrometheusMiddleware(raw_chunks, registry=registry)
    await run_asgi(app, http_scope("/anything"))
    await run_asgi(app, http_scope("/anything"))

    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="<unmatched>") == 4030
    assert value(registry, RESPONSE_SIZE + "_count", method="GET", handler="<unmatched>") == 2


async def test_a_file_sent_by_path_counts_its_size(registry: CollectorRegistry, tmp_path: Path) -> None:
    served = tmp_path / "report.bin"
    served.write_bytes(b"x" * 50_000)
    app = starlette_app(registry, Route("/file", lambda request: FileResponse(served)))
    scope = http_scope("/file") | {"extensions": {"http.response.pathsend": {}}}

    sent = await run_asgi(app, scope)

    assert [message["type"] for message in sent] == ["http.response.start", "http.response.pathsend"]
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/file") == 50_000
    assert value(registry, REQUESTS, method="GET", handler="/file", status="200") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_a_file_sent_by_zero_copy_counts_the_bytes_it_sends(registry: CollectorRegistry, tmp_path: Path) -> None:
    served = tmp_path / "video.bin"
    served.write_bytes(b"v" * 5_000)

    async def zero_copy(scope: Scope, receive: Receive, send: Send) -> None:
        with served.open("rb") as file:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.zerocopysend", "file": file, "count": 100, "more_body": True})
            await send({"type": "http.response.zerocopysend", "file": file.fileno(), "offset": 1_000, "more_body": True})
            file.seek(4_700)  # without an offset: from where the file stands, to its end
            await send({"type": "http.response.zerocopysend", "file": file, "more_body": False})
            assert current_request.get().finished  # type: ignore[union-attr]

    app = PrometheusMiddleware(zero_copy, registry=registry)
    scope = http_scope("/video") | {"extensions": {"http.response.zerocopysend": {}}}
    sent = await run_asgi(app, scope)

    assert [message["type"] for message in sent] == ["http.response.start"] + ["http.response.zerocopysend"] * 3
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="<unmatched>") == 100 + 4_000 + 300
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_a_body_sent_before_the_start_is_a_500_as_the_server_answers_it(registry: CollectorRegistry) -> None:
    async def no_start(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.body", "body": b"oops"})

    async def refusing_server_send(message: Message) -> None:  # what uvicorn does
        raise RuntimeError(f"Expected ASGI message 'http.response.start', but got {message['type']!r}.")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(RuntimeError, match=r"Expected ASGI message 'http\.response\.start'"):
        await PrometheusMiddleware(no_start, registry=registry)(http_scope("/x"), receive, refusing_server_send)

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="0") == 0
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="<unmatched>") == 0


class AppFailure(Exception):
    pass


async def test_exception_before_the_response_is_500_and_propagates_unchanged(registry: CollectorRegistry) -> None:
    failure = AppFailure("boom")

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise failure

    app = PrometheusMiddleware(failing, registry=registry)
    with pytest.raises(AppFailure) as raised:
        await run_asgi(app, http_scope("/x"))

    assert raised.value is failure
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_starlette_endpoint_exception_counts_as_500(registry: CollectorRegistry) -> None:
    async def broken(request: Request) -> Response:
        raise AppFailure("no")

    app = starlette_app(registry, Route("/broken", broken))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    ) as client:
        assert (await client.get("/broken")).status_code == 500

    assert value(registry, REQUESTS, method="GET", handler="/broken", status="500") == 1


async def test_failure_mid_stream_keeps_the_status_already_sent(registry: CollectorRegistry) -> None:
    async def half_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise AppFailure("stream broke")

    app = PrometheusMiddleware(half_stream, registry=registry)
    with pytest.raises(AppFailure):
        await run_asgi(app, http_scope("/s"))

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 0
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="<unmatched>") == 7
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_client_disconnect_before_a_response_is_499(registry: CollectorRegistry) -> None:
    async def waits_for_body(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "http.disconnect"

    app = PrometheusMiddleware(waits_for_body, registry=registry)
    await run_asgi(app, http_scope("/gone"), incoming=[{"type": "http.disconnect"}])

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="499") == 1


async def test_a_long_poll_whose_client_left_after_its_body_is_499_whatever_it_answers(registry: CollectorRegistry) -> None:
    # The usual long poll: read the whole body, then wait until there is news or the client is
    # gone (Starlette's request.is_disconnected()), then answer anyway.
    async def long_poll(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"no news"})

    app = PrometheusMiddleware(long_poll, registry=registry)
    await run_asgi(app, http_scope("/poll", method="POST"), incoming=[{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}])

    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="499") == 1
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="200") == 0
    assert value(registry, REQUEST_SIZE + "_sum", method="POST", handler="<unmatched>") == 2


async def test_cancelled_request_without_response_is_499_and_cancellation_propagates(registry: CollectorRegistry) -> None:
    started = asyncio.Event()

    async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        await asyncio.sleep(60)

    app = PrometheusMiddleware(hangs, registry=registry)
    task = asyncio.create_task(run_asgi(app, http_scope("/hang")))
    await started.wait()
    assert value(registry, IN_PROGRESS, method="GET") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="499") == 1
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_app_returning_without_a_response_is_500(registry: CollectorRegistry) -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    app = PrometheusMiddleware(silent, registry=registry)
    await run_asgi(app, http_scope("/silent"))

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 1


def connected_client(body: bytes = b"") -> tuple[Receive, list[Message]]:
    """A server's ``receive`` for a client that stays connected: the body, then waits forever."""
    delivered: list[Message] = []

    async def receive() -> Message:
        if not delivered:
            delivered.append({"type": "http.request", "body": body, "more_body": False})
            return delivered[-1]
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive, delivered


async def no_send(message: Message) -> None:
    raise AssertionError(f"nothing should be sent, got {message}")


@pytest.mark.parametrize("ending", ["return", "raise"])
async def test_an_unanswered_request_whose_client_is_still_there_is_500_without_waiting(
    registry: CollectorRegistry, ending: str
) -> None:
    error = RuntimeError("no response")

    async def reads_then_ends(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        if ending == "raise":
            raise error

    receive, delivered = connected_client(b"abc")
    app = PrometheusMiddleware(reads_then_ends, registry=registry)
    with anyio.fail_after(5):  # asking the server whether the client is gone must not wait
        if ending == "raise":
            with pytest.raises(RuntimeError) as raised:
                await app(http_scope("/quiet", "POST"), receive, no_send)
            assert raised.value is error
        else:
            await app(http_scope("/quiet", "POST"), receive, no_send)

    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="500") == 1
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status="499") == 0
    assert value(registry, REQUEST_SIZE + "_sum", method="POST", handler="<unmatched>") == 3
    assert len(delivered) == 1


async def test_an_unanswered_request_whose_client_left_unnoticed_is_499(registry: CollectorRegistry) -> None:
    async def reads_then_returns(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the body; the app never looks for the disconnect that follows

    app = PrometheusMiddleware(reads_then_returns, registry=registry)
    await run_asgi(app, http_scope("/left"), incoming=[{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}])

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="499") == 1
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 0


async def test_an_app_that_never_read_the_body_is_not_asked_about(registry: CollectorRegistry) -> None:
    # The server may still hold body: the middleware takes nothing the app did not ask for.
    app = PrometheusMiddleware(lambda scope, receive, send: asyncio.sleep(0), registry=registry)
    delivered = await run_asgi(app, http_scope("/unread"), incoming=[{"type": "http.request", "body": b"x", "more_body": True}])

    assert delivered == []
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="500") == 1


async def test_a_streaming_response_ends_its_wait_for_a_disconnect_and_is_recorded_once(registry: CollectorRegistry) -> None:
    # Starlette keeps a receive waiting for the disconnect while it streams (ASGI spec < 2.4) and
    # cancels it when the stream ends; once the body is complete that wait is the server's own.
    async def chunks() -> Any:
        yield b"one"
        yield b"two"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks())

    receive, delivered = connected_client()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = starlette_app(registry, Route("/stream", stream))
    scope = http_scope("/stream") | {"asgi": {"version": "3.0", "spec_version": "2.3"}}
    with anyio.fail_after(5):
        await app(scope, receive, send)

    assert [m.get("body") for m in sent[1:]] == [b"one", b"two", b""]
    assert len(delivered) == 1  # the body; the wait that followed was cancelled
    assert value(registry, REQUESTS, method="GET", handler="/stream", status="200") == 1
    assert value(registry, RESPONSE_SIZE + "_sum", method="GET", handler="/stream") == 6
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_in_progress_gauge_counts_the_request_while_it_runs(registry: CollectorRegistry) -> None:
    seen: list[float] = []

    async def look(request: Request) -> Response:
        seen.append(value(registry, IN_PROGRESS, method="GET"))
        return PlainTextResponse("ok")

    app = starlette_app(registry, Route("/look", look))
    await get(app, "/look")

    assert seen == [1.0]
    assert value(registry, IN_PROGRESS, method="GET") == 0


async def test_every_message_passes_through_unchanged_and_in_order(registry: CollectorRegistry) -> None:
    outgoing: list[Message] = [
        {"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")], "trailers": False},
        {"type": "http.response.body", "body": b"one", "more_body": True},
        {"type": "http.response.body", "body": b"two", "more_body": False, "extension": object()},
    ]
    incoming: list[Message] = [{"type": "http.request", "body": b"hi", "more_body": False}]
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.append(await receive())
        for message in outgoing:
            await send(message)

    sent = await run_asgi(PrometheusMiddleware(app, registry=registry), http_scope("/m", "POST"), incoming)

    assert [id(m) for m in sent] == [id(m) for m in outgoing]
    assert sent == outgoing
    assert received[0] is incoming[0]


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_non_http_scopes_pass_through_untouched(registry: CollectorRegistry, scope_type: str) -> None:
    calls: list[tuple[Any, Any, Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": f"{scope_type}.connect"}

    async def send(message: Message) -> None:
        pass

    scope = {"type": scope_type, "path": "/ws"}
    await PrometheusMiddleware(app, registry=registry)(scope, receive, send)

    assert calls == [(scope, receive, send)]
    assert calls[0][0] is scope and calls[0][1] is receive and calls[0][2] is send
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 0


async def test_metrics_path_and_excluded_paths_are_not_counted(registry: CollectorRegistry) -> None:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = starlette_app(
        registry, Route("/metrics", ok), Route("/healthz", ok), Route("/work", ok),
        exclude_paths=["/metrics", "/healthz"],
    )
    for path in ("/metrics", "/healthz", "/work"):
        assert (await get(app, path)).status_code == 200

    assert value(registry, REQUESTS, method="GET", handler="/work", status="200") == 1
    assert value(registry, REQUESTS, method="GET", handler="/metrics", status="200") == 0
    assert value(registry, REQUESTS, method="GET", handler="/healthz", status="200") == 0


@pytest.mark.parametrize(
    ("root_path", "path", "excluded"),
    [
        ("/", "/metrics", True),  # FastAPI(root_path="/"): the root path is not taken off
        ("/api", "/api/metrics", True),
        ("/api", "/apimetrics", False),
        ("/api", "/metrics", True),  # a server that left the root path out of the path
        ("/metrics", "/metrics", False),  # the app's own root: its path is ""
    ],
)
async def test_excluded_paths_are_matched_on_the_path_the_app_routes(registry: CollectorRegistry, root_path: str, path: str, excluded: bool) -> None:
    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("fine")(scope, receive, send)

    app = PrometheusMiddleware(ok, registry=registry)
    scope = http_scope(path)
    scope["root_path"] = root_path  # the path as given: with the root path in it, or not
    await run_asgi(app, scope)

    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == (0 if excluded else 1)


async def test_a_failing_handler_resolver_never_fails_the_request(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_resolver(scope: Scope) -> str:
        raise RuntimeError("resolver bug")

    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("fine")(scope, receive, send)

    app = PrometheusMiddleware(ok, registry=registry, handler_resolver=broken_resolver)
    with caplog.at_level(logging.ERROR, logger="crowdmon"):
        for _ in range(3):
            sent = await run_asgi(app, http_scope("/r"))
            assert sent[0]["status"] == 200 and sent[1]["body"] == b"fine"

    assert value(registry, "crowdmon_internal_errors_total", site="middleware.handler") == 3
    assert value(registry, REQUESTS, method="GET", handler="<unmatched>", status="200") == 3
    assert len([r for r in caplog.records if "middleware.handler" in r.getMessage()]) == 1


def test_setup_mistakes_raise_with_a_fix(registry: CollectorRegistry) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        pass

    with pytest.raises(ValueError, match=r"exclude_paths=\['/metrics'\]"):
        PrometheusMiddleware(app, registry=registry, exclude_paths="/metrics")
    with pytest.raises(ValueError, match="handler_resolver must be a callable"):
        PrometheusMiddleware(app, registry=registry, handler_resolver="/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        PrometheusMiddleware(app, registry=registry, instrumentation=PrometheusInstrumentation(registry))


def client_gone_once(body: bytes = b"") -> tuple[Receive, list[Message]]:
    """A server's ``receive`` for a client that left after sending ``body``, delivering
    ``http.disconnect`` once and then waiting forever (as hypercorn does)."""
    delivered: list[Message] = []

    async def receive() -> Message:
        if len(delivered) < 2:
            delivered.append({"type": "http.request", "body": body, "more_body": False} if not delivered else {"type": "http.disconnect"})
            return delivered[-1]
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive, delivered


@pytest.mark.parametrize("status", [503, 200])
async def test_a_5xx_to_a_client_already_gone_is_499_and_the_app_still_hears_of_it(registry: CollectorRegistry, status: int) -> None:
    """Before a 5xx starts, the middleware asks the server whether the client is still there;
    a server that says so only once must not leave the app waiting for it forever."""
    heard: list[str] = []

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the whole body
        await send({"type": "http.response.start", "status": status, "headers": []})
        heard.append((await receive())["type"])  # waits for the client to go, as a proxy would

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    receive, delivered = client_gone_once(b"abc")
    with anyio.fail_after(5):
        await PrometheusMiddleware(proxy, registry=registry)(http_scope("/upstream", "POST"), receive, send)

    assert heard == ["http.disconnect"]
    assert [message["status"] for message in sent] == [status]
    expected = "499" if status == 503 else "200"
    assert value(registry, REQUESTS, method="POST", handler="<unmatched>", status=expected) == 1
    assert len(delivered) == 2
