"""Profile crowdmon's per-request path: ``py-spy record -f raw -o out.txt -- python3 benchmarks/profile_middleware.py``.

Drives the in-process benchmark's Starlette JSON route through crowdmon (or another variant) for
a number of requests; without py-spy, ``--cprofile`` prints the top of a cProfile run instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowdmon.bench import ROUTES, build_variant, time_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="crowdmon")
    parser.add_argument("--framework", default="starlette")
    parser.add_argument("--route", default="json", choices=list(ROUTES))
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    app = build_variant(args.variant, args.framework).app
    run = lambda: asyncio.run(time_requests(app, ROUTES[args.route], args.requests))  # noqa: E731
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.runcall(run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        print(f"{run() * 1e6:.2f} µs/request")


if __name__ == "__main__":
    main()
