"""The ``/metrics`` endpoint as an ASGI app, and on a port of its own.

Serves the Prometheus text format or OpenMetrics by content negotiation, gzips when the client
asks, answers ``HEAD``, and filters families with ``?name[]=``.  Under prometheus_client's
multiprocess mode every scrape reads the workers' files through a fresh ``MultiProcessCollector``,
after dropping the live gauges of workers that died.  Optional protection: a client address
allow-list (403) and a bearer token or basic-auth credentials (401), compared in constant time;
a refused scrape carries no metric.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gzip
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics import exposition as openmetrics_exposition

from crowdmon._types import Receive, Scope, Send
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    check_instrumentation,
    check_path,
    default_instrumentation,
    unknown_option,
)

Headers = list[tuple[bytes, bytes]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class MetricsApp:
    """An ASGI app that exposes the instrumentation's registry (or, in multiprocess mode, the
    workers' files).

    ``bearer_token`` and ``basic_auth=(user, password)`` require credentials (either one passes
    when both are set); ``allow_from`` lists the client addresses or networks (``"10.0.0.0/8"``)
    that may scrape.  The address is the ASGI ``client``: behind a proxy that is the proxy's,
    unless the server rewrites it (``uvicorn --proxy-headers --forwarded-allow-ips``).
    """

    def __init__(
        self,
        instrumentation: PrometheusInstrumentation | None = None,
        *,
        compress: bool = True,
        bearer_token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        allow_from: Iterable[str] | None = None,
        prune_dead_workers: bool = True,
    ) -> None:
        # Imported here, not with this module, so `python3 -m crowdmon.multiprocess` runs cleanly.
        from crowdmon import multiprocess

        check_instrumentation("MetricsApp", instrumentation)
        if not isinstance(compress, bool):
            raise CrowdmonSetupError(f"compress takes True or False, got {compress!r}")
        self._multiprocess = multiprocess
        self._instrumentation = instrumentation
        self.compress = compress
        self.multiprocess = instrumentation.multiprocess if instrumentation else multiprocess.check_process_setup()
        self.prune_dead_workers = prune_dead_workers
        self._credentials = _credentials(bearer_token, basic_auth)
        self._challenge = _challenge(bearer_token, basic_auth)
        self._networks = _networks(allow_from)

    @property
    def instrumentation(self) -> PrometheusInstrumentation:
        # Given none, the process-wide default at each scrape (as a test fixture replaces it);
        # and in multiprocess mode a scrape needs only the directory, so a metrics-only process
        # (a gunicorn master) builds no metrics of its own.
        return self._instrumentation or default_instrumentation()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope.get("method")
        headers = _headers(scope)
        client = scope.get("client")
        refusal = self.refusal(headers, client[0] if client else None)
        if refusal is None and method not in ("GET", "HEAD"):
            refusal = 405, [(b"allow", b"GET, HEAD")]
        if refusal is not None:
            await _respond(send, refusal[0], b"", refusal[1], method)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        status, extra, body = await anyio.to_thread.run_sync(self.scrape, headers, query)
        await _respond(send, status, body, extra, method)

    def refusal(self, headers: dict[bytes, bytes], client_host: str | None) -> tuple[int, Headers] | None:
        """``(403, headers)`` or ``(401, headers)`` for a scrape that may not see the metrics."""
        if self._networks is not None and not _allowed(client_host, self._networks):
            return 403, []
        if self._credentials and not _authorised(headers.get(b"authorization", b""), self._credentials):
            return 401, self._challenge
        return None

    def scrape(self, headers: dict[bytes, bytes], query: str) -> tuple[int, Headers, bytes]:
        """Status, headers and body of an allowed scrape."""
        accept = headers.get(b"accept", b"").decode("latin-1")
        names = parse_qs(query).get("name[]")
        try:
            body, content_type = self.render(accept, names)
        except Exception as error:
            self.instrumentation.report_internal_error("metrics.render", error)
            return 500, [(b"content-type", b"text/plain; charset=utf-8")], b"metrics unavailable\n"
        extra = [(b"content-type", content_type.encode("latin-1")), (b"cache-control", b"no-store")]
        if self.compress and _accepts_gzip(headers.get(b"accept-encoding", b"").decode("latin-1")):
            body = gzip.compress(body, compresslevel=5)
            extra.append((b"content-encoding", b"gzip"))
        extra.append((b"vary", b"Accept, Accept-Encoding"))
        return 200, extra, body

    def render(self, accept: str = "", names: list[str] | None = None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header, and its content type."""
        registry = self._registry_for_scrape()
        encoder, content_type = _encoder_for(accept)
        if names:
            return encoder(_Restricted(registry, frozenset(names))), content_type
        return encoder(registry), content_type

    def _registry_for_scrape(self) -> CollectorRegistry:
        if self.multiprocess:
            path = self._multiprocess.multiprocess_directory()
            if self.prune_dead_workers:
                try:
                    self._multiprocess.prune_dead_processes(path)
                except OSError as error:  # the scrape goes on; the totals are still right
                    self.instrumentation.report_internal_error("metrics.prune", error)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
            return registry
        return self.instrumentation.registry


def _quality(part: str) -> float:
    """The ``q`` of one element of an ``Accept`` or ``Accept-Encoding`` header (1 if none; 0 if
    unreadable, as for a value nobody should rely on)."""
    for parameter in part.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                return 0.0
            return quality if 0 <= quality <= 1 else 0.0
    return 1.0


#: The OpenMetrics versions this prometheus_client writes (2.0.0 since 0.23).
OPENMETRICS_VERSIONS = frozenset({"1.0.0"} | ({"2.0.0"} if hasattr(openmetrics_exposition, "CONTENT_TYPE_LATEST_2_0") else set()))


def _encoder_for(accept: str) -> tuple[Any, str]:
    """prometheus_client's encoder for the element of ``Accept`` the client prefers most (by
    ``q``; OpenMetrics among equals), never one it refused (``q=0``).  OpenMetrics of a version
    this prometheus_client does not write is answered as OpenMetrics 1.0.0, labelled so (it
    would say the version asked for); an element it cannot serve at all gets the Prometheus text
    format: a client's header never makes the scrape fail."""
    wanted = [(quality, part) for part in accept.split(",") if (quality := _quality(part)) > 0]
    chosen = ""
    if wanted:
        best = max(quality for quality, _ in wanted)
        preferred = [part for quality, part in wanted if quality == best]
        openmetrics = [part for part in preferred if "application/openmetrics-text" in part]
        chosen = (openmetrics or preferred)[0]
        if openmetrics:
            chosen = ";".join(parameter for parameter in chosen.split(";") if not _other_version(parameter))
    try:
        return choose_encoder(chosen)
    except Exception:
        return choose_encoder("")


def _other_version(parameter: str) -> bool:
    """Whether ``parameter`` asks for an OpenMetrics version, well-formed but not one written here."""
    name, _, version = parameter.partition("=")
    version = version.strip()
    return name.strip().lower() == "version" and re.fullmatch(r"\d+(\.\d+)*", version) is not None and version not in OPENMETRICS_VERSIONS


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` accepts gzip (``q`` above 0): as ``gzip`` or ``x-gzip`` if it
    names either, else through ``*`` (which stands only for the codings it does not name)."""
    named: list[float] = []
    anything: list[float] = []
    for part in accept_encoding.split(","):
        coding = part.split(";")[0].strip().lower()
        if coding in ("gzip", "x-gzip"):
            named.append(_quality(part))
        elif coding == "*":
            anything.append(_quality(part))
    return max(named or anything or [0.0]) > 0


class _Restricted:
    """The samples of ``registry`` whose names are in ``names``.

    prometheus_client's own ``restricted_registry`` finds collectors by the names they declared
    at registration; the ``MultiProcessCollector`` declares none, so it would filter out all.
    """

    def __init__(self, registry: CollectorRegistry, names: frozenset[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            samples = [sample for sample in family.samples if sample.name in self._names]
            if samples:
                restricted = Metric(family.name, family.documentation, family.type, family.unit)
                restricted.samples = samples
                yield restricted


def _credentials(bearer_token: str | None, basic_auth: tuple[str, str] | None) -> list[bytes]:
    """SHA-256 digests of the ``Authorization`` header values that pass."""
    accepted = []
    if bearer_token is not None:
        if not isinstance(bearer_token, str) or not bearer_token.strip() or bearer_token != bearer_token.strip():
            raise CrowdmonSetupError(
                "bearer_token must be a non-empty string without surrounding whitespace; read it "
                "from a secret, e.g. bearer_token=os.environ['METRICS_TOKEN']"
            )
        accepted.append(b"Bearer " + bearer_token.encode())
    if basic_auth is not None:
        if (
            not isinstance(basic_auth, tuple)
            or len(basic_auth) != 2
            or not all(isinstance(part, str) and part for part in basic_auth)
            or ":" in basic_auth[0]
        ):
            raise CrowdmonSetupError(
                "basic_auth must be a (user, password) tuple of non-empty strings, the user "
                "without ':', e.g. basic_auth=('prometheus', os.environ['METRICS_PASSWORD'])"
            )
        pair = f"{basic_auth[0]}:{basic_auth[1]}".encode()
        accepted.append(b"Basic " + base64.b64encode(pair))
    return [hashlib.sha256(value).digest() for value in accepted]


def _challenge(bearer_token: str | None, basic_auth: tuple[str, str] | None) -> Headers:
    challenges = []
    if bearer_token is not None:
        challenges.append((b"www-authenticate", b'Bearer realm="metrics"'))
    if basic_auth is not None:
        challenges.append((b"www-authenticate", b'Basic realm="metrics", charset="UTF-8"'))
    return challenges


def _authorised(header: bytes, accepted: list[bytes]) -> bool:
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() == b"basic":
        # Re-encode what was sent, so padding or line breaks in the base64 cannot matter.
        try:
            credentials = base64.b64encode(base64.b64decode(credentials.strip(), validate=True))
        except (binascii.Error, ValueError):
            return False
        header = b"Basic " + credentials
    elif scheme.lower() == b"bearer":
        header = b"Bearer " + credentials.strip()
    else:
        return False
    # Digests of equal length are compared, every candidate each time: the time taken tells
    # neither the secret's length nor which scheme nearly matched.
    digest = hashlib.sha256(header).digest()
    matched = False
    for candidate in accepted:
        matched |= hmac.compare_digest(digest, candidate)
    return matched


def _networks(allow_from: Iterable[str] | None) -> tuple[IPNetwork, ...] | None:
    if allow_from is None:
        return None
    if isinstance(allow_from, str):
        raise CrowdmonSetupError(
            f"allow_from must be a collection of addresses or networks, got the string "
            f"{allow_from!r}; write allow_from=[{allow_from!r}]"
        )
    networks = []
    for entry in allow_from:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except (TypeError, ValueError) as error:
            raise CrowdmonSetupError(
                f"allow_from entry {entry!r} is not an IP address or network: {error}; "
                "use e.g. '127.0.0.1', '10.0.0.0/8' or '::1'"
            ) from None
    return tuple(networks)


def _allowed(host: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a unix socket path or a name: not an address on the list
    # An IPv4 client shows as a.b.c.d, or as ::ffff:a.b.c.d on a dual-stack listener: either
    # form may be listed, whichever the client shows as.
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    elif isinstance(address, ipaddress.IPv4Address):
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    return any(candidate in network for candidate in candidates for network in networks)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers") or ()}


async def _respond(send: Send, status: int, body: bytes, headers: Headers, method: object) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


# -- metrics on a listener of their own --------------------------------------------------------


#: Connections the metrics server serves at once (a thread each); more are closed at once.
MAX_CONNECTIONS = 256
#: Seconds a connection of the metrics server has to send its whole request (however slowly it
#: trickles in), and may stay silent at any point, before it is closed.
CONNECTION_TIMEOUT = 10.0


class _MetricsHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` of them, each given
    :data:`CONNECTION_TIMEOUT` seconds to send its request: idle or trickling connections cannot
    hold threads, nor slots for longer than that.  A connection from an address off
    ``allow_from`` gets its 403 at once, before any thread or request: it cannot hold one."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's default is 5)
    #: Set by :class:`MetricsServer`: the app whose allow-list is checked on connection.
    app: MetricsApp | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # Connections still sending their request, and when they were accepted.
        self._reading: dict[Any, float] = {}
        self._reading_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._cut_slow_requests, name="crowdmon-metrics-deadline", daemon=True).start()

    def _cut_slow_requests(self) -> None:
        """Twice a second: shut the connections whose request is not in after the timeout."""
        while not self._closed.wait(0.5):
            now = time.monotonic()
            with self._reading_lock:
                late = [request for request, since in self._reading.items() if now - since > CONNECTION_TIMEOUT]
            for request in late:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)

    def request_read(self, request: Any) -> None:
        """The request on this connection is in: the deadline no longer applies."""
        with self._reading_lock:
            self._reading.pop(request, None)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left or stalled is not worth a traceback (socketserver prints one per
        connection); anything else is a failure of crowdmon's, counted and logged once."""
        error = sys.exc_info()[1]
        if error is None or isinstance(error, OSError):
            return
        if self.app is not None:
            self.app.instrumentation.report_internal_error("metrics.render", error)
        else:
            super().handle_error(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        app = self.app
        if app is not None and app._networks is not None and not _allowed(str(client_address[0]), app._networks):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(_REFUSED)
            return False  # the server closes the connection
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._reading_lock:
            self._reading[request] = time.monotonic()
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.request_read(request)
            self._slots.release()


class _IPv6Server(_MetricsHTTPServer):
    address_family = socket.AF_INET6


_REFUSED = b"HTTP/1.0 403 Forbidden\r\nServer: crowdmon\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class MetricsServer:
    """A :class:`MetricsApp` served by a small threaded HTTP server; see :func:`serve_metrics`."""

    def __init__(self, app: MetricsApp, host: str, port: int, path: str) -> None:
        server_class = _IPv6Server if ":" in host else _MetricsHTTPServer
        try:
            self._server = server_class((host, port), _handler_for(app, path))
        except OSError as error:
            raise CrowdmonSetupError(
                f"crowdmon cannot serve metrics on {host}:{port}: {error}; pick a free port "
                "(in a multi-worker server, serve metrics from one process only, e.g. gunicorn's "
                "when_ready hook)"
            ) from error
        self._server.app = app
        # A process forked from this one (a gunicorn worker, when this runs in when_ready) would
        # hold the listening socket open without ever answering on it: it closes its copy.
        os.register_at_fork(after_in_child=functools.partial(_close_in_child, weakref.ref(self._server)))
        self.host = host
        self.port = int(self._server.server_address[1])
        self.path = path
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="crowdmon-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def close(self) -> None:
        """Stop listening and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _close_in_child(server: weakref.ref[_MetricsHTTPServer]) -> None:
    listener = server()
    if listener is not None:
        with contextlib.suppress(OSError):
            listener.socket.close()


#: What serve_metrics passes on to MetricsApp.
_METRICS_APP_OPTIONS = ("compress", "bearer_token", "basic_auth", "allow_from", "prune_dead_workers")


def serve_metrics(
    port: int,
    host: str = "127.0.0.1",
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    path: str = "/metrics",
    **options: object,
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` in a background thread, apart from the app's listener.

    ``options`` are :class:`MetricsApp`'s (``bearer_token``, ``basic_auth``, ``allow_from``,
    ``compress``).  ``port=0`` picks a free port (read it back from ``.port``).  Returns the
    running :class:`MetricsServer`; ``close()`` stops it.
    """
    check_path("path", path)
    for option in options:
        if option not in _METRICS_APP_OPTIONS:
            raise CrowdmonSetupError(
                unknown_option("serve_metrics", option, ("host", "instrumentation", "path", *_METRICS_APP_OPTIONS))
            )
    if not isinstance(host, str) or not host.strip():
        raise CrowdmonSetupError(
            f"host {host!r} would listen on every interface; name the address to listen on, such as "
            "'127.0.0.1' (or '0.0.0.0' for every interface, said openly)"
        )
    app = MetricsApp(instrumentation, **options)  # type: ignore[arg-type]
    return MetricsServer(app, host, port, path)


def _handler_for(app: MetricsApp, path: str) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        server_version = "crowdmon"
        timeout = CONNECTION_TIMEOUT  # a silent connection is closed, and its thread ends

        def version_string(self) -> str:
            return self.server_version  # not the Python version, to anyone who asks

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _not_allowed(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        def _answer(self, send_body: bool) -> None:
            server = self.server
            if isinstance(server, _MetricsHTTPServer):
                server.request_read(self.request)
            url = urlsplit(self.path)
            headers = {name.lower().encode("latin-1"): value.encode("latin-1") for name, value in self.headers.items()}
            refusal = app.refusal(headers, self.client_address[0])
            if refusal is not None:
                status, extra, body = refusal[0], refusal[1], b""
            elif url.path != path:
                status, extra, body = 404, [], b""
            else:
                status, extra, body = app.scrape(headers, url.query)
            self.send_response(status)
            for name, value in extra:
                self.send_header(name.decode("latin-1"), value.decode("latin-1"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not worth a log line each

    return MetricsHandler
