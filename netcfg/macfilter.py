"""A NIC's receive filter: let frames for the cluster MAC in, without wearing it.

lbd's cluster-MAC modes (netcfg/macmode.py) keep every node's own MAC and make the
node also *receive* frames sent to a second MAC. A real NIC drops frames for MACs it
has not been told about, so that MAC goes on the device's filter list:

* a **group** MAC (``mac_mode = "multicast"``): the multicast list, ``ip maddr add``,
  which is the SIOCADDMULTI ioctl (netlink has no call for it); listed in
  /proc/net/dev_mcast;
* a **unicast** MAC (``mac_mode = "flood"``): the unicast list, ``bridge fdb add MAC
  dev IF self permanent`` on a device that is no bridge, which is an RTM_NEWNEIGH
  message of family AF_BRIDGE with NTF_SELF (the kernel's default fdb handler calls
  ``dev_uc_add_excl``). A driver without a unicast filter goes promiscuous instead
  (veth does: "promiscuity 1"); a VLAN device passes the entry on to its parent.
  The entry does not make the frames the node's own: ``eth_type_trans`` still marks
  them PACKET_OTHERHOST, which IPv4, IPv6 and ARP drop, hence the ingress rule of
  macmode.py. Nothing here ever *sends* from the MAC.

Both take effect in the caller's network namespace; every call blocks (run it off
the event loop); failures raise :class:`MacFilterError` with one line.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path

from lbd.netcfg import netlink as nl
from lbd.protocol.errors import LbdError

SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932
SIOCGIFHWADDR = 0x8927
IFREQ_SIZE = 40
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NDA_LLADDR = 2
NTF_SELF = 0x02
NUD_PERMANENT = 0x80
AF_BRIDGE = 7
_NDMSG = struct.Struct("=BBHiHBB")


class MacFilterError(LbdError):
    """The interface's MAC filter could not be read or changed."""


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{mac!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)


def is_group_mac(mac: str) -> bool:
    """True for multicast/broadcast MACs (I/G bit set)."""
    return bool(mac_bytes(mac)[0] & 1)


def _name(interface: str) -> bytes:
    name = interface.encode()
    if not 0 < len(name) < 16:
        raise MacFilterError(f"bad interface name {interface!r}")
    return name


def interface_mac(interface: str) -> str:
    """The interface's MAC via SIOCGIFHWADDR (the caller's namespace; no netlink library)."""
    name = _name(interface)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            ifreq = fcntl.ioctl(
                sock.fileno(), SIOCGIFHWADDR, struct.pack("16s", name).ljust(IFREQ_SIZE, b"\0")
            )
        except OSError as exc:
            raise MacFilterError(f"interface {interface!r}: {exc.strerror}") from None
    return ":".join(f"{b:02x}" for b in ifreq[18:24])


# ------------------------------------------------------------ multicast list


def mc_membership(interface: str, mac: str) -> tuple[bool, bool]:
    """(listed, global) for ``mac`` on ``interface`` per /proc/net/dev_mcast, which
    follows the caller's network namespace. "global" means an ``ip maddr add``-style
    (ioctl) membership, the kind lbd adds and removes."""
    want = mac_bytes(mac).hex()
    try:
        lines = Path("/proc/net/dev_mcast").read_text().splitlines()
    except OSError:
        return False, False
    for line in lines:
        cols = line.split()
        if len(cols) == 5 and cols[1] == interface and cols[4] == want:
            return True, cols[3] != "0"
    return False, False


def mc_join(interface: str, mac: str, *, leave: bool = False) -> None:
    """``ip maddr add|del MAC dev IF`` through the SIOCADDMULTI/SIOCDELMULTI ioctl."""
    # struct ifreq: ifr_name[16], then ifr_hwaddr (sa_family AF_UNSPEC, sa_data).
    ifreq = struct.pack("16sH6s", _name(interface), 0, mac_bytes(mac)).ljust(IFREQ_SIZE, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCDELMULTI if leave else SIOCADDMULTI, ifreq)
        except OSError as exc:
            what = "leave" if leave else "join"
            raise MacFilterError(f"{interface}: cannot {what} {mac}: {exc.strerror}") from None


# ------------------------------------------------------------ unicast list


def _index(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise MacFilterError(f"no interface {interface!r}") from None


def uc_listed(interface: str, mac: str) -> bool:
    """Whether ``mac`` is a permanent ``self`` entry of ``interface`` (its unicast list)."""
    index, want = _index(interface), mac_bytes(mac)
    request = nl._message(
        RTM_GETNEIGH, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 1, _NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0, 0, 0)
    )
    try:
        answer = nl._request(nl.NETLINK_ROUTE, request)
    except (nl.NetlinkError, OSError) as exc:
        raise MacFilterError(f"{interface}: cannot list the fdb: {exc}") from None
    for mtype, payload in answer:
        if mtype != RTM_NEWNEIGH or len(payload) < _NDMSG.size:
            continue
        _fam, _p1, _p2, ifindex, state, flags, _type = _NDMSG.unpack_from(payload)
        if (
            ifindex == index
            and flags & NTF_SELF
            and state & NUD_PERMANENT
            and nl.attributes(payload, _NDMSG.size).get(NDA_LLADDR) == want
        ):
            return True
    return False


def uc_join(interface: str, mac: str, *, leave: bool = False) -> None:
    """``bridge fdb add|del MAC dev IF self permanent`` over rtnetlink."""
    index = _index(interface)
    body = _NDMSG.pack(AF_BRIDGE, 0, 0, index, NUD_PERMANENT, NTF_SELF, 0) + nl._attr(
        NDA_LLADDR, mac_bytes(mac)
    )
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK | (0 if leave else nl.NLM_F_CREATE)
    try:
        nl._request(
            nl.NETLINK_ROUTE, nl._message(RTM_DELNEIGH if leave else RTM_NEWNEIGH, flags, 1, body)
        )
    except (nl.NetlinkError, OSError) as exc:
        what = "remove" if leave else "add"
        raise MacFilterError(
            f"{interface}: cannot {what} {mac} as a unicast filter entry: {exc}"
        ) from None


# ------------------------------------------------------------ either


def listed(interface: str, mac: str) -> bool:
    """Whether the interface's filter holds ``mac`` as lbd adds it (group: a global
    multicast membership; unicast: a permanent self fdb entry)."""
    return mc_membership(interface, mac)[1] if is_group_mac(mac) else uc_listed(interface, mac)


def join(interface: str, mac: str, *, leave: bool = False) -> None:
    """Add ``mac`` to the interface's filter (or remove it): the list its kind uses."""
    (mc_join if is_group_mac(mac) else uc_join)(interface, mac, leave=leave)
