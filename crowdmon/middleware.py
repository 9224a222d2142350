"""The pure-ASGI middleware that records the ``crowdfunding_api_*`` request metrics."""

from __future__ import annotations

import collections.abc
import functools
import inspect
import logging
import os
from collections.abc import Iterable
from time import perf_counter
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry
from starlette.routing import Host, Mount

from crowdmon import _core
from crowdmon._compiled import speedups
from crowdmon._core import body_size
from crowdmon._recorder import STANDARD_METHODS, method_label, status_label
from crowdmon._types import ASGIApp, Message, Receive, Scope, Send
from crowdmon.context import RequestContext, UserTypeResolver, default_user_type
from crowdmon.exemplars import ExemplarProvider, request_exemplars
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    check_called_with_scope,
    check_instrumentation,
    check_registry,
    default_instrumentation,
)
from crowdmon.routes import HandlerResolver, MountTemplates, handler_label_for
from crowdmon.timing import only_leaves

_speedups = speedups()
if TYPE_CHECKING or _speedups is None:
    from crowdmon._core import ExchangeCore, MiddlewareCore
else:
    MiddlewareCore, ExchangeCore = _speedups.MiddlewareCore, _speedups.ExchangeCore
    # What the compiled call and receive return: asyncio.create_task takes them, as it takes
    # a coroutine.
    collections.abc.Coroutine.register(_speedups.MiddlewareCall)
    collections.abc.Coroutine.register(_speedups.MiddlewareReceive)

#: Whether the request path runs compiled (``crowdmon._speedups``) or in Python (``crowdmon._core``).
COMPILED = _speedups is not None

__all__ = ["CLIENT_CLOSED_REQUEST", "STANDARD_METHODS", "PrometheusMiddleware"]

#: Matched routes whose handler label a middleware remembers (an app has a bounded number).
_ROUTE_LABELS_CAP = 1024
#: Recorded when the client went away before any response was started (nginx's convention).
CLIENT_CLOSED_REQUEST = 499

_logger = logging.getLogger("crowdmon")
#: How many middlewares deep a new middleware looks for another one recording into its registry.
_STACK_DEPTH = 64


class PrometheusMiddleware(MiddlewareCore):
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
        check_instrumentation("PrometheusMiddleware", instrumentation)
        check_registry("PrometheusMiddleware", registry)
        check_resolver("handler_resolver", handler_resolver)
        self.app = app
        self._follows_default = instrumentation is None and registry is None
        if instrumentation is None:
            instrumentation = (
                default_instrumentation() if registry is None else PrometheusInstrumentation(registry)
            )
        self.exclude_paths = excluded_paths(exclude_paths)
        self.handler_resolver = handler_resolver
        check_resolver("user_type_resolver", user_type_resolver)
        self.user_type_resolver = user_type_resolver
        self._user_type_resolver = user_type_resolver or default_user_type
        self._exchange_type = _Exchange
        if COMPILED:
            # Servers tell an ASGI 3 app by asking whether its __call__ is a coroutine function
            # (uvicorn, hypercorn).  The compiled call returns an awaitable object of its own,
            # so the instance answers with a coroutine function doing the same; calling the
            # middleware itself still takes the compiled call.
            self.__dict__["__call__"] = self._asgi_call
        self._exemplar_option = exemplars
        self._bind(instrumentation)
        # Handler labels of matched routes: id(route), or (id(route), id(FastAPI route context)).
        # A request with no route in its scope is labelled afresh each time: no route matched
        # (a 404), or its router did not record the route (FastAPI's plain routes).
        self._route_labels: dict[object, str] = {}
        # Keeps those objects alive, so their ids are never reused while the labels are held.
        self._route_objects: list[object] = []
        # The mounts requests crossed, named as templates: the app's own, collected with it.
        self._mounts = MountTemplates()
        self._take_out_duplicates()

    def _take_out_duplicates(self) -> None:
        """Take out of the stack beneath, as far as its middlewares name the next one ``app``, a
        ``PrometheusMiddleware`` recording into this one's registry: each request would count
        twice.  (Added after ``setup_monitoring``, or by hand twice; Starlette builds the stack
        from the inside out, so the outermost one is left.)  Logged, as the user's mistake."""
        holder: object = self
        inner = self.app
        for _ in range(_STACK_DEPTH):
            if isinstance(inner, PrometheusMiddleware) and (
                inner.instrumentation.registry is self.instrumentation.registry
                or (inner._follows_default and self._follows_default)  # bound now, both follow the default
            ):
                try:
                    holder.app = inner.app  # type: ignore[attr-defined]
                except Exception:  # a holder that will not take it: both keep recording
                    return
                _logger.warning(
                    "%s and %s are both in this app's middleware stack: the app records every "
                    "request into the same registry twice. The inner one is taken out; add "
                    "PrometheusMiddleware once (setup_monitoring(app) adds it).",
                    type(self).__name__, type(inner).__name__,
                )
                inner = inner.app
                continue
            try:
                following = getattr(inner, "app", None)
            except Exception:
                return
            if following is None or not callable(following):
                return
            holder, inner = inner, following

    async def _asgi_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What servers inspect: see ``__init__``."""
        await MiddlewareCore.__call__(self, scope, receive, send)

    def _bind(self, instrumentation: PrometheusInstrumentation) -> None:
        """Record into ``instrumentation``: its recorder's methods kept as attributes."""
        recorder = instrumentation.requests
        self._exemplars = request_exemplars(self._exemplar_option, instrumentation)
        # One attribute, set at once: a request started through one recorder ends in it, also
        # while another thread follows the default to a new one.
        self._recording = (recorder.start, recorder.record, recorder.sums)
        self._pending = recorder.pending
        self._flush_at = recorder.flush_at
        self._flush = recorder.flush
        self._report = instrumentation.report_internal_error
        self.instrumentation = instrumentation

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
        label = handler_label_for(scope, entry_root_path, status, self._mounts)
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


if _speedups is not None:
    # Before Python 3.12 a Python subclass is called through tp_call, which packs the server's
    # three arguments into a tuple on every request.
    _speedups.take_vectorcall(PrometheusMiddleware)


def check_resolver(option: str, resolver: object) -> None:
    """Refuse at set-up a resolver that cannot answer: one that is not callable, or an async one,
    whose coroutine would be taken for the label and never awaited (the label is read in the
    request's synchronous code, a decorator's or the middleware's own)."""
    if resolver is None:
        return
    if not callable(resolver):
        raise CrowdmonSetupError(f"{option} must be a callable taking the ASGI scope, got {resolver!r}")
    check_called_with_scope(option, resolver)
    function: object = resolver
    while isinstance(function, functools.partial):
        function = function.func
    candidates = [function] if inspect.isroutine(function) else [function, type(function).__call__]
    if any(inspect.iscoroutinefunction(item) or inspect.isasyncgenfunction(item) for item in candidates):
        raise CrowdmonSetupError(
            f"{option} must be a plain function returning the label, not an async one: it is called "
            f"where nothing awaits it; got {resolver!r}"
        )


def excluded_paths(exclude_paths: Iterable[str]) -> frozenset[str]:
    """``exclude_paths`` as a set of paths, each a ``str`` starting with ``/`` (a path that does
    not could never match); a single string, a likely slip, is refused."""
    if isinstance(exclude_paths, str):
        raise CrowdmonSetupError(
            f"exclude_paths must be a collection of paths, got the string {exclude_paths!r}; "
            f"write exclude_paths=[{exclude_paths!r}]"
        )
    if not isinstance(exclude_paths, Iterable):
        raise CrowdmonSetupError(f"exclude_paths must be a collection of paths, got {exclude_paths!r}; write exclude_paths=()")
    # An empty string is no path (what splitting an unset variable gives) and is left out; "*"
    # is the path of an OPTIONS * request.
    paths = frozenset(exclude_paths) - {""}
    for path in paths:
        if not isinstance(path, str) or not (path.startswith("/") or path == "*"):
            raise CrowdmonSetupError(f"exclude_paths must be paths starting with '/', got {path!r}")
    return paths


class _Exchange(ExchangeCore, RequestContext):
    """One request as the middleware follows it: its state and hot path are the core's; here are
    the turns a request rarely takes."""

    __slots__ = ()

    @property
    def mounts(self) -> MountTemplates:
        return self.middleware._mounts

    def report_failure(self, site: str, error: Exception) -> None:
        self.middleware._report(site, error)

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
        return RequestContext.endpoint(self)

    async def _receive_body(self) -> Message:
        server_receive = self.server_receive
        message: Message = await server_receive()
        try:
            kind = message["type"]
            if kind == "http.request":
                body = message.get("body", b"")
                self.request_bytes += len(body) if body.__class__ is bytes else body_size(body)
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

    async def _conclude(self, error: BaseException | None) -> None:
        """End a request whose app returned (``error`` is ``None``) or raised ``error`` without
        starting a response; ``error`` is raised again once the request is recorded (or, after an
        app that returned, a cancellation that came meanwhile)."""
        try:
            if error is None:
                self.status, error = await self._unanswered_or_cancelled()
            elif _is_cancellation(error):
                self.status = CLIENT_CLOSED_REQUEST
            elif not isinstance(error, GeneratorExit):  # a coroutine being closed may not await
                # The app's own exception is what leaves, also if the task is cancelled meanwhile.
                self.status = (await self._unanswered_or_cancelled())[0]
        finally:
            self.end()
        if error is not None:
            raise error

    async def unanswered(self) -> int:
        """The status of a request the app ended without starting a response: 499 if the server
        already knows the client is gone, else 500 (what the server answers).

        Asked only once the body is complete, when all a server can still deliver is
        ``http.disconnect``, so no body is taken from anyone: one receive that may not wait,
        shielded from outer cancellation.  It raises only a cancellation of the task itself
        (asyncio's ``Task.cancel`` in the iteration the receive takes)."""
        if not self.body_complete:
            return 500  # any disconnect so far was seen by :meth:`_receive_body`
        try:
            with anyio.CancelScope(shield=True) as scope:
                scope.cancel()
                message = await self.server_receive()
                if message["type"] == "http.disconnect":
                    # The app's later receives get it too: a server may deliver it only once.
                    self.server_receive = _core.receive_after_the_end
                    return CLIENT_CLOSED_REQUEST
        except Exception:
            pass
        return 500

    async def _unanswered_or_cancelled(self) -> tuple[int, BaseException | None]:
        """:meth:`unanswered`, and the cancellation that interrupted it, if one did: the request
        then ends unanswered, as any request cancelled before its response starts (a 499)."""
        try:
            return await self.unanswered(), None
        except BaseException as error:
            if not _is_cancellation(error):
                raise
            return CLIENT_CLOSED_REQUEST, error

    async def _start_error(self, message: Message) -> None:
        """Start a 5xx response, once it is known whether the client is still there: an error
        middleware (Starlette's ``ServerErrorMiddleware``, inside ``setup_monitoring``'s
        middleware) answers an exception the app raised after its client left, and that client
        never gets the answer: a 499.  Asked only for 5xx responses, before they start, so a
        client that leaves once it has its answer cannot be mistaken for one that left before.
        A cancellation that comes while asking is raised once the message is with the server,
        as it would have come at the app's next await."""
        status, cancelled = await self._unanswered_or_cancelled()
        if status == CLIENT_CLOSED_REQUEST and cancelled is None:
            self.status = CLIENT_CLOSED_REQUEST
        server_send = self.server_send
        await server_send(message)
        if cancelled is not None:
            raise cancelled

    def _pathsend(self, message: Message) -> None:
        """The ASGI path-send extension (Starlette's FileResponse, when the server offers it):
        the whole file, and the last message of the response."""
        self.response_bytes += os.stat(message["path"]).st_size
        self.finish(perf_counter())

    def _zerocopysend(self, message: Message) -> None:
        """The ASGI zero-copy-send extension: ``count`` bytes of ``file`` (a file object or a
        descriptor), or to its end from ``offset`` or, without one, from where the file stands;
        the last message of the response unless ``more_body``."""
        count = message.get("count")
        if count is None:
            file = message["file"]
            descriptor = file if isinstance(file, int) else file.fileno()
            offset = message.get("offset")
            start = os.lseek(descriptor, 0, os.SEEK_CUR) if offset is None else offset
            count = max(os.fstat(descriptor).st_size - start, 0)
        self.response_bytes += count
        if not message.get("more_body", False):
            self.finish(perf_counter())

    def _exemplar(self, handler: str, duration: float) -> None:
        middleware = self.middleware
        try:
            middleware._exemplars.observe(self.scope, method_label(self.method), handler, status_label(self.status), duration)  # type: ignore[union-attr,arg-type]
        except Exception as error:
            middleware._report("middleware.exemplar", error)


def _is_cancellation(error: BaseException) -> bool:
    """The running backend's cancellation, or a group of nothing else (trio's nurseries, an
    asyncio ``TaskGroup`` whose tasks were all cancelled)."""
    try:
        cancelled = anyio.get_cancelled_exc_class()
    except Exception:
        return False
    return only_leaves(error, lambda leaf: isinstance(leaf, cancelled))
