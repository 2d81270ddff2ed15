"""A hostile neighbourhood (issue 13, item 6): the port cannot be stolen, the kernel
filters what may reach it, floods are measured.

* No port sharing: while a daemon holds the heartbeat port, an unprivileged process in
  its namespace cannot bind that port in any way (wildcard, own address, group,
  loopback, IPv6 dual-stack; with or without SO_REUSEADDR/SO_REUSEPORT), and the
  daemon goes on hearing every heartbeat of its peers, in a unicast-only cluster
  (``multicast = false``), where a stolen port would make it deaf. A daemon that finds
  the port taken refuses to start: one line, exit 1, nothing left behind.
* The filter (``inet lbd_hb``): datagrams from outside the segment, or too short or too
  long for the wire format, are dropped and counted before the socket; a source added
  to ``peers`` by a reload passes from then on.
* A read that finds the socket overflowed keeps the daemon reading on arrival.
* The flood benchmark (bench/flood.py) runs a short ramp: its report has the expected
  shape, and a modest flood causes no view change and no failed connection.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lbd.daemon.heartbeat import OVERFLOW_HOLD, SO_RXQ_OVFL, StampedReader
from lbd.netcfg.hbfilter import HB_TABLE
from lbd.netcfg.ruleset import GUARD_TABLE, OWNER_TABLE
from lbd.protocol.wire import MAX_DATAGRAM
from lbd.testbed import flood
from lbd.testbed.bed import Bed, wait_for
from lbd.testbed.cluster import HEARTBEAT_PORT, LbdCluster

NOBODY = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "/usr/bin/python3",
    "-I",
    "-c",
]
THIEF = r"""
import errno, json, os, socket, sys
port, addresses = int(sys.argv[1]), sys.argv[2].split(",")
tries = [(socket.AF_INET, a) for a in addresses] + [(socket.AF_INET6, "::")]
results = {}
for family, address in tries:
    for opts in ("plain", "reuseaddr", "reuseport", "reuseaddr+reuseport"):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack
        if "reuseaddr" in opts:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if "reuseport" in opts:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((address, port))
            results[f"{address} {opts}"] = "bound"
        except OSError as exc:
            results[f"{address} {opts}"] = errno.errorcode.get(exc.errno, str(exc.errno))
        s.close()
control = socket.socket()
control.bind(("0.0.0.0", port + 1))  # a free port: binding works for this user
print(json.dumps({"uid": os.getuid(), "results": results}))
"""
HOLDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sys.argv[2] == "reuse":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("BOUND", flush=True)
time.sleep(60)
"""


def counters(cluster: LbdCluster, index: int) -> dict[str, int]:
    """The daemon's datagram counters and its heartbeat filter's, in one dict."""
    status = cluster.query(index, "status")
    assert status is not None, cluster.log(index)[-2000:]
    return {
        **status["counters"],
        **{f"filter_{k}": v for k, v in status["heartbeat_filter"].items()},
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


def tables(bed: Bed, index: int) -> str:
    return bed.run(bed.nodes[index].name, "nft", "list", "tables").stdout


# ---------------------------------------------------------------- the socket


def test_overflow_keeps_the_reader_reading_on_arrival() -> None:
    """A datagram the socket had to drop (full buffer) turns the next read's answer
    into "more may be waiting" for OVERFLOW_HOLD, even once the buffer is empty."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
        rx.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        rx.bind(("127.0.0.1", 0))
        reader = StampedReader(rx)
        tx.sendto(b"x" * 100, rx.getsockname())
        batch, more = reader.read(64)
        assert len(batch) == 1 and not more and reader.drops == 0
        for _ in range(200):
            tx.sendto(b"y" * 1000, rx.getsockname())
        tx.sendto(b"z" * 100, rx.getsockname())  # carries the drop count
        read: list[bytes] = []
        for _ in range(10):
            batch, more = reader.read(64)
            read += [data for data, _source, _at in batch]
        assert 0 < len(read) < 201 and reader.drops == 201 - len(read), (len(read), reader.drops)
        assert more  # buffer empty, but a flood is on: keep reading on arrival
        time.sleep(OVERFLOW_HOLD + 0.05)
        assert reader.read(64) == ([], False)
    finally:
        rx.close()
        tx.close()


@pytest.mark.timeout(120)
def test_port_is_not_shared_and_every_heartbeat_is_heard(
    bed: Callable[..., Bed], tmp_path: Path
) -> None:
    the_bed = bed(nodes=3, add_vip=False)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile="default")
    peers = json.dumps([n.addr4 for n in the_bed.nodes])
    try:
        for index in range(3):  # unicast only: a stolen port would make a node deaf
            cluster.start(index, multicast="false", peers=peers)
        cluster.wait_converged(what="the unicast cluster to form")
        node = the_bed.nodes[0]
        out = the_bed.run(
            node.name,
            *NOBODY,
            THIEF,
            str(HEARTBEAT_PORT),
            f"0.0.0.0,{node.addr4},239.255.0.1,127.0.0.1",
        )
        thief = json.loads(out.stdout)
        assert thief["uid"] == 65534
        assert len(thief["results"]) == 5 * 4
        assert set(thief["results"].values()) == {"EADDRINUSE"}, thief["results"]

        order = [1, 2, 0]  # node 0 last both times: the windows nearly coincide
        before = {i: counters(cluster, i) for i in order}
        time.sleep(5.0)
        after = {i: counters(cluster, i) for i in order}
        d = {i: delta(after[i], before[i]) for i in order}
        sent_by_peers = d[1]["sent"] + d[2]["sent"]  # default timers: 10 a second each
        assert sent_by_peers > 80, d
        assert d[0]["accepted"] >= sent_by_peers - 4, d  # the windows differ by a query
        assert all(d[i]["view_changes"] == 0 for i in order), d
        assert d[0]["forged"] == d[0]["malformed"] == 0, d
    finally:
        cluster.stop_all()
    for index in range(3):
        assert cluster.procs[index].returncode == 0, cluster.log(index)[-2000:]
        assert HB_TABLE not in tables(the_bed, index)  # removed on a graceful stop


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", ["plain", "reuse"])
def test_daemon_refuses_a_taken_port(bed: Callable[..., Bed], tmp_path: Path, options: str) -> None:
    """Another process holds the port (with SO_REUSEADDR and SO_REUSEPORT, or without):
    the daemon exits 1 with one line naming the port and leaves nothing behind."""
    the_bed = bed(nodes=1, add_vip=False)
    node = the_bed.nodes[0]
    holder = the_bed.popen(node.name, *NOBODY, HOLDER, str(HEARTBEAT_PORT), options)
    wait_for(lambda: "BOUND" in the_bed.output(holder) or holder.poll() is not None, 10.0)
    assert "BOUND" in the_bed.output(holder), the_bed.output(holder)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile="fast")
    proc = cluster.start(0)
    try:
        code = proc.wait(timeout=30)
    finally:
        cluster.stop_all()
        the_bed.stop(holder)
    log = cluster.log(0)
    assert code == 1, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) == 1, log
    assert f"heartbeat port {HEARTBEAT_PORT}/udp is already in use" in lines[0], log
    left = tables(the_bed, 0)
    for table in (OWNER_TABLE, GUARD_TABLE, HB_TABLE):
        assert f"inet {table}\n" not in left + "\n", left
    addresses = the_bed.run(node.name, "ip", "-4", "addr", "show", "dev", "eth0").stdout
    assert the_bed.vip4 not in addresses, addresses


# ---------------------------------------------------------------- the filter


@pytest.mark.timeout(120)
def test_filter_drops_foreign_sources_and_bad_sizes(
    bed: Callable[..., Bed], tmp_path: Path
) -> None:
    the_bed = bed(nodes=3, add_vip=False)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile="default")
    outsider = "198.18.0.7"  # outside the segment; a peer after the reload
    try:
        cluster.start_all()
        cluster.wait_converged(what="the cluster to form")
        attacker = flood.Attacker(the_bed)
        target = [the_bed.nodes[0].addr4]
        views = [cluster.view_changes(i) for i in range(3)]

        def burst(kind: str, count: int, **kw: Any) -> dict[str, int]:
            before = counters(cluster, 0)
            sent = attacker.flood(kind, target, count * 10, 0.1, **kw)
            assert sent["sent"] == count and sent["errors"] == 0, sent
            time.sleep(0.3)  # a status query reads what waits in the socket first
            return delta(counters(cluster, 0), before)

        d = burst("forged", 64)  # from the segment, heartbeat-sized: passes
        assert d["filter_passed"] >= 64 and d["forged"] == 64, d
        assert d["filter_foreign"] == d["filter_badlen"] == 0, d
        drops = flood.socket_drops(the_bed, 0)
        d = burst("maxsize", 32)  # exactly MAX_DATAGRAM: passes the filter (the burst
        # may overflow the socket's buffer, which the kernel counts as drops)
        assert d["filter_foreign"] == d["filter_badlen"] == 0, d
        assert d["forged"] + flood.socket_drops(the_bed, 0) - drops == 32, d
        d = burst("badsize", 64)  # one byte too long or too short: dropped in the kernel
        assert d["filter_badlen"] == 64 and d["forged"] == d["malformed"] == 0, d
        d = burst("spoofed", 64, source=outsider)
        assert d["filter_foreign"] == 64 and d["forged"] == 0, d

        cluster.config(0, peers=json.dumps([outsider]))  # a reload makes it a peer
        cluster.signal(0, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in cluster.log(0), 10.0)
        d = burst("spoofed", 64, source=outsider)
        assert d["filter_foreign"] == 0 and d["forged"] == 64, d
        d = burst("spoofed", 64, source="198.18.0.8")  # others are still foreign
        assert d["filter_foreign"] == 64 and d["forged"] == 0, d
        assert [cluster.view_changes(i) for i in range(3)] == views
    finally:
        cluster.stop_all()


# ---------------------------------------------------------------- the benchmark


@pytest.mark.timeout(150)
def test_flood_bench_smoke(tmp_path: Path) -> None:
    """A short ramp of bench/flood.py: the report's shape, and a modest flood of forged
    datagrams (and of spoofed ones, all dropped by the filter) changes nothing."""
    prefix = f"lbdt-floodsmk-{int(time.time() * 1000) % 10000:04d}-"
    # Default timers: on a busy 2-core machine the fast ones flap without any flood.
    report = flood.run(
        tmp_path,
        kinds=["forged", "spoofed"],
        rates=[1000],
        step=1.5,
        prefix=prefix,
        profile="default",
    )
    assert report["benchmark"] == "flood" and report["max_datagram"] == MAX_DATAGRAM
    assert [s["kind"] for s in report["steps"]] == ["forged", "spoofed"]
    assert report["baseline"]["kind"] == "baseline" and report["baseline"]["sent"] == 0
    for step in [report["baseline"], *report["steps"]]:
        assert {
            "target_rate",
            "rate",
            "sent",
            "seconds",
            "filter_drops",
            "view_changes",
            "failed_connections",
            "connections",
            "duplicate_answers",
            "min_heard",
            "clean",
            "nodes",
        } <= set(step), step
        assert len(step["nodes"]) == 3
        assert step["rate"] > 500 or step["kind"] == "baseline", step
        assert step["view_changes"] == 0 and step["duplicate_answers"] == 0, step
        # A stray failed connection is a bed artefact (it happens without any flood).
        assert step["failed_connections"] <= 2 and step["connections"] > 100, step
        assert step["min_heard"] is not None and step["min_heard"] > 0.9, step
    forged, spoofed = report["steps"]
    # Half to node 0, half to the group: node 0 reads them all, the others half.
    assert forged["nodes"][0]["forged"] >= 0.95 * forged["sent"], forged
    assert all(n["forged"] >= 0.95 * forged["sent"] / 2 for n in forged["nodes"][1:]), forged
    # Spoofed: half to node 0, half to the group (all three nodes), all dropped.
    assert spoofed["filter_drops"] >= 0.99 * 2 * spoofed["sent"], spoofed
    assert sum(n["forged"] for n in spoofed["nodes"]) == 0, spoofed
    for kind, step in (("forged", forged), ("spoofed", spoofed)):
        figures = report["summary"][kind]
        assert figures["no_view_change_up_to"] == step["rate"], report["summary"]
        assert figures["view_changes_at"] is None, report["summary"]
        assert figures["clean_up_to"] == (step["rate"] if step["clean"] else None)
