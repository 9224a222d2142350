"""Timing a block of code: the one outcome rule shared by context managers and decorators.

| what leaves the block                 | duration                    | counted as error | re-raised |
| ------------------------------------- | --------------------------- | ---------------- | --------- |
| nothing (return, stream exhausted)    | observed, outcome success   | no               | —         |
| an ``Exception``                      | observed, outcome error     | once per metric  | unchanged |
| cancellation (asyncio / anyio / trio) | observed, outcome cancelled | no               | unchanged |
| ``GeneratorExit`` (stream closed)     | observed, outcome success   | no               | unchanged |
| ``StopIteration``, ``StopAsyncIteration`` leaving a ``__next__`` or ``__anext__`` (its end) | observed, outcome success | no | unchanged |
| ``KeyboardInterrupt``/``SystemExit``  | not observed                | no               | unchanged |
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from time import perf_counter
from types import TracebackType
from typing import Any

SUCCESS, ERROR, CANCELLED = "success", "error", "cancelled"
#: What ends an iterator: control flow when it leaves a ``__next__`` or ``__anext__``, a bug
#: anywhere else (a ``next()`` on an empty iterator that leaked out of a function).
ITERATION_ENDS = (StopIteration, StopAsyncIteration)


def outcome_of(error: BaseException | None, *, iterator: bool = False) -> str | None:
    """The outcome label for what left a block (``iterator``: the block is an iterator's
    ``__next__`` or ``__anext__``), or ``None`` when nothing is to be observed."""
    if error is None or isinstance(error, GeneratorExit) or (iterator and isinstance(error, ITERATION_ENDS)):
        return SUCCESS
    if isinstance(error, Exception):
        return ERROR
    if _is_cancellation(error):
        return CANCELLED
    if only_leaves(error, lambda leaf: isinstance(leaf, Exception) or _is_cancellation(leaf)):
        return ERROR  # a group of failures and cancellations: something failed
    return None  # KeyboardInterrupt, SystemExit: the process is going away


def _is_cancellation(error: BaseException) -> bool:
    # trio's Cancelled (under anyio) is a BaseException that is not asyncio's.
    return only_leaves(error, lambda leaf: isinstance(leaf, asyncio.CancelledError) or type(leaf).__name__ == "Cancelled")


#: ``BaseExceptionGroup``, a builtin from Python 3.11 on.
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", None)


def is_exception_group(error: BaseException) -> bool:
    """Whether ``error`` is a ``BaseExceptionGroup`` (Python 3.11 on; on 3.10 nothing is)."""
    return _GROUP is not None and isinstance(error, _GROUP)


def only_leaves(error: BaseException, leaf: Callable[[BaseException], bool]) -> bool:
    """``leaf(error)``; for an exception group (a trio nursery's, an asyncio ``TaskGroup``'s),
    whether every exception in it, however deeply nested, is such a leaf."""
    if _GROUP is not None and isinstance(error, _GROUP):  # narrowed to the group type
        return all(only_leaves(inner, leaf) for inner in error.exceptions)
    return leaf(error)


class Timing:
    """Observes the time a block took into the histogram child ``observer(outcome)`` returns.

    ``on_error(error, started)`` runs for an ``Exception`` leaving the block, with the block's
    ``perf_counter`` start (see :func:`crowdmon.instrumentation.first_count`).  Failures of the
    recording itself go to ``report`` and never into the timed code.
    """

    __slots__ = ("_observer", "_on_error", "_report", "_start")

    def __init__(
        self,
        observer: Callable[[str], Any],
        report: Callable[[str, BaseException], None],
        on_error: Callable[[BaseException, float], None] | None = None,
    ) -> None:
        self._observer = observer
        self._report = report
        self._on_error = on_error
        self._start = 0.0

    def __enter__(self) -> Timing:
        self._start = perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        elapsed = perf_counter() - self._start
        try:
            outcome = outcome_of(error)
            if outcome is None:
                return
            self._observer(outcome).observe(elapsed)
            if outcome == ERROR and self._on_error is not None:
                assert error is not None
                self._on_error(error, self._start)
        except Exception as failure:
            self._report("timing", failure)

    async def __aenter__(self) -> Timing:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, error, traceback)
