"""Helpers for testing your own instrumentation, and a pytest plugin.

``crowdmon_instrumentation`` (a pytest fixture) gives each test an instrumentation on a registry of
its own and makes it the process-wide default for the test, so decorators applied at import time,
module-level tracking functions and ``setup_monitoring(app)`` all record into it.  The plugin loads
by itself once crowdmon is installed (entry point ``pytest11``); otherwise add
``-p crowdmon.testing`` or ``pytest_plugins = ["crowdmon.testing"]`` in your root ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from crowdmon.catalogue import BY_NAME, MetricKind
from crowdmon.decorators import instrumented_metrics
from crowdmon.instrumentation import (
    CrowdmonSetupError,
    PrometheusInstrumentation,
    default_instrumentation,
    replace_default_instrumentation,
    values_in_files,
)

try:
    import pytest
except ImportError:  # pragma: no cover - the helpers work without pytest
    pytest = None  # type: ignore[assignment]


@contextlib.contextmanager
def isolated_instrumentation(**options: Any) -> Iterator[PrometheusInstrumentation]:
    """An instrumentation on a fresh registry, standing in as the process-wide default until the
    block ends.  ``options`` go to :class:`PrometheusInstrumentation` (e.g. ``cardinality_caps``)."""
    if values_in_files():
        raise CrowdmonSetupError(
            "PROMETHEUS_MULTIPROC_DIR is set, so prometheus_client keeps every value in files that "
            "outlive each test's registry: counts would leak from one test into the next (and into "
            "that directory). Unset it for the test run: env -u PROMETHEUS_MULTIPROC_DIR pytest"
        )
    instrumentation = PrometheusInstrumentation(CollectorRegistry(), **options)
    previous = replace_default_instrumentation(instrumentation)
    try:
        yield instrumentation
    finally:
        replace_default_instrumentation(previous)


def metric_value(
    name: str,
    labels: Mapping[str, str] | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
) -> float:
    """The current value of one sample; 0.0 when it does not exist yet.  Without ``labels``, the
    samples of ``name`` under any labels, added up (as :func:`assert_metric` does).

    ``name`` is a sample name (``"chat_messages_total"``, ``"vector_search_duration_seconds_sum"``);
    a histogram's family name means its ``_count``.  A label the catalogue metric does not have
    raises ``ValueError``: it could only ever read 0."""
    registry = (instrumentation or default_instrumentation()).registry
    found = _read(registry, _sample_name(name), labels)
    return 0.0 if found is None else found


def _as_label(label: str, value: object) -> str:
    """``value`` written as prometheus_client writes it in a sample: booleans as crowdmon does,
    a bucket bound as a float (``le="1.0"``, ``le="+Inf"``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if label == "le" and isinstance(value, (int, float)):
        return "+Inf" if value == float("inf") else str(float(value))
    return str(value)


def _read(registry: CollectorRegistry, sample: str, labels: Mapping[str, str] | None) -> float | None:
    """The sample's value; the sum of the samples that have ``labels`` when they are only some of
    the family's labels, or of all its samples when ``labels`` is ``None``; ``None`` if there is
    none."""
    wanted = dict(labels or {})
    if labels is not None:
        _check_label_names(sample, labels)
    for label, value in wanted.items():
        if not isinstance(value, str):
            raise ValueError(f"label values are strings: {label}={value!r} can never match; write {label}={_as_label(label, value)!r}")
    if sample.endswith("_bucket") and "le" not in wanted:
        needs = "its labels, le included" if labels is None else "its le label"
        raise ValueError(f"{sample} needs {needs}: its samples are cumulative, and adding them up means nothing")
    # The samples that have the labels given, added up (all of them: the one sample; none
    # given: the whole family).
    families = list(registry.collect())
    values = [
        s.value for family in families for s in family.samples
        if s.name == sample and all(s.labels.get(label) == value for label, value in wanted.items())
    ]
    if not values:
        _check_sample_name(sample, families)
    return sum(values) if values else None


#: The samples of each kind of family, by their suffix (prometheus_client's types).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _check_sample_name(sample: str, families: list[Any]) -> None:
    """Refuse a name no metric of the registry has a sample of: it could only ever read 0 (a
    typo, or prometheus_client's family name ``application_errors`` for the counter
    ``application_errors_total``)."""
    known = {s.name for family in families for s in family.samples}
    for family in families:
        known.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    if sample in known:
        return
    close = difflib.get_close_matches(sample, sorted(known), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"no metric in this registry has a sample named {sample!r}, so it could only ever read 0{hint}")


def _check_label_names(sample: str, labels: Mapping[str, str]) -> None:
    specs = (BY_NAME.get(sample.removesuffix(suffix)) for suffix in ("", "_bucket", "_count", "_sum", "_created"))
    spec = next((found for found in specs if found is not None), None)
    if spec is None:
        return  # not a catalogue metric: nothing to check against
    known = set(spec.labels) | ({"le"} if sample.endswith("_bucket") else set())
    unknown = sorted(set(labels) - known)
    if unknown:
        raise ValueError(f"{spec.name} has no label {unknown[0]!r}; its labels are: {', '.join(spec.labels) or '(none)'}")


def assert_metric(
    name: str,
    labels: Mapping[str, str] | None = None,
    value: float | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
) -> float:
    """Assert the sample ``name{labels}`` exists (and equals ``value``, when given); returns it.
    Without ``labels``, the samples of ``name`` under any labels, added up.

    The failure message lists the samples the family does have, so a wrong label shows at once."""
    registry = (instrumentation or default_instrumentation()).registry
    sample = _sample_name(name)
    found = _read(registry, sample, labels)
    if found is None or (value is not None and found != value):
        expected = "to exist" if value is None else f"to be {value!r}"
        got = "it does not exist" if found is None else f"it is {found!r}"
        raise AssertionError(
            f"expected {sample}{_format(labels)} {expected}, but {got}.\n"
            f"Samples of this family:\n{_family_listing(registry, sample)}"
        )
    return found


class MetricDelta:
    """How much one sample changed inside a ``with metric_delta(...)`` block."""

    def __init__(self, name: str, labels: Mapping[str, str] | None, instrumentation: PrometheusInstrumentation | None) -> None:
        self.name = _sample_name(name)
        self.labels = None if labels is None else dict(labels)
        # The registry of the block: the default instrumentation may be replaced after it.
        self._registry = (instrumentation or default_instrumentation()).registry
        self.before = 0.0
        self.after: float | None = None

    def _read(self) -> float:
        found = _read(self._registry, self.name, self.labels)
        return 0.0 if found is None else found

    @property
    def value(self) -> float:
        """The change so far (the final change once the block has ended)."""
        after = self._read() if self.after is None else self.after
        return after - self.before

    def assert_incremented(self, by: float = 1.0) -> None:
        """Assert the sample grew by exactly ``by``."""
        if self.value != by:
            registry = self._registry
            raise AssertionError(
                f"expected {self.name}{_format(self.labels)} to grow by {by!r}, but it changed by "
                f"{self.value!r} (from {self.before!r}).\n"
                f"Samples of this family:\n{_family_listing(registry, self.name)}"
            )

    def assert_unchanged(self) -> None:
        """Assert the sample did not change."""
        self.assert_incremented(0.0)


@contextlib.contextmanager
def metric_delta(
    name: str,
    labels: Mapping[str, str] | None = None,
    *,
    instrumentation: PrometheusInstrumentation | None = None,
) -> Iterator[MetricDelta]:
    """``with metric_delta("chat_messages_total", {...}) as d: ...`` then ``d.assert_incremented()``."""
    delta = MetricDelta(name, labels, instrumentation)
    delta.before = delta._read()
    try:
        yield delta
    finally:
        delta.after = delta._read()


def assert_instrumented(func: object, *metrics: str) -> tuple[str, ...]:
    """Assert crowdmon decorators are on ``func`` and, if named, record into every one of
    ``metrics``; returns the metrics they record into."""
    found = instrumented_metrics(func)
    name = getattr(func, "__qualname__", repr(func))
    if not found:
        raise AssertionError(f"{name} carries no crowdmon decorator (or CROWDMON_DISABLED is set)")
    missing = [metric for metric in metrics if metric not in found]
    if missing:
        raise AssertionError(f"{name} records into {', '.join(found)}, not into {', '.join(missing)}")
    return found


def _sample_name(name: str) -> str:
    spec = BY_NAME.get(name)
    if spec is not None and spec.kind == MetricKind.HISTOGRAM:
        return name + "_count"
    return name


def _format(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


def _family_listing(registry: CollectorRegistry, sample: str) -> str:
    lines = []
    for family in registry.collect():
        for item in family.samples:
            if item.name == sample:
                lines.append(f"  {item.name}{_format(item.labels)} {item.value!r}")
    return "\n".join(lines[:50]) or "  (none)"


if pytest is not None:

    @pytest.fixture
    def crowdmon_instrumentation() -> Iterator[PrometheusInstrumentation]:
        """An instrumentation on its own registry, the process-wide default for this test."""
        with isolated_instrumentation() as instrumentation:
            yield instrumentation
