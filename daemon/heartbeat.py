"""The heartbeat socket: open it, send from the node's own address, read what waited.

Reading records each datagram's arrival time (the kernel's receive timestamp),
so the daemon may leave datagrams queued while the cluster is settled (the
core's ``quiet_until``) and still measure a peer's silence from its arrival, not
from when it was read. Kernel timestamps are wall-clock; they are moved onto the
monotonic clock with the offset between the two clocks. If that offset moved
since the last read (the wall clock was stepped), the timestamps are not trusted
and the read time is used instead: later than the truth, which only delays a
death verdict, never hastens one.
"""

from __future__ import annotations

import socket
import struct
import time

from lbd.daemon.config import DaemonConfig
from lbd.protocol.errors import LbdError

IP_PKTINFO = 8  # linux/in.h; Python 3.11's socket module does not export it
IP_MULTICAST_ALL = 49
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 1 << 20
"""Bytes of socket buffer: a settled daemon leaves an interval's heartbeats queued
(at 64 nodes some 150 kB of kernel memory, near Linux's default limit)."""
STAMP_TOLERANCE = 0.001
"""Seconds the clock offset may move between reads (NTP slews far less), and what
is added to every converted timestamp so that it errs late."""
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)

Batch = list[tuple[bytes, str, float]]
"""(datagram, source address, arrival on the monotonic clock), oldest first."""


class HeartbeatSocketError(LbdError):
    """The heartbeat socket could not be set up."""


def heartbeat_socket(cfg: DaemonConfig, ifindex: int, address: str) -> socket.socket:
    """UDP socket on the group port, joined on the interface, sending from ``address``."""
    sock = socket.socket(socket.AF_INET,
                         socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        try:  # past net.core.rmem_max: needs CAP_NET_ADMIN, which the daemon has
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError as exc:
        sock.close()
        raise HeartbeatSocketError(
            f"heartbeat socket on port {cfg.port}: {exc.strerror}") from None
    return sock


def send_from(sock: socket.socket, address: str, target: tuple[str, int],
              data: bytes) -> None:
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

    def read(self, limit: int) -> tuple[Batch, bool]:
        """At most ``limit`` queued datagrams, and whether more may be waiting."""
        now, offset = _clock_offset()
        trusted = self._offset is not None and abs(offset - self._offset) < STAMP_TOLERANCE
        self._offset = offset
        batch: Batch = []
        for _ in range(limit):
            try:
                data, ancillary, _flags, source = self._sock.recvmsg(65535, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return batch, False
            except OSError:
                return batch, False  # e.g. ICMP errors queued on the socket: nothing to read
            arrived = now
            for level, kind, payload in ancillary:
                if trusted and level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC.unpack(payload[:_TIMESPEC.size])
                    stamp = seconds + nanoseconds * 1e-9 - offset + STAMP_TOLERANCE
                    arrived = min(now, stamp)
            batch.append((data, source[0], arrived))
        return batch, True
