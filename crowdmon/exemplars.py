"""Exemplars, opt-in: a trace id on ``crowdfunding_api_requests_total`` and on the request
duration histogram, in the OpenMetrics output.

A provider is called once per request, in the request's context, with the ASGI scope; it returns
the exemplar's labels (``{"trace_id": "..."}``) or ``None`` for no exemplar.  Built-in providers:
``"opentelemetry"`` (the current span, when the ``opentelemetry-api`` package is installed and
the span is sampled) and ``"traceparent"`` (the W3C ``traceparent`` request header, when sampled).
The latest exemplar of each series is kept and shown; the Prometheus text format has no exemplars,
so only scrapers asking for OpenMetrics see them.  prometheus_client's multiprocess mode keeps no
exemplars: there, asking for them warns and records none.
"""

from __future__ import annotations

import re
import time
import warnings
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

from crowdmon._recorder import DURATION, REQUESTS, BufferedRequestRecorder
from crowdmon._sharded import bucket_edges
from crowdmon._types import Scope
from crowdmon.instrumentation import CrowdmonSetupError, check_called_with_scope

if TYPE_CHECKING:
    from crowdmon.instrumentation import PrometheusInstrumentation

ExemplarProvider = Callable[[Scope], "Mapping[str, str] | None"]
_Latest = tuple[Mapping[str, str], float, float]

#: OpenMetrics: an exemplar's label names and values together hold at most 128 characters.
MAX_EXEMPLAR_RUNES = 128
#: Series with an exemplar kept at most, per metric; requests folded by the guard never show one.
MAX_SERIES = 4096
#: Label names already checked (a provider returns the same few names every time).
_VALID_NAMES: set[str] = set()
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: W3C Trace Context: version, trace id, parent id, flags, lower-case hex; a later version may
#: carry more fields after them, version 00 may not.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


class ExemplarsUnavailableWarning(RuntimeWarning):
    """Exemplars were asked for where prometheus_client cannot keep them (multiprocess mode)."""


def opentelemetry_exemplar(scope: Scope) -> dict[str, str] | None:
    """The current OpenTelemetry span's trace and span ids, if it is valid and sampled."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def traceparent_exemplar(scope: Scope) -> dict[str, str] | None:
    """The trace and span ids of the request's W3C ``traceparent`` header, if it is valid (as
    the W3C Trace Context recommendation has it: version ``ff`` and all-zero ids are not) and
    sampled."""
    for name, value in scope.get("headers") or ():
        if name == b"traceparent":
            match = _TRACEPARENT.fullmatch(value.strip())
            if match is None:
                return None
            version, trace_id, span_id, flags, more = match.groups()
            if version == b"ff" or (version == b"00" and more) or not int(flags, 16) & 1:
                return None
            if trace_id.strip(b"0") == b"" or span_id.strip(b"0") == b"":
                return None
            return {"trace_id": trace_id.decode(), "span_id": span_id.decode()}
    return None


def exemplar_provider(option: object) -> ExemplarProvider | None:
    """The provider an ``exemplars=`` option names: a callable, ``"opentelemetry"``,
    ``"traceparent"``, or ``None`` / ``False`` for none."""
    if option is None or option is False:
        return None
    if option == "opentelemetry":
        try:
            import opentelemetry.trace  # noqa: F401
        except ImportError:
            raise CrowdmonSetupError(
                "exemplars='opentelemetry' needs the OpenTelemetry API: pip install opentelemetry-api "
                "(and an SDK that records spans), or pass your own provider callable"
            ) from None
        return opentelemetry_exemplar
    if option == "traceparent":
        return traceparent_exemplar
    if callable(option) and not isinstance(option, (str, bool)):
        check_called_with_scope("exemplars", option)
        return option
    raise CrowdmonSetupError(
        f"exemplars must be 'opentelemetry', 'traceparent' or a callable taking the ASGI scope and "
        f"returning labels such as {{'trace_id': ...}} or None; got {option!r}"
    )


class RequestExemplars:
    """What the middleware calls per request, when exemplars are on."""

    def __init__(self, provider: ExemplarProvider, store: ExemplarStore) -> None:
        self.provider = provider
        self.store = store
        # The built-in providers always return valid labels; a user's are checked every time.
        self._check = provider not in (opentelemetry_exemplar, traceparent_exemplar)

    def observe(self, scope: Scope, method: str, handler: str, status: str, duration: float) -> None:
        labels = self.provider(scope)
        if labels:
            self.store.record(method, handler, status, duration, _checked(labels) if self._check else labels)


def request_exemplars(option: object, instrumentation: PrometheusInstrumentation) -> RequestExemplars | None:
    """Exemplars for a middleware recording into ``instrumentation``, or ``None`` when off.

    Checks the option at set-up; in multiprocess mode warns and returns ``None``.
    """
    provider = exemplar_provider(option)
    if provider is None:
        return None
    recorder = instrumentation.requests
    if instrumentation.multiprocess or not isinstance(recorder, BufferedRequestRecorder):
        warnings.warn(
            "crowdmon records no exemplars in prometheus_client's multiprocess mode "
            "(PROMETHEUS_MULTIPROC_DIR is set): its files keep none. Requests are recorded as usual.",
            ExemplarsUnavailableWarning,
            stacklevel=3,
        )
        return None
    if recorder.exemplars is None:
        recorder.exemplars = ExemplarStore()
    return RequestExemplars(provider, recorder.exemplars)


class ExemplarStore:
    """The latest exemplar of each request series, attached to the scraped families."""

    def __init__(self) -> None:
        self._bounds = DURATION.buckets
        self._le = bucket_edges(self._bounds)
        # (labels, value, timestamp): made into prometheus_client Exemplars only when scraped.
        self._counter: dict[tuple[str, str, str], _Latest] = {}
        self._buckets: dict[tuple[str, str, str], _Latest] = {}

    def record(self, method: str, handler: str, status: str, duration: float, labels: Mapping[str, str]) -> None:
        now = time.time()
        counter, buckets = self._counter, self._buckets
        counter_key = (method, handler, status)
        if counter_key in counter or len(counter) < MAX_SERIES:
            counter[counter_key] = (labels, 1.0, now)
        bucket_key = (method, handler, self._le[bisect_left(self._bounds, duration)])
        if bucket_key in buckets or len(buckets) < MAX_SERIES:
            buckets[bucket_key] = (labels, duration, now)

    def attach(self, families: Iterable[Metric]) -> Iterator[Metric]:
        """``families`` with the exemplars on their samples; exemplars of series that no longer
        match a sample (labels folded by the guard) are dropped."""
        counter_name = REQUESTS.name
        bucket_name = DURATION.name + "_bucket"
        for family in families:
            if family.name == REQUESTS.name.removesuffix("_total"):
                family.samples = _with_exemplars(family.samples, counter_name, ("method", "handler", "status"), self._counter)
            elif family.name == DURATION.name:
                family.samples = _with_exemplars(family.samples, bucket_name, ("method", "handler", "le"), self._buckets)
            yield family


def _with_exemplars(samples: list, name: str, keys: tuple[str, str, str], exemplars: dict[tuple[str, str, str], _Latest]) -> list:  # type: ignore[type-arg]
    matched = set()
    result = []
    for sample in samples:
        if sample.name == name:
            key = tuple(sample.labels.get(label, "") for label in keys)
            latest = exemplars.get(key)
            if latest is not None:
                matched.add(key)
                sample = sample._replace(exemplar=Exemplar(dict(latest[0]), latest[1], latest[2]))
        result.append(sample)
    for stale in exemplars.keys() - matched:
        exemplars.pop(stale, None)
    return result


def _checked(labels: Mapping[str, str]) -> Mapping[str, str]:
    """``labels`` as an OpenMetrics exemplar label set; ``ValueError`` when it cannot be one."""
    runes = 0
    for name, value in labels.items():
        if type(value) is not str or name not in _VALID_NAMES:
            return _checked_slowly(labels)
        runes += len(name) + len(value)
    if runes > MAX_EXEMPLAR_RUNES:
        raise ValueError(f"exemplar labels hold {runes} characters; OpenMetrics allows {MAX_EXEMPLAR_RUNES}")
    return labels


def _checked_slowly(labels: Mapping[str, str]) -> Mapping[str, str]:
    checked = {}
    runes = 0
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name):
            raise ValueError(f"exemplar label name {name!r} is not a valid label name")
        if len(_VALID_NAMES) < 64:
            _VALID_NAMES.add(name)
        checked[name] = str(value)
        runes += len(name) + len(checked[name])
    if runes > MAX_EXEMPLAR_RUNES:
        raise ValueError(f"exemplar labels hold {runes} characters; OpenMetrics allows {MAX_EXEMPLAR_RUNES}")
    return checked
