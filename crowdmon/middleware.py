"""The pure-ASGI middleware that records the ``crowdfunding_api_*`` request metrics."""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Iterable
from functools import partial
from time import perf_counter

import anyio
from prometheus_client import CollectorRegistry
from starlette.routing import Host, Mount

from crowdmon._recorder import STANDARD_METHODS, method_label, status_label
from crowdmon._types import ASGIApp, Message, Receive, Scope, Send
from crowdmon.catalogue import UNMATCHED_HANDLER
from crowdmon.context import (
    ENTRY_ROOT_PATH,
    SCOPE,
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

__all__ = ["CLIENT_CLOSED_REQUEST", "STANDARD_METHODS", "PrometheusMiddleware"]

#: Matched routes whose handler label a middleware remembers (an app has a bounded number).
_ROUTE_LABELS_CAP = 1024
#: Recorded when the client went away before any response was started (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
# A request's state list: the four slots of its published context (crowdmon.context), then these.
MIDDLEWARE, METHOD, STARTED, STATUS, REQUEST_BYTES, BODY_COMPLETE, RESPONSE_BYTES, FINISHED, RECEIVE, SEND = range(4, 14)


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
            entry_root_path = scope.get("root_path") or ""
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

        # The request's whole state is one list, published as its context too; the app gets
        # receive and send as partials of two module functions over it.  One list and two
        # partials are the fewest objects a request can cost: each object Python allocates costs
        # again in the garbage collector's passes, and that is most of what instrumentation costs.
        state = [
            scope, entry_root_path, self.user_type_resolver, None,
            self, method, perf_counter(), 0, 0, False, 0, False, receive, send,
        ]  # fmt: skip
        token = None
        try:
            token = current_request.set(state)
        except Exception as error:
            self._report("middleware.context", error)
        try:
            await self.app(scope, partial(_receive_and_measure, state), partial(_send_and_measure, state))
        except BaseException as error:
            if not state[STATUS]:
                state[STATUS] = CLIENT_CLOSED_REQUEST if _is_cancellation(error) else 500
            raise
        finally:
            if not state[FINISHED]:
                # The app returned without responding (the server answers 500 on its behalf),
                # or failed, or the client went away.
                if not state[STATUS]:
                    state[STATUS] = 500
                _finish(state, perf_counter())
            if token is not None:
                current_request.reset(token)

    def _route_label(self, scope: Scope, entry_root_path: str, status: int, route: object, context: object, key: object) -> str:
        """:func:`handler_label_for`, stored under ``key`` for :func:`_finish` to look up: the
        matched route, and FastAPI's route context if there is one.

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


async def _receive_and_measure(state: RequestContext) -> Message:
    message: Message = await state[RECEIVE]()
    try:
        kind = message["type"]
        if kind == "http.request":
            state[REQUEST_BYTES] += len(message.get("body", b""))
            if not message.get("more_body", False):
                state[BODY_COMPLETE] = True
        elif kind == "http.disconnect" and not state[STATUS]:
            # Gone before any response was started; a response started later wins.
            state[STATUS] = CLIENT_CLOSED_REQUEST
    except Exception as error:
        state[MIDDLEWARE]._report("middleware.receive", error)
    return message


def _send_and_measure(state: RequestContext, message: Message) -> Awaitable[None]:
    # A plain function returning the server's awaitable: no coroutine of our own per message.
    # The request is over when the app hands over its last body chunk.
    try:
        kind = message["type"]
        if kind == "http.response.body":
            state[RESPONSE_BYTES] += len(message.get("body", b""))
            if not message.get("more_body", False) and not state[FINISHED]:
                _finish(state, perf_counter())
        elif kind == "http.response.start":
            status = message["status"]
            state[STATUS] = status if status.__class__ is int else _odd_status(status)
    except Exception as error:
        state[MIDDLEWARE]._report("middleware.send", error)
    send: Send = state[SEND]
    return send(message)


def _finish(state: RequestContext, ended_at: float) -> None:
    """Record the request: its handler label, then its entry for the recorder.  Runs once."""
    state[FINISHED] = True
    middleware: PrometheusMiddleware = state[MIDDLEWARE]
    scope = state[SCOPE]
    status = state[STATUS]
    try:
        route = scope.get("route")
        fastapi_scope = scope.get("fastapi")
        context = fastapi_scope.get("effective_route_context") if fastapi_scope.__class__ is dict else None
        key = id(route) if context is None else (id(route), id(context))
        resolver = middleware.handler_resolver
        label = None if resolver is None else resolver(scope)
        if label is not None:
            handler = str(label)
        else:
            stored = middleware._route_labels.get(key)
            if stored is None or (scope.get("root_path") or "") != state[ENTRY_ROOT_PATH]:
                handler = middleware._route_label(scope, state[ENTRY_ROOT_PATH], status, route, context, key)
            else:
                handler = stored
    except Exception as error:
        middleware._report("middleware.handler", error)
        handler = UNMATCHED_HANDLER
    method = state[METHOD]
    duration = ended_at - state[STARTED]
    request_bytes = state[REQUEST_BYTES]
    try:
        middleware._record((
            method,
            handler,
            status,
            duration,
            request_bytes if state[BODY_COMPLETE] else _declared_size(scope, request_bytes),
            state[RESPONSE_BYTES],
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


def _odd_status(status: object) -> object:
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
