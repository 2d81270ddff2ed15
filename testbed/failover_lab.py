"""Failover benchmark in real namespaces: client-visible outage after a daemon crash.

    .venv/bin/python bench/failover_lab.py [--trials 20] [--profiles default,fast]
                                           [--nodes 3] [--fault kill|hostdeath|service]
                                           [--prefix lbdt-bench] [--json] [--out FILE]

For each timer profile: one 3-node bed with real daemons, echo services and the lab's
client load (64 sources, a new TCP connection every 4 ms). Each trial waits a random
phase of the heartbeat cycle, fails one node (rotating): ``kill`` SIGKILLs its daemon
(the host stays up: the kernel lease closes it), ``hostdeath`` takes its link down
(nothing of it is reachable any more); waits until the survivors agree, restores the
node and waits until it is back. ``service`` kills node1's echo service (by PID, an
echo server this bench started) while every daemon lives: each node runs a
``[[check]]`` of its own echo service (SERVICE_CHECK: TCP connect to 127.0.0.1:80,
the same interval/rise/fall as keepalived_lab.py's ``vrrp_script``), so node1 drains
its slices to the others once ``fall`` runs failed; the restarted service brings them
back. The client-visible outage of a trial is
the longest gap between successful new connections from the sources the killed node
served (lbd.testbed.metrics.outage). Also counts duplicate answers over the whole run
(packet capture) and measures one daemon's CPU % and RSS while serving. ``timeline``
(per-node new connections per 100 ms around the first fault) feeds bench/plots.py.
``--out`` also writes the JSON to a file (bench/out/ by convention).

keepalived in the same bed, same load and metric: bench/keepalived_lab.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lbd.protocol.config import PROFILES
from lbd.testbed import metrics
from lbd.testbed.bed import Bed, wait_for
from lbd.testbed.benchout import add_output_args, emit
from lbd.testbed.cluster import Capture, ClientLoad, LbdCluster, holds_slices
from lbd.testbed.traffic import TCP_PORT

CLK_TCK = os.sysconf("SC_CLK_TCK")
FAULTS = ("kill", "hostdeath", "service")

# --fault service: the service check, the same for lbd and keepalived (keepalived_lab.py).
# keepalived 2.2.7 takes a vrrp_script's interval and timeout in integer seconds only
# (``interval 0.2``: "invalid number"), so both check every second. lbd's timeout must
# be below its interval, keepalived's is at least 1 s: a killed service refuses the
# connect at once, so neither check ever waits for its timeout here.
CHECK_INTERVAL, CHECK_RISE, CHECK_FALL = 1, 2, 2
CHECK_TIMEOUT_LBD, CHECK_TIMEOUT_KEEPALIVED = 0.5, 1
SERVICE_CHECK = (
    f'\n[[check]]\nname = "echo"\ntcp = "127.0.0.1:{TCP_PORT}"\n'
    f"interval = {CHECK_INTERVAL}\ntimeout = {CHECK_TIMEOUT_LBD}\n"
    f"rise = {CHECK_RISE}\nfall = {CHECK_FALL}\n"
)


def start_services(bed: Bed, nodes: list[int] | None = None) -> dict[int, Any]:
    """The echo service on the VIP (for clients) and on 127.0.0.1 (for the check)."""
    chosen = nodes if nodes is not None else list(range(len(bed.nodes)))
    procs = bed.start_echo(nodes=chosen, addrs=[bed.vip4, "127.0.0.1"])
    return dict(zip(chosen, procs, strict=True))


def kill_service(proc: Any) -> float:
    """SIGKILL an echo server this bench started (by PID); the time of the fault."""
    at = time.monotonic()
    proc.kill()
    proc.wait(timeout=5)
    return at


class CheckedCluster(LbdCluster):
    """Every daemon's config gets SERVICE_CHECK (its own echo service)."""

    def config(self, index: int, **extra: str) -> Path:
        path = super().config(index, **extra)
        path.write_text(path.read_text() + SERVICE_CHECK)
        return path


def drained(victim: int, slices: dict[str, int]) -> bool:
    """Whether ``victim`` holds no slices (its check failed, it drained)."""
    return slices[f"node{victim}"] == 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def daemon_cost(pid: int, seconds: float) -> dict[str, float]:
    """CPU % of one core over ``seconds`` and RSS (MB) of the daemon ``pid``."""

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    before, start = cpu_ticks(), time.monotonic()
    time.sleep(seconds)
    used = (cpu_ticks() - before) / CLK_TCK
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "cpu_percent": round(100 * used / (time.monotonic() - start), 2),
        "rss_mb": round(rss_kb / 1024, 1),
    }


def timeline(
    record: dict[str, Any],
    fault: float,
    *,
    before: float = 2.0,
    after: float = 5.0,
    step: float = 0.1,
    until: float | None = None,
) -> dict[str, Any]:
    """Successful new connections per node (and failures) per ``step`` around ``fault``.

    Attempts completing at or after ``until`` (e.g. the next trial's fault) are left out.
    """
    bins = round((before + after) / step)
    nodes: dict[str, list[int]] = {}
    failed = [0] * bins
    for row in record["tcp"]:
        if until is not None and row[metrics.END] >= until:
            continue
        slot = int((row[metrics.END] - fault + before) // step)
        if not 0 <= slot < bins:
            continue
        if row[metrics.NAME]:
            nodes.setdefault(row[metrics.NAME], [0] * bins)[slot] += 1
        else:
            failed[slot] += 1
    return {"step_s": step, "t0_s": -before, "nodes": dict(sorted(nodes.items())), "failed": failed}


def run_profile(
    profile: str,
    trials: int,
    nodes: int,
    workdir: Path,
    fault_kind: str = "kill",
    *,
    prefix: str = "lbdt-bench",
) -> dict[str, Any]:
    interval = PROFILES[profile].interval
    everyone = list(range(nodes))
    service = fault_kind == "service"
    with Bed(f"{prefix}{profile[:4]}-", nodes=nodes, add_vip=False) as bed:
        cluster = (CheckedCluster if service else LbdCluster)(
            bed, workdir / profile, profile=profile
        )
        try:
            cluster.start_all()
            services: dict[int, Any] = {}
            if service:  # nobody claims before its check rose: services first
                wait_for(
                    lambda: all(
                        bed.vip4 in bed.run(n.name, "ip", "-4", "addr").stdout for n in bed.nodes
                    ),
                    10.0,
                    0.1,
                    "the daemons' VIP",
                )
                services = start_services(bed)
            cluster.wait_converged(everyone, check=lambda s: all(v > 0 for v in s.values()))
            if not service:
                bed.start_echo(addrs=[bed.vip4])
            capture = Capture(bed, workdir)
            load = ClientLoad(bed, workdir)
            time.sleep(1.0)
            cost = daemon_cost(cluster.procs[0].pid, 5.0)
            faults: list[tuple[float, int, float]] = []
            for trial in range(trials):
                victim = 1 + trial % (nodes - 1)  # node 0 keeps running: its cost is measured
                if service:
                    victim = 1  # ~1/3 of the clients; its daemon lives on
                    time.sleep(0.5 + random.uniform(0, CHECK_INTERVAL))  # random check phase
                    fault = kill_service(services[victim])
                    cluster.wait_converged(everyone, check=functools.partial(drained, victim))
                else:
                    time.sleep(0.5 + random.uniform(0, interval))  # random heartbeat phase
                    if fault_kind == "hostdeath":
                        fault = cluster.link_down(victim)
                    else:
                        fault = cluster.crash(victim)
                    cluster.wait_converged([i for i in everyone if i != victim])
                time.sleep(0.3)
                back = time.monotonic()
                if service:
                    services.update(start_services(bed, [victim]))
                elif fault_kind == "hostdeath":
                    cluster.link_up(victim)
                else:
                    cluster.start(victim)
                cluster.wait_converged(everyone, check=holds_slices(victim))
                faults.append((fault, victim, back))
            time.sleep(0.5)
            record = load.stop()
            report = capture.stop()
        finally:
            cluster.stop_all()
    failed = {bed.nodes[victim].name for _, victim, _ in faults}
    outages = []
    for fault, victim, back in faults:
        figures = metrics.outage(record, fault, bed.nodes[victim].name, horizon=back - fault)
        if figures["outage_ms"] is not None:
            outages.append(figures["outage_ms"])
    return {
        "system": "lbd",
        "profile": profile,
        "fault": fault_kind,
        "interval_ms": round(interval * 1000),
        "dead_after_ms": round(PROFILES[profile].dead_after * 1000),
        "trials": len(faults),
        "measured": len(outages),
        "outage_ms": {
            "p50": percentile(outages, 50),
            "p99": percentile(outages, 99),
            "max": max(outages),
            "mean": round(statistics.fmean(outages), 1),
        },
        "outages_ms": outages,
        "duplicate_synacks": report.duplicate_synacks,
        "duplicate_udp_answers": report.duplicate_udp_answers,
        "broken_connections": len(metrics.broken(record)),
        # A killed service breaks its own connections; the other nodes' must survive.
        "broken_elsewhere": len(metrics.broken(record, failed)),
        "long_lived_connections": len(record["conns"]),
        "check": (
            {
                "interval_s": CHECK_INTERVAL,
                "timeout_s": CHECK_TIMEOUT_LBD,
                "rise": CHECK_RISE,
                "fall": CHECK_FALL,
            }
            if service
            else None
        ),
        "daemon_cost_n3": cost,
        "timeline": timeline(record, faults[0][0], until=faults[1][0] if len(faults) > 1 else None)
        if faults
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--profiles", default="default,fast")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--fault", choices=FAULTS, default="kill")
    add_output_args(parser, prefix="lbdt-bench")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="lbd-bench-") as tmp:
        for profile in args.profiles.split(","):
            results.append(
                run_profile(
                    profile, args.trials, args.nodes, Path(tmp), args.fault, prefix=args.prefix
                )
            )
    out = {
        "benchmark": "failover_lab",
        "nodes": args.nodes,
        "fault": args.fault,
        "results": results,
    }
    if not emit(args, out):
        for r in results:
            o = r["outage_ms"]
            print(
                f"{r['profile']:>8} ({r['fault']}): outage p50 {o['p50']} ms, "
                f"p99 {o['p99']} ms over {r['measured']} trials; "
                f"duplicates {r['duplicate_synacks']}+"
                f"{r['duplicate_udp_answers']}; broken {r['broken_connections']} "
                f"({r['broken_elsewhere']} elsewhere) of {r['long_lived_connections']} "
                f"long-lived; daemon {r['daemon_cost_n3']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
