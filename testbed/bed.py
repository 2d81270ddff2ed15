"""A throw-away network of namespaces for lbd's kernel tests.

Topology (all names start with the bed's prefix; nothing touches the root namespace)::

    client (203.0.113.2, AnyIP 198.51.100.0/24 and 2001:db8:2::/64 on lo)
      | eth0 <-> eth1
    router (203.0.113.1 / 2001:db8:3::1 ; 192.0.2.1 / 2001:db8:1::1), forwarding on
      | eth0 <-> pr
    hub: bridge br0 acting as a hub (ageing 0, no snooping, no STP, ports flood, no learning)
      | p0 .. p<N-1>
    node n0..n<N-1>: eth0 with the SAME shared MAC, own 192.0.2.(11+i)/24 and
    2001:db8:1::(11+i)/64, optionally the VIPs (v4 /32, v6 /128 nodad, deprecated)

Every frame for the shared MAC reaches every node, as on a real hub.

``Bed(..., switch=True)`` makes br0 an ordinary learning switch instead (learning on,
default ageing 300 s, unknown unicast and multicast flooded, optionally IGMP/MLD
snooping with ``mcast_snooping=True`` and a querier with ``mcast_querier=True``), and
``unique_macs=True`` gives node i its own MAC ``node_mac(i)`` (02:00:00:00:01:<11+i>)
instead of the shared one: the topology of lbd's cluster-MAC modes (multicast,
flood). ``vlan=10`` puts the LAN on a VLAN: the nodes' and the router's addresses
(and the VIPs) go on the sub-interface ``eth0.10`` over eth0 (``NodeNs.iface``,
``Bed.lan_iface``), the switch carries the tagged frames. All default off, so the hub
bed is unchanged. Veths are created
from inside the namespaces (``ip -n NS link add ... peer ... netns OTHER``) and sysctls
are written by processes running inside the namespace, because /proc/sys/net follows
the caller's namespace.

Use the ``bed`` fixture (tests/netns/conftest.py) or ``with Bed("lbdt-x-") as bed:``;
helpers: ``run``/``popen``/``python``/``run_python`` inside a namespace, ``set_sysctls``,
``read_sysctl``, ``link_down``/``link_up``, ``wait_for``; traffic (traffic.py):
``start_echo``, ``probe``, ``probe_udp_all``, ``ping``.

Teardown kills the processes the bed started (by PID, then waits for them: PID 1 here
reaps slowly) and any process left inside the bed's namespaces, then deletes the
namespaces. An owner file in /run/lbd-testbed/ records which process built a bed, so
that :func:`cleanup_stale` can remove beds whose builder died without cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from lbd.testbed.nsutil import (
    OWNER_DIR,
    RUN_NETNS,
    BedError,
    cleanup_prefix,
    cleanup_stale,
    delete_netns,
    list_netns,
    netns_unavailable_reason,
    wait_for,
    write_owner,
)
from lbd.testbed.traffic import (
    CLIENT_PROBE,
    ECHO_SERVER,
    TCP_PORT,
    UDP_PORT,
    TrafficMixin,
    sources4,
    sources6,
)

__all__ = [
    "CLIENT_PROBE",
    "ECHO_SERVER",
    "OWNER_DIR",
    "RUN_NETNS",
    "TCP_PORT",
    "UDP_PORT",
    "Bed",
    "BedError",
    "NodeNs",
    "cleanup_prefix",
    "cleanup_stale",
    "delete_netns",
    "list_netns",
    "netns_unavailable_reason",
    "node_mac",
    "sources4",
    "sources6",
    "wait_for",
]

SHARED_MAC = "02:00:5e:00:01:64"
VIP4 = "192.0.2.100"
VIP6 = "2001:db8:1::100"
ROUTER_LAN4 = "192.0.2.1"
ROUTER_LAN6 = "2001:db8:1::1"
ROUTER_WAN4 = "203.0.113.1"
ROUTER_WAN6 = "2001:db8:3::1"
CLIENT4 = "203.0.113.2"
CLIENT6 = "2001:db8:3::2"
CLIENT_NET4 = "198.51.100.0/24"
CLIENT_NET6 = "2001:db8:2::/64"
MAX_NODES = 32


def node_mac(index: int) -> str:
    """The unique MAC of node ``index`` in a ``unique_macs`` bed."""
    return f"02:00:00:00:01:{11 + index:02x}"


T = TypeVar("T")


@dataclass(frozen=True)
class NodeNs:
    """One server namespace of the bed."""

    name: str
    index: int
    addr4: str
    addr6: str
    iface: str = "eth0"
    mac: str = SHARED_MAC


class Bed(TrafficMixin):
    """Context manager building the hub topology above; see the module docstring."""

    def __init__(
        self,
        prefix: str,
        nodes: int = 3,
        *,
        vip4: str = VIP4,
        vip6: str = VIP6,
        shared_mac: str = SHARED_MAC,
        add_vip: bool = True,
        switch: bool = False,
        mcast_snooping: bool = False,
        mcast_querier: bool = False,
        unique_macs: bool = False,
        vlan: int | None = None,
    ) -> None:
        """``switch``/``mcast_snooping``/``mcast_querier``/``unique_macs``/``vlan``: see
        module doc."""
        if not prefix.startswith("lbdt-"):
            raise ValueError(f"bed prefixes start with 'lbdt-', got {prefix!r}")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in 1..{MAX_NODES}, got {nodes}")
        self.prefix = prefix
        self.vip4 = vip4
        self.vip6 = vip6
        self.shared_mac = shared_mac
        self.add_vip = add_vip
        if (mcast_snooping or mcast_querier) and not switch:
            raise ValueError("mcast_snooping/mcast_querier need switch=True")
        self.switch = switch
        self.mcast_snooping = mcast_snooping
        self.mcast_querier = mcast_querier
        self.unique_macs = unique_macs
        if vlan is not None and not 1 <= vlan <= 4094:
            raise ValueError(f"vlan must be in 1..4094, got {vlan}")
        self.vlan = vlan
        self.lan_iface = f"eth0.{vlan}" if vlan is not None else "eth0"
        """The interface of the nodes and of the router's LAN side."""
        self.hub = f"{prefix}hub"
        self.router = f"{prefix}r"
        self.client = f"{prefix}c"
        self.nodes = [
            NodeNs(
                f"{prefix}n{i}",
                i,
                f"192.0.2.{11 + i}",
                f"2001:db8:1::{11 + i}",
                iface=self.lan_iface,
                mac=node_mac(i) if unique_macs else shared_mac,
            )
            for i in range(nodes)
        ]
        self._procs: list[subprocess.Popen[Any]] = []
        self._logs: dict[int, Path] = {}
        self._tmp: Path | None = None
        self._up = False

    # ---------------------------------------------------------------- lifecycle

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the bed, hub first."""
        return [self.hub, self.router, self.client, *(n.name for n in self.nodes)]

    def __enter__(self) -> Bed:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def build(self) -> None:
        """Create namespaces, links, addresses, routes and sysctls."""
        cleanup_prefix(self.prefix)
        write_owner(self.prefix)
        self._tmp = Path(tempfile.mkdtemp(prefix=self.prefix))
        for ns in self.namespaces:
            self._ip(None, "netns", "add", ns)
        self._build_hub()
        self._build_router_and_client()
        for node in self.nodes:
            self._build_node(node)
        self._wait_links_up()
        self._up = True

    def teardown(self) -> None:
        """Stop every process the bed started, delete its namespaces. Never raises."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
        self._procs.clear()
        cleanup_prefix(self.prefix)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(n.startswith(self.prefix) for n in list_netns()), 5.0)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._up = False

    # ------------------------------------------------------------- construction

    def _ip(self, ns: str | None, *args: str) -> None:
        argv = ["ip", *(["-n", ns] if ns else []), *args]
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        if out.returncode != 0:
            raise BedError(f"{' '.join(argv)} failed: {out.stderr.strip()}")

    def _batch(self, ns: str, lines: Sequence[str]) -> None:
        """Run many ``ip`` commands inside ``ns`` with one process (ip -batch)."""
        text = "\n".join(lines) + "\n"
        out = subprocess.run(
            ["ip", "-n", ns, "-batch", "-"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
        if out.returncode != 0:
            raise BedError(f"ip -n {ns} -batch failed: {out.stderr.strip()}\n{text}")

    def set_sysctls(self, ns: str, values: dict[str, str | int]) -> None:
        """Write sysctls from a process inside ``ns`` (one ``sysctl -w`` call)."""
        if values:
            self.run(ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items()))

    def read_sysctl(self, ns: str, key: str) -> str:
        """Read one sysctl as seen inside ``ns``."""
        return self.run(ns, "sysctl", "-n", key).stdout.strip()

    def _build_hub(self) -> None:
        # No IPv6 in the hub: its ports must stay silent (no link-local, no MLD, no NDP).
        self.set_sysctls(
            self.hub,
            {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1},
        )
        ports = [(f"p{n.index}", n.name) for n in self.nodes] + [("pr", self.router)]
        if self.switch:
            # A learning switch: default ageing (300 s), unknown unicast/multicast flooded.
            bridge = (
                f"link add br0 type bridge stp_state 0 mcast_snooping "
                f"{int(self.mcast_snooping)} mcast_querier {int(self.mcast_querier)}"
            )
            learning = "on"
        else:
            bridge = "link add br0 type bridge ageing_time 0 mcast_snooping 0 stp_state 0"
            learning = "off"
        lines = ["link set lo up", bridge]
        for port, peer_ns in ports:
            lines.append(f"link add {port} type veth peer name eth0 netns {peer_ns}")
        for port, _ in ports:
            lines += [
                f"link set {port} master br0",
                f"link set dev {port} type bridge_slave learning {learning} flood on "
                "mcast_flood on",
                f"link set {port} up",
            ]
        lines.append("link set br0 up")
        self._batch(self.hub, lines)

    def _build_router_and_client(self) -> None:
        r, c = self.router, self.client
        self._ip(r, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", c)
        # Forwarding only in the router; DAD off or IPv6 forwarding stalls ~2 s (NOTES).
        self.set_sysctls(
            r,
            {
                "net.ipv4.ip_forward": 1,
                "net.ipv6.conf.all.forwarding": 1,
                "net.ipv6.conf.all.accept_dad": 0,
                "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv6.conf.eth0.accept_dad": 0,
                "net.ipv6.conf.eth1.accept_dad": 0,
            },
        )
        lan = self._add_vlan(r)
        self._batch(
            r,
            [
                "link set lo up",
                f"addr add {ROUTER_LAN4}/24 dev {lan}",
                f"addr add {ROUTER_LAN6}/64 dev {lan} nodad",
                f"addr add {ROUTER_WAN4}/24 dev eth1",
                f"addr add {ROUTER_WAN6}/64 dev eth1 nodad",
                "link set eth0 up",
                f"link set {lan} up",
                "link set eth1 up",
                f"route add {CLIENT_NET4} via {CLIENT4}",
                f"route add {CLIENT_NET6} via {CLIENT6}",
            ],
        )
        # IPv6 AnyIP: the local route makes the kernel accept packets for the range, but
        # bind() checks configured addresses only, hence ip_nonlocal_bind (seen here).
        self.set_sysctls(
            c,
            {
                "net.ipv4.ip_forward": 0,
                "net.ipv6.ip_nonlocal_bind": 1,
                "net.ipv6.conf.all.accept_dad": 0,
                "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv6.conf.eth0.accept_dad": 0,
            },
        )
        # AnyIP: local routes on lo let the client bind any address of those ranges.
        self._batch(
            c,
            [
                "link set lo up",
                f"addr add {CLIENT4}/24 dev eth0",
                f"addr add {CLIENT6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add local {CLIENT_NET4} dev lo",
                f"route add local {CLIENT_NET6} dev lo",
                f"route add default via {ROUTER_WAN4}",
                f"route add ::/0 via {ROUTER_WAN6}",
            ],
        )

    def _build_node(self, node: NodeNs) -> None:
        # Identical MACs mean identical link-local addresses and failing DAD: no
        # link-local generation, no DAD (NOTES). Set before the link comes up.
        self.set_sysctls(
            node.name,
            {
                "net.ipv4.ip_forward": 0,
                "net.ipv6.conf.all.forwarding": 0,
                "net.ipv6.conf.eth0.addr_gen_mode": 1,
                "net.ipv6.conf.eth0.accept_dad": 0,
                # link_down() must not wipe the IPv6 addresses (the kernel's default).
                "net.ipv6.conf.eth0.keep_addr_on_down": 1,
            },
        )
        self._batch(node.name, [f"link set eth0 address {node.mac}"])
        lan = self._add_vlan(node.name)
        lines = [
            "link set lo up",
            f"addr add {node.addr4}/24 dev {lan}",
            f"addr add {node.addr6}/64 dev {lan} nodad",
        ]
        if self.add_vip:
            # /32 and /128 so the node's own address stays primary; the v6 VIP is
            # deprecated (preferred_lft 0) so it is never picked as a source address.
            lines += [
                f"addr add {self.vip4}/32 dev {lan}",
                f"addr add {self.vip6}/128 dev {lan} nodad preferred_lft 0",
            ]
        lines += [
            "link set eth0 up",
            f"link set {lan} up",
            f"route add default via {ROUTER_LAN4}",
            f"route add ::/0 via {ROUTER_LAN6}",
        ]
        self._batch(node.name, lines)

    def _add_vlan(self, ns: str) -> str:
        """With ``vlan``: eth0.<id> over eth0 (down; eth0's MAC), its IPv6 sysctls as
        eth0's. Returns the LAN interface's name."""
        if self.vlan is None:
            return "eth0"
        lan = self.lan_iface
        self._batch(ns, [f"link add link eth0 name {lan} type vlan id {self.vlan}"])
        # A dotted interface name: sysctl keys with "/" as the separator.
        self.set_sysctls(
            ns,
            {
                f"net/ipv6/conf/{lan}/{key}": self.read_sysctl(ns, f"net/ipv6/conf/eth0/{key}")
                for key in ("addr_gen_mode", "accept_dad", "keep_addr_on_down")
            },
        )
        return lan

    def _wait_links_up(self) -> None:
        checks = [(n.name, n.iface) for n in self.nodes]
        checks += [(self.router, self.lan_iface), (self.router, "eth1"), (self.client, "eth0")]

        def all_up() -> bool:
            for ns, dev in checks:
                out = self.run(ns, "cat", f"/sys/class/net/{dev}/operstate", check=False)
                if out.stdout.strip() != "up":
                    return False
            return True

        wait_for(all_up, 5.0, 0.02, "bed links to come up")

    # ------------------------------------------------------------------ helpers

    def node(self, which: int | str | NodeNs) -> NodeNs:
        """A node by index, namespace name or NodeNs."""
        if isinstance(which, NodeNs):
            return which
        for node in self.nodes:
            if which in (node.index, node.name):
                return node
        raise KeyError(f"no node {which!r} in bed {self.prefix}")

    def run(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``ns`` and wait (captured text output)."""
        full = ["ip", "netns", "exec", ns, *argv]
        out = subprocess.run(
            full, capture_output=True, text=True, check=False, timeout=timeout, input=input
        )
        if check and out.returncode != 0:
            raise BedError(
                f"{' '.join(full)} exited {out.returncode}\nstdout: {out.stdout}\n"
                f"stderr: {out.stderr}"
            )
        return out

    def popen(self, ns: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns``; the bed stops it (by PID) at teardown.

        Unless ``stdout`` is given, stdout and stderr go to a log file read by
        :meth:`output`. ``ip netns exec`` execs in place, so ``proc.pid`` is the
        program's own PID.
        """
        log: Path | None = None
        if "stdout" not in kw:
            assert self._tmp is not None, "bed not built"
            log = self._tmp / f"proc{len(self._procs)}.log"
            with log.open("wb") as fh:
                kw["stdout"] = fh
                kw.setdefault("stderr", subprocess.STDOUT)
                kw.setdefault("stdin", subprocess.DEVNULL)
                proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        else:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        if log is not None:
            self._logs[proc.pid] = log
        return proc

    def output(self, proc: subprocess.Popen[Any]) -> str:
        """What a process started by :meth:`popen` has written so far."""
        log = self._logs.get(proc.pid)
        return log.read_text(errors="replace") if log and log.exists() else ""

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
        """Signal one process started here (by PID), wait for it, return its code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            return proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=5.0)

    def _python_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def python(self, ns: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start the venv's Python inside ``ns`` with ``args`` (e.g. "-c", code)."""
        kw.setdefault("env", self._python_env())
        return self.popen(ns, sys.executable, *args, **kw)

    def run_python(
        self, ns: str, code: str, *args: str, check: bool = True, timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` inside ``ns`` to completion (argv[1:] = ``args``)."""
        full = ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]
        out = subprocess.run(
            full,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=self._python_env(),
        )
        if check and out.returncode != 0:
            raise BedError(
                f"python in {ns} exited {out.returncode}\nstdout: {out.stdout}\n"
                f"stderr: {out.stderr}"
            )
        return out

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02
    ) -> T:
        """Module-level :func:`wait_for`, for convenience."""
        return wait_for(predicate, timeout, interval)

    def link_down(self, node: int | str | NodeNs) -> None:
        """Take a node's eth0 down (emulates host death / cable pull)."""
        n = self.node(node)
        self._ip(n.name, "link", "set", n.iface, "down")

    def link_up(self, node: int | str | NodeNs) -> None:
        """Bring a node's eth0 up again and restore its default routes.

        Admin-down removes the routes through the link (addresses stay: IPv6 ones thanks
        to keep_addr_on_down=1), so the default routes are re-added.
        """
        n = self.node(node)
        self._ip(n.name, "link", "set", n.iface, "up")
        for gateway in (ROUTER_LAN4, ROUTER_LAN6):
            argv = ["ip", "route", "replace", "default", "via", gateway]

            def replaced(cmd: list[str] = argv) -> bool:
                return self.run(n.name, *cmd, check=False).returncode == 0

            # The kernel re-creates the IPv6 prefix route a moment after the link is up.
            wait_for(replaced, 3.0, 0.02, f"default route via {gateway} in {n.name}")
