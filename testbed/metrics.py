"""Figures from a client load record (load.py's JSON): shares, outage, broken, duplicates.

Definitions (the ones ``lbd lab``, the e2e suite and bench/failover_lab.py report):

* **affected sources** of a fault on node X: the load sources whose last successful
  connection before the fault was answered by X (the slices X held);
* **client-visible outage**: the longest gap between consecutive successful new
  connections (completion times) from the affected sources, around the fault;
* **served again**: for every affected source, its first success after the fault,
  minus the fault time; the maximum over sources (includes the source's sampling
  period: each source is tried once per ``len(sources) * interval``);
* **broken**: long-lived connections that reset, closed or stalled (per node);
* **duplicate UDP answers**: queries that got more than one answer.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

START, END, SOURCE, NAME = 0, 1, 2, 3


def successes(record: dict[str, Any]) -> list[list[Any]]:
    return [row for row in record["tcp"] if row[NAME]]


def shares(record: dict[str, Any], since: float = 0.0, until: float = float("inf")) -> Counter[str]:
    """Successful new connections per node with a completion time in [since, until)."""
    return Counter(r[NAME] for r in successes(record) if since <= r[END] < until)


def owners_at(record: dict[str, Any], when: float, lookback: float = 2.0) -> dict[int, str]:
    """{source index: node} from each source's last success in [when - lookback, when]."""
    owners: dict[int, str] = {}
    for row in sorted(successes(record), key=lambda r: r[END]):
        if when - lookback <= row[END] <= when:
            owners[row[SOURCE]] = row[NAME]
    return owners


def outage(
    record: dict[str, Any],
    fault: float,
    node: str,
    *,
    horizon: float = 5.0,
    lookback: float = 1.0,
    grace: float = 0.05,
) -> dict[str, Any]:
    """Outage figures for a fault on ``node`` at monotonic time ``fault``.

    ``absorbed_by`` counts who answered the affected sources from ``grace`` after the
    fault on (a killed daemon's kernel table outlives it by 11-17 ms).
    """
    affected = {s for s, n in owners_at(record, fault).items() if n == node}
    times = sorted(
        r[END]
        for r in successes(record)
        if r[SOURCE] in affected and fault - lookback <= r[END] <= fault + horizon
    )
    gap = max((b - a for a, b in itertools.pairwise(times)), default=None)
    first_after: dict[int, float] = {}
    for row in sorted(successes(record), key=lambda r: r[END]):
        if row[SOURCE] in affected and row[START] >= fault and row[SOURCE] not in first_after:
            first_after[row[SOURCE]] = row[END]
    unserved = sorted(affected - set(first_after))
    served_again = max((t - fault for t in first_after.values()), default=None)
    after = [
        r
        for r in record["tcp"]
        if r[SOURCE] in affected and fault + grace <= r[START] <= fault + horizon
    ]
    new_owners = Counter(r[NAME] for r in after if r[NAME])
    return {
        "affected_sources": len(affected),
        "outage_ms": None if gap is None else round(gap * 1000, 1),
        "served_again_ms": None if served_again is None else round(served_again * 1000, 1),
        "unserved_sources": [record["sources"][i] for i in unserved],
        "absorbed_by": dict(new_owners),
    }


def broken(
    record: dict[str, Any], excluded: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Long-lived connections that broke, on nodes not in ``excluded``."""
    return [c for c in record["conns"] if c["broken_at"] is not None and c["node"] not in excluded]


def udp_duplicates(record: dict[str, Any]) -> int:
    return sum(1 for row in record["udp"] if len(row[NAME]) > 1)


def failures(record: dict[str, Any], since: float = 0.0, until: float = float("inf")) -> int:
    """Failed new connections started in [since, until)."""
    return sum(1 for r in record["tcp"] if not r[NAME] and since <= r[START] < until)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "tcp_attempts": len(record["tcp"]),
        "tcp_ok": len(successes(record)),
        "udp_queries": len(record["udp"]),
        "udp_answered": sum(1 for r in record["udp"] if r[NAME]),
        "udp_duplicates": udp_duplicates(record),
        "long_lived": [
            {
                "node": c["node"],
                "exchanges": c["exchanges"],
                "broken": c["broken_at"] is not None,
                "error": c["error"],
            }
            for c in record["conns"]
        ],
        "shares": dict(shares(record)),
    }


def failure_bursts(record: dict[str, Any], join: float = 0.1) -> list[float]:
    """Durations (s) of runs of failed new connections, failures < ``join`` apart merged.

    A slice handed over break-before-make is unserved for a moment: its SYNs are dropped
    and a real client retransmits. The bursts show how long those moments last.
    """
    starts = sorted(r[START] for r in record["tcp"] if not r[NAME])
    bursts: list[float] = []
    first = last = None
    for t in starts:
        if first is None or last is None or t - last > join:
            if first is not None and last is not None:
                bursts.append(last - first)
            first = t
        last = t
    if first is not None and last is not None:
        bursts.append(last - first)
    return bursts
