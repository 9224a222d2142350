"""Decorators that instrument service functions without touching their bodies.

Each decorator works on sync functions, ``async def`` functions, generators and async generators
(timed until exhausted, closed or failed), methods, classmethods and staticmethods.  A plain
``def`` or ``async def`` gets a plain function wrapper, anything else a ``wrapt`` proxy; either
way the decorated function keeps its signature, name, docstring and ``inspect`` answers, and
``Callable[[F], F]`` keeps its type for mypy.  Every decorator follows the outcome rule of
:mod:`crowdmon.timing`.

Labels given to a decorator are checked when it is applied; ``endpoint`` and ``user_type`` left
out come from the request being handled (see :mod:`crowdmon.context`).  With no
``instrumentation=`` the process-wide default one is looked up at every call.
``enabled=False``, or ``CROWDMON_DISABLED=1`` in the environment when the decorator is applied,
returns the function itself.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import pickle
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Generator, Iterator
from enum import Enum
from time import perf_counter
from types import FunctionType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import wrapt

from crowdmon import instrumentation as _instrumentation_module
from crowdmon.catalogue import CATEGORY_COUNTERS, ERROR_TYPES
from crowdmon.errors import ErrorTaxonomy, default_taxonomy
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    LabelledMetric,
    PrometheusInstrumentation,
    recording_instrumentation,
)
from crowdmon.timing import CANCELLED, ERROR, ITERATION_ENDS, SUCCESS, outcome_of

F = TypeVar("F", bound="Callable[..., Any] | classmethod[Any, Any, Any] | staticmethod[Any, Any]")

#: Set to ``1`` (or ``true``/``yes``/``on``) to make every decorator return the function itself.
DISABLE_ENV = "CROWDMON_DISABLED"


def tracked_external(
    service: str,
    endpoint: str | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Time each call into ``external_api_duration_seconds{service,endpoint,outcome}``; an
    exception also counts in ``external_service_errors_total``.  ``endpoint`` defaults to the
    function's name."""
    service = _static_label("tracked_external", "service", service)
    given_endpoint = None if endpoint is None else _static_label("tracked_external", "endpoint", endpoint)
    return _decorator(
        "tracked_external",
        lambda name: _ExternalProbe(instrumentation, service, given_endpoint or name.rpartition(".")[2]),
        enabled,
    )


def tracked_errors(
    component: str,
    *,
    error_type: str | None = None,
    taxonomy: ErrorTaxonomy | None = None,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Count an exception leaving the call in ``application_errors_total``,
    ``application_error_details_total`` and its category's counter, categorised by ``taxonomy``
    (the default one) unless ``error_type`` fixes the category."""
    component = _static_label("tracked_errors", "component", component)
    if error_type is not None and error_type not in ERROR_TYPES:
        raise CrowdmonSetupError(
            f"@tracked_errors(error_type={error_type!r}) is not a known error category; use one "
            f"of: {', '.join(ERROR_TYPES)}, or leave it out to classify by the error taxonomy"
        )
    if taxonomy is not None and not isinstance(taxonomy, ErrorTaxonomy):
        raise CrowdmonSetupError(f"taxonomy must be a crowdmon.ErrorTaxonomy, got {taxonomy!r}")
    chosen = taxonomy or default_taxonomy
    return _decorator(
        "tracked_errors",
        lambda name: _ErrorsProbe(instrumentation, component, error_type, chosen, name),
        enabled,
    )


def tracked_chat(
    endpoint: str | None = None,
    user_type: str | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Time each call into ``chat_processing_duration_seconds{endpoint,user_type}``."""
    endpoint = _optional_label("tracked_chat", "endpoint", endpoint)
    user_type = _optional_label("tracked_chat", "user_type", user_type)
    return _decorator("tracked_chat", lambda name: _ChatProbe(instrumentation, endpoint, user_type), enabled)


def tracked_vector_search(
    operation: str,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Time each call into ``vector_search_duration_seconds{operation}``."""
    operation = _static_label("tracked_vector_search", "operation", operation)
    return _decorator(
        "tracked_vector_search",
        lambda name: _DurationProbe(instrumentation, "vector_search_duration_seconds", operation),
        enabled,
    )


def tracked_database_query(
    operation: str,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Time each call into ``database_query_duration_seconds{operation}``."""
    operation = _static_label("tracked_database_query", "operation", operation)
    return _decorator(
        "tracked_database_query",
        lambda name: _DurationProbe(instrumentation, "database_query_duration_seconds", operation),
        enabled,
    )


def tracked_memory_operation(
    operation: str,
    memory_type: str | None = None,
    user_type: str | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Count each call that succeeds in ``memory_operations_total{operation,memory_type,user_type}``."""
    operation = _static_label("tracked_memory_operation", "operation", operation)
    memory_type = _static_label("tracked_memory_operation", "memory_type", _required("tracked_memory_operation", "memory_type", memory_type))
    user_type = _optional_label("tracked_memory_operation", "user_type", user_type)
    return _decorator(
        "tracked_memory_operation",
        lambda name: _MemoryProbe(instrumentation, operation, memory_type, user_type),
        enabled,
    )


def tracked_document_operation(
    operation: str,
    document_type: str | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Count each call in ``document_operations_total{operation,document_type,status}`` with
    ``status`` the call's outcome: ``success``, ``error`` or ``cancelled``."""
    operation = _static_label("tracked_document_operation", "operation", operation)
    document_type = _static_label("tracked_document_operation", "document_type", _required("tracked_document_operation", "document_type", document_type))
    return _decorator(
        "tracked_document_operation",
        lambda name: _DocumentProbe(instrumentation, operation, document_type),
        enabled,
    )


def tracked_session(
    user_type: str | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
    enabled: bool | None = None,
) -> Callable[[F], F]:
    """Hold one session in ``active_sessions_current{user_type}`` while each call runs; the
    gauge comes back down however the call ends."""
    user_type = _optional_label("tracked_session", "user_type", user_type)
    return _decorator("tracked_session", lambda name: _SessionProbe(instrumentation, user_type), enabled)


def instrumented_metrics(func: object) -> tuple[str, ...]:
    """The metrics crowdmon decorators on ``func`` (a function, or a bound method) record into."""
    found: list[str] = []
    current: object = func
    for _ in range(64):
        if current is None:
            break
        parent = getattr(current, "_self_parent", None)
        holder = parent if isinstance(parent, _CrowdmonWrapper) else current
        if isinstance(holder, _CrowdmonWrapper):
            found.extend(holder._self_probe.metrics)
        elif isinstance(getattr(current, _PROBE_ATTRIBUTE, None), _Probe):
            found.extend(getattr(current, _PROBE_ATTRIBUTE).metrics)
        if isinstance(current, (classmethod, staticmethod)):
            current = current.__func__
        else:
            current = getattr(current, "__wrapped__", None)
    return tuple(dict.fromkeys(found))


# -- applying a decorator ----------------------------------------------------------------------


if TYPE_CHECKING:
    _FunctionWrapper = wrapt.FunctionWrapper[..., Any]
    _BoundFunctionWrapper = wrapt.BoundFunctionWrapper[..., Any]
else:
    _FunctionWrapper = wrapt.FunctionWrapper
    _BoundFunctionWrapper = wrapt.BoundFunctionWrapper


class _CrowdmonBoundWrapper(_BoundFunctionWrapper):
    """What a decorated staticmethod, classmethod or callable attribute is when read from its
    class or an instance: pickled as Python pickles a bound method, as that attribute."""

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        holder = self._self_instance if self._self_instance is not None else self._self_owner
        return getattr, (holder, getattr(self, "__name__"))  # noqa: B009  # a proxied attribute

    def __copy__(self) -> _CrowdmonBoundWrapper:
        return self

    def __deepcopy__(self, memo: object) -> _CrowdmonBoundWrapper:
        return self


class _CrowdmonWrapper(_FunctionWrapper):
    """wrapt's function wrapper, carrying the probe so tests can see what is instrumented.

    Pickled by reference, as a function is (``ProcessPoolExecutor.submit`` pickles what it runs),
    and copied as itself, as a function is."""

    __bound_function_wrapper__ = _CrowdmonBoundWrapper

    def __init__(self, wrapped: Any, wrapper: Any, probe: _Probe) -> None:
        super().__init__(wrapped, wrapper)
        self._self_probe = probe

    def __reduce_ex__(self, protocol: object) -> str:
        qualname = getattr(self, "__qualname__", None)
        if not isinstance(qualname, str):
            raise pickle.PicklingError(
                f"cannot pickle the crowdmon-decorated {self.__wrapped__!r}: it pickles by reference, "
                "as a function does, and has no __qualname__ to be found by; decorate a module-level def that calls it"
            )
        return qualname  # pickle finds it in its __module__, and checks it is this object

    def __copy__(self) -> _CrowdmonWrapper:
        return self

    def __deepcopy__(self, memo: object) -> _CrowdmonWrapper:
        return self


class _AsyncCallableWrapper(_CrowdmonWrapper):
    """For a callable object whose ``__call__`` is an ``async def``: the wrapper's ``__call__``
    is one too, as frameworks tell such an object by it (Starlette runs a ``BackgroundTask`` or
    an exception handler whose ``__call__`` is not a coroutine function in a worker thread)."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await super().__call__(*args, **kwargs)


def _decorator(name: str, make_probe: Callable[[str], _Probe], enabled: bool | None) -> Callable[[F], F]:
    if enabled is None:
        enabled = os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")
    elif not isinstance(enabled, bool):
        raise CrowdmonSetupError(f"@{name}(enabled=...) takes True, False or None, got {enabled!r}")

    def decorate(func: F) -> F:
        if not enabled:
            return func
        target = _callable_target(name, func)
        probe = make_probe(_function_label(target))
        probe.iterator = getattr(target, "__name__", None) in ("__next__", "__anext__")
        shape = _shape(target)
        if isinstance(func, FunctionType) and shape in ("sync", "coroutine"):
            return cast(F, _plain_function_wrapper(func, probe, shape == "coroutine"))
        if shape == "async_generator":
            wrapper = _async_generator_wrapper(probe)
        elif shape == "generator":
            wrapper = _generator_wrapper(probe)
        elif shape == "coroutine":
            wrapper = _async_errors_wrapper(probe) if probe.errors_only else _async_wrapper(probe)
        elif shape == "awaitable":
            wrapper = _maybe_awaitable_wrapper(probe)
        else:
            wrapper = _sync_errors_wrapper(probe) if probe.errors_only else _sync_wrapper(probe)
        if shape == "coroutine" and not inspect.isroutine(target) and not isinstance(target, functools.partial):
            return cast(F, _AsyncCallableWrapper(func, wrapper, probe))
        return cast(F, _CrowdmonWrapper(func, wrapper, probe))

    return decorate


def _callable_target(name: str, func: object) -> Any:
    if isinstance(func, (classmethod, staticmethod)):
        func = func.__func__
    if isinstance(func, type):
        raise TypeError(
            f"@{name}(...) cannot decorate the class {func.__name__}; decorate its methods instead"
        )
    if not callable(func):
        raise TypeError(
            f"@{name}(...) can only decorate a function, method, classmethod or staticmethod, "
            f"got {type(func).__name__} {func!r}; put the decorator directly above a def"
        )
    made = func.func if isinstance(func, functools.partial) else func
    if getattr(made, "__code__", None) in _CONTEXT_MANAGER_FACTORIES:
        raise TypeError(
            f"@{name}(...) above @contextmanager or @asynccontextmanager would time only the making "
            f"of the context manager {_function_label(made)}, not its block: put @{name}(...) below "
            "it, directly above the generator function (its duration then runs from entering the "
            "block to leaving it, and an exception raised in the block is its outcome)"
        )
    return func


def _probe() -> Iterator[None]:
    yield


async def _async_probe() -> AsyncIterator[None]:
    yield


#: The code of what @contextmanager and @asynccontextmanager turn a generator function into:
#: the same for every function they decorate.
_CONTEXT_MANAGER_FACTORIES = frozenset(
    (contextlib.contextmanager(_probe).__code__, contextlib.asynccontextmanager(_async_probe).__code__)
)


def _shape(target: Any) -> str:
    """What calling ``target`` gives: a coroutine, a (async) generator, or a plain result.  A
    callable object is what its ``__call__`` is."""
    candidates = [target]
    if not inspect.isroutine(target) and callable(target):
        candidates.append(type(target).__call__)
    for candidate in candidates:
        if inspect.isasyncgenfunction(candidate):
            return "async_generator"
        if inspect.iscoroutinefunction(candidate):
            return "coroutine"
        if inspect.isgeneratorfunction(candidate):
            return "generator"
    try:
        innermost = inspect.unwrap(target)
    except ValueError:  # a cycle of __wrapped__
        return "sync"
    if innermost is not target and inspect.iscoroutinefunction(innermost):
        # A plain def around an async def (functools.wraps and the like): it most likely returns
        # the coroutine, whose outcome is only known once it is awaited.
        return "awaitable"
    return "sync"


def _function_label(target: Any) -> str:
    """The ``function`` label: the qualified name, without the ``<locals>`` of enclosing functions;
    a ``functools.partial`` is named by the function it calls."""
    for _ in range(16):
        if not isinstance(target, functools.partial):
            break
        target = target.func
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return str(name).rpartition("<locals>.")[2]


def _static_label(decorator: str, parameter: str, value: object) -> str:
    """A label value given at decoration, checked now so that calls have nothing left to check."""
    if callable(value) and not isinstance(value, (str, Enum)):
        raise CrowdmonSetupError(
            f"@{decorator} needs its arguments: write @{decorator}({parameter}=...) above the "
            f"function, not a bare @{decorator}"
        )
    if isinstance(value, Enum):
        value = value.value
    if not isinstance(value, str):
        raise TypeError(
            f"@{decorator}({parameter}=...) must be a str (or an Enum of str), got "
            f"{type(value).__name__} {value!r}; label values are strings, e.g. {parameter}={str(value)!r}"
        )
    if not value:
        raise CrowdmonSetupError(f"@{decorator}({parameter}='') needs a non-empty label value")
    return value


def _required(decorator: str, parameter: str, value: object) -> object:
    """A label every call of the decorator needs (checked after the first argument, so that a bare
    ``@decorator`` gets the message saying so)."""
    if value is None:
        raise CrowdmonSetupError(f"@{decorator} needs {parameter}=...: write @{decorator}(operation=..., {parameter}=...)")
    return value


def _optional_label(decorator: str, parameter: str, value: object) -> str | None:
    if callable(value) and not isinstance(value, (str, Enum)):
        raise CrowdmonSetupError(
            f"@{decorator} needs its parentheses: write @{decorator}() above the function (its "
            f"arguments are optional), not a bare @{decorator}"
        )
    return None if value is None else _static_label(decorator, parameter, value)


# -- the wrappers: the outcome rule around each kind of callable ---------------------------------

#: Where a plain-function wrapper keeps its probe, for :func:`instrumented_metrics`.
_PROBE_ATTRIBUTE = "_crowdmon_probe"


def _plain_function_wrapper(func: FunctionType, probe: _Probe, coroutine: bool) -> FunctionType:
    """The fast path for a plain ``def`` or ``async def`` (methods included, bound as usual).

    A ``wrapt`` proxy costs more per call than everything crowdmon records, so a plain function
    gets a plain function: the same wrappers' outcome rule, ``functools.update_wrapper`` for the
    name, doc and ``__wrapped__`` (hence ``inspect.signature``), and the wrapped function's
    ``__globals__``, so tools that resolve string annotations through them (older FastAPI) still
    find the user's names.  The wrapper's code reads only its closure and builtins, which makes
    that safe.  Generators, callable objects, classmethod and staticmethod objects keep ``wrapt``.
    """
    if probe.errors_only:
        inner = (_plain_async_errors if coroutine else _plain_sync_errors)(func, probe.begin, probe.finish)
    else:
        inner = (_plain_async if coroutine else _plain_sync)(func, probe.begin, probe.succeeded, probe.finish)
    wrapper = FunctionType(inner.__code__, func.__globals__, func.__name__, None, inner.__closure__)
    functools.update_wrapper(wrapper, func)
    setattr(wrapper, _PROBE_ATTRIBUTE, probe)
    return wrapper


_Finish = Callable[[Any, "BaseException | None"], None]


def _plain_sync(func: Callable[..., Any], begin: Callable[[], Any], succeeded: Callable[[Any], None], finish: _Finish) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        state = begin()
        try:
            result = func(*args, **kwargs)
        except BaseException as error:
            finish(state, error)
            raise
        succeeded(state)
        return result

    return call


def _plain_async(func: Callable[..., Any], begin: Callable[[], Any], succeeded: Callable[[Any], None], finish: _Finish) -> Callable[..., Any]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        # The coroutine is made first: a wrong argument is the caller's mistake, not a failure.
        coroutine = func(*args, **kwargs)
        state = begin()
        try:
            result = await coroutine
        except BaseException as error:
            finish(state, error)
            raise
        succeeded(state)
        return result

    return call


def _plain_sync_errors(func: Callable[..., Any], begin: Callable[[], Any], finish: _Finish) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        state = begin()
        try:
            return func(*args, **kwargs)
        except BaseException as error:
            finish(state, error)
            raise

    return call


def _plain_async_errors(func: Callable[..., Any], begin: Callable[[], Any], finish: _Finish) -> Callable[..., Any]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        coroutine = func(*args, **kwargs)
        state = begin()
        try:
            return await coroutine
        except BaseException as error:
            finish(state, error)
            raise

    return call



def _maybe_awaitable_wrapper(probe: _Probe) -> Callable[..., Any]:
    """For a plain ``def`` wrapping an ``async def``: a coroutine it returns is timed and judged
    when it is awaited; anything else (a value, a task or future the caller may keep, poll or
    await twice) is the call's result, as for any sync function, and is returned unchanged."""
    begin, succeeded, finish = probe.begin, probe.succeeded, probe.finish

    def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        state = begin()
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as error:
            finish(state, error)
            raise
        if inspect.iscoroutine(result):
            # Timed from when it is awaited, if it ever is: a coroutine cancelled before its
            # first step or never awaited runs no code of ours, and must leave nothing open.
            probe.abandon(state)
            return _named(_awaited(_Unawaited(result), probe), result)
        succeeded(state)
        return result

    return call


_Made = TypeVar("_Made", Generator[Any, Any, Any], AsyncGenerator[Any, Any], Coroutine[Any, Any, Any])


def _named(made: _Made, original: object) -> _Made:
    """``made`` (the generator, async generator or coroutine a wrapper hands back) under the
    names of the one it stands for, which tracebacks, reprs and Python's "coroutine ... was never
    awaited" show."""
    name, qualname = getattr(original, "__name__", None), getattr(original, "__qualname__", None)
    if isinstance(name, str) and isinstance(qualname, str):
        target: Any = made  # generator and coroutine objects' names are writable
        target.__name__, target.__qualname__ = name, qualname
    return made


class _Unawaited:
    """Holds the coroutine a plain ``def`` returned until :func:`_awaited` awaits it, and closes
    it if that never happens (the caller closed or cancelled ours before its first step), as the
    caller would have closed it: no "coroutine was never awaited" warning that it did not cause."""

    __slots__ = ("coroutine",)

    def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.coroutine = coroutine

    def __del__(self) -> None:
        self.coroutine.close()  # a no-op once it has run


async def _awaited(unawaited: _Unawaited, probe: _Probe) -> Any:
    state = probe.begin()
    try:
        result = await unawaited.coroutine
    except BaseException as error:
        probe.finish(state, error)
        raise
    probe.succeeded(state)
    return result


def _sync_wrapper(probe: _Probe) -> Callable[..., Any]:
    begin, succeeded, finish = probe.begin, probe.succeeded, probe.finish

    def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        state = begin()
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as error:
            finish(state, error)
            raise
        succeeded(state)
        return result

    return call


def _async_wrapper(probe: _Probe) -> Callable[..., Any]:
    begin, succeeded, finish = probe.begin, probe.succeeded, probe.finish

    async def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        awaitable = wrapped(*args, **kwargs)  # a wrong argument is the caller's mistake, not a failure
        state = begin()
        try:
            result = await awaitable
        except BaseException as error:
            finish(state, error)
            raise
        succeeded(state)
        return result

    return call


def _sync_errors_wrapper(probe: _Probe) -> Callable[..., Any]:
    """For a probe that only looks at exceptions: on the way in only the time (to tell this call's
    exceptions from an earlier one's, see :func:`first_count`), nothing on success."""
    begin, finish = probe.begin, probe.finish

    def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        state = begin()
        try:
            return wrapped(*args, **kwargs)
        except BaseException as error:
            finish(state, error)
            raise

    return call


def _async_errors_wrapper(probe: _Probe) -> Callable[..., Any]:
    begin, finish = probe.begin, probe.finish

    async def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        awaitable = wrapped(*args, **kwargs)
        state = begin()
        try:
            return await awaitable
        except BaseException as error:
            finish(state, error)
            raise

    return call


def _generator_wrapper(probe: _Probe) -> Callable[..., Any]:
    def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        # Called now, so a wrong argument fails at the call as it would undecorated.
        generator = wrapped(*args, **kwargs)
        return _named(_timed_generator(probe, generator), generator)

    return call


def _timed_generator(probe: _Probe, generator: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    state = probe.begin()
    try:
        result = yield from generator
    except BaseException as error:
        probe.finish(state, error)
        raise
    probe.succeeded(state)
    return result


def _async_generator_wrapper(probe: _Probe) -> Callable[..., Any]:
    def call(wrapped: Callable[..., Any], instance: object, args: Any, kwargs: Any) -> Any:
        generator = wrapped(*args, **kwargs)
        return _named(_timed_async_generator(probe, generator), generator)

    return call


async def _timed_async_generator(probe: _Probe, generator: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, Any]:
    state = probe.begin()
    try:
        to_send: Any = None
        to_throw: BaseException | None = None
        while True:
            try:
                if to_throw is not None:
                    thrown, to_throw = to_throw, None
                    value = await generator.athrow(thrown)
                else:
                    value = await generator.asend(to_send)
            except StopAsyncIteration:
                break
            try:
                to_send = yield value
            except GeneratorExit:
                # Suspended anywhere but at its yield, the generator is being closed already:
                # the event loop's shutdown closes every live async generator, this one too.
                if getattr(generator, "ag_await", None) is None:
                    await generator.aclose()
                raise
            except BaseException as thrown:  # athrow() on the wrapper: pass it to the generator
                to_throw = thrown
    except BaseException as error:
        probe.finish(state, error)
        raise
    probe.succeeded(state)


# -- probes: what each decorator records -------------------------------------------------------


class _Probe:
    """Records one decorator's metrics around a call: ``state = begin()`` before it, then
    ``succeeded(state)`` or ``finish(state, error)``.

    None of them ever raises: a failure is reported to ``crowdmon_internal_errors_total{site}``.
    Subclasses override ``succeeded`` for the common path, and ``resolve`` to look up, once per
    instrumentation, the children that do not change from call to call."""

    metrics: tuple[str, ...] = ()
    site = "decorator"
    #: Records nothing unless an exception leaves the call (the wrappers then skip succeeded).
    errors_only = False
    #: ``state`` is the start time; a builtin, so the hot path makes no Python call for it.
    begin: Callable[[], Any] = staticmethod(perf_counter)
    #: The decorated function is an iterator's ``__next__`` or ``__anext__``: its
    #: ``StopIteration`` or ``StopAsyncIteration`` is its end, not a failure.
    iterator = False

    def __init__(self, instrumentation: PrometheusInstrumentation | None) -> None:
        if instrumentation is not None and not isinstance(instrumentation, PrometheusInstrumentation):
            raise CrowdmonSetupError(
                f"instrumentation= takes a PrometheusInstrumentation (or None for the default one), "
                f"got {instrumentation!r}"
            )
        self._fixed = instrumentation
        self._bound: object = _UNBOUND

    def instrumentation(self) -> PrometheusInstrumentation | None:
        """The one given, else the default of the moment (``None``: it could not be built)."""
        fixed = self._fixed
        return fixed if fixed is not None else recording_instrumentation()

    def bind(self) -> PrometheusInstrumentation:
        """The instrumentation to record into, re-resolving cached children when it changed
        (the default instance is looked up at every call, so tests can replace it)."""
        target = self.instrumentation()
        if target is None:
            raise _NothingToRecordInto
        if target is not self._bound:
            self.resolve(target)
            self._bound = target
        return target

    def resolve(self, target: PrometheusInstrumentation) -> None:
        """Look up what does not change from call to call (override)."""

    def succeeded(self, state: Any) -> None:
        self.finish(state, None)

    def abandon(self, state: Any) -> None:
        """Close what ``begin`` opened without recording anything (override if it opened any)."""

    def finish(self, state: Any, error: BaseException | None) -> None:
        elapsed = perf_counter() - state
        try:
            outcome = outcome_of(error, iterator=self.iterator)
            if outcome is not None:
                self.record(self.bind(), elapsed, outcome, error, state)
        except Exception as failure:
            self.report(failure)

    def record(
        self, target: PrometheusInstrumentation, elapsed: float, outcome: str, error: BaseException | None, started: Any
    ) -> None:
        raise NotImplementedError

    def report(self, failure: Exception) -> None:
        target = self.instrumentation()
        if target is None or isinstance(failure, _NothingToRecordInto):
            return  # the default could not be built, which was logged
        with contextlib.suppress(Exception):  # nothing left to report to
            target.report_internal_error(self.site, failure)


class _NothingToRecordInto(Exception):
    """The default instrumentation could not be built (logged once): the call records nothing."""


_UNBOUND = object()


class _ExternalProbe(_Probe):
    metrics = ("external_api_duration_seconds", "external_service_errors_total")
    site = "tracked_external"

    def __init__(self, instrumentation: PrometheusInstrumentation | None, service: str, endpoint: str) -> None:
        super().__init__(instrumentation)
        self.service, self.endpoint = service, endpoint
        self._children: dict[str, Any] = {}
        self._success: Any = None

    def resolve(self, target: PrometheusInstrumentation) -> None:
        durations = target.metric("external_api_duration_seconds")
        self._children = {
            outcome: durations.labels(self.service, self.endpoint, outcome)
            for outcome in (SUCCESS, ERROR, CANCELLED)
        }
        self._success = self._children[SUCCESS]

    def succeeded(self, state: Any) -> None:
        elapsed = perf_counter() - state
        try:
            if (self._fixed or _instrumentation_module._default) is not self._bound:
                self.bind()
            self._success.observe(elapsed)
        except Exception as failure:
            self.report(failure)

    def record(
        self, target: PrometheusInstrumentation, elapsed: float, outcome: str, error: BaseException | None, started: Any
    ) -> None:
        self._children[outcome].observe(elapsed)
        if outcome == ERROR and error is not None:
            target.count_external_error(self.service, self.endpoint, error, since=started)


class _ErrorsProbe(_Probe):
    metrics: tuple[str, ...] = ("application_errors_total", "application_error_details_total")
    site = "tracked_errors"
    errors_only = True

    def __init__(
        self,
        instrumentation: PrometheusInstrumentation | None,
        component: str,
        error_type: str | None,
        taxonomy: ErrorTaxonomy,
        function: str,
    ) -> None:
        super().__init__(instrumentation)
        self.component, self.error_type, self.taxonomy, self.function = component, error_type, taxonomy, function
        # With its error_type fixed, that category's counter; classified, any category's.
        categories = [CATEGORY_COUNTERS.get(error_type)] if error_type else list(CATEGORY_COUNTERS.values())
        self.metrics = (*type(self).metrics, *(name for name in categories if name is not None))

    def succeeded(self, state: Any) -> None:
        pass

    def finish(self, state: Any, error: BaseException | None) -> None:
        if error is None or not isinstance(error, Exception) or (self.iterator and isinstance(error, ITERATION_ENDS)):
            return
        try:
            target = self.bind()
            target.record_error(
                error,
                error_type=self.error_type or self.taxonomy.classify(error),
                component=self.component,
                user_type=target.user_type_label(None),
                endpoint=target.endpoint_label(None),
                function=self.function,
                since=state,
            )
        except Exception as failure:
            self.report(failure)


class _DurationProbe(_Probe):
    def __init__(self, instrumentation: PrometheusInstrumentation | None, metric: str, operation: str) -> None:
        super().__init__(instrumentation)
        self.metrics = (metric,)
        self.site = metric
        self.operation = operation
        self._child: Any = None

    def resolve(self, target: PrometheusInstrumentation) -> None:
        self._child = target.metric(self.metrics[0]).labels(self.operation)

    def succeeded(self, state: Any) -> None:
        elapsed = perf_counter() - state
        try:
            if (self._fixed or _instrumentation_module._default) is not self._bound:
                self.bind()
            self._child.observe(elapsed)
        except Exception as failure:
            self.report(failure)

    def record(
        self, target: PrometheusInstrumentation, elapsed: float, outcome: str, error: BaseException | None, started: Any
    ) -> None:
        self._child.observe(elapsed)


class _ChatProbe(_Probe):
    metrics = ("chat_processing_duration_seconds",)
    site = "tracked_chat"

    def __init__(
        self, instrumentation: PrometheusInstrumentation | None, endpoint: str | None, user_type: str | None
    ) -> None:
        super().__init__(instrumentation)
        self.endpoint, self.user_type = endpoint, user_type
        self._metric: LabelledMetric | None = None

    def resolve(self, target: PrometheusInstrumentation) -> None:
        self._metric = target.metric("chat_processing_duration_seconds")

    def record(
        self, target: PrometheusInstrumentation, elapsed: float, outcome: str, error: BaseException | None, started: Any
    ) -> None:
        assert self._metric is not None
        self._metric.labels(target.endpoint_label(self.endpoint), target.user_type_label(self.user_type)).observe(elapsed)


class _MemoryProbe(_Probe):
    metrics = ("memory_operations_total",)
    site = "tracked_memory_operation"

    def __init__(
        self, instrumentation: PrometheusInstrumentation | None, operation: str, memory_type: str, user_type: str | None
    ) -> None:
        super().__init__(instrumentation)
        self.operation, self.memory_type, self.user_type = operation, memory_type, user_type
        self._metric: LabelledMetric | None = None

    def resolve(self, target: PrometheusInstrumentation) -> None:
        self._metric = target.metric("memory_operations_total")

    def record(
        self, target: PrometheusInstrumentation, elapsed: float, outcome: str, error: BaseException | None, started: Any
    ) -> None:
        if outcome == SUCCESS:
            assert self._metric is not None
            self._metric.labels(self.operation, self.memory_type, target.user_type_label(self.user_type)).inc()


class _DocumentProbe(_Probe):
    metrics = ("document_operations_total",)
    site = "tracked_document_operation"

    def __init__(self, instrumentation: PrometheusInstrumentation | None, operation: str, document_type: str) -> None:
        super().__init__(instrumentation)
        self.operation, self.document_type = operation, document_type
        self._children: dict[str, Any] = {}

    def resolve(self, target: PrometheusInstrumentation) -> None:
        documents = target.metric("document_operations_total")
        self._children = {
            outcome: documents.labels(self.operation, self.document_type, outcome)
            for outcome in (SUCCESS, ERROR, CANCELLED)
        }

    @staticmethod
    def begin() -> Any:
        return 0.0

    def succeeded(self, state: Any) -> None:
        try:
            if (self._fixed or _instrumentation_module._default) is not self._bound:
                self.bind()
            self._children[SUCCESS].inc()
        except Exception as failure:
            self.report(failure)

    def record(
        self, target: PrometheusInstrumentation, elapsed: float, outcome: str, error: BaseException | None, started: Any
    ) -> None:
        self._children[outcome].inc()


class _SessionProbe(_Probe):
    metrics = ("active_sessions_current",)
    site = "tracked_session"

    def __init__(self, instrumentation: PrometheusInstrumentation | None, user_type: str | None) -> None:
        super().__init__(instrumentation)
        self.user_type = user_type

    def begin(self) -> Any:
        try:
            target = self.bind()
            child = target.metric("active_sessions_current").labels(target.user_type_label(self.user_type))
            child.inc()
            return child
        except Exception as failure:
            self.report(failure)
            return None

    def succeeded(self, state: Any) -> None:
        self.finish(state, None)

    def abandon(self, state: Any) -> None:
        self.finish(state, None)

    def finish(self, state: Any, error: BaseException | None) -> None:
        # Whatever ended the call, KeyboardInterrupt included: the gauge comes back down.
        if state is None:
            return
        try:
            state.dec()
        except Exception as failure:
            self.report(failure)
