"""Benchmark of the ownership table: build time, balance and disruption.

    python bench/ownership.py          # human-readable tables
    python bench/ownership.py --json   # one JSON object

For N members (equal weights) and B buckets: the median build time with the cache
cleared, the balance (largest share over the fair share), and the buckets moved when
one member leaves or one joins, next to the optimum (the leaver's buckets, the
newcomer's buckets; L2 requires equality; at N = 256 = MAX_NODES the join is measured
on the cluster minus one member). Then build times (median and fastest run) with G
distinct weights at N = 64 and 256, B = 65536, and the balance spread over random node IDs
(rendezvous balance is binomial noise). Last, the loop lag: how late a 2 ms tick of an
asyncio loop (a heartbeat's stand-in) runs while an N = 256 table with all weights
distinct is built, on the loop and through the daemon's own ``build_table`` (a thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from lbd.daemon.effects import EffectsMixin
from lbd.protocol import events as ev
from lbd.protocol import ownership
from lbd.protocol.messages import MAX_NODES
from lbd.protocol.ownership import OwnershipTable

NODE_COUNTS = (3, 16, 64, 256)
BUCKET_COUNTS = (4096, 65536)
GOALS_MS = {(256, 65536): 100.0, (64, 4096): 10.0}
MIXED_GOALS_MS = {64: 50.0, 256: 100.0}  # B = 65536, any number of distinct weights


def build_times_ms(members: Sequence[tuple[str, int]], buckets: int, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        ownership.clear_cache()
        start = time.perf_counter()
        ownership.compute_owners(members, buckets)
        times.append((time.perf_counter() - start) * 1000)
    return times


def build_ms(members: Sequence[tuple[str, int]], buckets: int, runs: int) -> float:
    return statistics.median(build_times_ms(members, buckets, runs))


def balance(table: OwnershipTable) -> float:
    """max over members of (owned share / weight-fair share)."""
    total = sum(weight for _, weight in table.members)
    counts = table.counts()
    return max(
        counts[node] / (table.buckets * weight / total)
        for node, weight in table.members
        if weight > 0
    )


def equal_weights(runs: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for buckets in BUCKET_COUNTS:
        for n in NODE_COUNTS:
            members = [(f"node-{i:03d}", 100) for i in range(n)]
            table = OwnershipTable.build(members, buckets)
            leaver = members[n // 2][0]
            smaller = OwnershipTable.build([m for m in members if m[0] != leaver], buckets)
            # At MAX_NODES nobody can join: measure the join on the cluster minus one.
            base = members if n < MAX_NODES else members[1:]
            before_join = OwnershipTable.build(base, buckets)
            bigger = OwnershipTable.build([*base, ("node-new", 100)], buckets)
            milliseconds = build_ms(members, buckets, runs)
            goal = GOALS_MS.get((n, buckets))
            rows.append(
                {
                    "nodes": n,
                    "buckets": buckets,
                    "build_ms": round(milliseconds, 3),
                    "goal_ms": goal,
                    "goal_met": None if goal is None else milliseconds <= goal,
                    "balance": round(balance(table), 4),
                    "removal_moved": len(smaller.moved_from(table)),
                    "removal_optimum": len(table.buckets_of(leaver)),
                    "addition_moved": len(bigger.moved_from(before_join)),
                    "addition_optimum": len(bigger.buckets_of("node-new")),
                }
            )
    return rows


def mixed_weights(runs: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    buckets = 65536
    for n, goal in MIXED_GOALS_MS.items():
        for groups in (1, 2, 16, n):
            members = [(f"node-{i:03d}", 1 + i % groups) for i in range(n)]
            times = build_times_ms(members, buckets, runs)
            rows.append(
                {
                    "nodes": n,
                    "buckets": buckets,
                    "distinct_weights": groups,
                    "build_ms": round(statistics.median(times), 3),
                    "build_min_ms": round(min(times), 3),
                    "goal_ms": goal,
                    "goal_met": statistics.median(times) <= goal,
                    "balance": round(balance(OwnershipTable.build(members, buckets)), 4),
                }
            )
    return rows


class _TableShell(EffectsMixin):
    """The daemon's ``build_table`` path alone: the table comes back to ``done``."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] | None = None
        self.driver = self  # type: ignore[assignment]

    def table_built(
        self, weights: ownership.MemberWeights, owners: ownership.Owners, now: float
    ) -> bool:
        assert self.done is not None
        self.done.set_result(None)
        return False  # "stopped": no _stepped() of a real Service


async def _lag_while(build: Callable[[], Awaitable[object]], tick: float) -> dict[str, float]:
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            start = time.perf_counter()
            await asyncio.sleep(tick)
            lags.append(time.perf_counter() - start - tick)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(10 * tick)
    lags.clear()
    start = time.perf_counter()
    await build()
    took = time.perf_counter() - start
    await asyncio.sleep(10 * tick)
    running = False
    await task
    return {"build_ms": took * 1000, "max_lag_ms": max(lags) * 1000}


def loop_lag(runs: int, nodes: int = 256, buckets: int = 65536) -> list[dict[str, object]]:
    """The worst lateness of a 2 ms tick while a table is built on the loop, and in
    the daemon's table thread (``EffectsMixin.build_table``)."""
    members = ownership.normalize_members((f"node-{i:03d}", 1 + i) for i in range(nodes))

    async def measure() -> list[dict[str, object]]:
        shell = _TableShell()
        loop = asyncio.get_running_loop()

        async def on_loop() -> object:
            ownership.clear_cache()
            return ownership.compute_owners(members, buckets)

        async def in_thread() -> object:
            ownership.clear_cache()
            shell.done = loop.create_future()
            shell.build_table(ev.BuildTable(members, buckets, 0))
            await shell.done
            return None

        rows: list[dict[str, object]] = []
        for where, build in (("event loop", on_loop), ("table thread", in_thread)):
            samples = [await _lag_while(build, 0.002) for _ in range(runs)]
            rows.append(
                {
                    "built_in": where,
                    "nodes": nodes,
                    "buckets": buckets,
                    "distinct_weights": nodes,
                    "build_ms": round(statistics.median(r["build_ms"] for r in samples), 1),
                    "max_tick_lag_ms": round(max(r["max_lag_ms"] for r in samples), 1),
                    "median_max_tick_lag_ms": round(
                        statistics.median(r["max_lag_ms"] for r in samples), 1
                    ),
                }
            )
        return rows

    return asyncio.run(measure())


def random_ids(clusters: int) -> list[dict[str, object]]:
    rng = random.Random(2024)
    rows: list[dict[str, object]] = []
    for buckets in BUCKET_COUNTS:
        for n in (16, 64):
            ratios = []
            for _ in range(clusters):
                members = [(f"h{rng.getrandbits(48):012x}", 100) for _ in range(n)]
                ratios.append(balance(OwnershipTable.build(members, buckets)))
            rows.append(
                {
                    "nodes": n,
                    "buckets": buckets,
                    "clusters": clusters,
                    "balance_mean": round(statistics.fmean(ratios), 4),
                    "balance_p95": round(float(np.percentile(ratios, 95)), 4),
                    "balance_max": round(max(ratios), 4),
                    "share_above_1_10": round(sum(r > 1.10 for r in ratios) / clusters, 3),
                }
            )
    return rows


def print_table(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n{title}")
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=7, help="timed builds per case")
    parser.add_argument("--clusters", type=int, default=100, help="random ID sets per case")
    args = parser.parse_args()
    report = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "equal_weights": equal_weights(args.runs),
        "mixed_weights": mixed_weights(args.runs),
        "random_ids": random_ids(args.clusters),
        "loop_lag": loop_lag(args.runs),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"python {report['python']}, numpy {report['numpy']}, {report['cpus']} CPUs")
    print_table("Equal weights (build: median ms, cache cleared)", report["equal_weights"])
    print_table("Distinct weights (B=65536)", report["mixed_weights"])
    print_table("Balance over random node IDs (equal weights)", report["random_ids"])
    print_table(
        "Loop lag of a 2 ms tick during a build (N=256, all weights distinct)", report["loop_lag"]
    )


if __name__ == "__main__":
    main()
