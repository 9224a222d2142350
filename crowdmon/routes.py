"""Turning a request into a bounded ``handler`` label.

The label is the route template the application's own router matched (``/items/{item_id}``),
read from the scope after routing: Starlette and FastAPI store the matched route in
``scope["route"]`` and extend ``root_path`` for every ``Mount`` they pass.  Nothing here
re-implements routing, and nothing here may raise: any surprise yields the unmatched sentinel.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.routing import Host, Mount

from crowdmon._types import Scope
from crowdmon.catalogue import UNMATCHED_HANDLER

#: A user-supplied resolver: the handler label for a finished request, or ``None`` for unmatched.
HandlerResolver = Callable[[Scope], "str | None"]


def handler_label_for(scope: Scope, entry_root_path: str, status: int | str) -> str:
    """The route template of a routed request, or :data:`UNMATCHED_HANDLER`.

    ``entry_root_path`` is ``scope["root_path"]`` as the middleware first saw it; whatever the
    routers appended to it since is the path of the mounts the request went through.
    """
    route = scope.get("route")
    if route is None:
        return UNMATCHED_HANDLER
    template = _template_of(scope, route)
    if not isinstance(template, str) or not template:
        return UNMATCHED_HANDLER
    root_path = scope.get("root_path") or ""
    mount_prefix = ""
    if isinstance(root_path, str) and root_path.startswith(entry_root_path):
        mount_prefix = root_path[len(entry_root_path) :]
    if isinstance(route, (Mount, Host)):
        # The last route matched is a Mount: the mounted app found nothing of its own (a 404 in a
        # sub-router) or is not a router at all (static files, a bare ASGI app).  Its root_path
        # already ends with the mount's path, so the template is the prefix plus the remainder.
        if status == 404:
            return UNMATCHED_HANDLER
        return mount_prefix + "/{path}"
    return mount_prefix + template


def _template_of(scope: Scope, route: object) -> object:
    """The matched route's path template, without converters (``{item_id}``, not ``{item_id:int}``).

    Since 0.137, FastAPI keeps an included router's routes unprefixed and records the effective
    route, whose template has every ``include_router`` prefix, under ``scope["fastapi"]``.
    """
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        context = fastapi_scope.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            template = getattr(context, "path_format", None)
            if isinstance(template, str):
                return template
    return getattr(route, "path_format", None) or getattr(route, "path", None)
