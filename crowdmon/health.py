"""The ``/health`` endpoint: every component's state and an overall status, as JSON.

Each request first runs the registered health checks (concurrently; sync ones in a worker thread),
each bounded by its timeout, and sets ``component_health_status`` from their answers.  A sync check
already running for another request (two probes at once) is not started again: the later request
waits for that run's answer, within its own timeout.  A sync check that hangs keeps its worker
thread after its timeout, so a hung check holds one thread, not one per ``/health`` request; a run
that never got a thread before its timeout is dropped, and the next request starts afresh.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import weakref
from typing import Any

import anyio
import anyio.to_thread

from crowdmon._types import Receive, Scope, Send
from crowdmon.catalogue import HEALTH_STATES
from crowdmon.instrumentation import (
    HealthCheck,
    PrometheusInstrumentation,
    check_instrumentation,
    default_instrumentation,
)

logger = logging.getLogger("crowdmon")


def overall_status(states: dict[str, str]) -> str:
    """``unhealthy`` if any component is, else ``degraded`` if any is, else ``healthy``."""
    values = set(states.values())
    for state in ("unhealthy", "degraded"):
        if state in values:
            return state
    return "healthy"


class _SyncRun:
    """One run of a sync check in a worker thread, shared by the requests that ask meanwhile."""

    def __init__(self, key: tuple[str, int], check: Any) -> None:
        self.key = key
        self.check = check  # the callable run, kept: the id in the key stays its own
        self.lock = threading.Lock()
        self.state = "queued"  # then "running" and "done", or "dropped" if it never started
        self.answer: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        """In the worker thread: the check's answer or exception, kept for every waiting request."""
        with self.lock:
            if self.state == "dropped":  # its request gave up before a thread was free
                return
            self.state = "running"
        try:
            self.answer = self.check()
        except BaseException as error:  # SystemExit too: in a worker thread it ends only the thread
            self.error = error
        finally:
            with self.lock:
                self._end("done")

    def drop_unless_started(self) -> None:
        with self.lock:
            if self.state == "queued":
                self._end("dropped")

    def _end(self, state: str) -> None:
        """(Holding the lock.)  The next request for this check starts a run of its own."""
        self.state = state
        if _sync_runs.get(self.key) is self:
            del _sync_runs[self.key]


#: Sync checks queued or running in a worker thread, by component and callable: a check
#: registered again with the same callable waits for the run under way, as another probe does.
_sync_runs: dict[tuple[str, int], _SyncRun] = {}


async def run_health_checks(instrumentation: PrometheusInstrumentation) -> tuple[dict[str, str], dict[str, str]]:
    """Run every registered check and record its state; returns the states this run found and a
    reason for each failed check."""
    states: dict[str, str] = {}
    failures: dict[str, str] = {}

    async def run(check: HealthCheck) -> None:
        state, reason = await _run_one(check)
        instrumentation.set_component_health(check.component, state)
        states[check.component] = state
        if reason:
            failures[check.component] = reason

    async with anyio.create_task_group() as group:
        for check in instrumentation.health_checks():
            group.start_soon(run, check)
    return states, failures


async def _run_one(check: HealthCheck) -> tuple[str, str]:
    answer: Any = None
    try:
        # move_on_after, not fail_after: a TimeoutError the check raises itself is its failure.
        with anyio.move_on_after(check.timeout) as deadline:
            if inspect.iscoroutinefunction(check.check):
                answer = await check.check()
            else:
                answer = await _run_in_thread(check)
                if inspect.isawaitable(answer):
                    answer = await answer
        if deadline.cancelled_caught:
            return "unhealthy", f"timed out after {check.timeout:g} s"
        _failing.discard(check)  # it ran and answered: a failure after this one is logged again
    except anyio.get_cancelled_exc_class() as error:
        if _being_cancelled():
            raise
        # The check's own: it awaited something cancelled elsewhere.  A failed check, not ours.
        return _failed(check, error)
    except _ThreadExited as exited:
        return _failed(check, exited.error)
    except Exception as error:
        return _failed(check, error)
    return _state_of(check.component, answer)


def _failed(check: HealthCheck, error: BaseException) -> tuple[str, str]:
    # Logged with its traceback when the check starts failing, not at every probe of a check
    # that keeps failing (a probe every few seconds would flood the log).
    if check not in _failing:
        _failing.add(check)
        logger.warning("health check for %r failed (logged again only after a run that answers in time)", check.component, exc_info=error)
    # The class name only: a message may carry hosts, credentials or user data.
    return "unhealthy", f"raised {type(error).__name__}"


#: The registered checks whose last run raised: their next failure is not logged.  A check
#: registered again is a new one; one no longer registered is let go of.
_failing: weakref.WeakSet[HealthCheck] = weakref.WeakSet()


class _ThreadExited(Exception):
    """A sync check ended its worker thread with a ``BaseException`` that is not an
    ``Exception`` (``SystemExit``): the check failed, and the server goes on."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error


async def _run_in_thread(check: HealthCheck) -> Any:
    """The answer of the sync check's run: a new one, or the one already under way."""
    key = (check.component, id(check.check))
    run = _sync_runs.get(key)
    if run is None:
        run = _sync_runs[key] = _SyncRun(key, check.check)
        try:
            await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except BaseException:
            run.drop_unless_started()
            raise
    else:
        while run.state != "done":
            await anyio.sleep(0.01)
        if run.error is None and inspect.isawaitable(run.answer):
            # A sync callable returning a coroutine (``lambda: ping()``): one coroutine is
            # awaited once, by the request that started the run; this one calls for its own.
            return await anyio.to_thread.run_sync(check.check, abandon_on_cancel=True)
    if run.error is not None:
        if isinstance(run.error, Exception):
            raise run.error
        raise _ThreadExited(run.error)
    return run.answer


def _being_cancelled() -> bool:
    """Whether the running task is being cancelled from outside (asyncio; under other event
    loops a cancellation is always taken for the caller's)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return True
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0


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
        check_instrumentation("HealthApp", instrumentation)
        self._instrumentation = instrumentation

    @property
    def instrumentation(self) -> PrometheusInstrumentation:
        """The one given, else the process-wide default at each request."""
        return self._instrumentation or default_instrumentation()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            found, failures = await run_health_checks(self.instrumentation)
        except Exception as error:
            self.instrumentation.report_internal_error("health", error)
            found, failures = {}, {}
        # What this request's checks found, over the states the others last set: the answer
        # agrees with its own failures though a concurrent probe finished after it.
        components = {**self.instrumentation.component_health(), **found}
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
