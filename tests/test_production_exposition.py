"""A hardened ``/metrics``: bearer token, basic auth, address allow-list, ``HEAD``, ``name[]``,
a separate listener, and the README's protection snippets."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import crowdmon.exposition
from crowdmon import (
    CrowdmonSetupError,
    MetricsApp,
    PrometheusInstrumentation,
    PrometheusMiddleware,
    serve_metrics,
    setup_monitoring,
)
from crowdmon.testing import isolated_instrumentation
from tests.asgi import http_scope, run_asgi
from tests.production_support import readme_snippet
from tests.support import free_port, scraped

TOKEN = "tok-3f9a"


def protected_client(registry: CollectorRegistry, client: tuple[str, int] = ("127.0.0.1", 5000), **options: Any) -> httpx.AsyncClient:
    instrumentation = PrometheusInstrumentation(registry)
    app = Starlette(routes=[Route("/work", lambda request: PlainTextResponse("ok"))])
    setup_monitoring(app, instrumentation=instrumentation, metrics_app=MetricsApp(instrumentation, **options))
    instrumentation.track_document_operation("add", "pdf", "success")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://t")


async def test_bearer_token_guards_the_metrics(registry: CollectorRegistry) -> None:
    async with protected_client(registry, bearer_token=TOKEN) as client:
        missing = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"authorization": "Bearer tok-3f9b"})
        basic_instead = await client.get("/metrics", headers={"authorization": "Basic " + base64.b64encode(b"x:" + TOKEN.encode()).decode()})
        right = await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        lower_scheme = await client.get("/metrics", headers={"authorization": f"bearer {TOKEN}"})

    for refused in (missing, wrong, basic_instead):
        assert refused.status_code == 401
        assert refused.content == b""
        assert refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert right.status_code == 200
    assert lower_scheme.status_code == 200
    assert scraped(right.text, "document_operations_total", operation="add", document_type="pdf", status="success") == 1


async def test_basic_auth_guards_the_metrics(registry: CollectorRegistry) -> None:
    def basic(user: str, password: str) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    async with protected_client(registry, basic_auth=("prometheus", "pa:ss")) as client:
        right = await client.get("/metrics", headers=basic("prometheus", "pa:ss"))
        wrong_password = await client.get("/metrics", headers=basic("prometheus", "pa:st"))
        wrong_user = await client.get("/metrics", headers=basic("grafana", "pa:ss"))
        garbage = await client.get("/metrics", headers={"authorization": "Basic %%%"})
        head = await client.head("/metrics")

    assert right.status_code == 200
    for refused in (wrong_password, wrong_user, garbage, head):
        assert refused.status_code == 401
        assert refused.content == b""
        assert refused.headers["www-authenticate"] == 'Basic realm="metrics", charset="UTF-8"'


async def test_either_credential_passes_when_both_are_configured(registry: CollectorRegistry) -> None:
    async with protected_client(registry, bearer_token=TOKEN, basic_auth=("u", "p")) as client:
        by_token = await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        by_password = await client.get("/metrics", auth=("u", "p"))
        refused = await client.get("/metrics")

    assert (by_token.status_code, by_password.status_code, refused.status_code) == (200, 200, 401)
    assert refused.headers.get_list("www-authenticate") == ['Bearer realm="metrics"', 'Basic realm="metrics", charset="UTF-8"']


@pytest.mark.parametrize(
    ("client_host", "status"),
    [("10.1.2.3", 200), ("127.0.0.1", 200), ("::ffff:10.9.9.9", 200), ("192.168.1.5", 403), ("2001:db8::1", 403)],
)
async def test_address_allow_list(registry: CollectorRegistry, client_host: str, status: int) -> None:
    async with protected_client(registry, client=(client_host, 5000), allow_from=["10.0.0.0/8", "127.0.0.1"]) as client:
        response = await client.get("/metrics")
        work = await client.get("/work")

    assert response.status_code == status
    assert work.status_code == 200  # only /metrics is guarded
    if status == 403:
        assert response.content == b""


async def test_allow_list_is_checked_before_credentials(registry: CollectorRegistry) -> None:
    async with protected_client(registry, client=("192.168.1.5", 5000), allow_from=["10.0.0.0/8"], bearer_token=TOKEN) as client:
        response = await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 403


async def test_a_scope_without_client_address_is_refused_by_the_allow_list(registry: CollectorRegistry) -> None:
    app = MetricsApp(PrometheusInstrumentation(registry), allow_from=["127.0.0.1"])
    scope = http_scope("/metrics")
    del scope["client"]
    sent = await run_asgi(app, scope)

    assert sent[0]["status"] == 403


async def test_refused_scrapes_never_reach_the_registry(registry: CollectorRegistry) -> None:
    app = MetricsApp(PrometheusInstrumentation(registry), bearer_token=TOKEN)
    rendered = []
    app.render = lambda *args: rendered.append(args) or (b"", "text/plain")  # type: ignore[method-assign]
    sent = await run_asgi(app, http_scope("/metrics", headers=[(b"authorization", b"Bearer nope")]))

    assert sent[0]["status"] == 401
    assert rendered == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bearer_token": ""}, "bearer_token must be a non-empty string"),
        ({"bearer_token": " padded "}, "without surrounding whitespace"),
        ({"basic_auth": ("user:name", "pw")}, "the user without ':'"),
        ({"basic_auth": ("user", "")}, "basic_auth must be a \\(user, password\\) tuple"),
        ({"allow_from": "10.0.0.0/8"}, "allow_from=\\['10.0.0.0/8'\\]"),
        ({"allow_from": ["10.0.0.300"]}, "is not an IP address or network"),
    ],
)
def test_protection_mistakes_fail_at_setup(registry: CollectorRegistry, options: dict[str, Any], message: str) -> None:
    with pytest.raises(CrowdmonSetupError, match=message):
        MetricsApp(PrometheusInstrumentation(registry), **options)


def test_setup_monitoring_refuses_a_metrics_app_on_another_registry(registry: CollectorRegistry) -> None:
    with pytest.raises(CrowdmonSetupError, match=r"MetricsApp\(instrumentation, \.\.\.\)"):
        setup_monitoring(Starlette(), registry=registry, metrics_app=MetricsApp(PrometheusInstrumentation(CollectorRegistry())))


async def test_setup_monitoring_twice_on_one_app_fails_rather_than_recording_every_request_twice(registry: CollectorRegistry) -> None:
    app = Starlette(routes=[Route("/work", lambda request: PlainTextResponse("done"))])
    setup_monitoring(app, registry=registry)

    with pytest.raises(CrowdmonSetupError, match=r"this app already has PrometheusMiddleware .* Call setup_monitoring once per app"):
        setup_monitoring(app, registry=registry)
    by_hand = Starlette()
    by_hand.add_middleware(PrometheusMiddleware, registry=registry)
    with pytest.raises(CrowdmonSetupError, match="do not also add the middleware yourself"):
        setup_monitoring(by_hand, registry=registry)
    by_default = Starlette()
    by_default.add_middleware(PrometheusMiddleware)  # the default's registry, which setup also records into
    with isolated_instrumentation(), pytest.raises(CrowdmonSetupError, match="do not also add the middleware yourself"):
        setup_monitoring(by_default)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        assert (await client.get("/work")).status_code == 200
    assert [route.path for route in app.router.routes] == ["/metrics", "/health", "/work"]
    assert registry.get_sample_value(
        "crowdfunding_api_requests_total", {"method": "GET", "handler": "/work", "status": "200"}
    ) == 1


class TenantMiddleware(PrometheusMiddleware):
    """A subclass, as an app might write to add a label of its own."""


@pytest.mark.parametrize("how", ["setup, then added", "added twice", "added, then a subclass"])
async def test_the_middleware_twice_in_one_stack_records_each_request_once(
    registry: CollectorRegistry, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    # What setup_monitoring cannot see at set-up: the middleware added after it, or twice by
    # hand.  The outer one takes the inner one out of the stack when Starlette builds it.
    app = Starlette(routes=[Route("/work", lambda request: PlainTextResponse("done"))])
    if how == "setup, then added":
        setup_monitoring(app, registry=registry)
        app.add_middleware(PrometheusMiddleware, registry=registry)
    else:
        app.add_middleware(PrometheusMiddleware, registry=registry)
        app.add_middleware(PrometheusMiddleware if how == "added twice" else TenantMiddleware, registry=registry)
    elsewhere = CollectorRegistry()
    app.add_middleware(PrometheusMiddleware, registry=elsewhere)  # another registry: recorded there too

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        for _ in range(3):
            assert (await client.get("/work")).status_code == 200

    labels = {"method": "GET", "handler": "/work", "status": "200"}
    assert registry.get_sample_value("crowdfunding_api_requests_total", labels) == 3
    assert elsewhere.get_sample_value("crowdfunding_api_requests_total", labels) == 3
    warned = [record.getMessage() for record in caplog.records if "twice" in record.getMessage()]
    assert len(warned) == 1
    assert "records every request into the same registry twice" in warned[0]


async def test_two_middlewares_following_the_default_are_one_even_when_built_under_another_default() -> None:
    # An app built at import (the default of that moment), its stack built in a test that
    # replaced the default: both follow the default, so both would record into the test's.
    app = Starlette(routes=[Route("/work", lambda request: PlainTextResponse("done"))])
    setup_monitoring(app)
    app.add_middleware(PrometheusMiddleware)

    with isolated_instrumentation() as isolated:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            assert (await client.get("/work")).status_code == 200
        assert isolated.registry.get_sample_value(
            "crowdfunding_api_requests_total", {"method": "GET", "handler": "/work", "status": "200"}
        ) == 1


def test_setup_monitoring_refuses_an_app_with_a_subclass_of_the_middleware(registry: CollectorRegistry) -> None:
    app = Starlette()
    app.add_middleware(TenantMiddleware, registry=registry)

    with pytest.raises(CrowdmonSetupError, match="do not also add the middleware yourself"):
        setup_monitoring(app, registry=registry)


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_setup_monitoring_records_what_the_client_gets_whatever_the_middleware_order(registry: CollectorRegistry, framework: str) -> None:
    """crowdmon wraps the whole stack, Starlette's ServerErrorMiddleware included: an exception
    handler's response is what it records, and a compressing middleware added afterwards is
    inside it."""
    from fastapi import FastAPI
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.requests import Request
    from starlette.responses import Response

    class Outage(Exception):
        pass

    async def fail(request: Request) -> Response:
        raise Outage("the database is down")

    async def crash(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def big(request: Request) -> Response:
        return PlainTextResponse("a" * 5000)

    async def on_error(request: Request, error: Exception) -> Response:
        # A handler for Exception runs in Starlette's ServerErrorMiddleware, outside the
        # middleware the app adds.
        if isinstance(error, Outage):
            return PlainTextResponse("try again later", status_code=503)
        return PlainTextResponse("Internal Server Error", status_code=500)

    routes = [Route("/fail", fail), Route("/crash", crash), Route("/big", big)]
    handlers = {Exception: on_error}
    app = Starlette(routes=routes, exception_handlers=handlers) if framework == "starlette" else FastAPI(routes=routes, exception_handlers=handlers)
    setup_monitoring(app, registry=registry)
    app.add_middleware(GZipMiddleware, minimum_size=100)  # added after: still inside crowdmon

    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        failed = await client.get("/fail")
        crashed = await client.get("/crash")
        compressed = await client.get("/big", headers={"accept-encoding": "gzip"})
    assert (failed.status_code, failed.text) == (503, "try again later")
    assert (crashed.status_code, crashed.text) == (500, "Internal Server Error")
    assert compressed.headers["content-encoding"] == "gzip"
    wire_bytes = int(compressed.headers["content-length"])
    assert wire_bytes < 100

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"method": "GET", **labels})

    assert sample("crowdfunding_api_requests_total", handler="/fail", status="503") == 1
    assert sample("crowdfunding_api_response_size_bytes_sum", handler="/fail") == len("try again later")
    assert sample("crowdfunding_api_requests_total", handler="/crash", status="500") == 1
    assert sample("crowdfunding_api_response_size_bytes_sum", handler="/crash") == len("Internal Server Error")
    assert sample("crowdfunding_api_response_size_bytes_sum", handler="/big") == wire_bytes


async def test_setup_monitoring_after_the_app_served_a_request_is_refused(registry: CollectorRegistry) -> None:
    app = Starlette(routes=[Route("/work", lambda request: PlainTextResponse("done"))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        assert (await client.get("/work")).status_code == 200
    with pytest.raises(CrowdmonSetupError, match=r"this app has already started \(its middleware stack is built\); call setup_monitoring\(app\) where the app is created"):
        setup_monitoring(app, registry=registry)


async def test_setup_monitoring_in_a_lifespan_handler_says_to_call_it_where_the_app_is_created(registry: CollectorRegistry) -> None:
    refused: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            setup_monitoring(app, registry=registry)
        except CrowdmonSetupError as error:
            refused.append(str(error))
        yield

    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return events.pop(0)

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    await Starlette(lifespan=lifespan)({"type": "lifespan"}, receive, send)

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert len(refused) == 1
    assert "not in a startup or lifespan handler, which runs once the app has started" in refused[0]


def test_setup_monitoring_refuses_a_string_for_exclude_paths(registry: CollectorRegistry) -> None:
    with pytest.raises(CrowdmonSetupError, match=r"got the string '/internal'; write exclude_paths=\['/internal'\]"):
        setup_monitoring(Starlette(), registry=registry, exclude_paths="/internal")


async def test_head_has_the_get_headers_and_no_body(registry: CollectorRegistry) -> None:
    async with protected_client(registry) as client:
        get = await client.get("/metrics", headers={"accept-encoding": "identity"})
        head = await client.head("/metrics", headers={"accept-encoding": "identity"})

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert int(head.headers["content-length"]) == len(get.content)


async def test_name_filter_takes_several_names_and_histogram_families(registry: CollectorRegistry) -> None:
    async with protected_client(registry) as client:
        await client.get("/work")
        response = await client.get(
            "/metrics",
            params=[("name[]", "document_operations_total"), ("name[]", "crowdfunding_api_request_duration_seconds_bucket")],
        )

    families = {line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE")}
    assert families == {"document_operations_total", "crowdfunding_api_request_duration_seconds"}
    assert scraped(response.text, "crowdfunding_api_request_duration_seconds_bucket", method="GET", handler="/work", le="+Inf") == 1
    assert "crowdfunding_api_requests_total{" not in response.text


def test_serve_metrics_on_a_separate_listener(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)
    instrumentation.track_chat_message("anonymous", "user", False, True)
    with serve_metrics(port=0, instrumentation=instrumentation, bearer_token=TOKEN, allow_from=["127.0.0.1"]) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        ok = httpx.get(server.url, headers={"authorization": f"Bearer {TOKEN}", "accept-encoding": "gzip"})
        raw = httpx.get(server.url, headers={"authorization": f"Bearer {TOKEN}", "accept": "application/openmetrics-text; version=1.0.0"})
        refused = httpx.get(server.url)
        head = httpx.head(server.url, headers={"authorization": f"Bearer {TOKEN}"})
        elsewhere = httpx.get(server.url.replace("/metrics", "/other"), headers={"authorization": f"Bearer {TOKEN}"})

    assert ok.status_code == 200
    assert ok.headers["content-encoding"] == "gzip"
    labels = {"user_type": "anonymous", "message_type": "user", "cache_hit": "false", "rag_used": "true"}
    assert scraped(ok.text, "chat_messages_total", **labels) == 1
    assert raw.text.endswith("# EOF\n")
    assert (refused.status_code, refused.content, refused.headers["www-authenticate"]) == (401, b"", 'Bearer realm="metrics"')
    assert (head.status_code, head.content) == (200, b"")
    assert elsewhere.status_code == 404
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url)  # closed


def test_the_metrics_listener_is_not_held_by_forked_workers_and_quiet_about_clients_that_leave(
    registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    """Started in gunicorn's when_ready, the listener is forked into every worker: each closes
    its copy, or a dead master would leave the port held and unanswered.  A client resetting its
    connection, or sending a POST, gets no traceback in the log."""
    import os
    import struct

    instrumentation = PrometheusInstrumentation(registry)
    with serve_metrics(port=0, instrumentation=instrumentation) as server:
        child = os.fork()
        if child == 0:  # the worker: its copy of the listener is closed
            os._exit(0 if server._server.socket.fileno() == -1 else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert server._server.socket.fileno() != -1  # still listening here

        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as reset:
                reset.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        posted = httpx.post(server.url, content=b"x")
        answered = httpx.get(server.url)

    assert (posted.status_code, posted.headers["allow"], posted.content) == (405, "GET, HEAD", b"")
    assert answered.status_code == 200
    assert "Traceback" not in capfd.readouterr().err
    assert registry.get_sample_value("crowdmon_internal_errors_total", {"site": "metrics.render"}) == 0


def test_the_metrics_listener_cannot_be_held_by_silent_connections(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crowdmon.exposition, "CONNECTION_TIMEOUT", 0.5)
    instrumentation = PrometheusInstrumentation(registry)
    before = threading.active_count()
    with serve_metrics(port=0, instrumentation=instrumentation, allow_from=["10.9.9.9"]) as fenced:
        # Off the list: the 403 comes at once, from the listener's own thread.
        silent = [socket.create_connection(("127.0.0.1", fenced.port)) for _ in range(50)]
        refused = httpx.get(fenced.url)
        assert threading.active_count() <= before + 2  # the listener and its deadline
        assert silent[0].recv(100).startswith(b"HTTP/1.0 403 Forbidden")
        for connection in silent:
            connection.close()
    assert (refused.status_code, refused.headers["server"]) == (403, "crowdmon")

    with serve_metrics(port=0, instrumentation=instrumentation, bearer_token=TOKEN) as open_to_all:
        silent = [socket.create_connection(("127.0.0.1", open_to_all.port)) for _ in range(100)]
        time.sleep(0.2)
        assert threading.active_count() <= before + 2 + crowdmon.exposition.MAX_CONNECTIONS
        deadline = time.monotonic() + 10  # past the timeout the silent ones are closed, their threads gone
        while threading.active_count() > before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threading.active_count() <= before + 2
        unauthorised = httpx.get(open_to_all.url)
        for connection in silent:
            connection.close()
    assert unauthorised.status_code == 401
    assert unauthorised.headers["server"] == "crowdmon"  # not the Python version


def test_connections_trickling_their_request_cannot_keep_the_scraper_out(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crowdmon.exposition, "CONNECTION_TIMEOUT", 1.0)
    monkeypatch.setattr(crowdmon.exposition, "MAX_CONNECTIONS", 4)
    with serve_metrics(port=0, instrumentation=PrometheusInstrumentation(registry)) as server:
        trickling = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        started = time.monotonic()
        answered = None
        while answered is None and time.monotonic() - started < 5:
            for connection in trickling:
                with contextlib.suppress(OSError):
                    connection.send(b"G")  # a byte at a time: never silent for the read timeout
            time.sleep(0.2)
            with contextlib.suppress(httpx.HTTPError):
                answered = httpx.get(server.url, timeout=2)
        waited = time.monotonic() - started
        for connection in trickling:
            connection.close()

    assert answered is not None and answered.status_code == 200
    assert 0.9 < waited < 3  # the four slots were taken until the deadline cut them


async def test_allow_from_takes_an_ipv4_client_in_either_form() -> None:
    async def scrape(allow_from: list[str], client: str) -> int:
        app = MetricsApp(PrometheusInstrumentation(CollectorRegistry()), allow_from=allow_from)
        scope = http_scope("/metrics")
        scope["client"] = (client, 50000)
        return int((await run_asgi(app, scope))[0]["status"])

    assert await scrape(["::ffff:127.0.0.1"], "::ffff:127.0.0.1") == 200
    assert await scrape(["::ffff:10.0.0.0/104"], "::ffff:10.0.0.5") == 200
    assert await scrape(["127.0.0.1"], "::ffff:127.0.0.1") == 200
    assert await scrape(["10.0.0.0/8"], "::ffff:10.0.0.5") == 200
    assert await scrape(["10.0.0.0/8"], "::ffff:11.0.0.5") == 403
    assert await scrape(["::ffff:127.0.0.1"], "127.0.0.1") == 200  # an IPv4 listener's client
    assert await scrape(["::ffff:10.0.0.0/104"], "10.0.0.5") == 200


def test_serve_metrics_refuses_a_busy_port(registry: CollectorRegistry) -> None:
    instrumentation = PrometheusInstrumentation(registry)
    with serve_metrics(port=0, instrumentation=instrumentation) as first, pytest.raises(CrowdmonSetupError, match="pick a free port"):
        serve_metrics(port=first.port, instrumentation=instrumentation)


async def test_readme_protect_snippet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    namespace: dict[str, Any] = {}
    exec(readme_snippet("protect"), namespace)
    transport = httpx.ASGITransport(app=namespace["app"])
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.get("/metrics")
        allowed = await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})

    assert (refused.status_code, refused.content) == (401, b"")
    assert allowed.status_code == 200
    assert "crowdfunding_api_requests_in_progress" in allowed.text


def test_readme_separate_port_snippet() -> None:
    port = free_port()
    code = readme_snippet("separate-port").replace('host="0.0.0.0"', 'host="127.0.0.1"').replace("port=9464", f"port={port}")
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    with namespace["metrics_server"] as server:
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"accept-encoding": "gzip"})

    assert server.port == port
    assert scrape.status_code == 200
    assert "crowdfunding_api_requests_in_progress" in scrape.text
    assert scrape.headers["content-encoding"] == "gzip"
    assert "/metrics" not in {getattr(route, "path", None) for route in namespace["app"].router.routes}


def test_name_filter_keeps_collectors_that_declare_no_names(registry: CollectorRegistry) -> None:
    # Like prometheus_client's MultiProcessCollector: collect() only, no describe().
    class Undeclared:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield GaugeMetricFamily("app_queue_depth", "Jobs waiting.", value=7)

    registry.register(Undeclared())
    body, _ = MetricsApp(PrometheusInstrumentation(registry)).render(names=["app_queue_depth", "chat_messages_total"])

    assert scraped(body.decode(), "app_queue_depth") == 7
    assert [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")] == ["app_queue_depth"]
