"""The pure-ASGI middleware that records the ``crowdfunding_api_*`` request metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from time import perf_counter

import anyio
from prometheus_client import CollectorRegistry
from starlette.routing import Host, Mount

from crowdmon._recorder import method_label, status_label
from crowdmon._types import ASGIApp, Message, Receive, Scope, Send
from crowdmon.catalogue import UNMATCHED_HANDLER
from crowdmon.context import (
    ENTRY_ROOT_PATH,
    METHOD,
    SCOPE,
    STARTED,
    RequestContext,
    UserTypeResolver,
    current_request,
)
from crowdmon.exemplars import ExemplarProvider, request_exemplars
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    default_instrumentation,
)
from crowdmon.routes import HandlerResolver, handler_label_for

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
        if isinstance(exclude_paths, str):
            raise CrowdmonSetupError(
                f"exclude_paths must be a collection of paths, got the string {exclude_paths!r}; "
                f"write exclude_paths=[{exclude_paths!r}]"
            )
        if handler_resolver is not None and not callable(handler_resolver):
            raise CrowdmonSetupError(
                f"handler_resolver must be a callable taking the ASGI scope, got {handler_resolver!r}"
            )
        self.app = app
        if instrumentation is None:
            instrumentation = (
                default_instrumentation() if registry is None else PrometheusInstrumentation(registry)
            )
        self.instrumentation = instrumentation
        self.exclude_paths = frozenset(exclude_paths)
        self.handler_resolver = handler_resolver
        if user_type_resolver is not None and not callable(user_type_resolver):
            raise CrowdmonSetupError(f"user_type_resolver must be a callable taking the ASGI scope, got {user_type_resolver!r}")
        self.user_type_resolver = user_type_resolver
        recorder = instrumentation.requests
        self._start = recorder.start
        self._record = recorder.record
        self._pending = recorder.pending
        self._flush_at = recorder.flush_at
        self._flush = recorder.flush
        self._report = instrumentation.report_internal_error
        self._exemplars = request_exemplars(exemplars, instrumentation)
        # Handler labels of matched routes: id(route), or (id(route), id(FastAPI route context)).
        self._route_labels: dict[object, str] = {id(None): UNMATCHED_HANDLER}
        # Keeps those objects alive, so their ids are never reused while the labels are held.
        self._route_objects: list[object] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            entry_root_path = scope.get("root_path", "")
            path = scope["path"]
            if entry_root_path and path.startswith(entry_root_path):
                path = path[len(entry_root_path) :]
            excluded = path in self.exclude_paths
            if not excluded:
                # The method as the server gave it: it is made a label when the batch is absorbed.
                method = scope["method"]
                self._start(method)
        except Exception as error:
            self._report("middleware.start", error)
            excluded = True
        if excluded:
            await self.app(scope, receive, send)
            return

        # What a request needs at its end travels in the list published as its context: one
        # object instead of four cells.  The rest of its state lives in the closures' cells.
        request = [scope, entry_root_path or "", self.user_type_resolver, None, method, perf_counter()]
        status = 0
        request_bytes = 0
        response_bytes = 0
        body_complete = False
        finished = False

        async def receive_and_measure() -> Message:
            nonlocal request_bytes, body_complete, status
            message = await receive()
            try:
                kind = message["type"]
                if kind == "http.request":
                    request_bytes += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        body_complete = True
                elif kind == "http.disconnect" and not status:
                    # Gone before any response was started; a response started later wins.
                    status = CLIENT_CLOSED_REQUEST
            except Exception as error:
                self._report("middleware.receive", error)
            return message

        def send_and_measure(message: Message) -> Awaitable[None]:
            # A plain function returning the server's awaitable: no coroutine of our own per
            # message.  The request is over when the app hands over its last body chunk.
            nonlocal status, response_bytes, finished
            try:
                kind = message["type"]
                if kind == "http.response.body":
                    response_bytes += len(message.get("body", b""))
                    if not message.get("more_body", False) and not finished:
                        finished = True
                        self._finish(
                            request, status, perf_counter(),
                            request_bytes if body_complete else _declared_size(scope, request_bytes),
                            response_bytes,
                        )
                elif kind == "http.response.start":
                    status = message["status"]
            except Exception as error:
                self._report("middleware.send", error)
            return send(message)

        token = None
        try:
            token = current_request.set(request)
        except Exception as error:
            self._report("middleware.context", error)
        try:
            await self.app(scope, receive_and_measure, send_and_measure)
        except BaseException as error:
            if not status:
                status = CLIENT_CLOSED_REQUEST if _is_cancellation(error) else 500
            raise
        finally:
            if not finished:
                # The app returned without responding (the server answers 500 on its behalf),
                # or failed, or the client went away.
                self._finish(
                    request, status or 500, perf_counter(),
                    request_bytes if body_complete else _declared_size(scope, request_bytes),
                    response_bytes,
                )
            if token is not None:
                current_request.reset(token)

    def _finish(self, request: RequestContext, status: int, ended_at: float, request_bytes: int, response_bytes: int) -> None:
        """Record one request: its handler label, then its entry for the recorder."""
        scope = request[SCOPE]
        entry_root_path = request[ENTRY_ROOT_PATH]
        try:
            if self.handler_resolver is None:
                route = scope.get("route")
                fastapi_scope = scope.get("fastapi")
                context = None if fastapi_scope is None else fastapi_scope.get("effective_route_context")
                handler = self._route_labels.get(id(route) if context is None else (id(route), id(context)))
                if handler is None or (scope.get("root_path") or "") != entry_root_path:
                    handler = self._route_label(scope, entry_root_path, status)
            else:
                handler = self._resolved_label(scope, entry_root_path, status)
        except Exception as error:
            self._report("middleware.handler", error)
            handler = UNMATCHED_HANDLER
        method = request[METHOD]
        duration = ended_at - request[STARTED]
        try:
            self._record((method, handler, status, duration, request_bytes, response_bytes))
            if len(self._pending) >= self._flush_at:
                self._flush()
        except Exception as error:
            self._report("middleware.record", error)
        if self._exemplars is not None:
            try:
                self._exemplars.observe(scope, method_label(method), handler, status_label(status), duration)
            except Exception as error:
                self._report("middleware.exemplar", error)

    def _resolved_label(self, scope: Scope, entry_root_path: str, status: int) -> str:
        """The user's ``handler_resolver``'s label, or the router's when it answers ``None``."""
        label = self.handler_resolver(scope)  # type: ignore[misc]
        return self._route_label(scope, entry_root_path, status) if label is None else str(label)

    def _route_label(self, scope: Scope, entry_root_path: str, status: int) -> str:
        """:func:`handler_label_for`, remembered per matched route (and FastAPI route context).

        Only for requests that crossed no mount (``root_path`` unchanged): there the label depends
        on nothing but those two objects, which the middleware then keeps alive, so their ids are
        never reused.  Past :data:`_ROUTE_LABELS_CAP` routes nothing more is remembered.
        """
        label = handler_label_for(scope, entry_root_path, status)
        route = scope.get("route")
        if (
            route is not None
            and not isinstance(route, (Mount, Host))
            and (scope.get("root_path") or "") == entry_root_path
            and len(self._route_labels) < _ROUTE_LABELS_CAP
        ):
            fastapi_scope = scope.get("fastapi")
            context = None if fastapi_scope is None else fastapi_scope.get("effective_route_context")
            self._route_labels[id(route) if context is None else (id(route), id(context))] = label
            self._route_objects.append((route, context))
        return label


def _declared_size(scope: Scope, received: int) -> int:
    """``Content-Length`` for a body the app did not read to the end; never less than was read.
    Headers no server should send (not pairs of bytes) count as no ``Content-Length``: a failure
    here would lose the request and leave it in progress forever."""
    try:
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                if value.isdigit() and len(value) <= 15:
                    return max(received, int(value))
                break
    except Exception:
        pass
    return received


def _is_cancellation(error: BaseException) -> bool:
    try:
        return isinstance(error, anyio.get_cancelled_exc_class())
    except Exception:
        return False
