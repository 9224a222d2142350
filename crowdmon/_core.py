"""The middleware's request path in Python: what :mod:`crowdmon._speedups` does in C.

:class:`MiddlewareCore` is the base of :class:`~crowdmon.middleware.PrometheusMiddleware`, and
:class:`ExchangeCore` the base of the object that follows one request.  Both exist twice, with
the same attributes and behaviour: here, and compiled from ``_speedups.c`` when the package is
installed from source with a C compiler.  :mod:`crowdmon.middleware` takes the compiled ones if
they import and ``CROWDMON_NO_EXTENSIONS`` is not set in the environment.

The rare turns of a request (a body to count as it arrives, a 5xx answer, an exemplar, a route
seen for the first time) are Python methods of the subclasses, called from either core.
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from crowdmon import instrumentation as _instrumentation_module
from crowdmon._types import Message, Scope
from crowdmon.catalogue import UNMATCHED_HANDLER
from crowdmon.context import current_request

if TYPE_CHECKING:
    from crowdmon._recorder import RequestEntry
    from crowdmon.middleware import PrometheusMiddleware


class MiddlewareCore:
    """The middleware's call, and :meth:`_begin`.  Its attributes are set by the subclass."""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        middleware: PrometheusMiddleware = self  # type: ignore[assignment]
        exchange = self._begin(scope, receive, send)
        if exchange is None:  # not HTTP, or not recorded
            await middleware.app(scope, receive, send)
            return
        # The request's whole state is one object, published as its context too; the app gets
        # its bound receive and send.  It is the fewest objects a request can cost: each object
        # Python allocates costs again in the garbage collector's passes, and that is most of
        # what instrumentation costs.
        app = middleware.app
        try:
            await app(scope, exchange.receive, exchange.send)
        except BaseException as error:
            if not exchange.status:
                await exchange._conclude(error)  # records the request, then raises error
            exchange.end()
            raise
        if exchange.status:
            exchange.end()
        else:
            await exchange._conclude(None)

    def _begin(self, scope: Scope, receive: Any, send: Any) -> Any:
        """The request's exchange (published as the request context), or ``None`` for a scope that
        is not recorded: not HTTP, or an excluded path (or a start that failed, which is reported).
        """
        if scope.get("type") != "http":
            return None
        middleware: PrometheusMiddleware = self  # type: ignore[assignment]
        if middleware._follows_default and _instrumentation_module._default is not middleware.instrumentation:
            middleware._follow_the_default()
        try:
            entry_root_path = scope.get("root_path") or ""
            path = scope["path"]
            # The path the app routes, as Starlette finds it: the root path is taken off only
            # if a "/" (or nothing) follows it in the path.
            if entry_root_path and path.startswith(entry_root_path) and path[len(entry_root_path) : len(entry_root_path) + 1] in ("", "/"):
                path = path[len(entry_root_path) :]
            if path in middleware.exclude_paths:
                return None
            # The method as the server gave it: it is made a label when the batch is absorbed.
            method = scope["method"]
            recording = middleware._recording  # (start, record, sums), read once
            recording[0](method)
        except Exception as error:
            middleware._report("middleware.start", error)
            return None

        exchange = middleware._exchange_type()
        exchange.scope = scope
        exchange.entry_root_path = entry_root_path
        exchange.user_type_resolver = middleware._user_type_resolver
        exchange._user_type = None
        exchange._endpoint = UNMATCHED_HANDLER
        exchange.middleware = middleware
        exchange.method = method
        exchange.status = exchange.request_bytes = exchange.response_bytes = 0
        exchange.body_complete = exchange.finished = False
        exchange.server_receive = receive
        exchange.server_send = send
        exchange._token = None
        exchange._recording = recording  # where the start was counted, whatever comes next
        exchange.started = perf_counter()
        try:
            exchange._token = current_request.set(exchange)
        except Exception as error:
            middleware._report("middleware.context", error)
        return exchange


class ExchangeCore:
    """One request as the middleware follows it: the published request context (``scope``,
    ``entry_root_path``, ``user_type_resolver``, ``_user_type``, ``_endpoint``, read by
    :class:`~crowdmon.context.RequestContext`) and the middleware's own state."""

    __slots__ = (
        "_endpoint",
        "_recording",
        "_token",
        "_user_type",
        "body_complete",
        "entry_root_path",
        "finished",
        "method",
        "middleware",
        "request_bytes",
        "response_bytes",
        "scope",
        "server_receive",
        "server_send",
        "started",
        "status",
        "user_type_resolver",
    )  # fmt: skip

    scope: Scope | None
    entry_root_path: str
    _user_type: str | None
    _endpoint: str
    middleware: PrometheusMiddleware
    method: object
    status: int | str
    request_bytes: int
    response_bytes: int
    body_complete: bool
    finished: bool
    server_receive: Any
    server_send: Any
    started: float
    _token: Any
    _recording: tuple[Callable[[object], None], Callable[[RequestEntry], None], object]

    def receive(self) -> Awaitable[Message]:
        # Once the body is complete and the response has started, the app's receives go
        # straight to the server: a wait for a disconnect (Starlette's streaming responses keep
        # one) then costs nothing when it is cancelled.  Until the response starts, a disconnect
        # the app receives makes the request a 499, whatever response it starts afterwards.
        if self.body_complete and self.status:
            return self.server_receive()  # type: ignore[no-any-return]
        return self._receive_body()  # type: ignore[attr-defined,no-any-return]

    def send(self, message: Message) -> Awaitable[None]:
        # A plain method returning the server's awaitable: no coroutine of our own per message.
        # The request is over when the app hands over its last body chunk.
        try:
            kind = message["type"]
            if kind == "http.response.body":
                # A body before any start is refused by the server; the app's error then ends the
                # request in ``__call__``, as a 500.
                if self.status:
                    body = message.get("body", b"")
                    self.response_bytes += len(body) if body.__class__ is bytes else body_size(body)
                    if not message.get("more_body", False) and not self.finished:
                        self.finish(perf_counter())
            elif kind == "http.response.start":
                if not self.status:  # else the client left before it: 499
                    status = message["status"]
                    self.status = status if status.__class__ is int and 99 < status < 600 else odd_status(status)
                    if self.status.__class__ is int and self.status >= 500 and self.body_complete:
                        return self._start_error(message)  # type: ignore[attr-defined,no-any-return]
            elif kind == "http.response.pathsend" and self.status and not self.finished:
                self._pathsend(message)  # type: ignore[attr-defined]
            elif kind == "http.response.zerocopysend" and self.status and not self.finished:
                self._zerocopysend(message)  # type: ignore[attr-defined]
        except Exception as error:
            self.middleware._report("middleware.send", error)
        server_send = self.server_send
        return server_send(message)  # type: ignore[no-any-return]

    def finish(self, ended_at: float) -> None:
        """Record the request: its handler label, then its entry for the recorder.  Runs once."""
        self.finished = True
        self._endpoint = UNMATCHED_HANDLER  # until the label is known, whatever is raised meanwhile
        middleware = self.middleware
        scope: Scope = self.scope  # type: ignore[assignment]  # let go of only after finishing
        status = self.status
        try:
            # The user's resolver if it answers, else the label stored for the matched route (and
            # FastAPI route context), worked out on the route's first request.
            resolver = middleware.handler_resolver
            label = None if resolver is None else resolver(scope)
            if label is not None:
                handler = str(label)
            else:
                route = scope.get("route")
                fastapi_scope = scope.get("fastapi")
                context = fastapi_scope.get("effective_route_context") if fastapi_scope.__class__ is dict else None
                key = id(route) if context is None else (id(route), id(context))
                stored = middleware._route_labels.get(key)
                if stored is None or (scope.get("root_path") or "") != self.entry_root_path:
                    stored = middleware._route_label(scope, self.entry_root_path, status, route, context, key)
                handler = stored
        except Exception as error:
            middleware._report("middleware.handler", error)
            handler = UNMATCHED_HANDLER
        self._endpoint = handler
        duration = ended_at - self.started
        request_bytes = self.request_bytes
        try:
            record = self._recording[1]
            record((
                self.method,
                handler,
                status,
                duration,
                request_bytes if self.body_complete else declared_size(scope, request_bytes),
                self.response_bytes,
            ))
            if len(middleware._pending) >= middleware._flush_at:
                middleware._flush()
        except Exception as error:
            middleware._report("middleware.record", error)
        if middleware._exemplars is not None:
            self._exemplar(handler, duration)  # type: ignore[attr-defined]

    def end(self) -> None:
        """The request is over (the app returned or raised): record it if no response did, then
        let go of it.  Copies of its context live on: a server's keep-alive timer, re-armed inside
        the last send, or a timeout the app cancelled, waits in the event loop's queue for
        seconds, and through the context held every request's scope and server channels alive.
        Hundreds of requests, each kept past the garbage collector's young generation: a
        collection every ~50 requests."""
        try:
            if not self.finished:
                if not self.status:
                    self.status = 500
                self.finish(perf_counter())
        finally:
            self.scope = None
            self.server_receive = receive_after_the_end
            self.server_send = send_after_the_end
            token, self._token = self._token, None
            if token is not None:
                try:
                    current_request.reset(token)
                except ValueError:
                    # Ended from another context than the one it was published in (its coroutine
                    # closed by the garbage collector): that one has nothing of it to reset.
                    pass
                except Exception as error:
                    self.middleware._report("middleware.context", error)


async def receive_after_the_end() -> Message:
    """``receive`` of a request the middleware has let go of: what the ASGI spec has a server
    answer once the response has been sent."""
    return {"type": "http.disconnect"}


async def send_after_the_end(message: Message) -> None:
    """``send`` of a request the middleware has let go of, as servers refuse it."""
    raise RuntimeError(f"this request has ended (its app returned), so it cannot send {message.get('type')!r}")


def odd_status(status: object) -> int | str:
    """A status that is not a plain ``int`` from 100 to 599: its number if it is an integer of
    another type (``HTTPStatus``, NumPy) in that range, else ``"0"``, which records as ``"0"``
    (and, unlike the number 0, is not "no response yet")."""
    try:
        code = operator.index(status)  # type: ignore[arg-type]
    except Exception:
        return "0"
    return code if 99 < code < 600 else "0"


def body_size(body: object) -> int:
    """The bytes a body that is not ``bytes`` holds: a ``memoryview``'s ``len()`` counts its
    items, four bytes each for an array of ``'I'``."""
    try:
        return memoryview(body).nbytes  # type: ignore[arg-type]
    except TypeError:  # not a buffer: no server sends it on, but its length is what it claims
        return len(body)  # type: ignore[arg-type]


def declared_size(scope: Scope, received: int) -> int:
    """``Content-Length`` for a body the app did not read to the end; never less than was read.
    Headers no server should send (not pairs of bytes) count as no ``Content-Length``: a failure
    here would lose the request and leave it in progress forever."""
    try:
        headers = scope.get("headers") or ()
        if b"content-length" not in map(_HEADER_NAME, headers):
            return received  # most requests: the names are compared in C
        for name, value in headers:
            if name == b"content-length":
                if value.isdigit() and len(value) <= 15:
                    return max(received, int(value))
                break
    except Exception:
        pass
    return received


_HEADER_NAME = operator.itemgetter(0)
