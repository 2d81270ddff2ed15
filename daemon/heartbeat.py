"""The heartbeat socket: open it, send from the node's own address, read what waited.

Reading records each datagram's arrival time (the kernel's receive timestamp),
so the daemon may leave datagrams queued while the cluster is settled (the
core's ``quiet_until``) and still measure a peer's silence from its arrival, not
from when it was read. Kernel timestamps are wall-clock; they are moved onto the
monotonic clock with the offset between the two clocks. If that offset moved
since the last read (the wall clock was stepped), the timestamps are not trusted
and the read time is used instead: later than the truth, which only delays a
death verdict, never hastens one.

The port is never shared: no ``SO_REUSEADDR`` or ``SO_REUSEPORT``, so while the
daemon holds ``0.0.0.0:port`` any other bind of that port (wildcard or a
specific address, with or without those options, by any user) fails with
EADDRINUSE, and nobody else can receive the unicast heartbeats. The wildcard
bind is what lets one socket hear both the group and unicast ``peers``; the group
is joined on the interface only, and ``IP_MULTICAST_ALL = 0`` keeps out groups
other sockets of the host joined. A daemon that finds the port taken refuses to
start with one line naming the port.

A flood (forged datagrams from the segment pass the kernel filter, see
``netcfg/hbfilter.py``) can fill the receive buffer while a settled daemon reads
only once per interval, and then real heartbeats are dropped with the rest. The
kernel reports the socket's drop count with every datagram (``SO_RXQ_OVFL``);
once it grows, the reader says "more may be waiting" for ``OVERFLOW_HOLD``
seconds, so the daemon reads on arrival (keeping the buffer empty) for as long
as a flood lasts, then returns to quiet reading.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

from lbd.daemon.config import DaemonConfig
from lbd.protocol.errors import LbdError
from lbd.protocol.wire import MAX_DATAGRAM

IP_PKTINFO = 8  # linux/in.h; Python 3.11's socket module does not export it
IP_MULTICAST_ALL = 49
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = 33
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
RECEIVE_BUFFER = 1 << 20
"""Bytes of socket buffer: a settled daemon leaves an interval's heartbeats queued
(at 64 nodes some 150 kB of kernel memory, near Linux's default limit)."""
STAMP_TOLERANCE = 0.001
"""Seconds the clock offset may move between reads (NTP slews far less), and what
is added to every converted timestamp so that it errs late."""
OVERFLOW_HOLD = 1.0
"""Seconds of reading on arrival after the socket last dropped a datagram."""
READ_SIZE = MAX_DATAGRAM + 1
"""A longer datagram is truncated to this, still too long, and refused as such."""
_TIMESPEC = struct.Struct("qq")
_DROPS = struct.Struct("I")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_DROPS.size)

Batch = list[tuple[bytes, str, float]]
"""(datagram, source address, arrival on the monotonic clock), oldest first."""


class HeartbeatSocketError(LbdError):
    """The heartbeat socket could not be set up."""


def heartbeat_socket(cfg: DaemonConfig, ifindex: int, address: str) -> socket.socket:
    """UDP socket on the group port, joined on the interface, sending from ``address``."""
    sock = socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    )
    try:
        # Never SO_REUSEADDR/SO_REUSEPORT: the port must not be shared (module doc).
        sock.bind(("0.0.0.0", cfg.port))  # noqa: S104 - group and unicast peers both arrive
        own = socket.inet_aton(address)
        if cfg.multicast:
            mreqn = struct.pack("4s4si", socket.inet_aton(cfg.group), own, ifindex)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, own)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        # Otherwise Linux delivers every group joined by anyone on this port.
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        try:  # past net.core.rmem_max: needs CAP_NET_ADMIN, which the daemon has
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise HeartbeatSocketError(
                f"heartbeat port {cfg.port}/udp is already in use by another process "
                f"(ss -ulpn 'sport = :{cfg.port}' names it); lbd never shares it"
            ) from None
        raise HeartbeatSocketError(f"heartbeat socket on port {cfg.port}: {exc.strerror}") from None
    return sock


def send_from(sock: socket.socket, address: str, target: tuple[str, int], data: bytes) -> None:
    """Send ``data`` with ``address`` as its source (IP_PKTINFO); raises OSError."""
    pktinfo = struct.pack("i4s4s", 0, socket.inet_aton(address), bytes(4))
    sock.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, target)


def _clock_offset() -> tuple[float, float]:
    """(monotonic now, wall clock minus monotonic clock)."""
    mono = time.monotonic()
    return mono, time.time() - mono


class StampedReader:
    """Reads the datagrams queued on a socket with their arrival times."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._offset: float | None = None
        self.drops = 0
        """Datagrams the socket dropped (full buffer), as of the last one read."""
        self._flooded_until = float("-inf")

    def read(self, limit: int) -> tuple[Batch, bool]:
        """At most ``limit`` queued datagrams, and whether more may be waiting (also
        while the socket dropped datagrams in the last ``OVERFLOW_HOLD`` seconds)."""
        now, offset = _clock_offset()
        trusted = self._offset is not None and abs(offset - self._offset) < STAMP_TOLERANCE
        self._offset = offset
        batch: Batch = []
        drops = self.drops
        more = True
        for _ in range(limit):
            try:
                data, ancillary, _flags, source = self._sock.recvmsg(READ_SIZE, _ANCILLARY)
            except OSError:  # BlockingIOError: all read; or e.g. a queued ICMP error
                more = False
                break
            arrived = now
            for level, kind, payload in ancillary:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == SO_TIMESTAMPNS and trusted:
                    seconds, nanoseconds = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
                    stamp = seconds + nanoseconds * 1e-9 - offset + STAMP_TOLERANCE
                    arrived = min(now, stamp)
                elif kind == SO_RXQ_OVFL and len(payload) >= _DROPS.size:
                    drops = _DROPS.unpack(payload[: _DROPS.size])[0]
            batch.append((data, source[0], arrived))
        if drops != self.drops:  # the kernel's counter only grows (it may wrap)
            self.drops = drops
            self._flooded_until = now + OVERFLOW_HOLD
        return batch, more or now < self._flooded_until
