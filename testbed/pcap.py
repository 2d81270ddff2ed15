"""A small pcap reader and the duplicate-answer count of ``lbd lab`` and the e2e suite.

The client namespace's traffic is captured with ``tcpdump -i eth0 --immediate-mode -w``;
this module reads that file (classic pcap: a 24-byte header, then 16-byte record headers,
Ethernet/IPv4/IPv6 + TCP/UDP parsed here) and counts the two failures S1 forbids:

* one SYN answered by two servers: SYN|ACKs for one 4-tuple with different initial
  sequence numbers, or two SYN|ACKs for one 4-tuple less than ``SYNACK_WINDOW`` apart
  (all namespaces share one kernel, so ISNs from different "servers" may look alike);
* one UDP query answered twice: more than one answer between a query and the next
  query from the same client address and port.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SYNACK_WINDOW = 0.200
PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10


@dataclass(frozen=True, slots=True)
class Packet:
    """One TCP or UDP packet: time, protocol (6/17), endpoints, TCP flags and seq."""

    time: float
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    flags: int = 0
    seq: int = 0


@dataclass
class DuplicateReport:
    """What the capture shows; ``examples`` keeps a few offending flows for messages."""

    packets: int = 0
    syns: int = 0
    synacks: int = 0
    udp_queries: int = 0
    udp_answers: int = 0
    duplicate_synacks: int = 0
    duplicate_udp_answers: int = 0
    resets_from_vip: int = 0
    examples: list[str] = field(default_factory=list)
    resets: list[tuple[str, int, float]] = field(default_factory=list)
    """RSTs from the VIP as (client address, port, time); short connections closing
    right after their first line see a few (a bed artefact), long-lived ones must not."""

    @property
    def duplicates(self) -> int:
        return self.duplicate_synacks + self.duplicate_udp_answers


def _transport(time: float, proto: int, src: str, dst: str, data: bytes) -> Packet | None:
    if proto == 6 and len(data) >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", data)
        return Packet(time, 6, src, sport, dst, dport, data[13], seq)
    if proto == 17 and len(data) >= 8:
        sport, dport = struct.unpack_from("!HH", data)
        return Packet(time, 17, src, sport, dst, dport)
    return None


def parse_frame(time: float, frame: bytes, linktype: int = LINKTYPE_ETHERNET) -> Packet | None:
    """Ethernet (or Linux cooked) frame -> Packet, or None if not TCP/UDP over IP."""
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 14)[0], 16
    else:
        if len(frame) < 14:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
        while ethertype == 0x8100 and len(frame) >= offset + 4:  # VLAN tags
            ethertype = struct.unpack_from("!H", frame, offset + 2)[0]
            offset += 4
    if ethertype == 0x0800 and len(frame) >= offset + 20:
        ihl = (frame[offset] & 0x0F) * 4
        frag = struct.unpack_from("!H", frame, offset + 6)[0] & 0x1FFF
        if frag:
            return None
        proto = frame[offset + 9]
        src = str(ipaddress.IPv4Address(frame[offset + 12 : offset + 16]))
        dst = str(ipaddress.IPv4Address(frame[offset + 16 : offset + 20]))
        return _transport(time, proto, src, dst, frame[offset + ihl :])
    if ethertype == 0x86DD and len(frame) >= offset + 40:
        proto = frame[offset + 6]  # extension headers are not followed (none used here)
        src = str(ipaddress.IPv6Address(frame[offset + 8 : offset + 24]))
        dst = str(ipaddress.IPv6Address(frame[offset + 24 : offset + 40]))
        return _transport(time, proto, src, dst, frame[offset + 40 :])
    return None


def read_pcap(path: str | Path) -> list[Packet]:
    """Every TCP/UDP packet of a pcap file (a truncated last record is ignored)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data)[0]
    endian = "<"
    if magic not in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        endian = ">"
        magic = struct.unpack_from(">I", data)[0]
        if magic not in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            raise ValueError(f"{path}: not a pcap file (magic {data[:4].hex()})")
    scale = 1e-9 if magic == PCAP_MAGIC_NS else 1e-6
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    packets: list[Packet] = []
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from(endian + "IIII", data, offset)
        offset += 16
        if offset + caplen > len(data):
            break
        packet = parse_frame(sec + frac * scale, data[offset : offset + caplen], linktype)
        if packet is not None:
            packets.append(packet)
        offset += caplen
    return packets


def count_duplicates(
    packets: list[Packet], vips: set[str], tcp_port: int, udp_port: int
) -> DuplicateReport:
    """Count SYN|ACK and UDP-answer duplicates among packets to/from ``vips``."""
    report = DuplicateReport(packets=len(packets))
    synacks: dict[tuple[str, int], list[tuple[float, int]]] = defaultdict(list)
    udp_pending: dict[tuple[str, int], int] = {}
    for p in packets:
        if p.proto == 6 and p.dst in vips and p.dport == tcp_port:
            if p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                report.syns += 1
                synacks.pop((p.src, p.sport), None)  # a new attempt on a reused port
        elif p.proto == 6 and p.src in vips and p.sport == tcp_port:
            if p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK:
                report.synacks += 1
                seen = synacks[(p.dst, p.dport)]
                if any(seq != p.seq or p.time - t < SYNACK_WINDOW for t, seq in seen):
                    report.duplicate_synacks += 1
                    if len(report.examples) < 5:
                        report.examples.append(f"SYN|ACK x2 to {p.dst}:{p.dport} at {p.time:.3f}")
                seen.append((p.time, p.seq))
            if p.flags & TCP_RST:
                report.resets_from_vip += 1
                report.resets.append((p.dst, p.dport, p.time))
        elif p.proto == 17 and p.dst in vips and p.dport == udp_port:
            report.udp_queries += 1
            udp_pending[(p.src, p.sport)] = 0
        elif p.proto == 17 and p.src in vips and p.sport == udp_port:
            report.udp_answers += 1
            key = (p.dst, p.dport)
            if key in udp_pending:
                udp_pending[key] += 1
                if udp_pending[key] > 1:
                    report.duplicate_udp_answers += 1
                    if len(report.examples) < 5:
                        report.examples.append(f"UDP x2 to {p.dst}:{p.dport} at {p.time:.3f}")
    return report
