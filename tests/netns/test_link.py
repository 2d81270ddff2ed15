"""lbd.netcfg.link in a real namespace: VIPs, MAC and sysctls set, then restored exactly.

Each LinkSetup runs in a Python process inside a node namespace (as the daemon does),
driven by DRIVER below; the checks read the kernel with ``ip`` and ``sysctl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbd.testbed.bed import Bed, NodeNs

MakeBed = Callable[..., Bed]

DRIVER = """
import json, logging, sys
from lbd.netcfg.link import LinkError, LinkSetup
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cfg = json.loads(sys.argv[1])
out = {}
try:
    setup = LinkSetup(cfg["interface"], cfg["vips"], **cfg["kw"])
except LinkError as exc:
    out["init"] = f"LinkError: {exc}"
else:
    for action in cfg["actions"]:
        try:
            getattr(setup, action)()
            out[action] = "ok"
        except LinkError as exc:
            out[action] = f"LinkError: {exc}"
            break
    out["recorded"] = setup.recorded
print(json.dumps(out))
"""

SYSCTLS = [
    "net.ipv4.conf.all.send_redirects",
    "net.ipv4.conf.eth0.send_redirects",
    "net.ipv4.conf.eth0.arp_ignore",
    "net.ipv4.conf.eth0.arp_announce",
    "net.netfilter.nf_conntrack_tcp_loose",
    "net.ipv6.conf.eth0.addr_gen_mode",
    "net.ipv6.conf.eth0.accept_dad",
    "net.ipv6.conf.eth0.keep_addr_on_down",
    "net.ipv4.ip_forward",
]


def drive(
    bed: Bed,
    node: NodeNs,
    actions: list[str],
    vips: list[str] | None = None,
    interface: str = "eth0",
    **kw: Any,
) -> dict[str, Any]:
    """Run LinkSetup actions in a fresh process inside ``node``; return its report."""
    cfg = {
        "interface": interface,
        "vips": [bed.vip4, bed.vip6] if vips is None else vips,
        "actions": actions,
        "kw": kw,
    }
    out = bed.run_python(node.name, DRIVER, json.dumps(cfg))
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def snapshot(bed: Bed, node: NodeNs) -> dict[str, Any]:
    """Addresses (with flags), MAC, routes and the relevant sysctls of a node."""
    addrs = json.loads(bed.run(node.name, "ip", "-j", "addr", "show", "eth0").stdout)[0]
    routes = bed.run(node.name, "ip", "route", "show").stdout.splitlines()
    routes += bed.run(node.name, "ip", "-6", "route", "show").stdout.splitlines()
    values = bed.run(node.name, "sysctl", "-n", *SYSCTLS).stdout.split()
    return {
        "mac": addrs["address"],
        "addrs": sorted(
            (a["local"], a["prefixlen"], a.get("nodad", False), a.get("deprecated", False))
            for a in addrs["addr_info"]
        ),
        "routes": sorted(routes),
        "sysctls": dict(zip(SYSCTLS, values, strict=True)),
    }


def test_apply_sets_everything_and_restore_puts_it_back(bed: MakeBed, tmp_path: Path) -> None:
    b = bed(nodes=2, add_vip=False)
    node = b.nodes[0]
    state = tmp_path / "link-state.json"
    before = snapshot(b, node)
    report = drive(b, node, ["apply"], state_file=str(state))
    assert report["apply"] == "ok", report
    assert state.exists()
    after = snapshot(b, node)
    assert (b.vip4, 32, False, False) in after["addrs"]
    assert (b.vip6, 128, True, True) in after["addrs"]  # nodad, deprecated
    assert (
        after["sysctls"]
        | {
            "net.ipv4.conf.all.send_redirects": "0",
            "net.ipv4.conf.eth0.send_redirects": "0",
            "net.ipv4.conf.eth0.arp_ignore": "1",
            "net.ipv4.conf.eth0.arp_announce": "2",
            "net.netfilter.nf_conntrack_tcp_loose": "0",
        }
        == after["sysctls"]
    )
    assert after["sysctls"]["net.ipv4.ip_forward"] == before["sysctls"]["net.ipv4.ip_forward"]
    # The VIP answers from the client (ARP through the router, TCP and UDP, v4 and v6),
    # and only this node has it.
    b.start_echo([node])
    assert b.probe(["198.51.100.9", "2001:db8:2::9"]) == {
        "198.51.100.9": node.name,
        "2001:db8:2::9": node.name,
    }
    assert b.probe(["198.51.100.9"], proto="udp") == {"198.51.100.9": node.name}
    neigh = b.run(b.router, "ip", "neigh", "show", b.vip4).stdout
    assert b.shared_mac in neigh  # the node answered ARP for the VIP

    report = drive(b, node, ["restore"], state_file=str(state))
    assert report["restore"] == "ok"
    assert report["recorded"] == {"version": 1, "sysctls": {}, "addresses": {}, "mac": None}
    assert snapshot(b, node) == before
    assert not state.exists()


def test_apply_is_idempotent_and_restore_alone_is_a_noop(bed: MakeBed, tmp_path: Path) -> None:
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    state = str(tmp_path / "state.json")
    before = snapshot(b, node)
    assert drive(b, node, ["restore"], state_file=state)["restore"] == "ok"
    assert snapshot(b, node) == before
    once = drive(b, node, ["apply"], state_file=state)
    applied = snapshot(b, node)
    twice = drive(b, node, ["apply", "apply"], state_file=state)  # new process, twice
    assert snapshot(b, node) == applied
    assert twice["recorded"] == once["recorded"]
    assert drive(b, node, ["restore", "restore"], state_file=state)["restore"] == "ok"
    assert snapshot(b, node) == before
    # Without a state file the record lives in the process only.
    assert drive(b, node, ["apply", "apply", "restore"])["restore"] == "ok"
    assert snapshot(b, node) == before


def test_missing_interface_is_a_clear_link_error(bed: MakeBed) -> None:
    b = bed(nodes=1, add_vip=False)
    report = drive(b, b.nodes[0], ["apply"], interface="nope0")
    assert report["apply"] == "LinkError: interface 'nope0' does not exist"
    bad = drive(b, b.nodes[0], ["apply"], vips=["192.0.2.300"])
    assert bad["init"].startswith("LinkError: bad VIP '192.0.2.300'")


def test_crashed_run_leftovers_are_adopted_and_originals_restored(
    bed: MakeBed, tmp_path: Path
) -> None:
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    state = str(tmp_path / "state.json")
    before = snapshot(b, node)
    # A first daemon applies and dies without restoring.
    assert drive(b, node, ["apply"], state_file=state)["apply"] == "ok"
    # The restarted daemon adopts the VIPs and keeps the ORIGINAL values on record.
    report = drive(b, node, ["apply"], state_file=state)
    assert report["apply"] == "ok"
    recorded = report["recorded"]
    assert recorded["sysctls"]["net/ipv4/conf/eth0/arp_ignore"] == {"old": "0", "set": "1"}
    assert all(entry["added"] for entry in recorded["addresses"].values())
    addrs = [a for a in snapshot(b, node)["addrs"] if a[0] in (b.vip4, b.vip6)]
    assert len(addrs) == 2  # adopted, not duplicated
    assert drive(b, node, ["restore"], state_file=state)["restore"] == "ok"
    assert snapshot(b, node) == before


def test_preexisting_vip_is_adopted_and_left_in_place(bed: MakeBed) -> None:
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    b.run(node.name, "ip", "addr", "add", f"{b.vip4}/32", "dev", "eth0")
    before = snapshot(b, node)
    report = drive(b, node, ["apply", "restore"])
    assert report["apply"] == report["restore"] == "ok"
    assert snapshot(b, node) == before  # the admin's VIP stays; lbd's v6 VIP is gone


def test_changed_config_converges(bed: MakeBed, tmp_path: Path) -> None:
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    state = str(tmp_path / "state.json")
    before = snapshot(b, node)
    drive(b, node, ["apply"], vips=["192.0.2.100"], state_file=state)
    report = drive(b, node, ["apply"], vips=["192.0.2.101"], state_file=state)
    assert list(report["recorded"]["addresses"]) == ["192.0.2.101/32"]
    addrs = {a[0] for a in snapshot(b, node)["addrs"]}
    assert "192.0.2.101" in addrs
    assert "192.0.2.100" not in addrs
    drive(b, node, ["restore"], vips=["192.0.2.101"], state_file=state)
    assert snapshot(b, node) == before


def test_vip_with_prefix_never_becomes_primary(bed: MakeBed, tmp_path: Path) -> None:
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    state = str(tmp_path / "state.json")
    before = snapshot(b, node)
    assert drive(b, node, ["apply"], vips=["192.0.2.100/24"], state_file=state)["apply"] == "ok"
    listing = b.run(node.name, "ip", "-4", "addr", "show", "eth0").stdout
    assert "192.0.2.100/24 scope global secondary eth0" in listing
    assert drive(b, node, ["restore"], vips=[], state_file=state)["restore"] == "ok"
    assert snapshot(b, node) == before
    refused = drive(b, node, ["apply"], vips=["203.0.113.50/24"], state_file=state)
    assert "eth0: VIP 203.0.113.50/24 would become the primary address" in refused["apply"]
    assert snapshot(b, node) == before  # refused before anything changed


def test_cluster_mac_live_and_with_link_bounce(bed: MakeBed, tmp_path: Path) -> None:
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    # Unlike the bed's nodes, a fresh host generates link-local addresses and runs DAD.
    b.set_sysctls(
        node.name,
        {"net.ipv6.conf.eth0.accept_dad": 1, "net.ipv6.conf.eth0.keep_addr_on_down": 0},
    )
    before = snapshot(b, node)
    mac = "02:00:5e:00:01:65"
    for live in (True, False):
        state = str(tmp_path / f"state-{live}.json")
        report = drive(b, node, ["apply"], cluster_mac=mac, state_file=state, live_mac_change=live)
        assert report["apply"] == "ok", report
        after = snapshot(b, node)
        assert after["mac"] == mac
        assert after["sysctls"]["net.ipv6.conf.eth0.addr_gen_mode"] == "1"
        assert after["sysctls"]["net.ipv6.conf.eth0.accept_dad"] == "0"
        # Own addresses and routes survive (the bounce path re-adds the routes).
        assert set(before["addrs"]) <= set(after["addrs"])
        assert set(before["routes"]) <= set(after["routes"]), (live, after["routes"])
        assert b.ping(b.router, node.addr4)
        assert b.ping(b.router, node.addr6)
        assert (
            drive(b, node, ["restore"], state_file=state, live_mac_change=live)["restore"] == "ok"
        )
        assert snapshot(b, node) == before


CHILD_DRIVER = """
import json, sys
from lbd.netcfg.linkproc import LinkProcess, LinkProcessError, call, resolve_address
cfg = json.loads(sys.argv[1])
out = {}
try:
    out["resolve"] = list(resolve_address(cfg["interface"], None, "/etc/lbd/lbd.toml"))
except Exception as exc:
    out["resolve"] = f"{type(exc).__name__}: {exc}"
proc = LinkProcess(cfg["interface"], cfg["vips"], cluster_mac=None, state_file=cfg["state"])
for action in cfg["actions"]:
    try:
        getattr(proc, action)()
        out[action] = "ok"
    except LinkProcessError as exc:
        out[action] = f"LinkProcessError: {exc}"
try:
    call({"op": "reboot"})
except LinkProcessError as exc:
    out["unknown"] = str(exc)
out["pyroute2_imported"] = "pyroute2" in sys.modules
print(json.dumps(out))
"""


def drive_child(
    bed: Bed, node: NodeNs, actions: list[str], state: Path, interface: str = "eth0"
) -> dict[str, Any]:
    cfg = {
        "interface": interface,
        "vips": [bed.vip4, bed.vip6],
        "actions": actions,
        "state": str(state),
    }
    out = bed.run_python(node.name, CHILD_DRIVER, json.dumps(cfg), timeout=60)
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_link_process_does_the_netlink_work_in_a_child(bed: MakeBed, tmp_path: Path) -> None:
    """The daemon's path (netcfg/linkproc.py): same effects, pyroute2 only in the child."""
    b = bed(nodes=1, add_vip=False)
    node = b.nodes[0]
    state = tmp_path / "link.json"
    before = snapshot(b, node)
    report = drive_child(b, node, ["apply"], state)
    assert report["apply"] == "ok", report
    assert report["resolve"][1] == node.addr4, report
    assert report["unknown"] == "unknown link helper request 'reboot'"
    assert report["pyroute2_imported"] is False
    after = snapshot(b, node)
    assert (b.vip4, 32, False, False) in after["addrs"]
    assert (b.vip6, 128, True, True) in after["addrs"]
    assert drive_child(b, node, ["restore"], state)["restore"] == "ok"
    assert snapshot(b, node) == before
    assert not state.exists()

    missing = drive_child(b, node, ["apply", "restore"], state, interface="nope0")
    assert missing["apply"] == "LinkProcessError: interface 'nope0' does not exist"
    assert missing["restore"] == "ok"  # nothing recorded: a no-op
    assert missing["resolve"] == (
        "ConfigFileError: /etc/lbd/lbd.toml: interface: 'nope0' does not exist"
    )
