"""The guard that bounds the distinct values of every label.

Each label of each metric admits at most ``cap`` distinct values; later new values fold into
:data:`~crowdmon.catalogue.OVERFLOW_VALUE` and ``crowdmon_label_overflow_total{metric,label}``
counts every fold, so the folding is visible.  Admitted values are remembered forever: a label
value, once a time series, stays one.

In multiprocess mode every worker's series end up on one ``/metrics``, the dead workers' included,
so the values are admitted for the whole server: :class:`SharedAdmissions` keeps them in the
multiprocess directory, and a worker started later (a restart, gunicorn's ``--max-requests``)
finds the labels as full as they are.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping

from crowdmon.catalogue import OVERFLOW_VALUE

#: Distinct values a label admits when no cap is configured for it.
DEFAULT_CAP = 200

#: Called with the metric, the label, and how many values were folded.
OverflowHook = Callable[[str, str, int], None]


class CardinalityGuard:
    """Caps distinct values per ``(metric, label)``.

    ``caps`` maps ``"metric"`` or ``"metric:label"`` to a cap; the more specific key wins.
    ``on_overflow(metric, label, times)`` is called for every fold; ``times`` is how many values
    were folded at once (a batch of requests with the same label set folds in one call).
    """

    def __init__(
        self,
        default_cap: int = DEFAULT_CAP,
        caps: Mapping[str, int] | None = None,
        on_overflow: OverflowHook | None = None,
    ) -> None:
        from crowdmon.instrumentation import CrowdmonSetupError  # defined after this module loads

        if isinstance(default_cap, bool) or not isinstance(default_cap, int) or default_cap < 1:
            raise CrowdmonSetupError(f"default_cap must be a positive int, got {default_cap!r}")
        for key, cap in (caps or {}).items():
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise CrowdmonSetupError(f"cap for {key!r} must be a positive int, got {cap!r}")
        self.default_cap = default_cap
        self._caps = dict(caps or {})
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()
        self.on_overflow = on_overflow
        #: Where the values admitted by every process of a multi-worker server are kept.
        self.shared: SharedAdmissions | None = None
        # Labels that reached their cap across the server: what they admitted is in _seen.
        self._full: set[tuple[str, str]] = set()

    @property
    def caps(self) -> dict[str, int]:
        """The caps configured per ``"metric"`` or ``"metric:label"`` (a copy)."""
        return dict(self._caps)

    def cap_for(self, metric: str, label: str) -> int:
        caps = self._caps
        return caps.get(f"{metric}:{label}", caps.get(metric, self.default_cap))

    def admit(self, metric: str, label: str, value: str, times: int = 1) -> str:
        """``value`` if the label may hold it, else the overflow value, and the fold is counted
        ``times`` times (once per value it stands for)."""
        seen = self._seen.get((metric, label))
        if seen is not None and value in seen:
            return value
        with self._lock:
            key = (metric, label)
            seen = self._seen.setdefault(key, set())
            if value in seen:
                return value
            cap = self.cap_for(metric, label)
            if self.shared is not None and key not in self._full:
                try:
                    admitted, everyone = self.shared.admit(metric, label, value, cap)
                except Exception:  # the directory failed us: this process's own count decides
                    pass
                else:
                    seen |= everyone
                    if len(everyone) >= cap:
                        self._full.add(key)
                    if admitted:
                        return value
                    cap = 0
            if len(seen) < cap:  # a full label's values are all in seen
                seen.add(value)
                return value
        if self.on_overflow is not None:
            self.on_overflow(metric, label, times)
        return OVERFLOW_VALUE

    def admit_all(self, metric: str, labels: tuple[str, ...], values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.admit(metric, label, value) for label, value in zip(labels, values, strict=True))

    def distinct_values(self, metric: str, label: str) -> int:
        """How many distinct values ``label`` of ``metric`` holds (the overflow value excluded)."""
        return len(self._seen.get((metric, label), ()))


class SharedAdmissions:
    """The label values admitted by every process writing to one multiprocess ``directory``: a
    file per label (``crowdmon_labels_<metric>__<label>.jsonl``, a JSON string per line),
    read and appended under an exclusive lock.  A process asks only for values it has not seen,
    and no more once the label is full, so the files are touched at most ``cap`` times per label
    and process."""

    PREFIX = "crowdmon_labels_"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, metric: str, label: str) -> str:
        return os.path.join(self.directory, f"{self.PREFIX}{metric}__{label}.jsonl")

    @staticmethod
    def available() -> bool:
        """Whether this platform has the file locks the files are shared under (POSIX)."""
        try:
            import fcntl  # noqa: F401
        except ImportError:
            return False
        return True

    def admit(self, metric: str, label: str, value: str, cap: int) -> tuple[bool, set[str]]:
        """Whether ``value`` is admitted (it was already, or there was room), and every value
        admitted so far."""
        import fcntl

        with open(self.path(metric, label), "a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                file.seek(0)
                text = file.read()
                admitted = set(_values(text))
                if value in admitted:
                    return True, admitted
                if len(admitted) >= cap:
                    return False, admitted
                # A line a process left unfinished (killed mid-write, a full disk) is ended
                # first, so it spoils only itself.
                file.write(("\n" if text and not text.endswith("\n") else "") + json.dumps(value) + "\n")
                file.flush()
                admitted.add(value)
                return True, admitted
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)


def _values(text: str) -> Iterator[str]:
    """The values of a file of :class:`SharedAdmissions`: every whole line that is a JSON string."""
    for line in text.split("\n")[:-1]:  # the last piece is unfinished, or empty
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, str):
            yield value
