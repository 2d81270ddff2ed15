"""The shared test bed itself: connectivity, hub flooding, multicast, clean teardown."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from lbd.testbed.bed import OWNER_DIR, Bed, BedError, cleanup_stale, list_netns, sources4, sources6

from .conftest import bed_prefix

MakeBed = Callable[..., Bed]


def tcp_counters(bed: Bed, ns: str) -> dict[str, int]:
    """The Tcp: line of /proc/net/snmp as seen inside ``ns``."""
    lines = [ln.split() for ln in bed.run(ns, "cat", "/proc/net/snmp").stdout.splitlines()]
    names, values = [ln for ln in lines if ln[0] == "Tcp:"]
    return dict(zip(names[1:], map(int, values[1:]), strict=True))


def test_bed_comes_up(bed: MakeBed) -> None:
    b = bed(nodes=3)
    assert [n.name for n in b.nodes] == [f"{b.prefix}n{i}" for i in range(3)]
    assert set(b.namespaces) <= set(list_netns())
    for node in b.nodes:
        assert b.ping(b.router, node.addr4), node
        assert b.ping(b.router, node.addr6), node
        link = b.run(node.name, "ip", "-o", "link", "show", "eth0").stdout
        assert b.shared_mac in link
        # No link-local address: identical MACs would give identical ones (NOTES).
        assert "fe80" not in b.run(node.name, "ip", "-6", "addr", "show", "eth0").stdout
    # From an AnyIP client source to each node's own address, both families.
    for node in b.nodes:
        assert b.ping(b.client, node.addr4, src="198.51.100.7")
        assert b.ping(b.client, node.addr6, src="2001:db8:2::7")
    assert b.ping(b.client, b.vip4, src="198.51.100.8")


def test_hub_floods_to_every_node(bed: MakeBed) -> None:
    b = bed(nodes=3)
    b.start_echo()
    before = {n.name: tcp_counters(b, n.name) for n in b.nodes}
    # With no rules all three nodes answer the SYN; the duplicate SYN|ACKs make the
    # connection fail (RST), so the probe's answer itself is not checked here.
    b.probe(["198.51.100.20"], proto="tcp", timeout=0.5)
    after = {n.name: tcp_counters(b, n.name) for n in b.nodes}
    # The SYN for the shared MAC reached every node, and every node answered it.
    for name in before:
        assert after[name]["InSegs"] > before[name]["InSegs"], (name, before, after)
        assert after[name]["OutSegs"] > before[name]["OutSegs"], (name, before, after)
    # ... and every node answers a UDP query to the VIP, in both families.
    replies = b.probe_udp_all(["198.51.100.21", "2001:db8:2::21"])
    everyone = sorted(n.name for n in b.nodes)
    assert replies == {"198.51.100.21": everyone, "2001:db8:2::21": everyone}


def test_probe_many_sources_is_fast_and_bounded(bed: MakeBed) -> None:
    b = bed(nodes=1)
    b.start_echo()
    sources = sources4(254) + sources6(246)
    start = time.monotonic()
    got = b.probe(sources, proto="tcp", parallel=256)
    took_ok = time.monotonic() - start
    assert got == dict.fromkeys(sources, b.nodes[0].name)
    # Nobody has these addresses: every attempt times out, the run stays bounded.
    start = time.monotonic()
    silent = b.probe(sources, dst4="192.0.2.99", dst6="2001:db8:1::99", timeout=0.5, parallel=256)
    took_silent = time.monotonic() - start
    assert set(silent.values()) == {None}
    assert took_ok < 4.0, took_ok  # measured ~0.3 s
    assert took_silent < 5.0, took_silent  # measured ~1.1 s: two rounds of 0.5 s


MCAST_RECV = """
import socket, struct, sys
own, group, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((group, port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton(group) + socket.inet_aton(own))
print("READY", flush=True)
s.settimeout(5)
data, src = s.recvfrom(100)
print(data.decode(), src[0], flush=True)
"""

MCAST_SEND = """
import socket, sys
own, group, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(own))
s.bind((own, 0))
s.sendto(b"hello-from-" + own.encode(), (group, port))
"""


def test_multicast_between_nodes(bed: MakeBed) -> None:
    b = bed(nodes=3, add_vip=False)
    sender, *receivers = b.nodes
    procs = [b.python(n.name, "-c", MCAST_RECV, n.addr4, "239.255.0.1", "7400") for n in receivers]
    for proc in procs:

        def ready(p: subprocess.Popen[str] = proc) -> bool:
            return "READY" in b.output(p) or p.poll() is not None

        b.wait_for(ready)
    b.run_python(sender.name, MCAST_SEND, sender.addr4, "239.255.0.1", "7400")
    for proc in procs:
        assert proc.wait(timeout=6) == 0, b.output(proc)
        assert f"hello-from-{sender.addr4} {sender.addr4}" in b.output(proc)


def test_teardown_leaves_nothing() -> None:
    prefix = bed_prefix("teardown")
    with Bed(prefix, nodes=2) as b:
        proc = b.popen(b.nodes[0].name, "sleep", "60")
        names = b.namespaces
        assert set(names) <= set(list_netns())
    assert proc.poll() is not None
    assert not [n for n in list_netns() if n.startswith(prefix)]
    assert not (OWNER_DIR / prefix).exists()


def test_failing_test_still_cleans_up() -> None:
    prefix = bed_prefix("failing")
    with pytest.raises(RuntimeError, match="boom"), Bed(prefix, nodes=1) as b:
        b.popen(b.client, "sleep", "60")
        raise RuntimeError("boom")
    assert not [n for n in list_netns() if n.startswith(prefix)]


def test_failed_helper_command_names_the_namespace(bed: MakeBed) -> None:
    b = bed(nodes=1)
    with pytest.raises(BedError, match=b.client):
        b.run(b.client, "false")


def test_cleanup_stale_removes_beds_of_dead_builders() -> None:
    prefix = bed_prefix("stale")
    dead = subprocess.Popen(["true"])
    dead.wait()
    subprocess.run(["ip", "netns", "add", f"{prefix}hub"], check=True)
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    (OWNER_DIR / prefix).write_text(json.dumps({"pid": dead.pid, "start": "0"}))
    try:
        assert f"{prefix}hub" in cleanup_stale()
        assert f"{prefix}hub" not in list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", f"{prefix}hub"], check=False, capture_output=True)
        (OWNER_DIR / prefix).unlink(missing_ok=True)


def test_link_down_isolates_a_node_and_link_up_restores_it(bed: MakeBed) -> None:
    b = bed(nodes=2)
    b.link_down(0)
    assert not b.ping(b.router, b.nodes[0].addr4, timeout=0.3)
    assert b.ping(b.router, b.nodes[1].addr4)
    b.link_up(b.nodes[0])
    assert b.ping(b.router, b.nodes[0].addr4)
    assert b.ping(b.client, b.nodes[0].addr6, src="2001:db8:2::30")  # routes are back
