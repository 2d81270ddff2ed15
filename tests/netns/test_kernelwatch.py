"""Watched kernel state (S5): the kernel changed under a running daemon, under load.

Each scenario runs 3 real daemons (fast timer profile) with ClientLoad (64 IPv4
sources, a new TCP connection and a UDP query every 4 ms, one long-lived connection
per node) and a capture in the client namespace, changes node1's kernel state the way
an admin or a network manager would, and asserts:

* zero duplicate answers and no broken long-lived connection on the other nodes;
* failed new connections bounded: the affected slices are served again (restored in
  place, or handed over and back) within ``OUTAGE_LIMIT_MS``;
* one journal entry with the fault's MESSAGE_ID (node1 writes native journal
  datagrams to a socket of the test) and a log line naming it;
* ``lbd-cli status`` lists the problem while it lasts (polled every 10 ms);
* node1 serves again at the end (or, after a SIGKILL, stays closed).

Faults: ``ip addr del`` of the IPv4 and the IPv6 VIP; link down and up with
``keep_addr_on_down=0`` (the IPv6 VIP goes with the link); ``nft flush ruleset``
(tables owner + persist: nothing of lbd's goes); ``nft flush ruleset`` at once followed
by SIGKILL (the node stays closed); the same with persistence switched off
(``LBD_TABLE_PERSIST=0``, as on a kernel < 6.9): the guard is back within a few
milliseconds, measured by a netlink listener; in multicast MAC mode the ``lbd_mac``
tables deleted; the shared MAC changed; a sysctl reset.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbd.daemon.ctl import CtlError, request
from lbd.daemon.notify import MESSAGE_IDS, decode_journal
from lbd.testbed import metrics
from lbd.testbed.bed import Bed, sources6, wait_for
from lbd.testbed.cluster import Capture, ClientLoad, LbdCluster
from lbd.testbed.sink import DatagramSink

from .test_e2e import assert_clean

# Drain handoff (tens of ms) and back after the restore (0.2-0.6 s), client sampling
# (256 ms), and slack for a shared 2-core machine running other suites.
OUTAGE_LIMIT_MS = 1000.0
SETTLE = 1.0
SUBJECT = 1
FAULT_KINDS = {
    "VipRemoved",
    "LinkDown",
    "MacChanged",
    "TablesChanged",
    "SysctlChanged",
    "ClusterMacLeft",
    "KernelRestoreFailed",
}


@dataclass
class Run:
    bed: Bed
    cluster: LbdCluster
    journal_socket: DatagramSink
    load: ClientLoad | None = None
    capture: Capture | None = None
    seen: list[list[str]] = field(default_factory=list)
    _polling: threading.Event = field(default_factory=threading.Event)

    @property
    def ns(self) -> str:
        return self.bed.nodes[SUBJECT].name

    def sh(self, *argv: str, check: bool = True) -> str:
        return self.bed.run(self.ns, *argv, check=check).stdout

    def status(self, index: int = SUBJECT) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = request(
                str(self.cluster.sock(index)), {"cmd": "status"}, timeout=1.0
            )
        except CtlError:
            return None
        return result

    def poll_problems(self) -> None:
        """Record node1's status problems every 10 ms (a thread) until finish()."""

        def poll() -> None:
            while not self._polling.is_set():
                status = self.status()
                if status and status["problems"]:
                    self.seen.append(status["problems"])
                time.sleep(0.01)

        threading.Thread(target=poll, daemon=True).start()

    def journal(self) -> list[dict[str, str]]:
        """node1's journal entries so far, decoded."""
        return [
            {k: v.decode(errors="replace") for k, v in decode_journal(d).items()}
            for d in list(self.journal_socket.received)
        ]

    def journal_kinds(self) -> list[str]:
        ids = {v: k for k, v in MESSAGE_IDS.items()}
        return [ids.get(e.get("MESSAGE_ID", ""), "") for e in self.journal()]

    def finish(self) -> tuple[dict[str, Any], Any]:
        self._polling.set()
        assert self.load is not None and self.capture is not None
        record, report = self.load.stop(), self.capture.stop()
        self.load = self.capture = None
        return record, report


@contextmanager
def cluster_run(
    bed: Callable[..., Bed],
    tmp_path: Path,
    *,
    v6: bool = False,
    env: dict[str, str] | None = None,
    bed_kw: dict[str, Any] | None = None,
    **extra: str,
) -> Iterator[Run]:
    the_bed = bed(nodes=3, add_vip=False, **(bed_kw or {}))
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile="fast")
    journal = DatagramSink(tmp_path / "journal")
    run = Run(the_bed, cluster, journal)
    if v6:
        extra["vips"] = f'["{the_bed.vip4}", "{the_bed.vip6}"]'
    try:
        for index in range(3):
            node_env = dict(env or {})
            if index == SUBJECT:
                node_env["LBD_JOURNAL_SOCKET"] = str(tmp_path / "journal")
            cluster.start(index, env=node_env, **extra)
        cluster.wait_converged([0, 1, 2], what="the cluster to form")
        the_bed.start_echo()
        run.capture = Capture(the_bed, tmp_path)
        run.load = ClientLoad(the_bed, tmp_path)
        time.sleep(SETTLE)
        run.poll_problems()
        yield run
    finally:
        run._polling.set()
        for part in (run.load, run.capture):
            if part is not None:
                part.stop()
        cluster.stop_all()
        journal.close()


def log_lines(run: Run, *words: str) -> list[str]:
    """node1's journal messages (and any stderr line) holding every one of ``words``."""
    lines = [e.get("MESSAGE", "") for e in run.journal()]
    lines += run.cluster.log(SUBJECT).splitlines()
    return [ln for ln in lines if all(w in ln for w in words)]


VIP_RESTORE_LIMIT_MS = 500.0


def restored_ms(run: Run, what: str) -> float:
    """The restore time node1 logged for a fault (its "fixed after N ms" line)."""
    lines = log_lines(run, what, "fixed after")
    assert lines, log_lines(run)
    return float(lines[-1].split("fixed after ")[1].split(" ms")[0])


def assert_served_again(record: dict[str, Any], fault: float, name: str) -> dict[str, Any]:
    figures = metrics.outage(record, fault, name)
    print(
        "figures:",
        figures,
        "bursts (ms):",
        [round(b * 1000) for b in metrics.failure_bursts(record)],
    )
    assert figures["affected_sources"] >= 5 and not figures["unserved_sources"], figures
    assert figures["served_again_ms"] <= OUTAGE_LIMIT_MS, figures
    assert max(metrics.failure_bursts(record), default=0) * 1000 <= OUTAGE_LIMIT_MS
    return figures


def test_vip_removed_ipv4_then_ipv6(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path, v6=True) as run:
        name = run.bed.nodes[SUBJECT].name
        fault = time.monotonic()
        run.sh("ip", "addr", "del", f"{run.bed.vip4}/32", "dev", "eth0")
        wait_for(
            lambda: log_lines(run, f"VIP {run.bed.vip4}", "fixed after"),
            5.0,
            what="node1 to put its IPv4 VIP back",
        )
        run.cluster.wait_converged(
            [0, 1, 2],
            check=lambda s: s[run.cluster.node_id(SUBJECT)] > 0,
            what="node1 to take slices again",
        )
        time.sleep(SETTLE)
        # The IPv6 VIP: no load generator for it; probes show it answered again, once.
        v6 = sources6(40)
        run.sh("ip", "-6", "addr", "del", f"{run.bed.vip6}/128", "dev", "eth0")
        wait_for(
            lambda: log_lines(run, f"VIP {run.bed.vip6}", "fixed after"),
            5.0,
            what="node1 to put its IPv6 VIP back",
        )
        run.cluster.wait_converged(
            [0, 1, 2],
            check=lambda s: s[run.cluster.node_id(SUBJECT)] > 0,
            what="node1 to take slices again",
        )
        time.sleep(SETTLE)
        end = time.monotonic()
        record, report = run.finish()
        assert_clean(record, report)
        assert_served_again(record, fault, name)
        answers = run.bed.probe_udp_all(v6, window=0.5)
        assert all(len(v) == 1 for v in answers.values()), answers
        assert name in {v[0] for v in answers.values()}
        assert run.bed.vip6 in run.sh("ip", "-6", "addr", "show", "dev", "eth0")
        restored = [restored_ms(run, f"VIP {vip}") for vip in (run.bed.vip4, run.bed.vip6)]
        print("restored in (ms):", restored)
        # Over netlink, not by the link helper's process start (seconds under load):
        # the VIP's established connections stall while it is gone.
        assert max(restored) < VIP_RESTORE_LIMIT_MS, restored
        assert log_lines(run, f"VIP {run.bed.vip4} missing on eth0", "draining")
        assert run.journal_kinds().count("VipRemoved") == 2
        assert run.journal_kinds().count("KernelStateRestored") >= 2
        # (Put back in milliseconds, the fault is gone before a status poll can see it;
        # a VIP that cannot be put back stays a PROBLEM line: tests/test_kernelwatch.py.)
        assert metrics.shares(record, since=end - SETTLE)[name] > 0


def test_link_down_and_up_flushing_the_ipv6_vip(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """ifdown/ifup as a network manager does it, with keep_addr_on_down=0: the IPv6
    addresses go with the link and ifup puts back only the node's own."""
    with cluster_run(bed, tmp_path, v6=True) as run:
        name, node = run.bed.nodes[SUBJECT].name, run.bed.nodes[SUBJECT]
        run.bed.set_sysctls(run.ns, {"net.ipv6.conf.eth0.keep_addr_on_down": 0})
        fault = run.cluster.link_down(SUBJECT)
        run.cluster.wait_converged([0, 2], what="the peers to take node1's slices")
        wait_for(
            lambda: log_lines(run, f"VIP {run.bed.vip6} missing"),
            2.0,
            what="the IPv6 VIP to go with the link",
        )
        time.sleep(0.5)
        assert any(f"{node.iface} is down" in p for seen in run.seen for p in seen), run.seen
        # ifup: the link, the node's own addresses and routes; not lbd's VIP.
        run.sh("ip", "link", "set", "eth0", "up")
        run.sh("ip", "addr", "replace", f"{node.addr6}/64", "dev", "eth0", "nodad")
        for gateway in ("192.0.2.1", "2001:db8:1::1"):
            route = ["ip", "route", "replace", "default", "via", gateway]

            def routed(argv: list[str] = route) -> bool:
                return run.bed.run(run.ns, *argv, check=False).returncode == 0

            wait_for(routed, 3.0, what=f"a default route via {gateway}")
        run.cluster.wait_converged(
            [0, 1, 2],
            check=lambda s: s[run.cluster.node_id(SUBJECT)] > 0,
            what="node1 to take slices again",
        )
        time.sleep(SETTLE)
        end = time.monotonic()
        record, report = run.finish()
        assert_clean(record, report, down={name})
        assert_served_again(record, fault, name)
        assert run.bed.vip6 in run.sh("ip", "-6", "addr", "show", "dev", "eth0")
        answers = run.bed.probe_udp_all(sources6(40), window=0.5)
        assert all(len(v) == 1 for v in answers.values()), answers
        assert name in {v[0] for v in answers.values()}
        kinds = run.journal_kinds()
        assert "LinkDown" in kinds and "VipRemoved" in kinds, kinds
        assert log_lines(run, "eth0 is down", "fixed after")
        assert metrics.shares(record, since=end - SETTLE)[name] > 0


def guard_listing(run: Run) -> str:
    return run.sh("nft", "list", "table", "inet", "lbd_guard", check=False)


def test_flush_ruleset_then_flush_and_sigkill(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """Owner + persist tables: a flush takes nothing of lbd's; a flush immediately
    followed by SIGKILL leaves the guard (orphaned) and the node closed."""
    with cluster_run(bed, tmp_path) as run:
        name = run.bed.nodes[SUBJECT].name
        flushed = time.monotonic()
        run.sh("nft", "flush", "ruleset")
        tables = run.sh("nft", "list", "tables")
        assert "table inet lbd\n" in tables and "table inet lbd_guard" in tables, tables
        denied = run.bed.run(run.ns, "nft", "delete", "table", "inet", "lbd_guard", check=False)
        assert "Operation not permitted" in denied.stderr, denied
        assert "tcp flags syn / fin,syn,rst,ack drop" in guard_listing(run)
        time.sleep(SETTLE)
        assert not set(run.journal_kinds()) & FAULT_KINDS  # the flush changed nothing of ours
        pid = run.cluster.procs[SUBJECT].pid
        killed = time.monotonic()
        run.sh("sh", "-c", f"nft flush ruleset; kill -9 {pid}")
        run.cluster.procs[SUBJECT].wait(timeout=5)
        run.cluster.wait_converged([0, 2], what="the peers to take node1's slices")
        time.sleep(SETTLE)
        record, report = run.finish()
        # Nothing of lbd's changed; on a busy 2-core machine a connection may still fail.
        assert metrics.failures(record, since=flushed, until=killed) <= 2
        assert_clean(record, report)
        assert_served_again(record, killed, name)
        # Closed: the orphaned guard drops every new flow; node1 answers nothing new.
        late = [
            r
            for r in metrics.successes(record)
            if r[metrics.NAME] == name and r[metrics.START] > killed + 0.05
        ]
        assert not late, late[:5]
        listing = guard_listing(run)
        assert "tcp flags syn / fin,syn,rst,ack drop" in listing, listing
        assert "table inet lbd " not in run.sh("nft", "list", "tables")
        assert run.bed.vip4 in run.sh("ip", "addr", "show", "dev", "eth0")
        answered = run.bed.probe(64, timeout=1.0)
        assert set(answered.values()) == {run.bed.nodes[0].name, run.bed.nodes[2].name}, answered


GUARD_WATCH = r"""
import os, select, sys, time
from lbd.netcfg import netlink as nl
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))  # read events as they come
sock = nl.open_socket(nl.NETLINK_NETFILTER, 1 << (nl.NFNLGRP_NFTABLES - 1))
print("READY", flush=True)
while True:
    select.select([sock], [], [], 1.0)
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            break
        now = time.monotonic()
        for ev in nl.parse_nft(data):
            if isinstance(ev, nl.NftEvent) and ev.table == "lbd_guard" and ev.what in (
                    "NEWTABLE", "DELTABLE"):
                print(f"{now:.6f} {ev.what}", flush=True)
"""


def test_flush_without_persistent_tables_window(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """As on a kernel < 6.9 (LBD_TABLE_PERSIST=0): a flush deletes the guard and lbd
    writes it again at once; the window a SIGKILL could hit is measured. The flush
    also deletes flood mode's lbd_mac tables, and no new connection may fail."""
    with cluster_run(bed, tmp_path, env={"LBD_TABLE_PERSIST": "0"}, mac_mode='"flood"') as run:
        watch = run.bed.python(run.ns, "-c", GUARD_WATCH)
        wait_for(lambda: "READY" in run.bed.output(watch), 5.0, what="the nft listener")
        for _ in range(10):
            run.sh("nft", "flush", "ruleset")
            time.sleep(0.2)
        time.sleep(SETTLE)
        record, report = run.finish()
        lines = [ln.split() for ln in run.bed.output(watch).splitlines() if ln[:1].isdigit()]
        windows, gone = [], None
        for stamp, what in lines:
            if what == "DELTABLE":
                gone = float(stamp)
            elif gone is not None:
                windows.append((float(stamp) - gone) * 1000)
                gone = None
        print(
            f"guard missing after a flush (ms): median {statistics.median(windows):.2f}, "
            f"max {max(windows):.2f}, all {[round(w, 2) for w in windows]}"
        )
        assert len(windows) == 10 and max(windows) < 100, windows
        assert "tcp flags syn / fin,syn,rst,ack drop" in guard_listing(run)
        assert_clean(record, report)
        assert metrics.failures(record) == 0
        assert run.journal_kinds().count("TablesChanged") == 10
        assert log_lines(run, "deltable in inet lbd_guard", "by nft", "written again")
        # Flood mode: lbd_mac went too, but its owned twin stayed, so no
        # SYN was lost in the gap (7 of 10 flushes lost one before the twin).
        assert log_lines(run, "deltable in netdev lbd_mac by nft", "written again")
        assert "table netdev lbd_mac_owned" in run.sh("nft", "list", "tables")


def test_multicast_mode_lbd_mac_tables_deleted(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """mac_mode = "multicast", tables not persistent (as on a kernel < 6.9): a flush
    deletes lbd_mac (pkttype, ARP and ND rules) and the guard; lbd writes them again."""
    with cluster_run(
        bed,
        tmp_path,
        v6=True,
        env={"LBD_TABLE_PERSIST": "0"},
        bed_kw={"switch": True, "unique_macs": True},
        mac_mode='"multicast"',
    ) as run:
        name = run.bed.nodes[SUBJECT].name
        fault = time.monotonic()
        run.sh("nft", "flush", "ruleset")
        wait_for(
            lambda: log_lines(run, "lbd_mac", "written again"),
            2.0,
            what="node1 to write its tables again",
        )
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_clean(record, report)
        figures = metrics.outage(record, fault, name)
        print("figures:", figures, [ln for ln in log_lines(run, "written again")])
        assert not figures["unserved_sources"], figures
        assert figures["outage_ms"] is not None and figures["outage_ms"] <= OUTAGE_LIMIT_MS
        tables = run.sh("nft", "list", "tables")
        assert "table arp lbd_mac" in tables and "table inet lbd_mac" in tables, tables
        assert "meta pkttype set host" in run.sh("nft", "list", "chain", "inet", "lbd_mac", "pre")
        assert "arp saddr ether set" in run.sh("nft", "list", "chain", "arp", "lbd_mac", "out")
        assert "TablesChanged" in run.journal_kinds()
        answers = run.bed.probe_udp_all(sources6(40), window=0.5)
        assert all(len(v) == 1 for v in answers.values()), answers


def test_shared_mac_changed_and_sysctl_reset(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """The shared MAC (set by lbd) changed, then arp_ignore reset: both put back."""
    with cluster_run(bed, tmp_path, cluster_mac='"02:00:5e:00:01:64"') as run:
        name = run.bed.nodes[SUBJECT].name
        fault = time.monotonic()
        run.sh("ip", "link", "set", "eth0", "address", "02:00:5e:00:01:99")
        wait_for(
            lambda: log_lines(run, "has MAC 02:00:5e:00:01:99", "fixed after"),
            5.0,
            what="node1 to set its MAC back",
        )
        assert "02:00:5e:00:01:64" in run.sh("ip", "link", "show", "eth0")
        run.cluster.wait_converged(
            [0, 1, 2],
            check=lambda s: s[run.cluster.node_id(SUBJECT)] > 0,
            what="node1 to take slices again",
        )
        run.bed.set_sysctls(run.ns, {"net.ipv4.conf.eth0.arp_ignore": 0})
        wait_for(
            lambda: log_lines(run, "arp_ignore", "fixed after"),
            5.0,
            what="node1 to set arp_ignore back",
        )
        assert run.bed.read_sysctl(run.ns, "net.ipv4.conf.eth0.arp_ignore") == "1"
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_clean(record, report)
        assert_served_again(record, fault, name)
        kinds = run.journal_kinds()
        assert "MacChanged" in kinds and "SysctlChanged" in kinds, kinds
        print("restored in (ms):", restored_ms(run, "has MAC"), restored_ms(run, "arp_ignore"))
        assert any("not the cluster MAC" in p for seen in run.seen for p in seen), run.seen


MACMODE_HOLD = r"""
import sys, time
from lbd.netcfg.macmode import MacMode
mode = MacMode("eth0", ["192.0.2.100", "2001:db8:1::100"], sys.argv[1], persist=True,
               state_file=sys.argv[4])
getattr(mode, sys.argv[2])()
print("PERSISTENT", mode.persistent, flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_macmode_tables_owner_and_persist(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """lbd_mac tables of a live owner survive a flush, stay after a SIGKILL (orphaned,
    still rewriting), are adopted by the next run and removed by its restore."""
    the_bed = bed(nodes=1, add_vip=False, switch=True, unique_macs=True)
    ns, cmac, state = the_bed.nodes[0].name, "03:00:5e:11:22:33", str(tmp_path / "mac.json")
    owner = the_bed.python(ns, "-c", MACMODE_HOLD, cmac, "apply", "30", state)
    wait_for(lambda: "PERSISTENT" in the_bed.output(owner), 10.0, what="apply")
    assert "PERSISTENT True" in the_bed.output(owner)
    the_bed.run(ns, "nft", "flush", "ruleset")
    denied = the_bed.run(ns, "nft", "delete", "table", "arp", "lbd_mac", check=False)
    assert "Operation not permitted" in denied.stderr, denied
    tables = the_bed.run(ns, "nft", "list", "tables").stdout
    assert "table arp lbd_mac" in tables and "table inet lbd_mac" in tables, tables
    the_bed.stop(owner, 9)
    time.sleep(0.1)
    tables = the_bed.run(ns, "nft", "list", "tables").stdout
    assert "table arp lbd_mac" in tables and "table inet lbd_mac" in tables, tables
    again = the_bed.python(ns, "-c", MACMODE_HOLD, cmac, "apply", "0", state)
    assert again.wait(timeout=10) == 0 and "PERSISTENT True" in the_bed.output(again)
    rules = the_bed.run(ns, "nft", "list", "chain", "inet", "lbd_mac", "pre").stdout
    assert rules.count("pkttype set host") == 1, rules
    gone = the_bed.python(ns, "-c", MACMODE_HOLD, cmac, "restore", "0", state)
    assert gone.wait(timeout=10) == 0, the_bed.output(gone)
    assert "lbd_mac" not in the_bed.run(ns, "nft", "list", "tables").stdout
