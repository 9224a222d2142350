"""The seed's tracking API as module-level functions on the process-wide default instrumentation.

``from crowdmon import track_chat_message`` records into the same metrics as
``setup_monitoring(app)`` (given no registry) serves on ``/metrics``.  What records never raises a
set-up error into the request that first builds the default (see
:func:`~crowdmon.instrumentation.recording_instrumentation`); the two ``register_*`` functions,
which are set-up, do; the rest then records nothing.
"""

from __future__ import annotations

from crowdmon.instrumentation import (
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    UNRECORDED,
    HealthCheckFunction,
    SessionScope,
    default_instrumentation,
    recording_instrumentation,
)
from crowdmon.timing import Timing


def _unrecorded() -> Timing:
    """A block timed into nothing: the default instrumentation could not be built (logged)."""
    return Timing(lambda outcome: UNRECORDED, lambda site, error: None)


def track_request_performance(endpoint: str | None = None, user_type: str | None = None) -> Timing:
    """``with``/``async with``: time chat processing into ``chat_processing_duration_seconds``."""
    target = recording_instrumentation()
    return _unrecorded() if target is None else target.track_request_performance(endpoint, user_type)


def track_external_api_call(service: str, endpoint: str) -> Timing:
    """``with``/``async with``: time an external call into ``external_api_duration_seconds``."""
    target = recording_instrumentation()
    return _unrecorded() if target is None else target.track_external_api_call(service, endpoint)


def track_vector_search(operation: str) -> Timing:
    """``with``/``async with``: time a vector search into ``vector_search_duration_seconds``."""
    target = recording_instrumentation()
    return _unrecorded() if target is None else target.track_vector_search(operation)


def track_database_query(operation: str) -> Timing:
    """``with``/``async with``: time a query into ``database_query_duration_seconds``."""
    target = recording_instrumentation()
    return _unrecorded() if target is None else target.track_database_query(operation)


def track_chat_message(
    user_type: str | None = None,
    message_type: str = "user",
    cache_hit: bool = False,
    rag_used: bool = False,
) -> None:
    """Count one chat message in ``chat_messages_total``."""
    target = recording_instrumentation()
    if target is not None:
        target.track_chat_message(user_type, message_type, cache_hit, rag_used)


def track_memory_operation(operation: str, memory_type: str, user_type: str | None = None) -> None:
    """Count one memory operation in ``memory_operations_total``."""
    target = recording_instrumentation()
    if target is not None:
        target.track_memory_operation(operation, memory_type, user_type)


def track_document_operation(operation: str, document_type: str, status: str = "success") -> None:
    """Count one document operation in ``document_operations_total``."""
    target = recording_instrumentation()
    if target is not None:
        target.track_document_operation(operation, document_type, status)


def track_application_error(
    error_type: str | None,
    component: str,
    error: BaseException,
    user_type: str | None = None,
    endpoint: str | None = None,
    function: str | None = None,
) -> None:
    """Count ``error`` in ``application_errors_total``, the details and its category's counter."""
    target = recording_instrumentation()
    if target is not None:
        target.track_application_error(error_type, component, error, user_type, endpoint, function)


def start_session(user_type: str | None = None) -> None:
    """One more active session in ``active_sessions_current``."""
    target = recording_instrumentation()
    if target is not None:
        target.start_session(user_type)


def end_session(user_type: str | None = None) -> None:
    """One active session fewer in ``active_sessions_current``."""
    target = recording_instrumentation()
    if target is not None:
        target.end_session(user_type)


def track_session(user_type: str | None = None) -> SessionScope:
    """``with``/``async with``: one active session for the duration of the block."""
    target = recording_instrumentation()
    return SessionScope.unrecorded() if target is None else target.track_session(user_type)


def register_component(component: str) -> None:
    """Make ``component`` known to ``component_health_status``, as ``unknown``."""
    default_instrumentation().register_component(component)


def register_health_check(
    component: str, check: HealthCheckFunction, *, timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
) -> None:
    """Run ``check`` on every ``/health`` request to set ``component``'s state."""
    default_instrumentation().register_health_check(component, check, timeout=timeout)


def set_component_healthy(component: str) -> None:
    target = recording_instrumentation()
    if target is not None:
        target.set_component_healthy(component)


def set_component_degraded(component: str) -> None:
    target = recording_instrumentation()
    if target is not None:
        target.set_component_degraded(component)


def set_component_unhealthy(component: str) -> None:
    target = recording_instrumentation()
    if target is not None:
        target.set_component_unhealthy(component)


def component_health() -> dict[str, str]:
    """Every registered component and its current state."""
    target = recording_instrumentation()
    return {} if target is None else target.component_health()
