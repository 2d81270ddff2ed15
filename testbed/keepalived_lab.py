"""keepalived (VRRP) side by side with lbd: client-visible outage after a master failure.

    .venv/bin/python bench/keepalived_lab.py [--trials 20] [--advert 1,0.1]
                                             [--fault hostdeath|kill|service]
                                             [--prefix lbdt-kad-] [--json] [--out FILE]

The same kind of bed as bench/failover_lab.py (lbd.testbed.bed: 3 nodes on a hub,
a router, a client namespace), but each node has its own MAC (standard VRRP: the VIP
moves by gratuitous ARP) and runs Debian's keepalived (/usr/sbin/keepalived) instead of
lbd: one VRRP instance on eth0 holding the VIP, priorities 150/100/50 (node 0 is the
master and preempts back), ``advert_int 1`` (VRRPv2, the default) or ``advert_int 0.1``
(needs VRRPv3); keepalived also accepts down to 0.01, so ``--advert 0.02`` gives the
equal-interval twin of lbd's fast profile. No lbd, no nft rules. Every node runs the
same echo service on the VIP.

Each trial starts the lab's client load (lbd.testbed.load: 64 sources, a new TCP
connection every 4 ms, one long-lived connection, which VRRP puts on the master), waits
2 s plus a random phase of the advertisement cycle, fails the master, waits until the
client is served by a backup, stops the load and restores the master (it preempts).

Faults: ``hostdeath`` (default; the keepalived anchors' case) takes the master's link
down, then SIGSTOPs its whole keepalived process tree and SIGKILLs it. ``kill`` only
stops-then-kills the keepalived tree (a crash of the daemon, not of the host): the VIP
stays configured on the old master, whose service still answers until a backup's
gratuitous ARP moves the router over, so that figure is no outage bound (it is the
split-brain case); it is reported for completeness. ``service`` kills the master's
echo service (by PID, an echo server this bench started) while keepalived and the host
stay up: every node then runs a ``vrrp_script`` that checks its own echo service the way
lbd's ``[[check]]`` does in failover_lab.py (a TCP connect to 127.0.0.1:80, by
``/bin/bash``'s ``/dev/tcp`` as the non-root ``script_user nobody`` under
``enable_script_security``; no ``nc`` is installed here), with the same interval, rise
and fall (failover_lab.CHECK_*: integer seconds, keepalived 2.2.7 refuses fractions).
The script has no ``weight``: after ``fall`` failures the instance enters FAULT, the
master sends a priority-0 advertisement and drops the VIP, and the best backup takes
over at once (a negative weight would leave the backups waiting out the master-down
timer). The restarted service lets node 0 rise and preempt back.

The outage of a trial is lbd.testbed.metrics.outage (longest gap between successful
new connections of the sources the failed node served: here all of them), as for lbd.
keepalived is started with ``-n -l -D -G -P`` and its own ``-p``/``-r`` pid files per
namespace; its processes are found by parent PID and signalled by PID only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lbd.testbed import metrics
from lbd.testbed.bed import Bed, BedError, wait_for
from lbd.testbed.benchout import add_output_args, emit
from lbd.testbed.cluster import Capture, ClientLoad
from lbd.testbed.failover_lab import (
    CHECK_FALL,
    CHECK_INTERVAL,
    CHECK_RISE,
    CHECK_TIMEOUT_KEEPALIVED,
    kill_service,
    percentile,
    start_services,
    timeline,
)
from lbd.testbed.traffic import TCP_PORT

KEEPALIVED = "/usr/sbin/keepalived"
PRIORITIES = (150, 100, 50)
VRID = 51
TAKEOVER_TIMEOUT = 20.0
MASTER_TIMEOUT = 30.0
LEAD = 2.0  # load before the fault (the outage metric looks 1 s back; plots 2 s)
TAIL = 1.5  # load after the takeover
FAULTS = ("hostdeath", "kill", "service")
SCRIPT_USER = "nobody"  # enable_script_security: scripts never run as root
# A TCP connect, as lbd's tcp check: bash's /dev/tcp exits 1 on a refused connect.
CHECK_SCRIPT = f"/bin/bash -c '</dev/tcp/127.0.0.1/{TCP_PORT}'"


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def gone(pid: int, start: str) -> bool:
    """Dead (absent, zombie) or replaced by another process with the same PID."""
    fields = proc_stat(pid)
    return fields is None or fields[0] in {"Z", "X"} or fields[19] != start


def process_tree(root: int) -> dict[int, str]:
    """{pid: start time} of ``root`` and its live descendants (scan of /proc by parent)."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := proc_stat(int(entry))) and fields[0] not in "ZX":
            parents[int(entry)] = int(fields[1])
            starts[int(entry)] = fields[19]
    tree = {root} if root in starts else set()
    for _ in range(8):  # keepalived is two levels deep; bounded anyway
        more = {p for p, parent in parents.items() if parent in tree} - tree
        if not more:
            break
        tree |= more
    return {pid: starts[pid] for pid in tree}


class KeepalivedCluster:
    """keepalived in every node of ``bed``: configs, start, crash, who holds the VIP."""

    def __init__(self, bed: Bed, workdir: Path, advert_int: float, *, check: bool = False) -> None:
        self.bed = bed
        self.workdir = workdir
        self.advert_int = advert_int
        self.check = check
        """Every node's instance tracks a vrrp_script of its own echo service."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen[Any]] = {}
        self.services: dict[int, subprocess.Popen[Any]] = {}
        """Echo servers on the VIP and 127.0.0.1 (start_services), for ``check``."""

    def config(self, index: int) -> Path:
        node = self.bed.nodes[index]
        version = 3 if self.advert_int < 1 else 2
        script = track = ""
        if self.check:
            script = f"""vrrp_script chk_echo {{
    script "{CHECK_SCRIPT}"
    interval {CHECK_INTERVAL}
    timeout {CHECK_TIMEOUT_KEEPALIVED}
    rise {CHECK_RISE}
    fall {CHECK_FALL}
}}
"""
            track = "    track_script {\n        chk_echo\n    }\n"
        text = f"""global_defs {{
    router_id {node.name}
    vrrp_version {version}
    script_user {SCRIPT_USER}
    enable_script_security
}}
{script}vrrp_instance VI_LBD {{
    state BACKUP
    interface {node.iface}
    virtual_router_id {VRID}
    priority {PRIORITIES[index % len(PRIORITIES)]}
    advert_int {self.advert_int}
{track}    virtual_ipaddress {{
        {self.bed.vip4}/32 dev {node.iface}
    }}
}}
"""
        path = self.workdir / f"{node.name}.conf"
        path.write_text(text)
        return path

    def start(self, index: int) -> subprocess.Popen[Any]:
        if index in self.procs and self.procs[index].poll() is None:
            raise BedError(f"keepalived {index} is already running")
        node = self.bed.nodes[index]
        conf = self.config(index)
        pidfiles = [self.workdir / f"{node.name}.pid", self.workdir / f"{node.name}.vrrp.pid"]
        for stale in pidfiles:  # a killed keepalived leaves them; it would refuse to start
            stale.unlink(missing_ok=True)
        argv = [
            KEEPALIVED,
            "-n",
            "-l",
            "-D",
            "-G",
            "-P",
            "-f",
            str(conf),
            "-p",
            str(pidfiles[0]),
            "-r",
            str(pidfiles[1]),
        ]
        proc: subprocess.Popen[Any] = self.bed.popen(node.name, *argv)
        self.procs[index] = proc
        return proc

    def start_all(self) -> None:
        for index in range(len(self.bed.nodes)):
            self.start(index)

    def start_services(self, nodes: list[int] | None = None) -> None:
        """The echo service on the VIP and on 127.0.0.1 (the check's address)."""
        self.services.update(start_services(self.bed, nodes))

    def log(self, index: int) -> str:
        return self.bed.output(self.procs[index]) if index in self.procs else ""

    def crash(self, index: int) -> None:
        """SIGSTOP the whole keepalived tree (no child may leave gracefully), then SIGKILL."""
        proc = self.procs[index]
        tree = process_tree(proc.pid)
        for pid, start in tree.items():
            if not gone(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        tree |= process_tree(proc.pid)  # anything forked meanwhile (now stopped too)
        for pid, start in tree.items():
            if not gone(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=5)
        wait_for(
            lambda: all(gone(p, s) for p, s in tree.items()),
            5.0,
            0.02,
            "keepalived processes to die",
        )

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every keepalived (a graceful stop removes its VIP); bounded."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.crash(next(i for i, p in self.procs.items() if p is proc))

    def holders(self) -> list[int]:
        """Indexes of the nodes that have the VIP configured on their interface."""
        found = []
        for node in self.bed.nodes:
            out = self.bed.run(
                node.name, "ip", "-o", "-4", "addr", "show", "dev", node.iface, check=False
            )
            if f" {self.bed.vip4}/" in out.stdout:
                found.append(node.index)
        return found

    def drop_vip(self, index: int) -> None:
        """Remove a VIP a killed keepalived left behind (it cannot clean up)."""
        node = self.bed.nodes[index]
        self.bed.run(
            node.name, "ip", "addr", "del", f"{self.bed.vip4}/32", "dev", node.iface, check=False
        )

    def served_by(self, index: int, sources: int = 8) -> bool:
        """Every probe source gets its TCP answer from node ``index``."""
        answers = self.bed.probe(sources, timeout=0.3)
        return set(answers.values()) == {self.bed.nodes[index].name}

    def wait_master(self, index: int, timeout: float = MASTER_TIMEOUT) -> None:
        """Until node ``index`` alone holds the VIP and the client reaches it."""
        try:
            wait_for(
                lambda: self.holders() == [index] and self.served_by(index),
                timeout,
                0.1,
                f"node {index} to be the VRRP master",
            )
        except TimeoutError:
            logs = {i: self.log(i)[-1500:] for i in self.procs}
            raise AssertionError(f"no master {index}: holders {self.holders()}\n{logs}") from None


def served_elsewhere(load: ClientLoad, victim: str, since: float) -> bool:
    """The load's progress shows a success from another node after ``since``."""
    return any(p["t"] > since and any(n != victim for n in p["ok"]) for p in load.progress())


def run_trial(ka: KeepalivedCluster, workdir: Path, fault_kind: str) -> dict[str, Any]:
    """One master failure under fresh client load; the master is back at the end."""
    bed = ka.bed
    victim = bed.nodes[0].name
    capture = Capture(bed, workdir)
    load = ClientLoad(bed, workdir, long_lived=1)
    try:
        # A random phase of the advertisement cycle, or of the check's cycle.
        cycle = CHECK_INTERVAL if fault_kind == "service" else ka.advert_int
        time.sleep(LEAD + random.uniform(0, cycle))
        if fault_kind == "service":
            fault = kill_service(ka.services[0])  # keepalived and the host stay up
        else:
            fault = time.monotonic()
            if fault_kind == "hostdeath":
                bed.link_down(0)
            ka.crash(0)
        try:
            wait_for(lambda: served_elsewhere(load, victim, fault), TAKEOVER_TIMEOUT, 0.05)
            took_over = True
        except TimeoutError:
            took_over = False
        time.sleep(TAIL)
        end = time.monotonic()
    finally:
        record = load.stop()
        report = capture.stop()
    figures = metrics.outage(record, fault, victim, horizon=end - fault)
    after = [r for r in metrics.successes(record) if r[metrics.START] >= fault]
    new_master = after[-1][metrics.NAME] if after else None
    holders = ka.holders()
    # Restore: the link, no stale VIP, keepalived restarted; it preempts (priority 150).
    if fault_kind == "service":  # its check rises, the instance leaves FAULT, preempts
        ka.start_services([0])
    else:
        if fault_kind == "hostdeath":
            bed.link_up(0)
        ka.drop_vip(0)
        ka.start(0)
    ka.wait_master(0)
    return {
        "fault_t": fault,
        "took_over": took_over,
        "outage_ms": figures["outage_ms"] if took_over else None,
        "served_again_ms": figures["served_again_ms"],
        "new_master": new_master,
        "vip_holders_after": [bed.nodes[i].name for i in holders],
        "long_lived": len(record["conns"]),
        "long_lived_on_master": sum(c["node"] == victim for c in record["conns"]),
        "broken": len(metrics.broken(record)),
        "broken_elsewhere": len(metrics.broken(record, {victim})),
        "duplicate_synacks": report.duplicate_synacks,
        "duplicate_udp_answers": report.duplicate_udp_answers,
        "timeline": timeline(record, fault),
    }


def run_config(
    advert_int: float, trials: int, workdir: Path, fault_kind: str, prefix: str = "lbdt-kad-"
) -> dict[str, Any]:
    """``trials`` master failures with ``advert_int``; summary figures."""
    rows: list[dict[str, Any]] = []
    with Bed(prefix, nodes=3, add_vip=False, unique_macs=True) as bed:
        ka = KeepalivedCluster(
            bed, workdir / f"adv{advert_int}", advert_int, check=fault_kind == "service"
        )
        try:
            if ka.check:
                ka.start_services()
            else:
                bed.start_echo(addrs=[bed.vip4])
            ka.start_all()
            ka.wait_master(0)
            for _ in range(trials):
                rows.append(run_trial(ka, workdir, fault_kind))
        finally:
            ka.stop_all()
    outages = [r["outage_ms"] for r in rows if r["outage_ms"] is not None]
    summary = (
        {
            "p50": percentile(outages, 50),
            "p99": percentile(outages, 99),
            "max": max(outages),
            "mean": round(statistics.fmean(outages), 1),
        }
        if outages
        else None
    )
    return {
        "system": "keepalived",
        "profile": f"advert_int {advert_int:g}",
        "advert_int_s": advert_int,
        "vrrp_version": 3 if advert_int < 1 else 2,
        "interval_ms": round(advert_int * 1000),
        "fault": fault_kind,
        "trials": len(rows),
        "measured": len(outages),
        "outage_ms": summary,
        "outages_ms": outages,
        "long_lived_connections": sum(r["long_lived"] for r in rows),
        "long_lived_on_master": sum(r["long_lived_on_master"] for r in rows),
        "broken_connections": sum(r["broken"] for r in rows),
        "broken_elsewhere": sum(r["broken_elsewhere"] for r in rows),
        "duplicate_synacks": sum(r["duplicate_synacks"] for r in rows),
        "duplicate_udp_answers": sum(r["duplicate_udp_answers"] for r in rows),
        "check": (
            {
                "interval_s": CHECK_INTERVAL,
                "timeout_s": CHECK_TIMEOUT_KEEPALIVED,
                "rise": CHECK_RISE,
                "fall": CHECK_FALL,
                "script": CHECK_SCRIPT,
                "script_user": SCRIPT_USER,
            }
            if fault_kind == "service"
            else None
        ),
        "new_masters": sorted({r["new_master"] for r in rows if r["new_master"]}),
        "split_brain_trials": sum(len(r["vip_holders_after"]) > 1 for r in rows),
        "timeline": rows[0]["timeline"] if rows else None,
        "trial_rows": [{k: v for k, v in r.items() if k != "timeline"} for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--advert", default="1,0.1", help="advert_int values (s), 0.01..255")
    parser.add_argument("--fault", choices=FAULTS, default="hostdeath")
    add_output_args(parser, prefix="lbdt-kad-")
    args = parser.parse_args(argv)
    if not Path(KEEPALIVED).exists():
        parser.error(f"{KEEPALIVED} is not installed (apt-get install keepalived)")
    results = []
    with tempfile.TemporaryDirectory(prefix="lbd-kabench-") as tmp:
        for advert in args.advert.split(","):
            results.append(
                run_config(float(advert), args.trials, Path(tmp), args.fault, args.prefix)
            )
    out = {"benchmark": "keepalived_lab", "nodes": 3, "fault": args.fault, "results": results}
    if not emit(args, out):
        for r in results:
            o = r["outage_ms"] or {}
            print(
                f"keepalived {r['profile']} ({r['fault']}): outage p50 {o.get('p50')} ms, "
                f"p99 {o.get('p99')} ms over {r['measured']}/{r['trials']} trials; broken "
                f"{r['broken_connections']}/{r['long_lived_connections']} long-lived "
                f"({r['broken_elsewhere']} elsewhere); duplicates "
                f"{r['duplicate_synacks']}+{r['duplicate_udp_answers']}; split brain "
                f"{r['split_brain_trials']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
