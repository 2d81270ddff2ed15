"""Cluster-MAC modes (multicast, flood): lbd on an ordinary learning switch.

Theory of operation
-------------------
A switch learns a MAC on the port it last came from. With one *shared unicast* MAC on
every node (``mac_mode = "shared"``, fine on a hub) the switch sends all VIP traffic to
one port and the other nodes starve (tests/netns/test_switched.py shows it). In
``mac_mode = "multicast"`` every node keeps its own unique MAC, and the VIPs resolve
to a *multicast* cluster MAC instead, as Windows NLB's multicast mode and the old
CLUSTERIP target did. A MAC with the group bit (bit 0 of the first octet) set is never
learned as a source (no frame is ever sent *from* it), so a switch floods frames *to*
it to every port of the VLAN, like broadcast: every node receives every VIP packet.

Default cluster MAC: ``03:00:5e:XX:YY:ZZ`` with XX:YY:ZZ the first three bytes of
SHA-256("lbd cluster mac\\0" + cluster name): identical on every node with no extra
setting, different per cluster. 0x03 = group bit + locally administered bit, so it
collides with no vendor's MAC, and it lies outside the IP-multicast mappings
(01:00:5e:00-7f for IPv4, 33:33 for IPv6) that IGMP/MLD-snooping hardware may filter
by MAC: it is flooded as plain L2 multicast. (An explicit ``cluster_mac`` may be any
group MAC, e.g. NLB's IGMP-mode style 01:00:5e:7f:xx:yy; then switches that snoop by
MAC forward it only where 239.255.xx.yy was joined: that needs joins, which lbd does
not send.)

``mac_mode = "flood"`` (the LARTC page's "send address and listen address", Windows
NLB's unicast mode with MaskSourceMAC) uses a locally administered **unicast**
cluster MAC instead, default ``02:6c:`` + 4 bytes of the same digest. No frame ever
carries it as its Ethernet source (every node sends from its own MAC, and an egress
rule drops any frame that would), so a learning switch never learns it and floods
frames to it to every port like an unknown unicast MAC; and routers, which may refuse
a multicast MAC in an ARP reply (RFC 1812 section 3.3.2), accept it like any unicast
MAC. Unlike NLB's unicast mode, the nodes keep their own MACs on the interface, so
they still reach each other and the router by their own addresses (NLB's nodes, all
wearing the cluster MAC, cannot). Differences from multicast mode below: the filter
list, and a ``netdev lbd_mac`` table instead of the prerouting ``pkttype`` rule.

On each node, ``MacMode.apply()``:

* puts the cluster MAC on the interface's receive filter so that a real NIC passes
  those frames (netcfg/macfilter.py: ``ip maddr add`` for a group MAC; for a unicast
  one ``bridge fdb add MAC dev IF self permanent``, the unicast list);
* flood only, ``netdev lbd_mac``: ``ingress`` sets ``meta pkttype set host`` on
  frames to the cluster MAC (``eth_type_trans`` marks them PACKET_OTHERHOST, which
  IPv4, IPv6 and ARP drop before any inet/arp hook: checked, a ping to the VIP fails
  without it); ``egress`` drops, and counts, any frame with the cluster MAC as its
  Ethernet source;
* installs the persistent tables ``arp lbd_mac`` and ``inet lbd_mac``:

  - ``inet lbd_mac pre`` (prerouting, priority -190): frames to the cluster MAC arrive
    as PACKET_MULTICAST, which TCP (and the RFC 1122 check behind the
    ``drop_unicast_in_l2_multicast`` sysctl) refuse for a unicast IP destination:
    ``meta pkttype set host`` makes them the node's own. Checked on 6.18: prerouting
    runs before routing and before tcp_v4_rcv/tcp_v6_rcv look at pkttype.
  - ARP (``arp lbd_mac out``): ARP packets from a VIP (replies) get ``arp saddr
    ether set <cluster MAC>``. The Ethernet source stays the node's own MAC (a
    switch must never learn the cluster MAC).
  - IPv6 ND (``inet lbd_mac out``): the Target Link-Layer Address option of a
    Neighbor Advertisement for a VIP is rewritten to the cluster MAC. nft 1.0.6
    updates no checksum for a raw ``@th`` write, so the rule also writes the 16
    low reserved bits of the NA header (RFC 4861: "MUST be ignored by the receiver")
    with the one's-complement difference of the old and new MAC: the ICMPv6 checksum
    stays valid without being recomputed. The rule matches only when the option
    holds this node's own MAC and that reserved word is zero, so the difference is
    exact. The same is done for a Neighbor Solicitation sent *from* a VIP (its Source
    Link-Layer Address option): Linux solicits with the source address of the packet
    that needs the neighbour, and a router learns the sender's mapping from an NS, so
    without it the router would map the VIP to one node's own MAC (seen here). A
    receiver that checked the reserved bits would refuse these: then use a static
    neighbour entry (README).
  - One responder: every node holds the VIPs, so every node would answer each ARP
    request / Neighbor Solicitation. Identical answers would be harmless, but a
    router should see one. The designated responder is the owner of bucket
    ``ANCHOR_BUCKET`` (0) *while it holds a lease*: the daemon keeps the interface
    name in the set ``answer`` of both tables with the lease as timeout
    (``MacMode.answer``), and requests for a VIP are dropped on input by every node
    not in it. Ownership is exclusive (break-before-make) and follows failover, so
    after a crash the new owner of bucket 0 answers; a hung or dead daemon's element
    simply expires in the kernel. In a hand-off gap nobody answers for a moment; the
    router retries (a second answer would have been harmless anyway).

Tables are persistent (no ``flags owner``): after a crash the node still rewrites and
stays silent on ARP/ND for the VIP, like the guard keeps it closed. With
``persist=True`` (the daemon) they are made *owner + persist* where the kernel can
(>= 6.9), exactly like the guard (netcfg/nft.py ``claim_persistent``): while the
daemon lives nobody else can flush or delete them (``nft flush ruleset`` skips them),
after a crash they stay, orphaned, and the next run adopts them. Otherwise they are
plain tables and the daemon re-asserts them within milliseconds of an nft event
(``reassert``, daemon/kernelwatch.py); and, so that those milliseconds cost nothing,
each also gets an *owned twin* (``lbd_mac_owned``, ``flags owner``) with the same
rules, which no other process can flush or delete and which dies with the daemon.
While the daemon lives, a ``nft flush ruleset`` (``systemctl restart nftables`` on
Debian 12's 6.1 kernel) leaves the twin in place, so flood mode's ingress rule never
lapses (without it every SYN to the node in that gap was lost); after a crash the
plain table remains, as before. Every rule is idempotent when applied twice: setting
pkttype, the MAC or the ARP sender again changes nothing, the ND rewrite matches only
a message still holding our own MAC, and both ``answer`` sets are written together. ``restore()``
deletes both tables and leaves the MAC group, as recorded in the JSON state file
(write-ahead, idempotent, like link.py); the daemon calls it after the VIPs are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lbd.netcfg import macfilter
from lbd.netcfg.macfilter import (  # noqa: F401 - mc_membership: re-exported
    MacFilterError,
    interface_mac,
    is_group_mac,
    mac_bytes,
    mc_membership,
)
from lbd.netcfg.nft import NftError, claim_persistent, new_context
from lbd.netcfg.statefile import RecordError, load_record, save_record
from lbd.protocol.errors import LbdError

log = logging.getLogger("lbd.netcfg.macmode")

TABLE = "lbd_mac"
OWNED_TWIN_SUFFIX = "_owned"  # the owned twin of each table (module doc)
PRE_PRIORITY = -190  # after conntrack (-200), before lbd's owner table (-180)
INGRESS_PRIORITY = -500  # before any other ingress chain looks at the frame
FAMILIES = ("inet", "arp", "netdev")
ANCHOR_BUCKET = 0
STATE_VERSION = 1
_MAC_SALT = b"lbd cluster mac\0"


class MacModeError(LbdError):
    """The multicast cluster MAC could not be set up or undone."""


def derive_cluster_mac(cluster: str, mode: str = "multicast") -> str:
    """multicast: 03:00:5e + 3 bytes of SHA-256 of the cluster name; flood: 02:6c + 4
    bytes (a locally administered unicast MAC; see module doc)."""
    digest = hashlib.sha256(_MAC_SALT + cluster.encode()).digest()
    head = (0x02, 0x6C, *digest[:4]) if mode == "flood" else (0x03, 0x00, 0x5E, *digest[:3])
    return ":".join(f"{b:02x}" for b in head)


def ones_sum(data: bytes) -> int:
    """The 16-bit one's-complement sum of ``data`` (padded to even length), as in the
    Internet checksum (RFC 1071): the checksum is its complement."""
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def nd_compensation(own_mac: str, cluster_mac: str) -> int:
    """The 16-bit word that keeps the ICMPv6 checksum valid when the TLLA option
    changes from ``own_mac`` to ``cluster_mac`` (one's-complement old - new)."""
    old, new = ones_sum(mac_bytes(own_mac)), ones_sum(mac_bytes(cluster_mac))
    diff = old + (0xFFFF - new)  # one's-complement subtraction
    while diff > 0xFFFF:
        diff = (diff & 0xFFFF) + (diff >> 16)
    return 0 if diff == 0xFFFF else diff


@dataclass(frozen=True, slots=True)
class MacModeSpec:
    """Everything the lbd_mac tables depend on (one node: own_mac differs)."""

    interface: str
    cluster_mac: str
    own_mac: str
    vips4: tuple[str, ...]
    vips6: tuple[str, ...]
    table: str = TABLE

    @property
    def flood(self) -> bool:
        """A unicast cluster MAC (``mac_mode = "flood"``), not a multicast one."""
        return not is_group_mac(self.cluster_mac)

    @classmethod
    def build(
        cls, interface: str, cluster_mac: str, own_mac: str, vips: Sequence[str]
    ) -> MacModeSpec:
        """The mode follows the MAC: a group MAC is multicast mode, a unicast one flood."""
        v4: list[str] = []
        v6: list[str] = []
        for vip in vips:
            addr = ipaddress.ip_interface(vip).ip
            (v4 if addr.version == 4 else v6).append(str(addr))
        if is_group_mac(own_mac):
            raise ValueError(f"{interface} has a group MAC {own_mac}")
        if own_mac.lower() == cluster_mac.lower():
            # E.g. left over from shared mode: every frame would then come FROM the
            # cluster MAC and switches would learn it on one port.
            raise ValueError(
                f"{interface} wears the cluster MAC {cluster_mac} as its own; "
                "this mode needs every node's own MAC on the interface"
            )
        return cls(
            interface,
            cluster_mac.lower(),
            own_mac.lower(),
            tuple(dict.fromkeys(v4)),
            tuple(dict.fromkeys(v6)),
        )


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def table_commands(spec: MacModeSpec) -> list[str]:
    """(Re)assert both tables exactly: add (no-op if present), flush chains, re-add rules.

    The ``answer`` sets are created if missing and never flushed here, so a running
    responder keeps answering across a re-assert.
    """
    ifn = f'"{spec.interface}"'
    mac = spec.cluster_mac
    cmds: list[str] = []
    inet = f"inet {spec.table}"
    cmds += [
        f"add table {inet}",
        f"add set {inet} answer {{ typeof meta iifname; flags timeout; }}",
        f"add chain {inet} pre {{ type filter hook prerouting priority {PRE_PRIORITY}; "
        "policy accept; }",
        f"add chain {inet} out {{ type filter hook output priority 0; policy accept; }}",
        f"flush chain {inet} pre",
        f"flush chain {inet} out",
    ]
    if spec.flood:
        cmds += flood_commands(spec)
    else:
        cmds.append(f"add rule {inet} pre iifname {ifn} ether daddr {mac} meta pkttype set host")
    comp = nd_compensation(spec.own_mac, spec.cluster_mac)
    for vip in spec.vips6:
        target = _hex(ipaddress.IPv6Address(vip).packed)
        # NS for a VIP: only the designated responder lets it in (offset 64: target).
        cmds.append(
            f"add rule {inet} pre iifname {ifn} icmpv6 type nd-neighbor-solicit "
            f"@th,64,128 {target} iifname != @answer drop"
        )
        # NA for a VIP carrying our own MAC in its first option (TLLA: type 2, len 1).
        # Both NA and NS have reserved bits at offset 48..63 and the first option at
        # byte 24; own and cluster MAC are fixed, so `comp` is exact (module doc).
        own, new = _hex(mac_bytes(spec.own_mac)), _hex(mac_bytes(mac))
        rewrite = f"@th,48,16 0 @th,208,48 set {new} @th,48,16 set {comp}"
        cmds.append(
            f"add rule {inet} out oifname {ifn} icmpv6 type nd-neighbor-advert "
            f"@th,64,128 {target} @th,192,16 0x0201 @th,208,48 {own} {rewrite}"
        )
        # NS sent FROM a VIP (Linux solicits with the source of the packet that needs
        # the neighbour, e.g. a reply from the VIP): its SLLA option (type 1) would
        # teach the router VIP -> our own MAC. IPv6 has no arp_announce: rewrite it.
        cmds.append(
            f"add rule {inet} out oifname {ifn} icmpv6 type nd-neighbor-solicit "
            f"ip6 saddr {vip} @th,192,16 0x0101 @th,208,48 {own} {rewrite}"
        )
    if spec.vips4:
        arp = f"arp {spec.table}"
        vips = "{ " + ", ".join(spec.vips4) + " }"
        cmds += [
            f"add table {arp}",
            f"add set {arp} answer {{ typeof meta iifname; flags timeout; }}",
            f"add chain {arp} in {{ type filter hook input priority 0; policy accept; }}",
            f"add chain {arp} out {{ type filter hook output priority 0; policy accept; }}",
            f"flush chain {arp} in",
            f"flush chain {arp} out",
            f"add rule {arp} in iifname {ifn} arp operation request arp daddr ip {vips} "
            "iifname != @answer drop",
            # Replies, and requests should one ever leave from a VIP (arp_announce=2,
            # set by link.py, prevents that): the VIP always maps to the cluster MAC.
            f"add rule {arp} out oifname {ifn} arp saddr ip {vips} arp saddr ether set {mac}",
        ]
    return cmds


def flood_commands(spec: MacModeSpec) -> list[str]:
    """The ``netdev`` table of flood mode (module doc): frames TO the unicast cluster
    MAC become the node's own at ingress, before IPv4/IPv6/ARP drop them as
    PACKET_OTHERHOST (an inet prerouting rule would come too late); and a frame FROM
    the cluster MAC never leaves (egress: nothing lbd does sends one; this makes it a
    guarantee, counted)."""
    ifn, mac, t = f'"{spec.interface}"', spec.cluster_mac, f"netdev {spec.table}"
    return [
        f"add table {t}",
        f"add chain {t} ingress {{ type filter hook ingress device {ifn} priority "
        f"{INGRESS_PRIORITY}; policy accept; }}",
        f"add chain {t} egress {{ type filter hook egress device {ifn} priority 0; "
        "policy accept; }",
        f"flush chain {t} ingress",
        f"flush chain {t} egress",
        f"add rule {t} ingress ether daddr {mac} meta pkttype set host",
        f"add rule {t} egress ether saddr {mac} counter drop",
    ]


def owned_twin(spec: MacModeSpec) -> MacModeSpec:
    """The spec of the owned twin tables (module doc)."""
    return replace(spec, table=spec.table + OWNED_TWIN_SUFFIX)


def as_owned(cmds: Sequence[str]) -> list[str]:
    """``cmds`` with every table created ``flags owner`` (owned by the sending socket)."""
    return [f"{c} {{ flags owner; }}" if c.startswith("add table ") else c for c in cmds]


def _families(spec: MacModeSpec) -> list[str]:
    return ["inet", *(["arp"] if spec.vips4 else []), *(["netdev"] if spec.flood else [])]


def answer_commands(spec: MacModeSpec, lease_ms: int | None) -> list[str]:
    """Make this node the ARP/ND responder for ``lease_ms`` (None: stop answering).

    Add, delete, add-with-timeout: nft 1.0.6 does not refresh a timeout on re-add
    and cannot delete an absent element (same pattern as the lease in ruleset.py).
    """
    elem = f'"{spec.interface}"'
    cmds = []
    for family in _families(spec):
        if family == "netdev":
            continue  # no responder set there: flood mode's ingress/egress rules only
        t = f"{family} {spec.table}"
        cmds += [f"add element {t} answer {{ {elem} }}", f"delete element {t} answer {{ {elem} }}"]
        if lease_ms is not None:
            cmds.append(f"add element {t} answer {{ {elem} timeout {int(lease_ms)}ms }}")
    return cmds


def remove_commands(table: str = TABLE) -> list[str]:
    """Delete both tables; "add" first so an absent table is no error."""
    cmds = []
    for family in FAMILIES:
        cmds += [f"add table {family} {table}", f"delete table {family} {table}"]
    return cmds


class MacMode:
    """Apply/undo multicast cluster-MAC mode on one interface; see module doc."""

    def __init__(
        self,
        interface: str,
        vips: Sequence[str],
        cluster_mac: str,
        *,
        state_file: str | Path | None = None,
        table: str = TABLE,
        persist: bool = False,
    ) -> None:
        """``persist``: owner + persist tables where the kernel can (module doc);
        ``persistent`` then says whether they are."""
        self.interface = interface
        self.vips = list(vips)
        self.cluster_mac = cluster_mac.lower()
        self.state_file = Path(state_file) if state_file is not None else None
        self.table = table
        self.spec: MacModeSpec | None = None
        self._nft: Any = None
        self._sock: socket.socket | None = None
        self._cache: dict[str, Any] | None = None
        self.answering = False
        self.persist = persist
        self.persistent = False
        self.twinned = False
        """Whether the owned twin tables are kept (persist asked, kernel < 6.9)."""

    def _context(self) -> Any:
        if self._nft is None:
            try:
                self._nft, self._sock = new_context()
            except NftError as exc:
                raise MacModeError(str(exc)) from None
        return self._nft

    def _run(self, commands: Sequence[str]) -> None:
        rc, _out, err = self._context().cmd("\n".join(commands))
        if rc != 0:
            raise MacModeError((err or f"nft returned {rc}").strip())

    @property
    def portid(self) -> int | None:
        """The netlink port of our libnftables socket (as nft events name it), if known."""
        try:
            port = self._sock.getsockname()[0] if self._sock is not None else 0
        except OSError:
            return None
        return int(port) or None

    def _table_commands(self, spec: MacModeSpec) -> list[str]:
        cmds = table_commands(spec)
        # A persistent table refuses a table message without PERSIST (nft.py).
        if self.persistent:
            return [c for c in cmds if not c.startswith("add table ")]
        if self.twinned:
            cmds += as_owned(table_commands(owned_twin(spec)))
        return cmds

    # ---------------------------------------------------------------- state

    def _load(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        state: dict[str, Any] = {"version": STATE_VERSION, "maddr": None, "tables": None}
        if self.state_file is not None:
            try:
                loaded = load_record(self.state_file, STATE_VERSION)
            except RecordError as exc:
                raise MacModeError(str(exc)) from None
            if loaded is not None:
                state.update({k: loaded.get(k) for k in ("maddr", "tables")})
        self._cache = state
        return state

    def _save(self, state: dict[str, Any]) -> None:
        self._cache = state
        if self.state_file is None:
            return
        try:
            save_record(self.state_file, state)
        except OSError as exc:
            raise MacModeError(f"cannot write {self.state_file}: {exc}") from None

    # ---------------------------------------------------------------- public

    def apply(self) -> None:
        """Record, join the MAC, install the tables (not answering yet). Idempotent."""
        own = interface_mac(self.interface)
        try:
            self.spec = MacModeSpec.build(self.interface, self.cluster_mac, own, self.vips)
        except ValueError as exc:
            raise MacModeError(str(exc)) from None
        state = self._load()
        old = state["maddr"]
        if old is not None and (old["interface"], old["mac"]) != (self.interface, self.cluster_mac):
            self._leave(state)  # a previous run's group on another interface/MAC
        if state["maddr"] is None:
            state["maddr"] = {
                "interface": self.interface,
                "mac": self.cluster_mac,
                "added": not macfilter.listed(self.interface, self.cluster_mac),
            }
        state["tables"] = self.table
        self._save(state)  # write-ahead: a crash from here on is restorable
        if not macfilter.listed(self.interface, self.cluster_mac):
            macfilter.join(self.interface, self.cluster_mac)
        if self.persist:
            self._context()
            try:
                self.persistent = self._sock is not None and all(
                    [
                        claim_persistent(self._sock, family, self.table)
                        for family in _families(self.spec)
                    ]
                )
            except NftError as exc:
                raise MacModeError(str(exc)) from None
            self.twinned = not self.persistent
        if not self.spec.flood:  # a flood-mode run's table, before the mode changed
            with contextlib.suppress(MacModeError):
                self._run([f"delete table netdev {self.table}"])
        self._run(self._table_commands(self.spec))
        self.answering = False

    def repair(self) -> None:
        """Put back, on the caller's thread, what apply() set and someone changed since:
        the MAC group (joined again) and both tables, rebuilt for the interface's MAC
        now (the ND rewrite rules name it). Records nothing: apply() did."""
        if self.spec is None:
            raise MacModeError("repair() before apply()")
        own = interface_mac(self.interface)
        if own != self.spec.own_mac:
            try:
                self.spec = MacModeSpec.build(self.interface, self.cluster_mac, own, self.vips)
            except ValueError as exc:
                raise MacModeError(str(exc)) from None
        if not self.joined():
            macfilter.join(self.interface, self.cluster_mac)
        self.reassert()

    def joined(self) -> bool:
        """Whether the interface's filter holds the cluster MAC (macfilter.py)."""
        return macfilter.listed(self.interface, self.cluster_mac)

    def reassert(self) -> None:
        """Write both tables again now (someone deleted or changed them). The responder
        element comes back with the daemon's next kernel apply."""
        if self.spec is None:
            raise MacModeError("reassert() before apply()")
        self._run(self._table_commands(self.spec))
        self.answering = False

    @property
    def tables(self) -> list[tuple[str, str]]:
        """(family, name) of the tables this node installs."""
        return [(family, self.table) for family in _families(self.spec)] if self.spec else []

    def answer(self, lease_ms: int | None) -> None:
        """Answer ARP/NS for the VIPs for ``lease_ms`` from now (None: stop)."""
        if self.spec is None:
            raise MacModeError("answer() before apply()")
        if lease_ms is None and not self.answering:
            return  # nothing to withdraw: spare the transaction on every heartbeat
        cmds = answer_commands(self.spec, lease_ms)
        if self.twinned:  # in the same transaction: both copies agree on the responder
            cmds += answer_commands(owned_twin(self.spec), lease_ms)
        self._run(cmds)
        self.answering = lease_ms is not None

    def restore(self) -> None:
        """Delete the tables and leave the MAC group as recorded; no-op if nothing is."""
        state = self._load()
        failures = []
        if self.twinned and self.spec is not None:
            twin = owned_twin(self.spec)
            for family in _families(twin):
                try:
                    self._run([f"delete table {family} {twin.table}"])
                except MacModeError as exc:
                    if "No such file or directory" not in str(exc):
                        failures.append(str(exc))
            self.twinned = bool(failures)  # kept while one is left to delete
        if state["tables"] and self.persist:
            # No "add table" first: a persistent table (ours, or an orphan) refuses it.
            for family in FAMILIES:
                try:
                    self._run([f"delete table {family} {state['tables']}"])
                except MacModeError as exc:
                    if "No such file or directory" not in str(exc):
                        failures.append(str(exc))
            if not failures:
                state["tables"] = None
                self.persistent = False
        elif state["tables"]:
            try:
                self._run(remove_commands(state["tables"]))
                state["tables"] = None
            except MacModeError as exc:
                failures.append(str(exc))
        try:
            self._leave(state)
        except (MacModeError, MacFilterError) as exc:
            failures.append(str(exc))
        self.answering = False
        if failures:
            self._save(state)
            raise MacModeError("restore incomplete: " + "; ".join(failures))
        self._cache = None
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()

    def _leave(self, state: dict[str, Any]) -> None:
        entry = state["maddr"]
        if entry is None:
            return
        if entry["added"] and macfilter.listed(entry["interface"], entry["mac"]):
            macfilter.join(entry["interface"], entry["mac"], leave=True)
        state["maddr"] = None
        self._save(state)
