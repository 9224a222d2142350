"""The pure-ASGI middleware that records the ``crowdfunding_api_*`` request metrics."""

from __future__ import annotations

import operator
import os
from collections.abc import Awaitable, Iterable
from time import perf_counter

import anyio
from prometheus_client import CollectorRegistry
from starlette.routing import Host, Mount

from crowdmon import instrumentation as _instrumentation_module
from crowdmon._recorder import STANDARD_METHODS, method_label, status_label
from crowdmon._types import ASGIApp, Message, Receive, Scope, Send
from crowdmon.catalogue import UNMATCHED_HANDLER
from crowdmon.context import RequestContext, UserTypeResolver, current_request, default_user_type
from crowdmon.exemplars import ExemplarProvider, request_exemplars
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    default_instrumentation,
)
from crowdmon.routes import HandlerResolver, handler_label_for

__all__ = ["CLIENT_CLOSED_REQUEST", "STANDARD_METHODS", "PrometheusMiddleware"]

#: Matched routes whose handler label a middleware remembers (an app has a bounded number).
_ROUTE_LABELS_CAP = 1024
#: Recorded when the client went away before any response was started (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class PrometheusMiddleware:
    """Records every HTTP request into ``crowdfunding_api_*``; other scopes pass through untouched.

    Use it as ``app.add_middleware(PrometheusMiddleware)`` or wrap any ASGI callable:
    ``PrometheusMiddleware(app)``.  Requests whose path is in ``exclude_paths`` are not recorded.
    ``handler_resolver(scope)`` names the ``handler`` label for apps without a Starlette router;
    returning ``None`` falls back to the router's match.  ``exemplars`` (``"opentelemetry"``,
    ``"traceparent"`` or a callable, see :mod:`crowdmon.exemplars`) attaches trace ids.
    Given neither ``instrumentation`` nor ``registry``, it records into the process-wide default
    instrumentation of the moment (which :mod:`crowdmon.testing` replaces for each test).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        instrumentation: PrometheusInstrumentation | None = None,
        registry: CollectorRegistry | None = None,
        exclude_paths: Iterable[str] = ("/metrics",),
        handler_resolver: HandlerResolver | None = None,
        user_type_resolver: UserTypeResolver | None = None,
        exemplars: ExemplarProvider | str | None = None,
    ) -> None:
        if instrumentation is not None and registry is not None:
            raise CrowdmonSetupError(
                "pass either instrumentation= or registry= to PrometheusMiddleware, not both; "
                "the instrumentation already owns a registry"
            )
        if handler_resolver is not None and not callable(handler_resolver):
            raise CrowdmonSetupError(
                f"handler_resolver must be a callable taking the ASGI scope, got {handler_resolver!r}"
            )
        self.app = app
        self._follows_default = instrumentation is None and registry is None
        if instrumentation is None:
            instrumentation = (
                default_instrumentation() if registry is None else PrometheusInstrumentation(registry)
            )
        self.exclude_paths = excluded_paths(exclude_paths)
        self.handler_resolver = handler_resolver
        if user_type_resolver is not None and not callable(user_type_resolver):
            raise CrowdmonSetupError(f"user_type_resolver must be a callable taking the ASGI scope, got {user_type_resolver!r}")
        self.user_type_resolver = user_type_resolver
        self._user_type_resolver = user_type_resolver or default_user_type
        self._exemplar_option = exemplars
        self._bind(instrumentation)
        # Handler labels of matched routes: id(route), or (id(route), id(FastAPI route context)).
        # A request with no route in its scope is labelled afresh each time: no route matched
        # (a 404), or its router did not record the route (FastAPI's plain routes).
        self._route_labels: dict[object, str] = {}
        # Keeps those objects alive, so their ids are never reused while the labels are held.
        self._route_objects: list[object] = []

    def _bind(self, instrumentation: PrometheusInstrumentation) -> None:
        """Record into ``instrumentation``: its recorder's methods kept as attributes."""
        recorder = instrumentation.requests
        self._exemplars = request_exemplars(self._exemplar_option, instrumentation)
        self._start = recorder.start
        self._record = recorder.record
        self._pending = recorder.pending
        self._flush_at = recorder.flush_at
        self._flush = recorder.flush
        self._report = instrumentation.report_internal_error
        self.instrumentation = instrumentation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._follows_default and _instrumentation_module._default is not self.instrumentation:
            self._follow_the_default()
        try:
            entry_root_path = scope.get("root_path") or ""
            path = scope["path"]
            if entry_root_path and path.startswith(entry_root_path):
                path = path[len(entry_root_path) :]
            excluded = path in self.exclude_paths
            if not excluded:
                # The method as the server gave it: it is made a label when the batch is absorbed.
                method = scope["method"]
                start = self._start  # an attribute, called: no method lookup
                start(method)
        except Exception as error:
            self._report("middleware.start", error)
            excluded = True
        if excluded:
            await self.app(scope, receive, send)
            return

        # The request's whole state is one object, published as its context too; the app gets
        # its bound receive and send.  It is the fewest objects a request can cost: each object
        # Python allocates costs again in the garbage collector's passes, and that is most of
        # what instrumentation costs.  Bound methods are also what the interpreter calls fastest.
        exchange = _Exchange()
        exchange.scope = scope
        exchange.entry_root_path = entry_root_path
        exchange.user_type_resolver = self._user_type_resolver
        exchange._user_type = None
        exchange.middleware = self
        exchange.method = method
        exchange.status = exchange.request_bytes = exchange.response_bytes = 0
        exchange.body_complete = exchange.finished = False
        exchange.server_receive = receive
        exchange.server_send = send
        exchange.started = perf_counter()
        token = None
        try:
            token = current_request.set(exchange)
        except Exception as error:
            self._report("middleware.context", error)
        app = self.app
        try:
            await app(scope, exchange.receive, exchange.send)
        except BaseException as error:
            if not exchange.status:
                if _is_cancellation(error):
                    exchange.status = CLIENT_CLOSED_REQUEST
                elif not isinstance(error, GeneratorExit):  # a coroutine being closed may not await
                    exchange.status = await exchange.unanswered()
            raise
        else:
            if not exchange.status:
                exchange.status = await exchange.unanswered()
        finally:
            if not exchange.finished:
                if not exchange.status:
                    exchange.status = 500
                exchange.finish(perf_counter())
            # The request is over; let go of it.  Copies of its context live on: a server's
            # keep-alive timer, re-armed inside the last send, or a timeout the app cancelled,
            # waits in the event loop's queue for seconds, and through the context held every
            # request's scope and server channels alive.  Hundreds of requests, each kept
            # past the garbage collector's young generation: a collection every ~50 requests.
            exchange.scope = None
            exchange.server_receive = _receive_after_the_end
            exchange.server_send = _send_after_the_end
            if token is not None:
                current_request.reset(token)

    def _follow_the_default(self) -> None:
        try:
            self._bind(default_instrumentation())
        except Exception as error:  # keeps recording where it did
            self._report("middleware.start", error)

    def _route_label(self, scope: Scope, entry_root_path: str, status: int | str, route: object, context: object, key: object) -> str:
        """:func:`handler_label_for`, stored under ``key`` (the matched route, and FastAPI's route
        context if there is one) for :meth:`_Exchange.finish` to look up.

        Only for requests that crossed no mount (``root_path`` unchanged): there the label depends
        on nothing but those two objects, which the middleware then keeps alive, so their ids are
        never reused.  Past :data:`_ROUTE_LABELS_CAP` routes nothing more is stored.
        """
        label = handler_label_for(scope, entry_root_path, status)
        if (
            route is not None
            and not isinstance(route, (Mount, Host))
            and (scope.get("root_path") or "") == entry_root_path
            and key not in self._route_labels
            and len(self._route_labels) < _ROUTE_LABELS_CAP
        ):
            self._route_labels[key] = label
            self._route_objects.append((route, context))
        return label


def excluded_paths(exclude_paths: Iterable[str]) -> frozenset[str]:
    """``exclude_paths`` as a set of paths; a single string, a likely slip, is refused."""
    if isinstance(exclude_paths, str):
        raise CrowdmonSetupError(
            f"exclude_paths must be a collection of paths, got the string {exclude_paths!r}; "
            f"write exclude_paths=[{exclude_paths!r}]"
        )
    return frozenset(exclude_paths)


class _Exchange(RequestContext):
    """One request as the middleware follows it: the published context, then its own state."""

    __slots__ = (
        "body_complete",
        "finished",
        "method",
        "middleware",
        "request_bytes",
        "response_bytes",
        "server_receive",
        "server_send",
        "started",
        "status",
    )  # fmt: skip

    middleware: PrometheusMiddleware
    method: object
    started: float
    status: int | str
    request_bytes: int
    body_complete: bool
    response_bytes: int
    finished: bool
    server_receive: Receive
    server_send: Send

    def endpoint(self) -> str:
        """The ``handler`` label: the one recorded once the request is finished; until then the
        user's resolver's answer if it gives one, else the router's match."""
        if self.finished:
            return self._endpoint
        resolver = self.middleware.handler_resolver
        if resolver is not None:
            try:
                label = resolver(self.scope)  # type: ignore[arg-type]  # let go of only after finishing
            except Exception as error:
                self.middleware._report("middleware.handler", error)
            else:
                if label is not None:
                    return str(label)
        return super().endpoint()

    def receive(self) -> Awaitable[Message]:
        # Once the body is complete the app's receives go straight to the server: a wait for a
        # disconnect (Starlette's streaming responses keep one) then costs nothing when it is
        # cancelled, and a disconnect nobody answered is found by :meth:`unanswered`.
        if self.body_complete:
            return self.server_receive()
        return self._receive_body()

    async def _receive_body(self) -> Message:
        server_receive = self.server_receive
        message: Message = await server_receive()
        try:
            kind = message["type"]
            if kind == "http.request":
                self.request_bytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self.body_complete = True
            elif kind == "http.disconnect":
                # No more body will come: the request's size is what arrived (not what its
                # Content-Length promised).  Gone before any response was started is a 499,
                # whatever response is started later (an error middleware's 500): the client
                # never gets it.
                self.body_complete = True
                if not self.status:
                    self.status = CLIENT_CLOSED_REQUEST
        except Exception as error:
            self.middleware._report("middleware.receive", error)
        return message

    async def unanswered(self) -> int:
        """The status of a request the app ended without starting a response: 499 if the server
        already knows the client is gone, else 500 (what the server answers).

        Asked only once the body is complete, when all a server can still deliver is
        ``http.disconnect``, so no body is taken from anyone: one receive that may not wait,
        shielded from outer cancellation.  It never raises."""
        if not self.body_complete:
            return 500  # any disconnect so far was seen by :meth:`_receive_body`
        try:
            with anyio.CancelScope(shield=True) as scope:
                scope.cancel()
                message = await self.server_receive()
                if message["type"] == "http.disconnect":
                    # The app's later receives get it too: a server may deliver it only once.
                    self.server_receive = _receive_after_the_end
                    return CLIENT_CLOSED_REQUEST
        except Exception:
            pass
        return 500

    def send(self, message: Message) -> Awaitable[None]:
        # A plain method returning the server's awaitable: no coroutine of our own per message.
        # The request is over when the app hands over its last body chunk.
        try:
            kind = message["type"]
            if kind == "http.response.body":
                # A body before any start is refused by the server; the app's error then ends the
                # request in ``__call__``, as a 500.
                if self.status:
                    self.response_bytes += len(message.get("body", b""))
                    if not message.get("more_body", False) and not self.finished:
                        self.finish(perf_counter())
            elif kind == "http.response.start":
                if not self.status:  # else the client left before it: 499
                    status = message["status"]
                    self.status = status if status.__class__ is int else _odd_status(status)
                    if self.status.__class__ is int and self.status >= 500 and self.body_complete:
                        return self._start_error(message)
            elif kind == "http.response.pathsend" and self.status and not self.finished:
                # The ASGI path-send extension (Starlette's FileResponse, when the server offers
                # it): the whole file, and the last message of the response.
                self.response_bytes += os.stat(message["path"]).st_size
                self.finish(perf_counter())
        except Exception as error:
            self.middleware._report("middleware.send", error)
        server_send = self.server_send
        return server_send(message)

    async def _start_error(self, message: Message) -> None:
        """Start a 5xx response, once it is known whether the client is still there: an error
        middleware (Starlette's ``ServerErrorMiddleware``, inside ``setup_monitoring``'s
        middleware) answers an exception the app raised after its client left, and that client
        never gets the answer: a 499.  Asked only for 5xx responses, before they start, so a
        client that leaves once it has its answer cannot be mistaken for one that left before."""
        if await self.unanswered() == CLIENT_CLOSED_REQUEST:
            self.status = CLIENT_CLOSED_REQUEST
        server_send = self.server_send
        await server_send(message)

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
        method = self.method
        duration = ended_at - self.started
        request_bytes = self.request_bytes
        try:
            record = middleware._record
            record((
                method,
                handler,
                status,
                duration,
                request_bytes if self.body_complete else _declared_size(scope, request_bytes),
                self.response_bytes,
            ))
            if len(middleware._pending) >= middleware._flush_at:
                middleware._flush()
        except Exception as error:
            middleware._report("middleware.record", error)
        if middleware._exemplars is not None:
            try:
                middleware._exemplars.observe(scope, method_label(method), handler, status_label(status), duration)
            except Exception as error:
                middleware._report("middleware.exemplar", error)


async def _receive_after_the_end() -> Message:
    """``receive`` of a request the middleware has let go of: what the ASGI spec has a server
    answer once the response has been sent."""
    return {"type": "http.disconnect"}


async def _send_after_the_end(message: Message) -> None:
    """``send`` of a request the middleware has let go of, as servers refuse it."""
    raise RuntimeError(f"this request has ended (its app returned), so it cannot send {message.get('type')!r}")


def _odd_status(status: object) -> int | str:
    """A status that is not a plain ``int``: its number if it is an integer of another type
    (``HTTPStatus``, NumPy), else ``"0"``, which records as ``"0"`` (and is not "no response")."""
    try:
        return operator.index(status)  # type: ignore[arg-type]
    except Exception:
        return "0"


def _declared_size(scope: Scope, received: int) -> int:
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


def _is_cancellation(error: BaseException) -> bool:
    try:
        return isinstance(error, anyio.get_cancelled_exc_class())
    except Exception:
        return False
