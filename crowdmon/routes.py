"""Turning a request into a bounded ``handler`` label.

The label is the route template the application's own router matched (``/items/{item_id}``),
read from the scope after routing: Starlette and FastAPI store the matched route in
``scope["route"]`` and extend ``root_path`` for every ``Mount`` they pass.  A mount with path
parameters (``Mount("/{tenant}", ...)``) puts their values in ``root_path``; its template is then
found by asking the app's routes again, with their own ``matches()``.  Nothing here
re-implements routing, and nothing here may raise: any surprise yields the unmatched sentinel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import Host, Match, Mount

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
    if mount_prefix and _crossed_a_parameterised_mount(scope, route):
        mount_prefix = _mount_templates(scope, entry_root_path, route)
    if isinstance(route, (Mount, Host)):
        # The last route matched is a Mount: the mounted app found nothing of its own (a 404 in a
        # sub-router) or is not a router at all (static files, a bare ASGI app).  Its root_path
        # already ends with the mount's path, so the template is the prefix plus the remainder.
        if status == 404:
            return UNMATCHED_HANDLER
        return mount_prefix + "/{path}"
    return mount_prefix + template


#: How deep :func:`_mount_templates` follows mounts inside mounts.
_MOUNT_DEPTH = 16
#: The prefix of a request whose mounts could not be named again: bounded, and says so.
UNNAMED_MOUNT = "/{mount}"


def _crossed_a_parameterised_mount(scope: Scope, route: object) -> bool:
    """Whether a mount put path parameters of its own in ``scope``: parameters the final route
    does not have (a final ``Mount`` has only its own)."""
    path_params = scope.get("path_params")
    if not path_params or not isinstance(path_params, dict):
        return False
    if isinstance(route, Mount):
        return True
    own = getattr(route, "param_convertors", None)
    return not isinstance(own, dict) or any(name not in own for name in path_params)


def _mount_templates(scope: Scope, entry_root_path: str, route: object) -> str:
    """The templates of the mounts the request went through, in order: the app's routers asked
    again, from the top, with the routes' own ``matches()``; as in Starlette's router, the first
    full match wins, else the first partial one.  The walk ends at the first match that is not a
    mount to go into (the route itself, or what a router dispatches to it through, such as
    FastAPI's included routers).  :data:`UNNAMED_MOUNT` if no route matches on the way."""
    router = scope.get("router")
    probe: dict[str, Any] = {
        "type": "http",
        "path": scope.get("path"),
        "root_path": entry_root_path,
        "method": scope.get("method"),
        "headers": scope.get("headers") or [],
        "path_params": {},
    }
    prefix = ""
    try:
        for _ in range(_MOUNT_DEPTH):
            chosen, chosen_scope, partial = None, {}, False
            for candidate in getattr(router, "routes", None) or ():
                match, child = candidate.matches(probe)
                if match is Match.FULL:
                    chosen, chosen_scope, partial = candidate, child, False
                    break
                if match is Match.PARTIAL and chosen is None:
                    chosen, chosen_scope, partial = candidate, child, True
            if chosen is None:
                break
            if isinstance(chosen, Mount) and not partial:
                # A final mount's root_path ends with its own path, which the caller expects.
                prefix += chosen.path_format.removesuffix("/{path}")
                if chosen is route:
                    return prefix
                probe.update(chosen_scope)
                router = getattr(chosen.app, "router", chosen.app)  # a Router, or an app that has one
                continue
            return prefix
    except Exception:
        pass
    return UNNAMED_MOUNT


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
