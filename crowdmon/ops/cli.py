"""The ``crowdmon export`` subcommand's arguments and action."""

from __future__ import annotations

import argparse
import sys

from crowdmon.ops.alerts import DEFAULT_DURATIONS, THRESHOLD_DOCS
from crowdmon.ops.queries import PROBE_HANDLERS


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = "; ".join(f"{key}={value:g}" for key, (value, _) in THRESHOLD_DOCS.items())
    parser.add_argument("--out", required=True, help="directory to write into (created if missing)")
    parser.add_argument("--job", default="crowdmon", help="Prometheus job name of the application (default: crowdmon)")
    parser.add_argument("--target", action="append", dest="targets", metavar="HOST:PORT", help="scrape target for prometheus.yml; repeatable (default: 127.0.0.1:8000)")
    parser.add_argument("--metrics-path", default="/metrics")
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument("--evaluation-interval", default="15s")
    parser.add_argument("--datasource", default="Prometheus", help="Grafana data source name (default: Prometheus)")
    parser.add_argument("--prometheus-url", default="http://localhost:9090", help="URL Grafana reaches Prometheus at")
    parser.add_argument("--dashboards-path", default="/var/lib/grafana/dashboards/crowdmon", help="where Grafana reads the dashboard files")
    parser.add_argument("--threshold", action="append", default=[], metavar="KEY=NUMBER", help=f"alert threshold; repeatable. Defaults: {defaults}")
    parser.add_argument("--for", action="append", default=[], dest="durations", metavar="ALERT=DURATION", help=f"alert 'for:' duration; repeatable. Alerts: {', '.join(DEFAULT_DURATIONS)}")
    parser.add_argument("--probe-handler", action="append", dest="probe_handlers", metavar="HANDLER", help="a handler whose requests are probes or scrapes, not users' traffic; repeatable (default: /health and /metrics)")
    parser.add_argument("--slow-handler", action="append", dest="slow_handlers", metavar="HANDLER", help="a handler slow by design (an LLM answer, judged by SlowChatProcessing), left out of HighRequestLatency only; repeatable")


def _pairs(values: list[str], option: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            parser.error(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.out.strip():
        parser.error("--out needs a directory to write the pack into, got an empty path")
    try:
        from crowdmon.ops.files import ExportOptions, export, exported_files
    except ImportError as error:
        parser.error(str(error))

    thresholds: dict[str, float] = {}
    for key, value in _pairs(args.threshold, "--threshold", parser).items():
        try:
            thresholds[key] = float(value)
        except ValueError:
            parser.error(f"--threshold {key}= needs a number, got {value!r}")
    try:
        options = ExportOptions(
            job=args.job,
            targets=tuple(args.targets or ("127.0.0.1:8000",)),
            metrics_path=args.metrics_path,
            scrape_interval=args.scrape_interval,
            evaluation_interval=args.evaluation_interval,
            datasource=args.datasource,
            prometheus_url=args.prometheus_url,
            dashboards_path=args.dashboards_path,
            thresholds=thresholds,
            durations=_pairs(args.durations, "--for", parser),
            probe_handlers=tuple(args.probe_handlers or PROBE_HANDLERS),
            slow_handlers=tuple(args.slow_handlers or ()),
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        before = [path for path in exported_files(args.out) if path.exists()]
        written = export(args.out, options)
    except OSError as error:
        parser.error(f"cannot write the pack into {args.out!r}: {error.strerror or error}")
    for path in written:
        print(path, file=sys.stdout)
    for path in sorted(set(before) - set(written)):
        print(f"removed {path}", file=sys.stdout)
    return 0
