"""Raw netlink, just enough of it: watch addresses, links and nf_tables; own a table.

The daemon must not import pyroute2 (see linkproc.py), yet it has to *watch* the
kernel state it owns (daemon/kernelwatch.py) and to create tables with a flag that
nft 1.0.6 cannot spell (``NFT_TABLE_F_PERSIST``, netcfg/nft.py). Both need only a
handful of netlink messages, packed and parsed here with ``struct``:

* rtnetlink multicast groups ``RTMGRP_LINK``, ``RTMGRP_IPV4_IFADDR`` and
  ``RTMGRP_IPV6_IFADDR``: :func:`parse_route` turns a datagram into
  :class:`AddrEvent` / :class:`LinkEvent`; :func:`dump_addresses` and
  :func:`get_link` ask for the current state (a blocking request on a fresh socket:
  run them off the event loop);
* nfnetlink group ``NFNLGRP_NFTABLES`` (what ``nft monitor`` reads):
  :func:`parse_nft` turns a datagram into :class:`NftEvent` (the object's table and
  the sender's netlink port ID) and :class:`NftGeneration` (end of a transaction);
* one nf_tables batch of table messages (:func:`table_batch`) and its answer
  (:func:`batch_errors`).

Parsing is for what the kernel sends, but defensive anyway: a truncated message or
attribute ends the parse of that datagram (what was complete is returned), and
nothing but :class:`NetlinkError` is ever raised.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from lbd.protocol.errors import LbdError

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
NFNLGRP_NFTABLES = 7

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 1, 4, 0x200, 0x400, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
IFA_ADDRESS, IFA_LOCAL, IFA_CACHEINFO, IFA_FLAGS = 1, 2, 6, 8
IFA_F_NODAD = 0x02
INFINITY_LFT = 0xFFFFFFFF
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWGEN = 15
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
NFT_TABLE_F_OWNER, NFT_TABLE_F_PERSIST = 0x2, 0x4
NFPROTO = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
FAMILY_NAME = {v: k for k, v in NFPROTO.items()}
# nf_tables object messages whose first attribute (type 1) names the table.
NFT_TABLE_MESSAGES = {0: "NEWTABLE", 2: "DELTABLE", 3: "NEWCHAIN", 5: "DELCHAIN",
                      6: "NEWRULE", 8: "DELRULE", 9: "NEWSET", 11: "DELSET",
                      12: "NEWSETELEM", 14: "DELSETELEM", 18: "NEWOBJ", 20: "DELOBJ",
                      22: "NEWFLOWTABLE", 24: "DELFLOWTABLE"}  # fmt: skip

_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_IFADDR = struct.Struct("=BBBBI")
_IFINFO = struct.Struct("=BBHiII")
_NFGEN = struct.Struct("=BBH")
RECV_SIZE = 1 << 16


class NetlinkError(LbdError):
    """A netlink request failed; ``errno`` is the kernel's answer (0 if none)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class AddrEvent:
    """An address appeared (``new``) or went away on interface ``index``."""

    new: bool
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A link's state: ``new`` is False when the interface itself was deleted."""

    new: bool
    index: int
    flags: int
    name: str | None
    mac: str | None

    @property
    def up(self) -> bool:
        """Administratively up with a carrier (IFF_UP and IFF_LOWER_UP)."""
        return self.flags & (IFF_UP | IFF_LOWER_UP) == IFF_UP | IFF_LOWER_UP


@dataclass(frozen=True, slots=True)
class NftEvent:
    """A change of one nf_tables object (``what``: "DELTABLE", "NEWRULE", ...) in
    ``family`` ``table``, sent on behalf of netlink port ``portid``."""

    what: str
    family: str
    table: str
    portid: int


@dataclass(frozen=True, slots=True)
class NftGeneration:
    """The end of one nf_tables transaction and the process that committed it."""

    pid: int
    process: str


# ---------------------------------------------------------------- parsing


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, port ID, payload) of each complete message in a datagram."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, mtype, flags, _seq, portid = _HDR.unpack_from(data, offset)
        if length < _HDR.size or offset + length > len(data):
            return  # truncated: what was complete has been returned
        yield mtype, flags, portid, data[offset + _HDR.size : offset + length]
        offset += (length + 3) & ~3


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Type -> value of the attributes from ``offset`` on (the first of each type)."""
    found: dict[int, bytes] = {}
    while offset + _ATTR.size <= len(data):
        length, atype = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            break
        found.setdefault(atype & 0x3FFF, data[offset + _ATTR.size : offset + length])
        offset += (length + 3) & ~3
    return found


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.split(b"\0", 1)[0].decode(errors="replace")


def _mac(value: bytes | None) -> str | None:
    return None if value is None else ":".join(f"{b:02x}" for b in value)


def _address(family: int, value: bytes) -> str | None:
    if family == socket.AF_INET and len(value) == 4:
        return str(ipaddress.IPv4Address(value))
    if family == socket.AF_INET6 and len(value) == 16:
        return str(ipaddress.IPv6Address(value))
    return None


def parse_route(data: bytes) -> list[AddrEvent | LinkEvent]:
    """Address and link events of one rtnetlink datagram (others are skipped)."""
    out: list[AddrEvent | LinkEvent] = []
    for mtype, _flags, _portid, payload in messages(data):
        if mtype in (RTM_NEWADDR, RTM_DELADDR) and len(payload) >= _IFADDR.size:
            family, prefixlen, _f, _scope, index = _IFADDR.unpack_from(payload)
            attrs = attributes(payload, _IFADDR.size)
            # IPv4: IFA_LOCAL is the address (IFA_ADDRESS the peer); IPv6 has IFA_ADDRESS.
            value = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
            address = None if value is None else _address(family, value)
            if address is not None:
                out.append(AddrEvent(mtype == RTM_NEWADDR, index, address, prefixlen))
        elif mtype in (RTM_NEWLINK, RTM_DELLINK) and len(payload) >= _IFINFO.size:
            _family, _pad, _type, index, flags, _change = _IFINFO.unpack_from(payload)
            attrs = attributes(payload, _IFINFO.size)
            out.append(
                LinkEvent(
                    mtype == RTM_NEWLINK,
                    index,
                    flags,
                    _text(attrs.get(IFLA_IFNAME)),
                    _mac(attrs.get(IFLA_ADDRESS)),
                )
            )
    return out


def parse_nft(data: bytes) -> list[NftEvent | NftGeneration]:
    """Object changes and transaction ends of one NFNLGRP_NFTABLES datagram."""
    out: list[NftEvent | NftGeneration] = []
    for mtype, _flags, portid, payload in messages(data):
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES or len(payload) < _NFGEN.size:
            continue
        family = payload[0]
        attrs = attributes(payload, _NFGEN.size)
        kind = mtype & 0xFF
        if kind == NFT_MSG_NEWGEN:
            pid = attrs.get(NFTA_GEN_PROC_PID, b"")
            out.append(
                NftGeneration(
                    struct.unpack("!I", pid)[0] if len(pid) == 4 else 0,
                    _text(attrs.get(NFTA_GEN_PROC_NAME)) or "?",
                )
            )
        elif kind in NFT_TABLE_MESSAGES and 1 in attrs:
            out.append(
                NftEvent(
                    NFT_TABLE_MESSAGES[kind],
                    FAMILY_NAME.get(family, str(family)),
                    _text(attrs[1]) or "",
                    portid,
                )
            )
    return out


# ---------------------------------------------------------------- sockets


def open_socket(protocol: int, groups: int = 0, rcvbuf: int = 1 << 20) -> socket.socket:
    """A non-blocking, close-on-exec netlink socket subscribed to ``groups``."""
    try:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            protocol,
        )
    except OSError as exc:
        raise NetlinkError(
            f"cannot open a netlink socket: {exc.strerror}", exc.errno or 0
        ) from None
    try:
        try:  # room for a burst (a flush of a big ruleset); FORCE needs CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))
    except OSError as exc:
        sock.close()
        raise NetlinkError(
            f"cannot subscribe to netlink groups {groups:#x}: {exc.strerror}", exc.errno or 0
        ) from None
    return sock


def _message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body


def _attr(atype: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, atype) + value + b"\0" * (-length % 4)


def _request(protocol: int, request: bytes, timeout: float = 2.0) -> list[tuple[int, bytes]]:
    """Send one request on a fresh socket; (type, payload) of the answer up to DONE."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(request)
        out: list[tuple[int, bytes]] = []
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                raise NetlinkError("no netlink answer") from None
            for mtype, _flags, _portid, payload in messages(data):
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code:
                        raise NetlinkError(os.strerror(code), code)
                    return out
                out.append((mtype, payload))
                if not _flags & 0x2:  # not NLM_F_MULTI: a single answer
                    return out


def dump_addresses(index: int) -> set[str]:
    """The addresses on interface ``index`` now (blocking: call it off the loop)."""
    request = _message(
        RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    )
    found = set()
    for mtype, payload in _request(NETLINK_ROUTE, request):
        if mtype == RTM_NEWADDR:
            for event in parse_route(_message(mtype, 0, 0, payload)):
                if isinstance(event, AddrEvent) and event.index == index:
                    found.add(event.address)
    return found


def add_vip(index: int, address: str) -> bool:
    """Put a VIP back on interface ``index`` as link.py adds it (IPv4 /32; IPv6 /128
    without DAD and deprecated, so never chosen as a source), in a few milliseconds
    and without the link helper's process start (blocking: call it off the loop).
    True if added, False if it was there already."""
    addr = ipaddress.ip_address(address)
    packed = addr.packed
    if addr.version == 4:
        head = _IFADDR.pack(socket.AF_INET, 32, 0, 0, index)
        attrs = _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    else:
        head = _IFADDR.pack(socket.AF_INET6, 128, IFA_F_NODAD, 0, index)
        attrs = (
            _attr(IFA_ADDRESS, packed)
            + _attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
            + _attr(IFA_CACHEINFO, struct.pack("=IIII", 0, INFINITY_LFT, 0, 0))
        )
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    try:
        _request(NETLINK_ROUTE, _message(RTM_NEWADDR, flags, 1, head + attrs))
    except NetlinkError as exc:
        if exc.errno == 17:  # EEXIST: someone (the helper) was quicker
            return False
        raise
    return True


def get_link(index: int) -> LinkEvent | None:
    """The state of interface ``index`` now, None if it does not exist (blocking)."""
    request = _message(RTM_GETLINK, NLM_F_REQUEST, 1, _IFINFO.pack(0, 0, 0, index, 0, 0))
    try:
        answer = _request(NETLINK_ROUTE, request)
    except NetlinkError as exc:
        if exc.errno == 19:  # ENODEV
            return None
        raise
    for mtype, payload in answer:
        for event in parse_route(_message(mtype, 0, 0, payload)):
            if isinstance(event, LinkEvent):
                return event
    return None


# ---------------------------------------------------------------- nf_tables batches


def table_message(
    op: int, family: str, name: str, flags: int | None = None, *, seq: int = 1
) -> bytes:
    """A NEWTABLE (created if absent)/DELTABLE message for ``family`` table ``name``."""
    body = _NFGEN.pack(NFPROTO[family], 0, 0) + _attr(NFTA_TABLE_NAME, name.encode() + b"\0")
    if flags is not None:
        body += _attr(NFTA_TABLE_FLAGS, struct.pack("!I", flags))
    nlflags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op == NFT_MSG_NEWTABLE else 0)
    return _message((NFNL_SUBSYS_NFTABLES << 8) | op, nlflags, seq, body)


def table_batch(parts: list[bytes], seq: int) -> bytes:
    """``parts`` (each from :func:`table_message`) as ONE nf_tables transaction."""
    begin = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    return (
        _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, begin)
        + b"".join(parts)
        + _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(parts) + 1, begin)
    )


def exchange(sock: socket.socket, request: bytes, acks: int, timeout: float = 2.0) -> list[int]:
    """Send ``request`` on a BLOCKING socket shared with libnftables and read ``acks``
    answers; their errno values (0: done) in order. The socket's blocking mode is
    never changed (it is libnftables' too): waits use select()."""
    sock.send(request)
    codes: list[int] = []
    while len(codes) < acks:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise NetlinkError("no answer from nf_tables")
        for mtype, _flags, _portid, payload in messages(sock.recv(RECV_SIZE)):
            if mtype == NLMSG_ERROR and len(payload) >= 4:
                codes.append(-struct.unpack_from("=i", payload)[0])
    return codes
