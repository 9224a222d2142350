"""The ``crowdmon`` command: ``demo``, ``export`` and ``bench``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence


def _number(text: str, kind: type[int] | type[float], meaning: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{meaning}, got {text!r}") from None


def _port(text: str) -> int:
    port = int(_number(text, int, "a TCP port is 1 to 65535"))
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {port}")
    return port


def _host(text: str) -> str:
    # An empty host binds every interface, which a demo is not for; 0.0.0.0 says so openly.
    if not text.strip():
        raise argparse.ArgumentTypeError("an address to listen on, such as 127.0.0.1 (0.0.0.0: every interface), got ''")
    return text


def _seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds above 0")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"a number of seconds above 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = _number(text, float, "requests per second, 0 or more")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"requests per second, 0 or more, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crowdmon", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="serve the instrumented demo app on 127.0.0.1 and drive traffic at it"
    )
    demo.add_argument("--host", type=_host, default="127.0.0.1", help="address to listen on (default: %(default)s)")
    demo.add_argument("--port", type=_port, default=8000, help="port to listen on (default: %(default)s)")
    demo.add_argument(
        "--duration",
        type=_seconds,
        default=None,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    demo.add_argument(
        "--rate", type=_rate, default=20.0, help="generated requests per second (0: no traffic)"
    )

    export = commands.add_parser(
        "export", help="write Grafana dashboards and provisioning, alert rules and prometheus.yml"
    )
    from crowdmon.ops.cli import add_export_arguments

    add_export_arguments(export)

    bench = commands.add_parser(
        "bench", help="measure what crowdmon costs against the bare app and its peers"
    )
    from crowdmon.bench import add_arguments

    add_arguments(bench)

    args = parser.parse_args(argv)
    if args.command == "export":
        from crowdmon.ops.cli import run_export

        return run_export(args, export)
    if args.command == "demo":
        from crowdmon.demo import run_demo

        return run_demo(host=args.host, port=args.port, duration=args.duration, rate=args.rate)
    if args.command == "bench":
        from crowdmon.bench import main as run_bench

        return run_bench(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it
    return 2
