"""Instructions per request, counted by valgrind's callgrind: the in-process ASGI benchmark without
the noise of a shared machine.

Each variant of ``crowdmon bench asgi`` (same apps, same routes) serves a small and a large batch
of requests in its own process under ``valgrind --tool=callgrind``; the difference between the two
totals, divided by the difference in requests, is the instructions one request costs, start-up
and the first requests' one-off work excluded. With a fixed hash seed, counts repeat for the same interpreter, packages and inputs,
whatever else the machine runs, so ratios between variants are stable where microsecond timings
move by several µs.

    python3 benchmarks/instructions.py                    # Starlette JSON route, every variant
    python3 benchmarks/instructions.py --framework fastapi --route text

Needs valgrind (Debian package ``valgrind``); peers come from the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowdmon.bench import VARIANTS, Skipped, build_variant, http_scope, serve, table

# Both batches pass the first absorption of 1,024 recorded requests (which also admits the
# route's label set); the 2,048 requests between them hold two absorptions as every later batch
# costs, so the figure is what a request costs once the app is warm.
SMALL, LARGE = 1100, 1100 + 2048
ROUTES = {"json": "/items/42", "text": "/text", "stream": "/stream"}


def child(variant: str, framework: str, path: str, requests: int) -> None:
    """Serve ``requests`` requests through one variant (runs under callgrind)."""
    app = build_variant(variant, framework).app
    template = http_scope(path)

    async def drive() -> None:
        for _ in range(requests):
            status = await serve(app, dict(template))
            if status != 200:
                raise SystemExit(f"{variant} answered {status} for {path}")

    asyncio.run(drive())


def instructions(variant: str, framework: str, path: str, requests: int) -> int:
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", variant, "--framework", framework, "--path", path,
        "--requests", str(requests),
    ]
    # A fixed hash seed: string hashing decides dict layouts, and with them thousands of
    # instructions from one run to the next.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{variant}: {result.stderr.strip().splitlines()[-1:]}")
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"{variant}: callgrind printed no total")
    return int(found.group(1))


def per_request(variant: str, framework: str, path: str) -> float:
    small = instructions(variant, framework, path, SMALL)
    large = instructions(variant, framework, path, LARGE)
    return (large - small) / (LARGE - SMALL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("starlette", "fastapi"), default="starlette")
    parser.add_argument("--route", choices=sorted(ROUTES), default="json")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.framework, args.path, args.requests)
        return 0

    path = ROUTES[args.route]
    costs: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for variant in args.variants:
        try:
            build_variant(variant, args.framework)
        except Skipped as reason:
            skipped[variant] = str(reason)
            continue
        costs[variant] = per_request(variant, args.framework, path)

    bare = costs["bare"]
    rows = [
        [variant, f"{cost:,.0f}", "-" if variant == "bare" else f"{cost - bare:,.0f}", f"{cost / bare:.2f}x"]
        for variant, cost in costs.items()
    ]
    print(f"{args.framework} {path}: instructions per request (callgrind, {LARGE} - {SMALL} requests)")
    print(table(["variant", "instructions", "overhead", "vs bare"], rows))
    for variant, reason in skipped.items():
        print(f"skipped {variant}: {reason}")
    ours = costs.get("crowdmon", bare) - bare
    for peer in ("naive", "instrumentator", "passthrough"):
        if "crowdmon" in costs and peer in costs and costs[peer] > bare:
            print(f"crowdmon overhead / {peer} overhead: {ours / (costs[peer] - bare):.3f}")
    if "status_only" in costs and "passthrough" in costs and costs["passthrough"] > bare:
        # Learning the status alone, against the goal's 2x a pass-through.
        print(f"status_only overhead / passthrough overhead: {(costs['status_only'] - bare) / (costs['passthrough'] - bare):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
