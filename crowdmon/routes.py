"""Turning a request into a bounded ``handler`` label.

The label is the route template the application's own router matched (``/items/{item_id}``),
read from the scope after routing: Starlette (from 1.7) and FastAPI (for its own ``APIRoute``)
store the matched route in ``scope["route"]`` and extend ``root_path`` for every ``Mount`` they
pass.  A mount with path parameters (``Mount("/{tenant}", ...)``) puts their values in
``root_path``; its template, and the route of a router that did not record it (FastAPI's for a
plain ``Route``, such as ``app.add_route`` or ``/health``; Starlette before 1.7), are then found by
asking the app's routes again, with their own ``matches()``.  Nothing here re-implements routing,
and nothing here may raise: any surprise yields the unmatched sentinel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import Host, Match, Mount

from crowdmon._types import Scope
from crowdmon.catalogue import UNMATCHED_HANDLER

#: A user-supplied resolver: the handler label for a finished request, or ``None`` for unmatched.
HandlerResolver = Callable[[Scope], "str | None"]


def handler_label_for(scope: Scope, entry_root_path: str, status: int | str, mounts: MountTemplates) -> str:
    """The route template of a routed request, or :data:`UNMATCHED_HANDLER`.

    ``entry_root_path`` is ``scope["root_path"]`` as the middleware first saw it; whatever the
    routers appended to it since is the path of the mounts the request went through, named
    again as templates by ``mounts`` (the middleware's own, so it lives and dies with the app).
    """
    route = scope.get("route")
    if isinstance(route, (Mount, Host)) and status != 404 and _routes_beneath(route):
        # The last route recorded is a mount of a router that recorded none of its own.  If a
        # route of it matched, the scope names that route's endpoint (FastAPI's plain routes),
        # found again below; if not, it matched nothing on this scope (a trailing-slash
        # redirect; or it never saw it, as below).
        if scope.get("endpoint") is getattr(route, "app", None):
            return UNMATCHED_HANDLER
        route = None
    if route is None:
        if "endpoint" not in scope:
            # No route matched: every route's matches() names its endpoint.  (Or the router never
            # saw this scope: a middleware answered before routing, or handed the router a copy.)
            return UNMATCHED_HANDLER
        route = _route_by_matching(scope, entry_root_path)
        if route is None:
            return UNMATCHED_HANDLER
    template = _template_of(scope, route)
    if not isinstance(template, str) or not template:
        return UNMATCHED_HANDLER
    root_path = scope.get("root_path") or ""
    mount_prefix = ""
    if isinstance(root_path, str) and root_path.startswith(entry_root_path):
        mount_prefix = root_path[len(entry_root_path) :]
    if mount_prefix:
        mount_prefix = mounts.prefix(scope, entry_root_path, route, mount_prefix)
    if isinstance(route, (Mount, Host)):
        # The last route matched is a Mount: the mounted app found nothing of its own (a 404 in a
        # sub-router) or is not a router at all (static files, a bare ASGI app).  Its root_path
        # already ends with the mount's path, so the template is the prefix plus the remainder.
        if status == 404:
            return UNMATCHED_HANDLER
        return mount_prefix + "/{path}"
    return mount_prefix + template


#: How deep a walk follows mounts inside mounts.
_MOUNT_DEPTH = 16
#: The prefix of a request whose mounts could not be named again: bounded, and says so.
UNNAMED_MOUNT = "/{mount}"

#: The mounts and hosts a request went through to its route, outermost first.
_Chain = tuple["Mount | Host", ...]


class MountTemplates:
    """The mount prefix of a ``handler`` label as templates, never as the values of a mount's
    path parameters (``/tenants/{tenant}``, not ``/tenants/acme``).

    The first request that reaches a route through a mount finds its chain of mounts by asking
    the app's routers again, from the top, with the routes' own ``matches()`` (the first full
    match wins, else the first partial one, as in Starlette's router).  The chain is kept per
    route (up to :data:`ROUTES_KEPT` routes, a few chains each); if no mount in it has path
    parameters of its own, a later request whose raw prefix is one a replay confirmed keeps it,
    which is then the template, at the cost of two lookups.  Otherwise each request's chain is
    confirmed by replaying it: it must consume exactly the ``root_path`` the request's routing
    did.  (A ``root_path`` an app's middleware took from a proxy header is the client's to
    choose: a prefix is never trusted for being a known route's.)
    """

    ROUTES_KEPT = 1024
    CHAINS_KEPT = 8

    def __init__(self) -> None:
        # id(route) -> (route, its chains, whether any of them has a mount with parameters,
        # the raw prefixes a replay of them confirmed)
        self._known: dict[int, tuple[object, list[_Chain], bool, set[str]]] = {}

    def prefix(self, scope: Scope, entry_root_path: str, route: object, raw_prefix: str) -> str:
        known = self._known.get(id(route))
        if known is not None and not known[2] and raw_prefix in known[3] and not _has_mount_parameters(scope, route):
            return raw_prefix
        actual = scope.get("root_path")
        try:
            start = _start(scope, entry_root_path)
            for kept in known[1] if known is not None else ():
                consumed = _replay(kept, start)
                if consumed and consumed[-1] == actual:
                    return self._confirmed(kept, consumed, entry_root_path, raw_prefix, known)
            chain = _walk(start, route)
            consumed = _replay(chain, start) if chain else None
        except Exception:
            return UNNAMED_MOUNT
        if chain is None or not consumed or consumed[-1] != actual:
            return UNNAMED_MOUNT
        known = self._keep(route, chain, known)
        return self._confirmed(chain, consumed, entry_root_path, raw_prefix, known)

    def _keep(
        self, route: object, chain: _Chain, known: tuple[object, list[_Chain], bool, set[str]] | None
    ) -> tuple[object, list[_Chain], bool, set[str]] | None:
        parameterised = any(_own_parameters(element) for element in chain)
        if known is None:
            if len(self._known) < self.ROUTES_KEPT:
                # The route kept alive: its id stays its own.
                known = self._known[id(route)] = (route, [chain], parameterised, set())
        elif len(known[1]) < self.CHAINS_KEPT:
            known = self._known[id(route)] = (route, [*known[1], chain], known[2] or parameterised, known[3])
        return known

    def _confirmed(
        self,
        chain: _Chain,
        consumed: list[str],
        entry_root_path: str,
        raw_prefix: str,
        known: tuple[object, list[_Chain], bool, set[str]] | None,
    ) -> str:
        """The templates of a replayed chain; a raw prefix that is its own template is kept."""
        prefix = _templates(chain, consumed, entry_root_path)
        if known is not None and prefix == raw_prefix and len(known[3]) < self.CHAINS_KEPT:
            known[3].add(raw_prefix)
        return prefix


def _has_mount_parameters(scope: Scope, route: object) -> bool:
    """Whether ``scope`` holds path parameters the final route does not have (a final ``Mount``
    has only its own): a mount with parameters was crossed."""
    path_params = scope.get("path_params")
    if not path_params or not isinstance(path_params, dict):
        return False
    if isinstance(route, Mount):
        return True
    own = getattr(route, "param_convertors", None)
    return not isinstance(own, dict) or any(name not in own for name in path_params)


def _own_parameters(element: Mount | Host) -> bool:
    """Whether a mount's own path has parameters (every mount has ``{path}``, the rest of it)."""
    return isinstance(element, Mount) and any(name != "path" for name in element.param_convertors)


def _start(scope: Scope, entry_root_path: str) -> dict[str, Any]:
    """The request as the outermost router saw it, for asking its routes again."""
    app_root_path = scope.get("app_root_path")
    root_path = app_root_path if isinstance(app_root_path, str) and entry_root_path.startswith(app_root_path) else entry_root_path
    return {
        "type": "http",
        "path": scope.get("path"),
        "root_path": root_path,
        "method": scope.get("method"),
        "headers": scope.get("headers") or [],
        "path_params": {},
        "router": scope.get("router"),
    }


def _walk(start: dict[str, Any], route: object) -> _Chain | None:
    """The mounts and hosts from the outermost router to ``route``, or ``None``."""
    routes = getattr(start["router"], "routes", None)
    probe = dict(start)
    chain: list[Mount | Host] = []
    for _ in range(_MOUNT_DEPTH):
        chosen, chosen_scope = _choose(routes, probe)
        if chosen is None:
            return None
        if isinstance(chosen, (Mount, Host)) and chosen is not route:
            chain.append(chosen)
            probe.update(chosen_scope)
            routes = chosen.routes or _routes_beneath(chosen.app)
            continue
        if chosen is route and isinstance(route, (Mount, Host)):
            chain.append(route)
        return tuple(chain)
    return None


def _choose(routes: Any, probe: dict[str, Any]) -> tuple[object, dict[str, Any]]:
    """The route a Starlette router chooses among ``routes`` for ``probe``, and its child scope:
    the first full match, else the first partial one; ``(None, {})`` if none matches."""
    chosen, chosen_scope = None, {}
    for candidate in routes or ():
        match, child = candidate.matches(probe)
        if match is Match.FULL:
            return candidate, child
        if match is Match.PARTIAL and chosen is None:
            chosen, chosen_scope = candidate, child
    return chosen, chosen_scope


def _route_by_matching(scope: Scope, entry_root_path: str) -> object | None:
    """The route the app's routers chose for a request whose router did not record it in the
    scope, found again with the routes' own ``matches()`` from the outermost router (the first
    full match wins, else the first partial one), through mounts and hosts; ``None`` if no route
    matches (a 404) or the router cannot be asked."""
    try:
        probe = _start(scope, entry_root_path)
        routes = getattr(probe["router"], "routes", None)
        for _ in range(_MOUNT_DEPTH):
            chosen, chosen_scope = _choose(routes, probe)
            if _included(chosen):
                return _route_in_included(chosen, probe)
            if not isinstance(chosen, (Mount, Host)):
                return chosen
            beneath = chosen.routes or _routes_beneath(chosen.app)
            if not beneath:
                return chosen  # a mounted app that is not a router: static files, a bare ASGI app
            probe.update(chosen_scope)
            routes = beneath
    except Exception:
        pass
    return None


def _included(route: object) -> bool:
    """Whether ``route`` is FastAPI's included router (from 0.137), which routes by ``_match``."""
    return callable(getattr(route, "_match", None))


def _route_in_included(included: Any, probe: dict[str, Any]) -> object | None:
    """The route an included router (and the routers included in it) chose: FastAPI's effective
    route, whose ``starlette_route`` carries the whole prefixed template."""
    for _ in range(_MOUNT_DEPTH):
        match, _child, inner, context = included._match(probe)
        if match is Match.NONE:
            return None
        if context is not None:
            return getattr(context, "starlette_route", None) or getattr(context, "original_route", None)
        if not _included(inner):
            return inner  # type: ignore[no-any-return]
        included = inner
    return None


def _routes_beneath(app: object) -> list[Any]:
    """The routes of the router a mount's app wraps, through middleware that keeps the app it
    wraps as ``.app`` (a mount's own ``middleware=`` is seen through already)."""
    for _ in range(_MOUNT_DEPTH):
        routes = getattr(app, "routes", None)
        if routes:
            return list(routes)
        app = getattr(app, "app", None)
        if app is None:
            break
    return []


def _replay(chain: _Chain, start: dict[str, Any]) -> list[str] | None:
    """The ``root_path`` after each mount or host of ``chain`` for this request, or ``None`` if
    one of them does not match it."""
    probe = dict(start)
    consumed: list[str] = []
    for element in chain:
        match, child = element.matches(probe)
        if match is not Match.FULL:
            return None
        probe.update(child)
        consumed.append(str(probe.get("root_path")))
    return consumed


def _templates(chain: _Chain, consumed: list[str], entry_root_path: str) -> str:
    """The paths of the chain's mounts as templates: those below the middleware's entry (a
    middleware on a mounted sub-app has the mounts above it in its entry ``root_path``)."""
    return "".join(
        element.path_format.removesuffix("/{path}")
        for element, root_path in zip(chain, consumed, strict=True)
        if isinstance(element, Mount) and len(root_path) > len(entry_root_path)
    )


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
