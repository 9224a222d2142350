"""The request being handled, as seen by code running inside it.

The middleware sets :data:`current_request` for the duration of each HTTP request, so decorators
and tracking calls can label what they record with the route template and the user type of the
request they serve, without the business code passing them along.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from crowdmon._types import Scope
from crowdmon.catalogue import UNKNOWN_VALUE
from crowdmon.routes import handler_label_for

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
    """What the middleware publishes for a request: its scope, the ``root_path`` it entered with,
    the user type resolver, and the user type, ``None`` until first asked for.  The middleware
    keeps the rest of the request's state in the same object (a subclass)."""

    __slots__ = ("entry_root_path", "scope", "user_type", "user_type_resolver")

    scope: Scope
    entry_root_path: str
    user_type_resolver: UserTypeResolver | None
    user_type: str | None


current_request: ContextVar[RequestContext | None] = ContextVar("crowdmon_request", default=None)


def request_endpoint(context: RequestContext) -> str:
    """The route template of the request (known once the app's router has matched it)."""
    return handler_label_for(context.scope, context.entry_root_path, 200)


def request_user_type(context: RequestContext) -> str:
    """The user type resolver's answer for the request (the resolver runs once per request)."""
    user_type = context.user_type
    if user_type is None:
        resolver = context.user_type_resolver or default_user_type
        resolved = resolver(context.scope)
        user_type = context.user_type = resolved if isinstance(resolved, str) else str(resolved)
    return user_type


def current_endpoint() -> str | None:
    """The route template of the request being handled, or ``None`` outside a request."""
    context = current_request.get()
    return None if context is None else request_endpoint(context)


def current_user_type() -> str | None:
    """The user type of the request being handled, or ``None`` outside a request."""
    context = current_request.get()
    return None if context is None else request_user_type(context)
