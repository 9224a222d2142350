"""PromQL built from catalogue entries, shared by the dashboards and the alert rules.

Every builder takes a metric *name*, looks it up in the catalogue and checks each label it is
asked to group or filter by, so a query naming something the catalogue lacks fails when the
operations pack is generated, not months later as an empty panel.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from crowdmon.catalogue import MetricKind, MetricSpec, spec
from crowdmon.ops.promql import TARGET_LABELS

#: Handlers whose requests are probes or scrapes, not users' traffic, unless told otherwise.
PROBE_HANDLERS = ("/health", "/metrics")
#: The chat messages that answer: a user's own message is never served from the cache nor made
#: with retrieval, so the cache hit and RAG shares are shares of the other messages.
ANSWERS = ('message_type!="user"',)


@dataclass(frozen=True)
class Scope:
    """The matchers every query carries: Grafana variables on dashboards, a job in rules."""

    matchers: tuple[str, ...]
    #: The range of ``rate()`` and quantiles.
    window: str
    #: The range of the rules that count events over a longer span (``increase()``).
    long_window: str = "15m"
    #: Handlers whose requests are not users' traffic (probes, scrapes).
    probe_handlers: tuple[str, ...] = PROBE_HANDLERS
    #: Handlers slow by design (an LLM answer), left out of the request latency alert.
    slow_handlers: tuple[str, ...] = ()

    def selector(self, metric: MetricSpec, series: str, extra: Sequence[str] = ()) -> str:
        for matcher in extra:
            label = re.match(r"\w*", matcher).group()  # type: ignore[union-attr]  # \w* always matches
            _require_labels(metric, [label], allow_le=series.endswith("_bucket"))
        return f"{series}{{{', '.join((*self.matchers, *extra))}}}"


DASHBOARD_SCOPE = Scope(('job=~"$job"', 'instance=~"$instance"'), "$__rate_interval")


def rule_scope(
    job: str, window: str = "5m", long_window: str = "15m", probe_handlers: Sequence[str] = PROBE_HANDLERS, slow_handlers: Sequence[str] = ()
) -> Scope:
    return Scope((f'job="{job}"',), window, long_window, tuple(probe_handlers), tuple(slow_handlers))


def _require_labels(metric: MetricSpec, labels: Sequence[str], *, allow_le: bool = False) -> None:
    allowed = set(metric.labels) | TARGET_LABELS | ({"le"} if allow_le else set())
    missing = [name for name in labels if name not in allowed]
    if missing:
        raise ValueError(
            f"{metric.name} has no label {missing[0]!r} (it has {', '.join(metric.labels)}); "
            "fix the query or the catalogue"
        )


def _by(labels: Sequence[str]) -> str:
    return f" by ({', '.join(labels)})" if labels else ""


def counter_rate(name: str, scope: Scope, by: Sequence[str] = (), extra: Sequence[str] = (), *, window: str | None = None, function: str = "rate") -> str:
    """``sum by (...) (rate(name{...}[window]))`` for a catalogue counter (or a histogram's
    ``_count`` when ``name`` is a histogram)."""
    metric = spec(name)
    series = name + "_count" if metric.kind == MetricKind.HISTOGRAM else name
    if metric.kind == MetricKind.GAUGE:
        raise ValueError(f"{name} is a gauge; rate() needs a counter")
    _require_labels(metric, by)
    return f"sum{_by(by)} ({function}({scope.selector(metric, series, extra)}[{window or scope.window}]))"


def gauge_sum(name: str, scope: Scope, by: Sequence[str] = (), extra: Sequence[str] = (), *, aggregation: str = "sum") -> str:
    """``sum by (...) (name{...})`` for a catalogue gauge."""
    metric = spec(name)
    if metric.kind != MetricKind.GAUGE:
        raise ValueError(f"{name} is a {metric.kind.value}, not a gauge")
    _require_labels(metric, by)
    return f"{aggregation}{_by(by)} ({scope.selector(metric, name, extra)})"


def quantile(q: float, name: str, scope: Scope, by: Sequence[str] = (), extra: Sequence[str] = ()) -> str:
    """``histogram_quantile(q, sum by (le, ...) (rate(name_bucket{...}[window])))``."""
    metric = spec(name)
    if metric.kind != MetricKind.HISTOGRAM:
        raise ValueError(f"{name} is a {metric.kind.value}; quantiles need a histogram")
    _require_labels(metric, by)
    selector = scope.selector(metric, name + "_bucket", extra)
    return f"histogram_quantile({q}, sum by ({', '.join(('le', *by))}) (rate({selector}[{scope.window}])))"


def rate_or_zero(name: str, scope: Scope, by: Sequence[str], extra: Sequence[str]) -> str:
    """``counter_rate`` of the series matching ``extra``, and 0 for ``by`` groups that have
    traffic but no such series (a panel of errors then reads 0, not "no data")."""
    return f"{counter_rate(name, scope, by, extra)} or {counter_rate(name, scope, by)} * 0"


def ratio(name: str, scope: Scope, numerator: Sequence[str], by: Sequence[str] = (), denominator: Sequence[str] = ()) -> str:
    """The share of ``name``'s rate matching ``numerator`` matchers, per ``by`` group.  Groups with
    traffic but no matching series read 0, not "no data"."""
    part = counter_rate(name, scope, by, (*denominator, *numerator))
    whole = counter_rate(name, scope, by, denominator)
    return f"({part} or {whole} * 0) / {whole}"


def health_code(scope: Scope, codes: dict[str, int], by: Sequence[str] = ("component",)) -> str:
    """One number per component from the one-hot ``component_health_status``: the worst state
    across instances, coded by ``codes``."""
    metric = spec("component_health_status")
    terms = [
        f"{code} * {scope.selector(metric, metric.name, [matcher('status', '=', state)])}"
        for state, code in codes.items()
    ]
    return f"max{_by(by)} ({' + ignoring(status) '.join(terms)})"


def matcher(label: str, op: str, value: str) -> str:
    """A label matcher such as ``status="unhealthy"``, the value quoted for PromQL."""
    return f"{label}{op}{_quote(value)}"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
