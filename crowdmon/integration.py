"""``setup_monitoring(app)``: crowdmon on a Starlette or FastAPI app in one call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Route

from crowdmon._types import ASGIApp, Receive, Scope, Send
from crowdmon.exposition import MetricsApp
from crowdmon.health import HealthApp
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    check_instrumentation,
    check_path,
    check_registry,
    default_instrumentation,
    unknown_option,
)
from crowdmon.middleware import PrometheusMiddleware, excluded_paths

#: setup_monitoring's own options, then the middleware's it passes on.
_SETUP_OPTIONS = ("registry", "instrumentation", "metrics_path", "health_path", "exclude_paths", "metrics_app")
_MIDDLEWARE_OPTIONS = ("handler_resolver", "user_type_resolver", "exemplars")

#: Marks an app's ``build_middleware_stack`` that ``setup_monitoring`` wrapped.
_SET_UP = "_crowdmon_set_up"


async def _not_built_yet(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise RuntimeError("the app's middleware stack is not built yet")


def _records_into(middleware: object) -> CollectorRegistry | None:
    """The registry an added middleware (``app.user_middleware``'s entry) records into, if it is
    a ``PrometheusMiddleware`` (or a subclass); else ``None``."""
    added = getattr(middleware, "cls", None)
    if not (isinstance(added, type) and issubclass(added, PrometheusMiddleware)):
        return None
    # Starlette keeps the keyword arguments in .kwargs; before 0.35, in .options.
    options = getattr(middleware, "kwargs", None) or getattr(middleware, "options", None) or {}
    given = options.get("instrumentation")
    if isinstance(given, PrometheusInstrumentation):
        return given.registry
    registry = options.get("registry")
    return registry if isinstance(registry, CollectorRegistry) else default_instrumentation().registry


def setup_monitoring(
    app: Any,
    *,
    registry: CollectorRegistry | None = None,
    instrumentation: PrometheusInstrumentation | None = None,
    metrics_path: str | None = "/metrics",
    health_path: str | None = "/health",
    exclude_paths: Iterable[str] = (),
    metrics_app: MetricsApp | None = None,
    **middleware_options: Any,
) -> PrometheusInstrumentation:
    """Add :class:`PrometheusMiddleware` and the ``/metrics`` and ``/health`` routes to ``app``.

    The middleware wraps the app's whole middleware stack, Starlette's ``ServerErrorMiddleware``
    included, so it records what the client gets: the response of an exception handler, the
    bytes behind a compressing middleware, the time every middleware takes.

    Returns the instrumentation everything records into: the process-wide default one unless a
    ``registry`` or ``instrumentation`` is given.  ``None`` for a path leaves that route out.
    ``metrics_app`` serves ``metrics_path`` with your own :class:`MetricsApp` (e.g. protected).
    """
    if not isinstance(app, Starlette):
        raise CrowdmonSetupError(
            f"setup_monitoring needs a Starlette or FastAPI app, got {type(app).__name__}; for any "
            "other ASGI app wrap it yourself: app = PrometheusMiddleware(app), and serve "
            "crowdmon.MetricsApp() at /metrics"
        )
    check_instrumentation("setup_monitoring", instrumentation)
    check_registry("setup_monitoring", registry)
    if instrumentation is not None and registry is not None:
        raise CrowdmonSetupError("pass either instrumentation= or registry= to setup_monitoring, not both")
    for option, given in middleware_options.items():
        if option in ("default_cap", "cardinality_caps"):
            raise CrowdmonSetupError(
                f"{option} is PrometheusInstrumentation's: setup_monitoring(app, instrumentation="
                f"PrometheusInstrumentation(registry, {option}={given!r}))"
            )
        if option not in _MIDDLEWARE_OPTIONS:
            raise CrowdmonSetupError(unknown_option("setup_monitoring", option, _SETUP_OPTIONS + _MIDDLEWARE_OPTIONS))
    if metrics_app is not None and not isinstance(metrics_app, MetricsApp):
        raise CrowdmonSetupError(f"metrics_app takes a MetricsApp, got {metrics_app!r}")
    if metrics_app is not None and metrics_path is None:
        raise CrowdmonSetupError(
            "metrics_app is served at metrics_path, which is None; give the path (the default is "
            "'/metrics'), or leave metrics_app out"
        )
    if metrics_path is not None:
        check_path("metrics_path", metrics_path)
    if health_path is not None:
        check_path("health_path", health_path)
    if metrics_path is not None and metrics_path == health_path:
        raise CrowdmonSetupError(
            f"metrics_path and health_path are both {metrics_path!r}; one path serves one of them: "
            "give each its own (or None to leave one out)"
        )
    # Given neither, every part follows the process-wide default of the moment (a test fixture
    # replaces it for each test, an app built at import included).
    follows_default = instrumentation is None and registry is None
    if instrumentation is None:
        instrumentation = (
            default_instrumentation() if registry is None else PrometheusInstrumentation(registry)
        )
    if metrics_app is not None and metrics_app.instrumentation.registry is not instrumentation.registry:
        raise CrowdmonSetupError(
            "metrics_app exposes another registry than the one setup_monitoring records into; "
            "build it on the same instrumentation: MetricsApp(instrumentation, ...)"
        )
    excluded = excluded_paths(exclude_paths)
    if getattr(app.build_middleware_stack, _SET_UP, False) or any(
        _records_into(middleware) is instrumentation.registry for middleware in app.user_middleware
    ):
        raise CrowdmonSetupError(
            "this app already has PrometheusMiddleware (setup_monitoring was called on it before, or "
            "app.add_middleware(PrometheusMiddleware) was); every request would be recorded twice. "
            "Call setup_monitoring once per app, and do not also add the middleware yourself"
        )
    if metrics_path is not None:
        excluded |= {metrics_path}
    if app.middleware_stack is not None:
        raise CrowdmonSetupError(
            "this app has already started (its middleware stack is built); call "
            "setup_monitoring(app) where the app is created, before it starts: not in a startup "
            "or lifespan handler, which runs once the app has started"
        )
    recording_into = None if follows_default else instrumentation
    # Built now, so a bad option fails here; it wraps the app's stack when Starlette builds it.
    middleware = PrometheusMiddleware(_not_built_yet, instrumentation=recording_into, exclude_paths=excluded, **middleware_options)
    build_stack = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        middleware.app = build_stack()
        middleware._take_out_duplicates()  # added to the app by hand too
        return middleware

    setattr(build_middleware_stack, _SET_UP, True)
    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    # Inserted first, so a catch-all route or mount of the app cannot shadow them.
    routes = []
    if metrics_path is not None:
        served = metrics_app or MetricsApp(recording_into)
        routes.append(Route(metrics_path, served, methods=["GET", "HEAD"], name="crowdmon_metrics"))
    if health_path is not None:
        routes.append(Route(health_path, HealthApp(recording_into), methods=["GET", "HEAD"], name="crowdmon_health"))
    app.router.routes[0:0] = routes
    return instrumentation
