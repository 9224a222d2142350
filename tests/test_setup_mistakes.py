"""Set-up mistakes of every public entry point fail at once, with a message that says how to fix
them, instead of an AttributeError deep inside, a failure on every request, or nothing at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from crowdmon import (
    CardinalityGuard,
    CrowdmonSetupError,
    HealthApp,
    MetricsApp,
    PrometheusInstrumentation,
    PrometheusMiddleware,
    serve_metrics,
    setup_monitoring,
)
from crowdmon._types import Receive, Scope, Send
from crowdmon.errors import ErrorTaxonomy


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def instrumentation() -> PrometheusInstrumentation:
    return PrometheusInstrumentation(CollectorRegistry())


def _passes_on(function: Callable[..., object]) -> Callable[..., object]:
    """An ordinary decorator: ``functools.wraps`` over ``*args, **kwargs``."""
    import functools

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        return function(*args, **kwargs)

    return wrapper


def setup(**options: Any) -> Callable[[], object]:
    return lambda: setup_monitoring(Starlette(), **options)


def middleware(**options: Any) -> Callable[[], object]:
    return lambda: PrometheusMiddleware(app, **options)


MISTAKES: list[tuple[str, Callable[[], object], str]] = [
    # the wrong object where an instrumentation or a registry goes
    ("instrumentation= a registry", middleware(instrumentation=CollectorRegistry()),
     r"instrumentation= takes a PrometheusInstrumentation .*got <prometheus_client.registry.CollectorRegistry.*; for a registry, write registry="),
    ("registry= an instrumentation", middleware(registry=PrometheusInstrumentation(CollectorRegistry())),
     r"registry= takes a prometheus_client CollectorRegistry, got <crowdmon.*; for an instrumentation, write instrumentation="),
    ("setup instrumentation= a registry", setup(instrumentation=CollectorRegistry()), r"instrumentation= takes a PrometheusInstrumentation"),
    ("setup registry= a string", setup(registry="metrics"), r"registry= takes a prometheus_client CollectorRegistry, got 'metrics'"),
    ("PrometheusInstrumentation(a string)", lambda: PrometheusInstrumentation("metrics"), r"registry= takes a prometheus_client CollectorRegistry"),  # type: ignore[arg-type]
    ("MetricsApp(a registry)", lambda: MetricsApp(CollectorRegistry()), r"MetricsApp's instrumentation= takes a PrometheusInstrumentation .*MetricsApp\(PrometheusInstrumentation\(registry\)\)"),  # type: ignore[arg-type]
    ("HealthApp(a registry)", lambda: HealthApp(CollectorRegistry()), r"HealthApp's instrumentation= takes a PrometheusInstrumentation"),  # type: ignore[arg-type]
    ("metrics_app= not a MetricsApp", setup(registry=CollectorRegistry(), metrics_app="/metrics"), r"metrics_app takes a MetricsApp, got '/metrics'"),
    # paths
    ("metrics_path = health_path", setup(registry=CollectorRegistry(), metrics_path="/ops", health_path="/ops"),
     r"metrics_path and health_path are both '/ops'"),
    ("metrics_app with no metrics_path", lambda: setup_monitoring(Starlette(), instrumentation=(target := instrumentation()), metrics_path=None, metrics_app=MetricsApp(target)),
     r"metrics_app is served at metrics_path, which is None"),
    ("metrics_path not a string", setup(registry=CollectorRegistry(), metrics_path=123), r"metrics_path must be a path starting with '/', got 123"),
    ("exclude_paths without '/'", middleware(registry=CollectorRegistry(), exclude_paths=["metrics"]), r"exclude_paths must be paths starting with '/', got 'metrics'"),
    ("exclude_paths of bytes", middleware(registry=CollectorRegistry(), exclude_paths=[b"/metrics"]), r"exclude_paths must be paths starting with '/', got b'/metrics'"),
    ("exclude_paths None", middleware(registry=CollectorRegistry(), exclude_paths=None), r"exclude_paths must be a collection of paths, got None; write exclude_paths=\(\)"),
    ("serve_metrics path=None", lambda: serve_metrics(0, path=None, instrumentation=instrumentation()), r"path must be a path starting with '/', got None"),  # type: ignore[arg-type]
    ("serve_metrics host=''", lambda: serve_metrics(0, host="", instrumentation=instrumentation()), r"host '' would listen on every interface"),
    # callables that cannot be called the way crowdmon calls them
    ("handler_resolver taking nothing", middleware(registry=CollectorRegistry(), handler_resolver=lambda: "x"),
     r"handler_resolver is called with one argument, the ASGI scope; <function .*> cannot be called so"),
    ("user_type_resolver taking two", middleware(registry=CollectorRegistry(), user_type_resolver=lambda scope, request: "x"),
     r"user_type_resolver is called with one argument, the ASGI scope"),
    ("a wrapper passing its call on to a resolver taking nothing", middleware(registry=CollectorRegistry(), handler_resolver=_passes_on(lambda: "x")),
     r"handler_resolver is called with one argument, the ASGI scope"),
    ("exemplars taking nothing", middleware(registry=CollectorRegistry(), exemplars=lambda: None), r"exemplars is called with one argument, the ASGI scope"),
    # options of the wrong kind
    ("caps as a list", lambda: PrometheusInstrumentation(CollectorRegistry(), cardinality_caps=[("chat_messages_total", 3)]),  # type: ignore[arg-type]
     r"cardinality_caps takes a mapping such as \{'chat_messages_total:user_type': 20\}, got \[\('chat_messages_total', 3\)\]"),
    ("setup_monitoring(default_cap=)", setup(registry=CollectorRegistry(), default_cap=5),
     r"default_cap is PrometheusInstrumentation's: setup_monitoring\(app, instrumentation=PrometheusInstrumentation\(registry, default_cap=5\)\)"),
    ("MetricsApp(compress='no')", lambda: MetricsApp(instrumentation(), compress="no"), r"compress takes True or False, got 'no'"),  # type: ignore[arg-type]
    ("CardinalityGuard('5')", lambda: CardinalityGuard("5"), r"default_cap must be a positive int, got '5'"),  # type: ignore[arg-type]
    ("CardinalityGuard(True)", lambda: CardinalityGuard(True), r"default_cap must be a positive int, got True"),
    ("CardinalityGuard(2.5)", lambda: CardinalityGuard(2.5), r"default_cap must be a positive int, got 2.5"),  # type: ignore[arg-type]
    ("setup_monitoring(exclude_path=)", setup(registry=CollectorRegistry(), exclude_path=["/health"]),
     r"setup_monitoring has no option 'exclude_path' \(did you mean 'exclude_paths'\?\); its options are: registry, instrumentation, metrics_path, "),
    ("serve_metrics(bearer=)", lambda: serve_metrics(0, instrumentation=instrumentation(), bearer="x"),
     r"serve_metrics has no option 'bearer' \(did you mean 'bearer_token'\?\); its options are: host, instrumentation, path, compress, bearer_token, "),
    ("ErrorTaxonomy of names", lambda: ErrorTaxonomy(["openai.APIError"]),  # type: ignore[list-item]
     r"rules take a mapping or \(target, category\) pairs such as \('openai.APIError', 'external_service'\), got 'openai.APIError'"),
]


@pytest.mark.parametrize(("mistake", "make", "message"), MISTAKES, ids=[mistake for mistake, _, _ in MISTAKES])
def test_a_set_up_mistake_fails_at_once_with_its_fix(mistake: str, make: Callable[[], object], message: str) -> None:
    with pytest.raises(CrowdmonSetupError, match=message):
        made = make()
        close = getattr(made, "close", None)
        if callable(close):
            close()


def test_the_option_lists_in_the_messages_are_the_signatures() -> None:
    import inspect

    from crowdmon import exposition, integration

    def keywords(function: Callable[..., object]) -> set[str]:
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return {name for name, parameter in inspect.signature(function).parameters.items() if parameter.kind in kinds}

    assert set(integration._SETUP_OPTIONS) == keywords(setup_monitoring) - {"app"}
    assert set(integration._MIDDLEWARE_OPTIONS) == keywords(PrometheusMiddleware.__init__) - {"self", "app", "instrumentation", "registry", "exclude_paths"}
    assert set(exposition._METRICS_APP_OPTIONS) == keywords(MetricsApp.__init__) - {"self", "instrumentation"}


class TenantMiddleware(PrometheusMiddleware):
    """A subclass an app writes for a label of its own."""


def legitimate_inputs() -> list[tuple[str, Callable[[], object], object]]:
    """Each case: what is made of the input, read back, and what it must be."""
    import functools
    from collections import UserList

    def resolver(scope: Scope, request: object) -> str:
        return "from the adapter"

    @functools.wraps(resolver)
    def adapter(scope: Scope) -> str:  # wraps a function with another signature
        return resolver(scope, None)

    def with_tenant_first() -> object:
        app = Starlette()
        app.add_middleware(TenantMiddleware, registry=CollectorRegistry())  # another registry: recorded apart
        setup_monitoring(app, registry=CollectorRegistry())
        return [entry.cls.__name__ for entry in app.user_middleware]

    api_error = type("APIError", (Exception,), {"__module__": "openai"})
    return [
        ("a functools.wraps adapter",
         lambda: PrometheusMiddleware(app, registry=CollectorRegistry(), handler_resolver=adapter).handler_resolver({}),  # type: ignore[misc]
         "from the adapter"),
        ("exclude_paths from an unset variable", lambda: PrometheusMiddleware(app, registry=CollectorRegistry(), exclude_paths=[""]).exclude_paths, frozenset()),
        ("exclude_paths with OPTIONS *",
         lambda: PrometheusMiddleware(app, registry=CollectorRegistry(), exclude_paths=["*", "/health"]).exclude_paths,
         frozenset({"*", "/health"})),
        ("ErrorTaxonomy pairs of another sequence type",
         lambda: ErrorTaxonomy([UserList(["openai.APIError", "ai_system"])]).classify(api_error()),
         "ai_system"),
        ("a subclass on another registry, then setup", with_tenant_first, ["TenantMiddleware"]),
    ]


@pytest.mark.parametrize(("case", "make", "expected"), legitimate_inputs(), ids=[case for case, _, _ in legitimate_inputs()])
def test_what_is_legitimate_is_accepted(case: str, make: Callable[[], object], expected: object) -> None:
    assert make() == expected
