"""Heartbeat admission in the kernel: only the segment and the peers, only valid sizes.

Theory of operation
-------------------
The heartbeat socket listens on ``0.0.0.0:port`` (it hears the group and unicast
``peers`` alike), so without a filter anyone who can route a datagram to the node
can fill its receive buffer, and every datagram costs the daemon an AEAD lookup
or more. This owner-flagged table drops, before the socket, every UDP datagram to
the heartbeat port that

* comes neither from one of the interface's own IPv4 subnets *on that interface*
  (the segment: heartbeats are multicast with TTL 1 or unicast between peers),
  nor from a configured ``peers`` address (on any interface: peers may be routed);
* or whose UDP payload is shorter than the smallest or longer than the largest
  datagram the wire format can produce (``protocol.wire.MIN_DATAGRAM`` and
  ``MAX_DATAGRAM``: imported, so the bound follows the wire format). The check is
  on the UDP header's length field, which the kernel holds every datagram to
  (a shorter claim is trimmed to it, a longer one dropped); at the input hook the
  datagram is already reassembled from its fragments.

::

    table inet lbd_hb {                     # flags owner: lives as long as the daemon
        flags owner
        counter foreign { }   counter badlen { }   counter passed { }
        set segment { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }
        set peers { type ipv4_addr; elements = { 198.51.100.7 } }
        chain input { type filter hook input priority -160; policy accept;
            meta nfproto ipv4 udp dport 7946 jump heartbeat }
        chain heartbeat {
            iifname "eth0" ip saddr @segment goto valid
            ip saddr @peers goto valid
            counter name "foreign" drop }
        chain valid {
            udp length 44-65008 counter name "passed" accept
            counter name "badlen" drop }
    }

The input hook sees unicast and locally delivered multicast alike, after routing
(so a spoofed source that reverse-path filtering drops never gets here) and
before any socket. Priority -160 runs before the usual ``filter`` (0) chains, so
a flood is counted and dropped before an admin's rules spend time on it. Only
IPv4 is filtered: the daemon has no IPv6 heartbeat socket.

The table is owner-flagged like ``inet lbd``: it lives exactly as long as the
netlink socket of this module's libnftables context, so the object must be kept
for the daemon's life (garbage-collecting it drops the table), and a crashed
daemon leaves no filter behind (there is no socket to protect then). ``nft flush
ruleset`` skips owner tables; other processes, ``nft`` included, may list the
table and its counters but get EPERM on any change.

The subnets come from the kernel (:func:`interface_networks`: one RTM_GETADDR
netlink dump, no pyroute2 in the daemon): every IPv4 address on the interface
with its prefix length, the VIPs' /32s included (they are inside the subnet or
harmless). A node with only a /32 address hears only its ``peers``. The sets
can be replaced while running (:meth:`HeartbeatFilter.update`, e.g. after a
reload changed ``peers``) in one transaction.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbd.protocol.errors import LbdError
from lbd.protocol.wire import MAX_DATAGRAM, MIN_DATAGRAM

__all__ = [
    "COUNTERS",
    "HB_PRIORITY",
    "HB_TABLE",
    "FilterSpec",
    "HeartbeatFilter",
    "HeartbeatFilterError",
    "filter_commands",
    "interface_networks",
    "set_commands",
]

HB_TABLE = "lbd_hb"
HB_PRIORITY = -160
UDP_HEADER = 8
COUNTERS = ("foreign", "badlen", "passed")
"""Named counters: datagrams dropped for their source, for their size, and let through."""


class HeartbeatFilterError(LbdError):
    """The heartbeat filter could not be installed or changed; the message is nft's."""


def _networks(items: Iterable[str | ipaddress.IPv4Network]) -> tuple[ipaddress.IPv4Network, ...]:
    """IPv4 networks, merged: an interval set refuses overlapping elements."""
    nets = [ipaddress.IPv4Network(item, strict=False) for item in items]
    return tuple(ipaddress.collapse_addresses(nets))


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """What the filter depends on. ``segment``: the interface's subnets; ``peers``:
    the configured unicast peers; sizes are UDP payload bytes."""

    interface: str
    port: int
    segment: tuple[ipaddress.IPv4Network, ...] = ()
    peers: tuple[ipaddress.IPv4Address, ...] = ()
    min_size: int = MIN_DATAGRAM
    max_size: int = MAX_DATAGRAM
    table: str = HB_TABLE
    priority: int = HB_PRIORITY
    counters: tuple[str, ...] = field(default=COUNTERS)

    @classmethod
    def build(
        cls,
        interface: str,
        port: int,
        segment: Iterable[str | ipaddress.IPv4Network],
        peers: Iterable[str],
        **kw: Any,
    ) -> FilterSpec:
        """Normalise and validate (ValueError on a bad value)."""
        spec = cls(
            interface,
            port,
            _networks(segment),
            tuple(sorted({ipaddress.IPv4Address(p) for p in peers})),
            **kw,
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        # An interface name goes into a quoted string: keep it to what Linux allows.
        if not (
            0 < len(self.interface) < 16
            and all(c.isalnum() or c in "-_.@:" for c in self.interface)
        ):
            raise ValueError(f"bad interface name {self.interface!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, not {self.port}")
        if not 1 <= self.min_size <= self.max_size <= 65535 - UDP_HEADER:
            raise ValueError(
                f"datagram sizes {self.min_size}..{self.max_size} are not a valid UDP payload range"
            )
        if not self.table.replace("_", "").isalnum():
            raise ValueError(f"bad table name {self.table!r}")

    @property
    def udp_lengths(self) -> tuple[int, int]:
        """The UDP header's length field of the smallest and largest valid datagram."""
        return self.min_size + UDP_HEADER, self.max_size + UDP_HEADER


def set_commands(spec: FilterSpec, *, flush: bool) -> list[str]:
    """Fill (``flush``: replace) the ``segment`` and ``peers`` sets."""
    t = f"inet {spec.table}"
    cmds = [f"flush set {t} segment", f"flush set {t} peers"] if flush else []
    if spec.segment:
        cmds.append(f"add element {t} segment {{ {', '.join(map(str, spec.segment))} }}")
    if spec.peers:
        cmds.append(f"add element {t} peers {{ {', '.join(map(str, spec.peers))} }}")
    return cmds


def filter_commands(spec: FilterSpec) -> list[str]:
    """The whole table, as one transaction. Every statement creating the table repeats
    ``flags owner``: nft 1.0.6 refuses the transaction otherwise."""
    t = f"inet {spec.table}"
    low, high = spec.udp_lengths
    cmds = [f"add table {t} {{ flags owner; }}"]
    cmds += [f"add counter {t} {name}" for name in spec.counters]
    cmds += [
        f"add set {t} segment {{ type ipv4_addr; flags interval; }}",
        f"add set {t} peers {{ type ipv4_addr; }}",
        f"add chain {t} input {{ type filter hook input priority {spec.priority}; "
        "policy accept; }",
        f"add chain {t} heartbeat",
        f"add chain {t} valid",
        f"add rule {t} input meta nfproto ipv4 udp dport {spec.port} jump heartbeat",
        f'add rule {t} heartbeat iifname "{spec.interface}" ip saddr @segment goto valid',
        f"add rule {t} heartbeat ip saddr @peers goto valid",
        f'add rule {t} heartbeat counter name "foreign" drop',
        f'add rule {t} valid udp length {low}-{high} counter name "passed" accept',
        f'add rule {t} valid counter name "badlen" drop',
    ]
    return cmds + set_commands(spec, flush=False)


class HeartbeatFilter:
    """The ``inet lbd_hb`` table of one daemon. Keep the object for the daemon's life."""

    def __init__(
        self,
        interface: str,
        port: int,
        segment: Iterable[str | ipaddress.IPv4Network],
        peers: Iterable[str] = (),
        **kw: Any,
    ) -> None:
        self.spec = FilterSpec.build(interface, port, segment, peers, **kw)
        self._nft: Any = None

    def _context(self) -> Any:
        if self._nft is None:
            try:
                import nftables  # noqa: PLC0415 - Debian's binding, only on real nodes
            except ImportError as exc:
                raise HeartbeatFilterError(
                    "the nftables Python binding is missing (Debian: python3-nftables)"
                ) from exc
            nft = nftables.Nftables()
            nft.set_json_output(True)
            self._nft = nft
        return self._nft

    def _run(self, commands: Sequence[str]) -> str:
        rc, out, err = self._context().cmd("\n".join(commands))
        if rc != 0:
            raise HeartbeatFilterError((err or f"nft returned {rc}").strip())
        return str(out)

    @property
    def installed(self) -> bool:
        return self._nft is not None

    def install(self) -> None:
        """Create the table (one transaction). A live process's table of the same name
        makes this fail with EPERM."""
        self._run(filter_commands(self.spec))

    def update(
        self,
        *,
        segment: Iterable[str | ipaddress.IPv4Network] | None = None,
        peers: Iterable[str] | None = None,
    ) -> None:
        """Replace the segment and/or peers (one transaction; unchanged: nothing sent)."""
        new = FilterSpec.build(
            self.spec.interface,
            self.spec.port,
            self.spec.segment if segment is None else segment,
            map(str, self.spec.peers) if peers is None else peers,
            min_size=self.spec.min_size,
            max_size=self.spec.max_size,
            table=self.spec.table,
            priority=self.spec.priority,
        )
        if new == self.spec:
            return
        if self._nft is not None:
            self._run(set_commands(new, flush=True))
        self.spec = new

    def counters(self) -> dict[str, int]:
        """Packets per named counter (``COUNTERS``); {} when the table is not there."""
        if self._nft is None:
            return {}
        # Not "list table inet lbd_hb" (0.18 ms against 2-5 ms): with nftables 1.0.6
        # (Debian 12) that listing corrupted the daemon's heap now and then, caught by
        # faulthandler in CI as glibc's "corrupted double-linked list" abort inside
        # this call (2 of 3 clean runs, during a rolling parameter change).
        rc, out, _err = self._nft.cmd(f"list counters table inet {self.spec.table}")
        if rc != 0 or not out:
            return {}
        found: dict[str, int] = {}
        for obj in json.loads(out).get("nftables", []):
            counter = obj.get("counter")
            if counter and counter.get("name") in self.spec.counters:
                found[counter["name"]] = int(counter.get("packets", 0))
        return found

    def remove(self) -> None:
        """Delete the table (a graceful stop); the context is dropped as well."""
        if self._nft is None:
            return
        try:
            self._run(
                [
                    f"add table inet {self.spec.table} {{ flags owner; }}",
                    f"delete table inet {self.spec.table}",
                ]
            )
        finally:
            self._nft = None  # the kernel drops the table with the socket in any case

    def close(self) -> None:
        """Drop the libnftables context: the kernel removes the table."""
        self._nft = None


# ---------------------------------------------------------------- the subnets

_NLMSG = struct.Struct("=LHHLL")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBL")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def _align(n: int) -> int:
    return (n + 3) & ~3


def interface_networks(ifindex: int) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of every address on interface ``ifindex`` (RTM_GETADDR dump).

    The network is the address's prefix (for a point-to-point address, the peer's:
    ``IFA_ADDRESS``). Raises OSError if netlink fails.
    """
    found: list[ipaddress.IPv4Network] = []
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        sock.send(
            _NLMSG.pack(
                _NLMSG.size + _IFADDRMSG.size, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
            )
            + _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        )
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return found
            at = 0
            while at + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, at)
                if kind == _NLMSG_DONE or length < _NLMSG.size:
                    return found
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, at + _NLMSG.size)[0]
                    raise OSError(code, f"netlink address dump: {os.strerror(code)}")
                if kind == _RTM_NEWADDR:
                    net = _address_network(data[at + _NLMSG.size : at + length], ifindex)
                    if net is not None:
                        found.append(net)
                at += _align(length)


def _address_network(body: bytes, ifindex: int) -> ipaddress.IPv4Network | None:
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(body, 0)
    if family != socket.AF_INET or index != ifindex:
        return None
    attrs: dict[int, bytes] = {}
    at = _IFADDRMSG.size
    while at + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, at)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[at + _RTATTR.size : at + length]
        at += _align(length)
    raw = attrs.get(_IFA_ADDRESS) or attrs.get(_IFA_LOCAL)
    if raw is None or len(raw) != 4:
        return None
    return ipaddress.IPv4Network((socket.inet_ntoa(raw), prefixlen), strict=False)
