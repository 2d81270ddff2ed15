"""Simulated failover time: crash to every slice served again, per timer profile.

Runs the real protocol core in the deterministic cluster simulator
(lbd.testbed.clustersim): a cluster converges, one node crashes at a random phase of
the heartbeat cycle, and the clock stops when every bucket is accepted by
exactly one live node again. S1 is checked on every kernel change throughout.

    python bench/failover_sim.py [--json] [--runs 100] [--nodes 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

from lbd.protocol.config import PROFILES, Timers
from lbd.testbed.clustersim import Cluster, Violation

GOALS = {"default": 1.0, "fast": 0.25}


def one_failover(seed: int, timers: Timers, nodes: int) -> float:
    cluster = Cluster(seed, timers, buckets=256)
    for i in range(nodes):
        cluster.add_node(f"n{i}")
    deadline = 10.0
    while not cluster.converged():
        cluster.run_until(cluster.now + timers.interval)
        if cluster.now > deadline:
            raise Violation(f"seed {seed}: no convergence")
    cluster.run_until(cluster.now + 5 * timers.interval)
    rng = random.Random(seed)
    cluster.run_until(cluster.now + rng.uniform(0, timers.interval))
    cluster.crash(f"n{rng.randrange(nodes)}")
    crashed_at = cluster.now
    step = timers.interval / 50
    while cluster.now < crashed_at + 10 * timers.dead_after:
        cluster.run_until(cluster.now + step)
        if all(len(owners) == 1 for owners in cluster.served().values()):
            return cluster.now - crashed_at
    raise Violation(f"seed {seed}: slices not served again")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(q * (len(ordered) - 1)))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    report: dict[str, object] = {"nodes": args.nodes, "runs": args.runs, "profiles": {}}
    profiles: dict[str, object] = {}
    for name, timers in PROFILES.items():
        times, violations = [], 0
        for seed in range(args.runs):
            try:
                times.append(one_failover(seed, timers, args.nodes))
            except Violation:
                violations += 1
        profiles[name] = {
            "interval_ms": timers.interval * 1000,
            "dead_after_ms": timers.dead_after * 1000,
            "lease_ms": timers.lease * 1000,
            "p50_ms": round(statistics.median(times) * 1000, 1),
            "p99_ms": round(percentile(times, 0.99) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1),
            "goal_ms": GOALS[name] * 1000,
            "meets_goal": percentile(times, 0.99) <= GOALS[name],
            "s1_violations_or_failures": violations,
        }
    report["profiles"] = profiles
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, row in profiles.items():
            print(f"{name:8} {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
