"""The README's metric reference, generated from the catalogue (a test keeps the two equal)."""

from __future__ import annotations

from crowdmon.catalogue import CATALOGUE, MetricKind


def metric_reference_table() -> str:
    rows = ["| metric | type | labels | buckets | meaning |", "| --- | --- | --- | --- | --- |"]
    for spec in CATALOGUE:
        buckets = ", ".join(f"{bound:g}" for bound in spec.buckets) if spec.kind == MetricKind.HISTOGRAM else ""
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        rows.append(f"| `{spec.name}` | {spec.kind.value} | {labels} | {buckets} | {spec.help} |")
    return "\n".join(rows)
