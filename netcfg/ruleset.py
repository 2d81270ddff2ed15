"""The nftables text lbd installs: a pure builder, no kernel access (see nft.py).

Theory of operation
-------------------
Every node receives every packet for the VIPs. Two tables decide which node
answers a NEW flow, both hooked at ``prerouting`` after conntrack (-200) so
``ct state`` is known, and before DNAT (-100)::

    inet lbd        (flags owner, priority -180): the policy, lives with the daemon
    inet lbd_guard  (persistent,  priority -170): the fail-closed backstop

``inet lbd`` holds the owned buckets (set ``owned``) and the lease (set ``lease``,
one element per VIP family with a timeout). For a packet to a VIP it accepts
replies to flows this node originated, IPv6 neighbour discovery, established
TCP and related packets; a *true* SYN (``syn`` among syn/ack/fin/rst), a UDP
datagram or an ICMP echo request of a balanced protocol/port goes to ``claim``,
which jumps to ``live`` only if ``jhash(saddr [& prefix]) mod B`` is owned
AND the lease element is present; ``live`` marks and accepts it only before the
lease's absolute deadline (``meta time``, see ``live_commands``). Everything
else to a VIP is dropped, so the table alone enforces the whole policy (an
admin's ``nft flush ruleset`` skips owner tables but removes the guard).

UDP and ICMP are claimed per datagram, never by conntrack state: once a bucket
moves, its UDP "flows" must move too, or the old owner would keep answering.
A true SYN is also always claimed, even when conntrack calls it established
(a retransmitted SYN of a half-open flow), so a released bucket is released.

``inet lbd_guard`` accepts VIP packets carrying the mark set by ``claim`` and
otherwise only replies, neighbour discovery, established TCP (never a SYN) and
related packets. When the daemon dies its netlink socket closes, the kernel
destroys ``inet lbd`` (5-40 ms measured) and the guard, unmarked, drops every NEW flow:
fail closed (S2) while established connections live on. Non-SYN TCP with no
state (a mid-stream packet of a flow owned elsewhere, seen as NEW under
``nf_conntrack_tcp_loose=1``) is dropped silently by both: never a RST (S3).

Why prerouting: on a hub every node sees every packet and drops (N-1)/N of
the NEW ones; dropping before the routing lookup is the cheapest place, and a
dropped SYN's conntrack entry is never confirmed (no table growth). Why the
owner chain runs first (-180 < -170): the guard can only see a mark that is
already set. The mark cannot come from outside: the kernel clears skb->mark
when a packet crosses a namespace or arrives from the wire. Traffic from ``lo``
(the node talking to its own VIP) is exempt by default: it can never reach
another node.

Buckets are kept in a plain integer set (``typeof numgen inc mod B``): a set
typed after ``jhash`` loads but crashes nft 1.0.6's listing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

OWNER_TABLE = "lbd"
GUARD_TABLE = "lbd_guard"
OWNER_PRIORITY = -180
GUARD_PRIORITY = -170
DEFAULT_MARK = 0x4C420000  # "LB" in the high half
DEFAULT_MARK_MASK = 0xFFFF0000
TRUE_SYN = "tcp flags & (fin|syn|rst|ack) == syn"
ND_TYPES = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
# Above this many VIPs per family, match them with an anonymous set, not one rule each.
_VIP_RULES_MAX = 4


@dataclass(frozen=True, slots=True)
class Balance:
    """Which traffic to the VIPs is shared out. ``None`` ports = every port."""

    tcp: bool = True
    tcp_ports: tuple[str, ...] | None = None
    udp: bool = True
    udp_ports: tuple[str, ...] | None = None
    icmp: bool = True

    @classmethod
    def parse(cls, spec: str | Sequence[str]) -> Balance:
        """``"all"`` or tokens like ``"tcp"``, ``"tcp/80"``, ``"udp/5000-5100"``, ``"icmp"``."""
        tokens = [spec] if isinstance(spec, str) else list(spec)
        if tokens == ["all"]:
            return cls()
        if not tokens:
            raise ValueError("balance needs at least one protocol")
        tcp = udp = icmp = False
        all_tcp = all_udp = False
        tports: list[str] = []
        uports: list[str] = []
        for token in tokens:
            proto, _, ports = token.strip().lower().partition("/")
            if proto == "icmp" and not ports:
                icmp = True
            elif proto in ("tcp", "udp"):
                chosen = tports if proto == "tcp" else uports
                if ports:
                    chosen.append(_port_spec(ports, token))
                elif proto == "tcp":
                    all_tcp = True
                else:
                    all_udp = True
                tcp = tcp or proto == "tcp"
                udp = udp or proto == "udp"
            else:
                raise ValueError(f"balance entry {token!r}: want tcp[/P], udp[/P] or icmp")
        return cls(
            tcp=tcp,
            tcp_ports=None if all_tcp else tuple(dict.fromkeys(tports)),
            udp=udp,
            udp_ports=None if all_udp else tuple(dict.fromkeys(uports)),
            icmp=icmp,
        )


def _port_spec(ports: str, token: str) -> str:
    lo, dash, hi = ports.partition("-")
    try:
        first = int(lo)
        last = int(hi) if dash else first
    except ValueError:
        raise ValueError(f"balance entry {token!r}: bad port") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"balance entry {token!r}: ports must be 1..65535, low to high")
    return f"{first}-{last}" if dash and last != first else str(first)


@dataclass(frozen=True, slots=True)
class RulesetSpec:
    """Everything the rules depend on; identical on every node except nothing."""

    vips4: tuple[str, ...]
    vips6: tuple[str, ...]
    buckets: int
    seed: int
    prefix4: int = 32
    prefix6: int = 128
    balance: Balance = Balance()
    mark: int = DEFAULT_MARK
    mark_mask: int = DEFAULT_MARK_MASK
    table: str = OWNER_TABLE
    guard_table: str = GUARD_TABLE
    owner_priority: int = OWNER_PRIORITY
    guard_priority: int = GUARD_PRIORITY
    exempt_loopback: bool = True

    @classmethod
    def build(cls, vips: Iterable[str], **kw: object) -> RulesetSpec:
        """Split and normalise ``vips`` by family; validate everything."""
        v4: list[str] = []
        v6: list[str] = []
        for vip in vips:
            addr = ipaddress.ip_address(vip)
            (v4 if addr.version == 4 else v6).append(str(addr))
        spec = cls(tuple(dict.fromkeys(v4)), tuple(dict.fromkeys(v6)), **kw)  # type: ignore[arg-type]
        spec.validate()
        return spec

    def validate(self) -> None:
        if not (self.vips4 or self.vips6):
            raise ValueError("at least one VIP is needed")
        if not 1 <= self.buckets <= 1 << 20:
            raise ValueError(f"buckets must be in 1..{1 << 20}, not {self.buckets}")
        if not 0 <= self.seed <= 0xFFFFFFFF:
            raise ValueError("seed must be a 32-bit unsigned value")
        if not (0 <= self.prefix4 <= 32 and 0 <= self.prefix6 <= 128):
            raise ValueError("prefix4 must be in 0..32 and prefix6 in 0..128")
        if not self.mark or self.mark & ~self.mark_mask & 0xFFFFFFFF:
            raise ValueError("mark must be non-zero and inside mark_mask")
        if not -199 <= self.owner_priority < self.guard_priority:
            # After conntrack (-200), and the owner must mark before the guard looks.
            raise ValueError("need -200 < owner_priority < guard_priority")
        for name in (self.table, self.guard_table):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"bad table name {name!r}")

    @property
    def families(self) -> tuple[str, ...]:
        """Lease elements: one ``meta nfproto`` value per family that has a VIP."""
        return (("ipv4",) if self.vips4 else ()) + (("ipv6",) if self.vips6 else ())


def _vip_jumps(spec: RulesetSpec, chain: str) -> list[str]:
    rules: list[str] = []
    for proto, vips in (("ip", spec.vips4), ("ip6", spec.vips6)):
        if len(vips) > _VIP_RULES_MAX:
            rules.append(f"{proto} daddr {{ {', '.join(vips)} }} jump {chain}")
        else:
            rules += [f"{proto} daddr {vip} jump {chain}" for vip in vips]
    return rules


def _common_head(spec: RulesetSpec) -> list[str]:
    rules = ['iifname "lo" accept'] if spec.exempt_loopback else []
    # Replies to flows this node itself originated (conntrack knows them).
    rules.append("ct direction reply accept")
    if spec.vips6:
        # Neighbour discovery for the VIP: every node answers, identically.
        rules.append(f"{ND_TYPES} accept")
    return rules


def _ports(match: str, ports: tuple[str, ...] | None) -> str:
    if ports is None:
        return ""
    return f"{match} {{ {', '.join(ports)} }} " if len(ports) > 1 else f"{match} {ports[0]} "


def owner_vip_rules(spec: RulesetSpec) -> list[str]:
    """Rules of ``inet lbd``'s ``vip`` chain (the full policy on its own)."""
    b = spec.balance
    rules = _common_head(spec)
    if b.tcp:
        rules.append(f"{_ports('tcp dport', b.tcp_ports)}{TRUE_SYN} jump claim")
    rules.append("meta l4proto tcp ct state established accept")
    rules.append("ct state related accept")
    if b.udp:
        rules.append(f"{_ports('udp dport', b.udp_ports) or 'meta l4proto udp '}jump claim")
    if b.icmp and spec.vips4:
        rules.append("icmp type echo-request jump claim")
    if b.icmp and spec.vips6:
        rules.append("icmpv6 type echo-request jump claim")
    rules.append("counter drop")
    return rules


def claim_rules(spec: RulesetSpec) -> list[str]:
    """Rules of ``inet lbd``'s ``claim`` chain: owned bucket + lease element -> ``live``
    (which marks before the absolute deadline); anything that returns is dropped."""
    rules = []
    for proto, vips, prefix, width in (
        ("ip", spec.vips4, spec.prefix4, 32),
        ("ip6", spec.vips6, spec.prefix6, 128),
    ):
        if not vips:
            continue
        key = f"{proto} saddr"
        if prefix < width:
            mask = ((1 << width) - 1) ^ ((1 << (width - prefix)) - 1)
            net = ipaddress.IPv4Address(mask) if width == 32 else ipaddress.IPv6Address(mask)
            key += f" & {net}"
        rules.append(
            f"meta nfproto @lease jhash {key} mod {spec.buckets} seed 0x{spec.seed:08x} "
            "@owned jump live"
        )
    rules.append("counter drop")
    return rules


def guard_vip_rules(spec: RulesetSpec) -> list[str]:
    """Rules of ``inet lbd_guard``'s ``vip`` chain: marked, or no NEW at all."""
    rules = _common_head(spec)
    rules.append(f"meta mark & 0x{spec.mark_mask:08x} == 0x{spec.mark:08x} accept")
    rules.append(f"{TRUE_SYN} drop")
    rules.append("meta l4proto tcp ct state established accept")
    rules.append("ct state related accept")
    rules.append("drop")
    return rules


def owner_table_commands(spec: RulesetSpec, replace: bool = False) -> list[str]:
    """Create ``inet lbd`` (owned buckets empty, no lease). Every statement naming
    the table repeats ``flags owner``: nft 1.0.6 refuses the transaction otherwise."""
    t = f"inet {spec.table}"
    cmds = [f"add table {t} {{ flags owner; }}"]
    if replace:
        cmds += [f"delete table {t}", f"add table {t} {{ flags owner; }}"]
    cmds += [
        f"add set {t} owned {{ typeof numgen inc mod {spec.buckets}; }}",
        f"add set {t} lease {{ typeof meta nfproto; flags timeout; }}",
        f"add chain {t} pre {{ type filter hook prerouting priority {spec.owner_priority}; "
        "policy accept; }",
        f"add chain {t} vip",
        f"add chain {t} claim",
        f"add chain {t} live",
    ]
    cmds += [f"add rule {t} pre {r}" for r in _vip_jumps(spec, "vip")]
    cmds += [f"add rule {t} vip {r}" for r in owner_vip_rules(spec)]
    cmds += [f"add rule {t} claim {r}" for r in claim_rules(spec)]
    return cmds


def guard_commands(spec: RulesetSpec) -> list[str]:
    """(Re)assert ``inet lbd_guard`` idempotently: ``add table``/``add chain`` are
    no-ops when present; both chains are flushed and their few rules re-added, so
    the result is exact whatever was there (missing after ``nft flush ruleset``,
    edited, or left by an older run with other VIPs), without touching hooks."""
    t = f"inet {spec.guard_table}"
    cmds = [
        f"add table {t}",
        f"add chain {t} pre {{ type filter hook prerouting priority {spec.guard_priority}; "
        "policy accept; }",
        f"add chain {t} vip",
        f"flush chain {t} pre",
        f"flush chain {t} vip",
    ]
    cmds += [f"add rule {t} pre {r}" for r in _vip_jumps(spec, "vip")]
    cmds += [f"add rule {t} vip {r}" for r in guard_vip_rules(spec)]
    return cmds


def element_commands(
    spec: RulesetSpec, add: Iterable[int], remove: Iterable[int], target: Set[int]
) -> tuple[list[str], int]:
    """Incremental change of the owned set: only the buckets that differ travel.

    When more buckets leave than the node keeps (a drain, a lost quorum), flushing
    the set and re-adding ``target`` is the smaller transaction; it is just as
    atomic. Returns the commands and how many elements they carry.
    """
    rm = sorted(remove)
    ad = sorted(add)
    t = f"inet {spec.table}"
    if len(rm) > len(target) + 1:
        cmds = [f"flush set {t} owned"]
        keep = sorted(target)
        if keep:
            cmds.append(f"add element {t} owned {{ {', '.join(map(str, keep))} }}")
        return cmds, len(keep)
    cmds = []
    if rm:
        cmds.append(f"delete element {t} owned {{ {', '.join(map(str, rm))} }}")
    if ad:
        cmds.append(f"add element {t} owned {{ {', '.join(map(str, ad))} }}")
    return cmds, len(rm) + len(ad)


# nft's date parser reads an integer as whole seconds and multiplies by 10**9 in
# 64-bit unsigned arithmetic (wrapping). 10**9 = 2**9 * 1953125, so any multiple of
# 512 ns is reachable: k * 10**9 == C (mod 2**64) for k = (C / 512) * 1953125**-1
# (mod 2**55). install() checks that this nft reads it so (probe_commands).
_NS_STEP = 512
_K_MODULUS = 1 << 55
_K_FACTOR = pow(1953125, -1, _K_MODULUS)


def nft_time_literal(deadline_ns: int) -> int:
    """The integer nft turns into the ``meta time`` constant ``deadline_ns`` rounded
    DOWN to 512 ns (an earlier end is the safe side)."""
    if deadline_ns < 0:
        raise ValueError("a deadline before 1970")
    return ((deadline_ns // _NS_STEP) * _K_FACTOR) % _K_MODULUS


def live_commands(spec: RulesetSpec, live: bool, until_ns: int | None = None) -> list[str]:
    """Rewrite ``live``: mark and accept if ``live``, and then only while the wall
    clock is before ``until_ns`` (None: no absolute bound, on an nft that cannot
    express one). The lease element's timeout is relative: the kernel starts it
    when the transaction reaches it, which a paused or slow process can delay
    past the core's deadline. This bound is absolute, so it holds however late
    the transaction runs; the relative timeout still holds if the wall clock is
    stepped back. A packet must pass both."""
    t = f"inet {spec.table}"
    cmds = [f"flush chain {t} live"]
    if live:
        keep = ~spec.mark_mask & 0xFFFFFFFF
        mark = f"meta mark set meta mark & 0x{keep:08x} | 0x{spec.mark:08x}"
        clock = "" if until_ns is None else f"meta time < {nft_time_literal(until_ns)} "
        cmds.append(f"add rule {t} live {clock}{mark} accept")
    return cmds


PROBE_NS = _NS_STEP
"""The deadline install() writes and reads back: 512 ns after the epoch, which only
the wrapping arithmetic above can express, and which never matches a packet."""


def lease_commands(
    spec: RulesetSpec, lease_ms: int | None, until_ns: int | None = None
) -> list[str]:
    """Refresh (or drop) the lease atomically: the relative timeout of the lease
    elements and, with ``until_ns``, the absolute deadline of ``live``.

    nft 1.0.6 does not refresh a timeout when an element is re-added, and
    ``delete element`` of an absent (expired) element aborts the transaction
    (``destroy`` came in 1.0.8). So: add without timeout (a no-op if present),
    delete (now always present), add with the new timeout.
    """
    elems = ", ".join(spec.families)
    t = f"inet {spec.table}"
    cmds = [f"add element {t} lease {{ {elems} }}", f"delete element {t} lease {{ {elems} }}"]
    if lease_ms is not None:
        timed = ", ".join(f"{fam} timeout {lease_ms}ms" for fam in spec.families)
        cmds.append(f"add element {t} lease {{ {timed} }}")
    return cmds + live_commands(spec, lease_ms is not None, until_ns)
