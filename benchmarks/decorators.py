"""Per-call cost of crowdmon's decorators against the bare function and prometheus_client's
``Histogram.time()``, in one process.

Every variant is timed in each round, in a shuffled order, and the report gives medians over
rounds: µs per call, the overhead over the bare function of the same round, and the ratio of each
decorator's overhead to ``Histogram.time()``'s.  ``Histogram.time()`` only measures sync functions
correctly (on a coroutine function it times the creation of the coroutine), so the async rows
compare against the bare coroutine only.

    python3 benchmarks/decorators.py [--rounds 15] [--calls 20000] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from time import perf_counter, thread_time
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Histogram

from crowdmon import (
    PrometheusInstrumentation,
    tracked_chat,
    tracked_database_query,
    tracked_document_operation,
    tracked_errors,
    tracked_external,
    tracked_memory_operation,
    tracked_session,
    tracked_vector_search,
)

Variant = tuple[str, str, Callable[[], Any]]  # kind, name, one call


def variants(instrumentation: PrometheusInstrumentation, registry: CollectorRegistry) -> list[Variant]:
    inst = instrumentation
    decorators: dict[str, Callable[[Any], Any]] = {
        "@tracked_database_query": tracked_database_query("select", instrumentation=inst),
        "@tracked_external": tracked_external("openai", endpoint="chat/completions", instrumentation=inst),
        "@tracked_errors": tracked_errors(component="rag_system", instrumentation=inst),
        "@tracked_chat": tracked_chat(endpoint="/chat", user_type="authenticated", instrumentation=inst),
        "@tracked_vector_search": tracked_vector_search("similarity_search", instrumentation=inst),
        "@tracked_memory_operation": tracked_memory_operation("store", "conversation", "authenticated", instrumentation=inst),
        "@tracked_document_operation": tracked_document_operation("add", "pdf", instrumentation=inst),
        "@tracked_session": tracked_session("authenticated", instrumentation=inst),
    }
    default_decorated = tracked_database_query("select")

    def work() -> int:
        return 42

    async def async_work() -> int:
        return 42

    def generator() -> Iterator[int]:
        yield 42

    async def async_generator() -> AsyncIterator[int]:
        yield 42

    histogram = Histogram("bench_time_seconds", "Histogram.time() baseline.", registry=registry)
    found: list[Variant] = [("sync", "bare", work), ("sync", "Histogram.time()", histogram.time()(work))]
    found += [("sync", name, decorate(work)) for name, decorate in decorators.items()]
    found.append(("sync", "@tracked_database_query (default instance)", default_decorated(work)))
    found.append(("async", "bare", async_work))
    found += [("async", name, decorate(async_work)) for name, decorate in decorators.items() if name != "@tracked_session"]
    external = decorators["@tracked_external"]
    found += [
        ("generator", "bare", generator),
        ("generator", "@tracked_external", external(generator)),
        ("async generator", "bare", async_generator),
        ("async generator", "@tracked_external", external(async_generator)),
    ]
    return found


#: The clock the loops are timed with: CPU time of this thread (steady when other processes share
#: the cores) unless ``--clock wall``.
clock: Callable[[], float] = thread_time


def time_variant(kind: str, function: Callable[[], Any], calls: int) -> float:
    """Seconds per call."""
    perf_counter = clock
    if kind == "sync":
        started = perf_counter()
        for _ in range(calls):
            function()
        return (perf_counter() - started) / calls
    if kind == "generator":
        started = perf_counter()
        for _ in range(calls):
            for _item in function():
                pass
        return (perf_counter() - started) / calls

    async def run() -> float:
        started = perf_counter()
        if kind == "async":
            for _ in range(calls):
                await function()
        else:
            for _ in range(calls):
                async for _item in function():
                    pass
        return (perf_counter() - started) / calls

    return float(drive(run()))


def drive(coroutine: Any) -> Any:
    """Run a coroutine that never suspends, without an event loop's per-step overhead."""
    try:
        while True:
            coroutine.send(None)
    except StopIteration as stop:
        return stop.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="thread CPU time (default) or wall time")
    args = parser.parse_args(argv)
    global clock
    clock = thread_time if args.clock == "cpu" else perf_counter

    registry = CollectorRegistry()
    found = variants(PrometheusInstrumentation(registry), registry)
    samples: dict[tuple[str, str], list[float]] = {(kind, name): [] for kind, name, _ in found}
    shuffler = random.Random(args.seed)
    for round_number in range(args.rounds + 1):  # round 0 warms up and is dropped
        order = list(found)
        shuffler.shuffle(order)
        for kind, name, function in order:
            gc.collect()
            seconds = time_variant(kind, function, args.calls)
            if round_number:
                samples[(kind, name)].append(seconds * 1e6)

    histogram_overhead = statistics.median(
        h - b for h, b in zip(samples[("sync", "Histogram.time()")], samples[("sync", "bare")], strict=True)
    )
    print(f"{'kind':<16} {'function':<44} {'µs/call':>8} {'overhead µs':>12} {'x bare':>7} {'x Histogram.time() overhead':>28}")
    for kind, name, _ in found:
        measured, bare = samples[(kind, name)], samples[(kind, "bare")]
        per_call = statistics.median(measured)
        if name == "bare":
            print(f"{kind:<16} {name:<44} {per_call:8.3f}")
            continue
        overhead = statistics.median(m - b for m, b in zip(measured, bare, strict=True))
        ratio = statistics.median(m / b for m, b in zip(measured, bare, strict=True))
        versus = f"{overhead / histogram_overhead:28.2f}" if kind == "sync" else f"{'—':>28}"
        print(f"{kind:<16} {name:<44} {per_call:8.3f} {overhead:12.3f} {ratio:7.1f} {versus}")
    print(
        f"\nmedian of {args.rounds} interleaved rounds x {args.calls} calls ({args.clock} time); overhead = "
        f"variant - bare of the same round; Histogram.time() overhead = {histogram_overhead:.3f} µs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
