"""Reading PromQL back: which series and labels an expression names, checked against the catalogue.

Dashboards and alert rules are generated from :mod:`crowdmon.catalogue`, and this module proves it
from the other side: it tokenises each expression the way Prometheus does, collects every series
name, every label matcher and every ``by``/``without``/``on``/``ignoring`` label, and reports any
that the catalogue lacks.  It is a checker, not a full parser: ``promtool check rules`` still
judges the syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from crowdmon.catalogue import (
    BY_NAME,
    ERROR_TYPES,
    HEALTH_STATES,
    OUTCOMES,
    MetricKind,
    MetricSpec,
)

#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: Series suffixes a histogram family is exposed with.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

#: Label values the catalogue fixes, per (metric, label); ``None`` as metric means "any metric".
ENUMERATED_VALUES: dict[tuple[str | None, str], tuple[str, ...]] = {
    ("component_health_status", "status"): HEALTH_STATES,
    (None, "error_type"): ERROR_TYPES,
    ("external_api_duration_seconds", "outcome"): OUTCOMES,
    ("chat_messages_total", "cache_hit"): ("true", "false"),
    ("chat_messages_total", "rag_used"): ("true", "false"),
}

FUNCTIONS = frozenset(
    ["abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "max_over_time", "min_over_time", "minute", "month", "predict_linear", "present_over_time", "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "time", "timestamp", "vector", "year", "acos", "acosh", "asin", "asinh", "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi", "label_values"]
)
AGGREGATIONS = frozenset(
    ["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"]
)
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
OPERATOR_KEYWORDS = frozenset({"and", "or", "unless", "bool", "atan2", "offset", "inf", "nan"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    |(?P<number>(?:0x[0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[=<>+\-*/%^@(){}\[\],:])
    """,
    re.VERBOSE,
)
# Grafana's built-in interval variables stand for durations; any other $variable sits in a string.
_GRAFANA_INTERVAL = re.compile(r"\$(?:\{__\w+\}|__\w+)")


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass
class References:
    """What one expression names: series with their matchers, and grouping labels."""

    series: list[tuple[str, list[Matcher]]] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)


class PromQLReadError(ValueError):
    """The expression could not be tokenised."""


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromQLReadError(f"cannot read PromQL at {position}: {expr[position:position + 20]!r} in {expr!r}")
        position = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            yield kind, match.group()


def _unquote(token: str) -> str:
    body = token[1:-1]
    return body if token[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def references(expr: str) -> References:
    """Every series, matcher, grouping label and function ``expr`` names."""
    tokens = list(_tokens(_GRAFANA_INTERVAL.sub("5m", expr)))
    found = References()
    index = 0

    def matchers_from(start: int) -> tuple[list[Matcher], int]:
        # tokens[start] is "{"; returns the matchers and the index after "}".
        result: list[Matcher] = []
        position = start + 1
        while tokens[position][1] != "}":
            if tokens[position][1] == ",":
                position += 1
                continue
            label, op, value = tokens[position], tokens[position + 1], tokens[position + 2]
            if label[0] != "ident" or value[0] != "string":
                raise PromQLReadError(f"malformed label matcher in {expr!r}")
            result.append(Matcher(label[1], op[1], _unquote(value[1])))
            position += 3
        return result, position + 1

    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "ident" and text in LABEL_LIST_KEYWORDS:
            index += 1
            if following == "(":
                index += 1
                while tokens[index][1] != ")":
                    if tokens[index][0] == "ident":
                        found.grouping_labels.add(tokens[index][1])
                    index += 1
                index += 1
            continue
        if kind == "ident" and text.lower() in OPERATOR_KEYWORDS:
            index += 1
            continue
        if kind == "ident" and (following == "(" or (text in AGGREGATIONS and following in ("by", "without"))):
            found.functions.add(text)
            if text == "label_values":
                # Grafana's label_values(selector, label): the last argument is a label name.
                close = _closing_paren(tokens, index + 1)
                if tokens[close - 1][0] == "ident" and tokens[close - 2][1] == ",":
                    found.grouping_labels.add(tokens[close - 1][1])
                    del tokens[close - 2 : close]
            index += 1
            continue
        if kind == "ident":
            series_matchers: list[Matcher] = []
            index += 1
            if index < len(tokens) and tokens[index][1] == "{":
                series_matchers, index = matchers_from(index)
            found.series.append((text, series_matchers))
            continue
        if text == "{":
            series_matchers, index = matchers_from(index)
            names = [m.value for m in series_matchers if m.label == "__name__" and m.op == "="]
            found.series.append((names[0] if names else "", [m for m in series_matchers if m.label != "__name__"]))
            continue
        if text == "[":
            while tokens[index][1] != "]":
                index += 1
        index += 1
    return found


def _closing_paren(tokens: list[tuple[str, str]], start: int) -> int:
    depth = 0
    for position in range(start, len(tokens)):
        if tokens[position][1] == "(":
            depth += 1
        elif tokens[position][1] == ")":
            depth -= 1
            if depth == 0:
                return position
    raise PromQLReadError("unbalanced parentheses")


def spec_for_series(series: str) -> tuple[MetricSpec | None, str]:
    """The catalogue metric a series name belongs to, and the suffix it was read with."""
    found = BY_NAME.get(series)
    if found is not None and found.kind != MetricKind.HISTOGRAM:
        return found, ""
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in BY_NAME and BY_NAME[base].kind == MetricKind.HISTOGRAM:
            return BY_NAME[base], suffix
    return None, ""


def catalogue_problems(expr: str) -> list[str]:
    """Every way ``expr`` strays from the catalogue; empty when it names only catalogue metrics
    and labels, with only the values the catalogue allows for enumerated labels."""
    try:
        found = references(expr)
    except (PromQLReadError, IndexError) as error:
        return [f"unreadable expression: {error}"]
    problems: list[str] = []
    unknown_functions = found.functions - FUNCTIONS - AGGREGATIONS
    problems += [f"unknown function {name!r}" for name in sorted(unknown_functions)]
    available: set[str] = set(TARGET_LABELS)
    for series, matchers in found.series:
        metric, suffix = spec_for_series(series)
        if metric is None:
            hint = " (a histogram is queried as _bucket, _sum or _count)" if series in BY_NAME else ""
            problems.append(f"series {series!r} is not in the catalogue{hint}")
            continue
        labels = set(metric.labels) | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        available |= labels
        for matcher in matchers:
            if matcher.label not in labels:
                problems.append(f"{series} has no label {matcher.label!r}; it has {sorted(labels)}")
                continue
            problems += _value_problems(metric.name, matcher)
    for label in sorted(found.grouping_labels - available):
        problems.append(f"grouping label {label!r} is on none of the series the expression reads")
    return problems


def _value_problems(metric: str, matcher: Matcher) -> list[str]:
    allowed = ENUMERATED_VALUES.get((metric, matcher.label)) or ENUMERATED_VALUES.get((None, matcher.label))
    if allowed is None or "$" in matcher.value:
        return []
    if matcher.op in ("=", "!="):
        values: Iterable[str] = [matcher.value]
    elif re.fullmatch(r"[\w|]+", matcher.value):
        values = matcher.value.split("|")
    else:
        return []
    return [
        f"{metric}{{{matcher.label}}} never takes the value {value!r}; it is one of {list(allowed)}"
        for value in values
        if value not in allowed
    ]


def with_grafana_variables(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` variables replaced by ``values``, to run a
    dashboard query straight against Prometheus; a ``KeyError`` names a variable left unset."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)
