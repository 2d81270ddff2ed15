"""Real lbd daemons in a 3-node bed: converge, serve, drain/undrain, leave, refuse bad input.

Every daemon is a separate process (``python -m lbd.daemon.cli run``) in its node
namespace with its own config, state dir and control socket in a temporary folder,
and one shared key. Node 0 runs with NOTIFY_SOCKET, WATCHDOG_USEC and
LBD_JOURNAL_SOCKET pointing at Unix datagram sockets this test owns, so its
sd_notify and native journal messages are checked too. Every wait is bounded;
processes are stopped by PID (the bed also kills what it started).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbd.daemon.heartbeat import RECEIVE_BUFFER
from lbd.daemon.notify import MESSAGE_IDS, decode_journal
from lbd.netcfg.ruleset import GUARD_TABLE, OWNER_TABLE
from lbd.testbed.bed import TCP_PORT, Bed, wait_for
from lbd.testbed.cluster import LbdCluster
from lbd.testbed.sink import DatagramSink

BUCKETS = 512
CONVERGE_TIMEOUT = 20.0
CLUSTER_NAME = "netns-test"
CLIENT = r"""
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = socket.create_connection((dst, port), timeout=5, source_address=(src, 0))
stream = conn.makefile("rwb")
print("CONNECTED", stream.readline().decode().strip(), flush=True)
for line in sys.stdin:
    stream.write(line.encode())
    stream.flush()
    print("ECHO", stream.readline().decode().strip(), flush=True)
"""


class Cluster(LbdCluster):
    """The shared harness (lbd.testbed.cluster) with default timers and B = 512."""

    def __init__(self, bed: Bed, tmp: Path) -> None:
        super().__init__(bed, tmp, profile="default", buckets=BUCKETS)

    def config(self, index: int, **extra: str) -> Path:
        return super().config(index, **{"cluster": f'"{CLUSTER_NAME}"', **extra})

    def wait_slices(
        self, indexes: list[int], check: Callable[[dict[str, int]], bool], what: str
    ) -> dict[str, int]:
        return self.wait_converged(indexes, check, CONVERGE_TIMEOUT, what)


def node_tables(bed: Bed, index: int) -> str:
    return bed.run(bed.nodes[index].name, "nft", "list", "tables").stdout


def test_three_daemons_converge_serve_drain_and_leave(bed: Any, tmp_path: Path) -> None:
    the_bed: Bed = bed(nodes=3, add_vip=False)
    cluster = Cluster(the_bed, tmp_path)
    notify = DatagramSink(tmp_path / "notify")
    journal = DatagramSink(tmp_path / "journal")
    try:
        cluster.start(
            0,
            env={
                "NOTIFY_SOCKET": str(tmp_path / "notify"),
                "WATCHDOG_USEC": "1000000",
                "LBD_JOURNAL_SOCKET": str(tmp_path / "journal"),
            },
        )
        cluster.start(1)
        cluster.start(2)
        shares = cluster.wait_slices(
            [0, 1, 2], lambda s: all(v > 0 for v in s.values()), "three daemons to converge"
        )
        assert set(shares) == {"node0", "node1", "node2"}
        assert all(BUCKETS / 3 * 0.7 < v < BUCKETS / 3 * 1.3 for v in shares.values())

        # The heartbeat socket keeps an interval's heartbeats of a large cluster
        # (the kernel reports twice what was asked for).
        skmem = the_bed.run(the_bed.nodes[0].name, "ss", "-uamn").stdout
        assert re.findall(r"rb(\d+)", skmem) == [str(2 * RECEIVE_BUFFER)], skmem

        # A second daemon on node 0 refuses to start (instance lock), clearly.
        second = the_bed.python(
            the_bed.nodes[0].name, "-m", "lbd.daemon.cli", "run", "--config", str(cluster.config(0))
        )
        assert second.wait(timeout=20) == 1
        assert "already running" in the_bed.output(second)

        # Human output fits 80 columns and marks the local node.
        table = cluster.cli(1, "members").stdout.splitlines()
        assert len(table) == 4 and all(len(line) <= 80 for line in table)
        assert [line[0] for line in table[1:]] == [" ", "*", " "]
        # A settled daemon reads heartbeats once per interval (100 ms) but catches up
        # before it answers: a peer is never shown older than its last heartbeat
        # (sent every interval), which without catching up reached two intervals.
        heard = [
            row["last_heard_ms"]
            for _ in range(12)
            for row in cluster.query(1, "members") or []
            if not row["is_self"]
        ]
        assert len(heard) == 24 and max(heard) < 150, heard

        # Every client source is answered by exactly one node.
        the_bed.start_echo(addrs=[the_bed.vip4])
        answers = the_bed.probe_udp_all(60, window=0.5)
        assert all(len(names) == 1 for names in answers.values()), answers
        tcp = the_bed.probe(60)
        assert None not in tcp.values(), tcp
        owner = cluster.query(0, "owner", "198.51.100.7")
        assert owner is not None, cluster.cli(0, "owner", "198.51.100.7")
        assert tcp["198.51.100.7"] == the_bed.nodes[int(owner["owner"][-1])].name
        # The table (built off the loop) agrees with the slices each node holds.
        table = cluster.query(0, "table")
        assert table is not None and table["converged"], table
        assert set(table["counts"]) == {"node0", "node1", "node2"}
        assert sum(table["counts"].values()) == BUCKETS
        assert table["ranges"]["node1"][0][0] <= table["ranges"]["node1"][0][1]

        # An established connection to node 1 survives its drain and undrain.
        src = next(s for s, name in tcp.items() if name == the_bed.nodes[1].name)
        client = the_bed.python(
            the_bed.client, "-c", CLIENT, src, the_bed.vip4, str(TCP_PORT), stdin=subprocess.PIPE
        )
        wait_for(lambda: "CONNECTED" in the_bed.output(client), 10, what="client connect")
        assert client.stdin is not None
        assert cluster.cli(1, "drain").returncode == 0
        drained = cluster.wait_slices([0, 1, 2], lambda s: s["node1"] == 0, "node1 drained")
        assert drained["node0"] + drained["node2"] == BUCKETS
        client.stdin.write(b"during-drain\n")
        client.stdin.flush()
        wait_for(
            lambda: "ECHO during-drain" in the_bed.output(client),
            5,
            what="echo on the established connection while draining",
        )
        after = the_bed.probe(60)
        assert None not in after.values()
        assert the_bed.nodes[1].name not in after.values()
        assert cluster.cli(1, "undrain").returncode == 0
        cluster.wait_slices([0, 1, 2], lambda s: s["node1"] > 0, "node1 undrained")
        client.stdin.write(b"after-undrain\n")
        client.stdin.flush()
        wait_for(
            lambda: "ECHO after-undrain" in the_bed.output(client),
            5,
            what="echo on the established connection after undrain",
        )
        client.stdin.close()
        assert client.wait(timeout=10) == 0, the_bed.output(client)

        # SIGTERM on node 2: graceful hand-off, exit 0, its rules and VIP gone.
        leaver = cluster.procs[2]
        assert OWNER_TABLE in node_tables(the_bed, 2)
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(timeout=15) == 0, the_bed.output(leaver)
        log = the_bed.output(leaver)
        assert "left the cluster gracefully" in log and "Traceback" not in log
        tables = node_tables(the_bed, 2)
        assert OWNER_TABLE not in tables and GUARD_TABLE not in tables, tables
        addrs = the_bed.run(the_bed.nodes[2].name, "ip", "-4", "addr", "show", "eth0").stdout
        assert the_bed.vip4 not in addrs
        left = cluster.wait_slices(
            [0, 1], lambda s: set(s) == {"node0", "node1"}, "survivors to absorb node2's slices"
        )
        assert sum(left.values()) == BUCKETS
        final = the_bed.probe(60)
        assert None not in final.values()
        assert set(Counter(final.values())) <= {the_bed.nodes[0].name, the_bed.nodes[1].name}

        # Node 0 told "systemd" it was ready, kept STATUS current, pinged the watchdog
        # and wrote structured journal entries.
        messages = list(notify.received)
        assert any(m.startswith(b"READY=1\nSTATUS=serving") for m in messages), messages
        assert b"WATCHDOG=1" in messages
        assert any(b"STATUS=draining" not in m and m.startswith(b"STATUS=") for m in messages)
        entries = [decode_journal(d) for d in journal.received]
        ids = {e.get("MESSAGE_ID", b"").decode() for e in entries}
        for kind in ("Started", "ViewAgreed", "BucketsGained", "MemberLeft"):
            assert MESSAGE_IDS[kind] in ids, kind
        agreed = next(
            e for e in entries if e.get("MESSAGE_ID", b"").decode() == MESSAGE_IDS["ViewAgreed"]
        )
        assert agreed["NODE"] == b"node0" and agreed["VIEW"] and agreed["SLICES"]
    finally:
        for proc in cluster.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in cluster.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        notify.close()
        journal.close()


def test_bad_config_key_and_interface_fail_with_one_line(bed: Any, tmp_path: Path) -> None:
    the_bed: Bed = bed(nodes=1, add_vip=False)
    cluster = Cluster(the_bed, tmp_path)
    ns = the_bed.nodes[0].name

    def run_lbd(config: Path) -> subprocess.CompletedProcess[str]:
        return the_bed.run(
            ns,
            sys.executable,
            "-m",
            "lbd.daemon.cli",
            "run",
            "--config",
            str(config),
            check=False,
            timeout=30,
        )

    bad = cluster.config(0, weight='"heavy"')
    out = run_lbd(bad)
    assert out.returncode == 2
    assert out.stderr == f"lbd: {bad}: weight: expected an integer, got str\n"

    cluster.key.chmod(0o644)
    out = run_lbd(cluster.config(0))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "chmod 600" in out.stderr, out.stderr
    cluster.key.chmod(0o600)

    out = run_lbd(cluster.config(0, interface='"eth9"'))
    assert out.returncode == 2
    assert out.stderr.endswith("interface: 'eth9' does not exist\n"), out.stderr
    assert out.stderr.count("\n") == 1
    # Nothing was installed by the failed starts.
    assert OWNER_TABLE not in node_tables(the_bed, 0)
    assert GUARD_TABLE not in node_tables(the_bed, 0)

    out = cluster.cli(0, "status")
    assert out.returncode == 1
    assert out.stderr == (
        f"lbd-cli: cannot reach lbd at {cluster.sock(0)} (is the daemon running?)\n"
    )


def test_sighup_rotates_the_key_and_changes_weight_without_dropping(
    bed: Any, tmp_path: Path
) -> None:
    the_bed: Bed = bed(nodes=2, add_vip=False)
    cluster = Cluster(the_bed, tmp_path)
    try:
        for index in (0, 1):
            cluster.start(index)
        cluster.wait_slices([0, 1], lambda s: all(v > 0 for v in s.values()), "two converge")
        view = cluster.query(0, "status")["view"]
        old = cluster.key.read_text().split()[0]
        new = os.urandom(32).hex()

        def rotate_to(lines: list[str]) -> None:
            cluster.key.write_text("\n".join(lines) + "\n")
            for proc in cluster.procs.values():
                proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)  # several heartbeats under the new keyring

        # The rotation procedure: accept the new key everywhere, seal with it, drop the old.
        rotate_to([old, new])
        rotate_to([new, old])
        rotate_to([new])
        for index in (0, 1):
            status = cluster.query(index, "status")
            assert status["view"] == view and status["converged"], status
            assert status["counters"]["forged"] == 0, status
        for proc in cluster.procs.values():
            assert "configuration reloaded" in the_bed.output(proc)

        # Weight 300 vs 100 via reload: node0 ends up with about three quarters.
        cluster.config(0, weight="300")
        cluster.procs[0].send_signal(signal.SIGHUP)
        shares = cluster.wait_slices(
            [0, 1], lambda s: s["node0"] > BUCKETS * 0.6, "the weight change to take effect"
        )
        assert shares["node0"] + shares["node1"] == BUCKETS
        # A reload with a mistake keeps the running config and says so.
        cluster.config(0, weight="0")
        cluster.procs[0].send_signal(signal.SIGHUP)
        wait_for(
            lambda: "reload failed" in the_bed.output(cluster.procs[0]),
            5,
            what="the failed reload to be logged",
        )
        assert cluster.procs[0].poll() is None
    finally:
        for proc in cluster.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in cluster.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
