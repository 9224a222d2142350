"""The request being handled, as seen by code running inside it.

The middleware sets :data:`current_request` for the duration of each HTTP request, so decorators
and tracking calls can label what they record with the route template and the user type of the
request they serve, without the business code passing them along.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from contextvars import ContextVar
from enum import Enum
from typing import TYPE_CHECKING

from crowdmon._types import Scope
from crowdmon.catalogue import UNKNOWN_VALUE
from crowdmon.routes import MountTemplates, handler_label_for

#: Names the ``user_type`` label of a request from its ASGI scope.
UserTypeResolver = Callable[[Scope], str]


def default_user_type(scope: Scope) -> str:
    """``authenticated`` or ``anonymous`` from Starlette's ``AuthenticationMiddleware``
    (``scope["user"]``); ``unknown`` when the app authenticates no one."""
    user = scope.get("user")
    if user is None:
        return UNKNOWN_VALUE
    return "authenticated" if getattr(user, "is_authenticated", False) else "anonymous"


class RequestContext:
    """What crowdmon knows of the request in progress; ``user_type`` is resolved on first use.

    The middleware fills the slots of its own subclass directly (no ``__init__`` call per
    request): ``user_type_resolver`` is never ``None`` and ``_user_type`` starts as ``None``.

    When the request has ended, the middleware lets go of its scope (``scope`` becomes ``None``):
    a copy of the request's context can outlive it by far (a cancelled timer the server or the
    app scheduled stays in the event loop's queue, a task the app started runs on), and must
    not keep the whole request alive.  Such a copy then answers with what the request knew: the
    handler label it was recorded under, and its user type if it was resolved, else
    ``unknown``."""

    if not TYPE_CHECKING:  # the middleware's exchange holds the attributes
        __slots__ = ()

    scope: Scope | None
    entry_root_path: str
    user_type_resolver: UserTypeResolver
    _user_type: str | None
    _endpoint: str

    @property
    def mounts(self) -> MountTemplates:
        """The mount templates of the middleware the request went through."""
        raise NotImplementedError

    def endpoint(self) -> str:
        """The route template of the request (known once the app's router has matched it)."""
        scope = self.scope
        if scope is None:
            return self._endpoint
        return handler_label_for(scope, self.entry_root_path, 200, self.mounts)

    def report_failure(self, site: str, error: Exception) -> None:
        """Count and log a contained failure at ``site`` in the request's instrumentation (the
        middleware's request context does; here, nothing)."""

    def user_type(self) -> str:
        """The resolver's answer for this request (the resolver runs once per request; if it
        raises, the exception propagates and the request's user type is ``unknown``)."""
        if self._user_type is None:
            # Threads a request hands work to (asyncio.to_thread, the threadpool) share its
            # context: one of them asks, the others wait for its answer.  Other requests do not
            # wait: each request has a lock of its own while its resolver runs.
            with _RESOLVING:
                lock = _RESOLVERS.setdefault(id(self), (self, threading.Lock()))[1]
            # A resolver asking another request's user type does not wait for that request's
            # resolver, which might be asking this one's: it gets "unknown" instead of a hang.
            # One asking its own request's, directly or through another's, gets "unknown" too,
            # not a recursion.
            asking: list[RequestContext] = getattr(_ASKING, "contexts", [])
            if self in asking:
                return UNKNOWN_VALUE  # asked from within its own resolver: no answer yet
            if lock.acquire(blocking=not asking):
                try:
                    if self._user_type is None:
                        self._resolve()
                finally:
                    lock.release()
                    with _RESOLVING:
                        _RESOLVERS.pop(id(self), None)
        resolved = self._user_type
        return UNKNOWN_VALUE if resolved is None else resolved

    def _resolve(self) -> None:
        scope = self.scope
        if scope is None:
            self._user_type = UNKNOWN_VALUE  # the request ended before anyone asked
            return
        asking = getattr(_ASKING, "contexts", None)
        if asking is None:
            asking = _ASKING.contexts = []
        asking.append(self)
        try:
            resolved = resolver_label(self.user_type_resolver(scope))
        except Exception:
            self._user_type = UNKNOWN_VALUE  # asked once per request, whatever it answers
            raise
        finally:
            asking.pop()
        self._user_type = resolved


def resolver_label(answer: object) -> str:
    """The ``user_type`` label of a resolver's answer: ``unknown`` for ``None`` or an empty
    string (a resolver reading an attribute the request lacks), an enum by its value, anything
    else through ``str``.  An awaitable (a plain function handing back an async one's
    coroutine) is closed and raises ``TypeError``: it says nothing of the user."""
    if isinstance(answer, str):
        return answer or UNKNOWN_VALUE
    if answer is None:
        return UNKNOWN_VALUE
    if isinstance(answer, Enum):
        return resolver_label(answer.value)
    if inspect.isawaitable(answer):
        close = getattr(answer, "close", None)
        if callable(close):
            close()  # no "never awaited" warning: the TypeError says it
        raise TypeError(f"user_type_resolver returned an awaitable, {answer!r}: it must return the user type itself, as a str")
    return str(answer)


current_request: ContextVar[RequestContext | None] = ContextVar("crowdmon_request", default=None)

#: The lock of each request whose user-type resolver is running, by the request context's id;
#: the context is kept with it, so the id stays its own.  (Never taken twice by one thread: a
#: resolver asking its own request's user type is answered "unknown" before it.)  _RESOLVING
#: guards the table, for an instant at a time.
_RESOLVERS: dict[int, tuple[RequestContext, threading.Lock]] = {}
_RESOLVING = threading.Lock()
#: In each thread, the requests whose resolvers the thread is running (``contexts``), the
#: innermost last.
_ASKING = threading.local()


def current_endpoint() -> str | None:
    """The route template of the request being handled, or ``None`` outside a request."""
    context = current_request.get()
    return None if context is None else context.endpoint()


def current_user_type() -> str | None:
    """The user type of the request being handled, or ``None`` outside a request; ``unknown``
    when the resolver raised (the failure is counted and logged by the request's middleware)."""
    context = current_request.get()
    if context is None:
        return None
    return user_type_of(context, context.report_failure)


def user_type_of(context: RequestContext, report: Callable[[str, Exception], None]) -> str:
    """``context``'s user type; ``unknown`` when its resolver raised, the failure given to
    ``report`` (which must not fail the caller either)."""
    try:
        return context.user_type()
    except Exception as failure:
        with contextlib.suppress(Exception):
            report("user_type_resolver", failure)
        return UNKNOWN_VALUE
