"""Which ``mac_mode`` works on which network, with no switch or router configuration.

    .venv/bin/python bench/mac_modes.py [--modes shared,multicast,flood]
        [--networks hub,switch,snooping,rfc1812] [--serve 4] [--profile default]
        [--json] [--out FILE]

For every mode x network: a fresh 3-node bed (lbd.testbed.bed), real daemons (default
timers: on a loaded host the fast ones lapse leases and blur the table) with that
``mac_mode``, echo services, the lab's client load (64 IPv4
sources, a new TCP connection and a UDP query every 4 ms) and a capture. It serves for
``--serve`` seconds, SIGKILLs node1's daemon, waits until the survivors agree, serves
on for ``--serve`` seconds, and reports:

* ``served_pct``: new TCP connections answered before the fault (% of attempts);
* ``serving_nodes``: how many nodes answered any of them;
* ``duplicates``: SYNs answered twice plus UDP queries answered twice (capture);
* ``outage_ms``: the client-visible outage of the killed node's sources
  (lbd.testbed.metrics.outage), None when they were not served before;
* ``served_after_pct``: new connections answered after the survivors agreed;
* ``broken``: long-lived connections broken;
* ``longest_gap_ms``, ``lease_lapses``, ``quorum_lost``: the longest run of failed new
  connections, and how often a daemon's lease lapsed or it lost its quorum (logs).

Networks (the router is a Linux router with default settings in all of them; nothing
is configured for lbd on the switch or the router):

* ``hub``: the bridge floods every frame (no learning);
* ``switch``: an ordinary learning switch (learning on, default ageing, no snooping);
* ``snooping``: the learning switch with IGMP/MLD snooping and the bridge as querier
  (snooping without a querier floods everything, as if it were off);
* ``rfc1812``: the learning switch, and a router that refuses a multicast MAC in an
  ARP reply or an NA (RFC 1812 section 3.3.2; many routers; Linux accepts it), emulated
  by an nft filter on the router's LAN side dropping such replies.

Nodes wear one shared MAC in shared mode (the hub recipe), their own MACs otherwise.
``--out`` writes the JSON (bench/out/ by convention).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lbd.daemon.config import MAC_MODES
from lbd.testbed import metrics
from lbd.testbed.bed import Bed
from lbd.testbed.cluster import Capture, ClientLoad, LbdCluster

NETWORKS = ("hub", "switch", "snooping", "rfc1812")
PREFIX = "lbdt-macmodes-"
# RFC 1812 3.3.2: "A router MUST not believe any ARP reply that claims that the Link
# Layer address of another host or router is a broadcast or multicast address."
# ARP: the sender hardware address starts at byte 8; NA: the TLLA option's MAC at
# byte 26 of the ICMPv6 message. Bit 0 of the first octet is the group bit.
RFC1812_FILTER = """table inet lbdt_rfc1812 {
 chain in { type filter hook input priority -300; policy accept;
  icmpv6 type nd-neighbor-advert @th,192,8 2 @th,208,8 & 1 == 1 counter drop
 }
}
table arp lbdt_rfc1812 {
 chain in { type filter hook input priority -300; policy accept;
  arp operation reply @nh,64,8 & 1 == 1 counter drop
 }
}
"""


def make_bed(network: str, mode: str) -> Bed:
    return Bed(
        PREFIX,
        nodes=3,
        add_vip=False,
        switch=network != "hub",
        unique_macs=mode != "shared",
        mcast_snooping=network == "snooping",
        mcast_querier=network == "snooping",
    )


def measure(
    network: str, mode: str, serve: float, workdir: Path, profile: str = "default"
) -> dict[str, Any]:
    """One cell of the table (see the module doc)."""
    out: dict[str, Any] = {"network": network, "mode": mode}
    with make_bed(network, mode) as bed:
        if network == "rfc1812":
            bed.run(bed.router, "nft", "-f", "-", input=RFC1812_FILTER)
        cluster = LbdCluster(bed, workdir / f"{network}-{mode}", profile=profile)
        load = capture = None
        try:
            for index in range(3):
                cluster.start(index, mac_mode=f'"{mode}"')
            try:
                cluster.wait_converged(
                    [0, 1, 2],
                    check=lambda s: all(v > 0 for v in s.values()),
                    what="the cluster to form",
                )
            except AssertionError:  # e.g. heartbeats not carried: nothing to measure
                return {
                    **out,
                    "formed": False,
                    "served_pct": 0.0,
                    "serving_nodes": 0,
                    "duplicates": 0,
                    "outage_ms": None,
                    "served_after_pct": 0.0,
                    "broken": 0,
                    "syns_captured": 0,
                }
            bed.start_echo(addrs=[bed.vip4])
            capture = Capture(bed, workdir)
            load = ClientLoad(bed, workdir)
            time.sleep(serve)
            fault = cluster.crash(1)
            agreed = fault
            try:
                cluster.wait_converged([0, 2], what="survivors to absorb node1")
                agreed = time.monotonic()
            except AssertionError:
                out["survivors_agreed"] = False
            time.sleep(serve)
            record = load.stop()
            load = None
            report = capture.stop()
            capture = None
            logs = "".join(cluster.log(i) for i in range(3))
        finally:
            for part in (load, capture):
                if part is not None:
                    part.stop()
            cluster.stop_all()
    before = [r for r in record["tcp"] if r[metrics.START] < fault]
    after = [r for r in record["tcp"] if r[metrics.START] >= agreed + 0.5]
    victim = bed.nodes[1].name
    figures = metrics.outage(record, fault, victim, horizon=serve)

    def pct(rows: list[list[Any]]) -> float:
        return round(100 * sum(1 for r in rows if r[metrics.NAME]) / max(1, len(rows)), 1)

    out.update(
        {
            "served_pct": pct(before),
            "serving_nodes": len({r[metrics.NAME] for r in before if r[metrics.NAME]}),
            "duplicates": report.duplicate_synacks + report.duplicate_udp_answers,
            "outage_ms": figures["outage_ms"] if figures["affected_sources"] else None,
            "served_after_pct": pct(after),
            "broken": len(metrics.broken(record, set())),
            "syns_captured": report.syns,
            "longest_gap_ms": round(1000 * max(metrics.failure_bursts(record), default=0.0)),
            # Heartbeats are multicast too: a snooping switch that cuts them shows here.
            "lease_lapses": logs.count("lease lapsed"),
            "quorum_lost": logs.count("quorum lost"),
        }
    )
    return out


def works(cell: dict[str, Any]) -> bool:
    """Serves everyone, from every node, without duplicates, through a failover."""
    return bool(
        cell["served_pct"] >= 95
        and cell["serving_nodes"] == 3
        and cell["duplicates"] == 0
        and cell["served_after_pct"] >= 95
    )


def table(cells: list[dict[str, Any]]) -> str:
    lines = [
        f"{'mode':<10} {'network':<9} {'served':>7} {'nodes':>5} {'dup':>4} "
        f"{'outage':>8} {'after':>7} {'broken':>6}  works"
    ]
    for c in cells:
        outage = f"{c['outage_ms']:.0f} ms" if c["outage_ms"] is not None else "-"
        lines.append(
            f"{c['mode']:<10} {c['network']:<9} {c['served_pct']:>6}% "
            f"{c['serving_nodes']:>5} {c['duplicates']:>4} {outage:>8} "
            f"{c['served_after_pct']:>6}% {c['broken']:>6}  "
            f"{'yes' if works(c) else 'NO'}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MAC_MODES))
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--serve", type=float, default=4.0)
    parser.add_argument("--profile", choices=("default", "fast"), default="default")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    modes = args.modes.split(",")
    networks = args.networks.split(",")
    if not set(modes) <= set(MAC_MODES) or not set(networks) <= set(NETWORKS):
        parser.error(f"modes from {MAC_MODES}, networks from {NETWORKS}")
    cells = []
    with tempfile.TemporaryDirectory(prefix="lbd-macmodes-") as tmp:
        for mode in modes:
            for network in networks:
                cell = measure(network, mode, args.serve, Path(tmp), args.profile)
                cells.append(cell)
                if not args.json:
                    print(table([cell]).splitlines()[1], flush=True)
    result = {
        "profile": args.profile,
        "serve_s": args.serve,
        "cells": cells,
        "works_on": {m: sum(works(c) for c in cells if c["mode"] == m) for m in modes},
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text if args.json else "\n" + table(cells) + f"\nworks on: {result['works_on']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
