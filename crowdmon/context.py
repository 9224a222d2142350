"""The request being handled, as seen by code running inside it.

The middleware sets :data:`current_request` for the duration of each HTTP request, so decorators
and tracking calls can label what they record with the route template and the user type of the
request they serve, without the business code passing them along.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

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


#: What the middleware publishes for a request: a list starting ``[scope, entry_root_path,
#: user_type_resolver, user_type]``; ``user_type`` is ``None`` until first asked for.  The
#: middleware keeps the rest of the request's state in the same list, after these four.
RequestContext = list[Any]
SCOPE, ENTRY_ROOT_PATH, RESOLVER, USER_TYPE = range(4)

current_request: ContextVar[RequestContext | None] = ContextVar("crowdmon_request", default=None)


def request_endpoint(context: RequestContext) -> str:
    """The route template of the request (known once the app's router has matched it)."""
    return handler_label_for(context[SCOPE], context[ENTRY_ROOT_PATH], 200)


def request_user_type(context: RequestContext) -> str:
    """The user type resolver's answer for the request (the resolver runs once per request)."""
    user_type = context[USER_TYPE]
    if user_type is None:
        resolver = context[RESOLVER] or default_user_type
        resolved = resolver(context[SCOPE])
        user_type = context[USER_TYPE] = resolved if isinstance(resolved, str) else str(resolved)
    return user_type  # type: ignore[no-any-return]


def current_endpoint() -> str | None:
    """The route template of the request being handled, or ``None`` outside a request."""
    context = current_request.get()
    return None if context is None else request_endpoint(context)


def current_user_type() -> str | None:
    """The user type of the request being handled, or ``None`` outside a request."""
    context = current_request.get()
    return None if context is None else request_user_type(context)
