"""The ``/health`` endpoint: every component's state and an overall status, as JSON.

Each request first runs the registered health checks (concurrently; sync ones in a worker thread),
each bounded by its timeout, and sets ``component_health_status`` from their answers.  A sync check
that hangs keeps its worker thread after its timeout; it is not started again until it returns, so
a hung check holds one thread, not one per ``/health`` request.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

import anyio
import anyio.to_thread

from crowdmon._types import Receive, Scope, Send
from crowdmon.catalogue import HEALTH_STATES
from crowdmon.instrumentation import HealthCheck, PrometheusInstrumentation, default_instrumentation

logger = logging.getLogger("crowdmon")


def overall_status(states: dict[str, str]) -> str:
    """``unhealthy`` if any component is, else ``degraded`` if any is, else ``healthy``."""
    values = set(states.values())
    for state in ("unhealthy", "degraded"):
        if state in values:
            return state
    return "healthy"


#: Components whose sync check is still running in a worker thread.
_running_in_threads: set[tuple[int, str]] = set()


async def run_health_checks(instrumentation: PrometheusInstrumentation) -> dict[str, str]:
    """Run every registered check and record its state; returns a reason for each failed check."""
    failures: dict[str, str] = {}

    async def run(check: HealthCheck) -> None:
        state, reason = await _run_one(check, (id(instrumentation.registry), check.component))
        instrumentation.set_component_health(check.component, state)
        if reason:
            failures[check.component] = reason

    async with anyio.create_task_group() as group:
        for check in instrumentation.health_checks():
            group.start_soon(run, check)
    return failures


async def _run_one(check: HealthCheck, key: tuple[int, str]) -> tuple[str, str]:
    try:
        with anyio.fail_after(check.timeout):
            if inspect.iscoroutinefunction(check.check):
                answer = await check.check()
            else:
                if key in _running_in_threads:
                    return "unhealthy", "still running since an earlier request"
                _running_in_threads.add(key)

                def in_thread() -> Any:
                    try:
                        return check.check()
                    finally:
                        _running_in_threads.discard(key)

                answer = await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
                if inspect.isawaitable(answer):
                    answer = await answer
    except TimeoutError:
        return "unhealthy", f"timed out after {check.timeout:g} s"
    except Exception as error:
        # The class name only: a message may carry hosts, credentials or user data.
        logger.warning("health check for %r failed", check.component, exc_info=error)
        return "unhealthy", f"raised {type(error).__name__}"
    return _state_of(check.component, answer)


def _state_of(component: str, answer: Any) -> tuple[str, str]:
    if answer is None or answer is True:
        return "healthy", ""
    if answer is False:
        return "unhealthy", "check returned False"
    if isinstance(answer, str) and answer in HEALTH_STATES:
        return answer, "" if answer == "healthy" else f"check returned {answer!r}"
    return "unhealthy", (
        f"check returned {type(answer).__name__}; a check returns True, False, None or one of "
        f"{', '.join(HEALTH_STATES)}"
    )


class HealthApp:
    """An ASGI app answering 200 with the components' states, or 503 when one is unhealthy."""

    def __init__(self, instrumentation: PrometheusInstrumentation | None = None) -> None:
        self.instrumentation = instrumentation or default_instrumentation()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            failures = await run_health_checks(self.instrumentation)
        except Exception as error:
            self.instrumentation.report_internal_error("health", error)
            failures = {}
        components = self.instrumentation.component_health()
        status = overall_status(components)
        document: dict[str, Any] = {"status": status, "components": components}
        if failures:
            document["failures"] = failures
        body = json.dumps(document).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503 if status == "unhealthy" else 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})
