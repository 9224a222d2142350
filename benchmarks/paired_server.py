"""Server capacity measured in pairs: every variant's uvicorn worker loaded at the same time.

The "together" half of ``crowdmon bench server`` (:func:`crowdmon.bench.loaded_together`), on its
own, for any set of variants and as many rounds as wanted.  Loading one worker at a time is how
a worker runs in production, but what else the machine runs moves such windows by ±10%.  Here
all the workers share one CPU and each gets its own ``hey`` for the same seconds, so that load
falls on all of them alike and the scheduler gives each the same CPU time: the ratio of their
throughputs is the inverse ratio of what a request costs each.  Per-round ratios agree within
about ±0.02.  Workers sharing a CPU also share its caches, which makes a larger memory
footprint cost more than it would alone.

    python3 benchmarks/paired_server.py                          # bare, passthrough, naive, crowdmon
    python3 benchmarks/paired_server.py --variants bare,crowdmon --rounds 8 --seconds 3
    python3 benchmarks/paired_server.py --framework fastapi     # the same route in FastAPI
    python3 benchmarks/paired_server.py --stack standard        # uvicorn[standard]: httptools, uvloop

Needs ``hey`` (Debian package ``hey``) and Linux (CPU affinity).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowdmon.bench import (
    ROUTES,
    SERVER_FRAMEWORKS,
    SERVER_STACKS,
    SERVER_VARIANTS,
    describe_stack,
    loaded_together,
    missing_for_stack,
    server_name,
    table,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(SERVER_VARIANTS), help="comma-separated, the first is the baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16, help="connections of each worker's hey")
    parser.add_argument("--framework", choices=SERVER_FRAMEWORKS, default="starlette", help="the app the workers serve")
    parser.add_argument("--stack", choices=tuple(SERVER_STACKS), default="plain", help="plain (h11, asyncio) or standard (httptools, uvloop)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in SERVER_VARIANTS]
    if unknown or args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error(f"variants are any of {', '.join(SERVER_VARIANTS)}; rounds >= 1; seconds > 0; concurrency >= 1")
    if shutil.which("hey") is None:
        raise SystemExit("paired_server.py needs the load client hey (apt-get install hey)")
    missing = missing_for_stack(args.stack)
    if missing is not None:
        raise SystemExit(f"paired_server.py: {describe_stack(args.stack)}: {missing}")
    servers = [server_name(name, args.framework) for name in variants]
    try:
        measured = loaded_together(servers, rounds=args.rounds, seconds=args.seconds, concurrency=args.concurrency, stack=args.stack)
    except RuntimeError as error:
        raise SystemExit(f"paired_server.py: {error}") from None
    throughput = {name: measured[server] for name, server in zip(variants, servers, strict=True)}
    base = throughput[variants[0]]
    rows = []
    for name in variants:
        ratios = [value / baseline for value, baseline in zip(throughput[name], base, strict=True)]
        rows.append([name, median(throughput[name]), f"{median(ratios):.3f}", " ".join(f"{ratio:.3f}" for ratio in ratios)])
    print(table(["variant", "requests/s (shared CPU)", f"throughput / {variants[0]}", "each round"], rows))
    print(
        f"(median of {args.rounds} rounds; every {args.framework} worker, {describe_stack(args.stack)}, loaded at once"
        f" for {args.seconds:g} s by hey -c {args.concurrency}, GET {ROUTES['json']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
