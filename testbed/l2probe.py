"""Unicast ARP and NS probes, as a router sends them to revalidate a cached MAC.

    python l2probe.py IFACE DST_MAC VIP4 VIP6 [WAIT]

Sends, from IFACE's own MAC and addresses, one ARP request for VIP4 and one Neighbor
Solicitation for VIP6, both in frames addressed to DST_MAC (not broadcast/multicast:
the probe a Linux router sends in the PROBE state), then prints one JSON object: every
ARP reply for VIP4 and Neighbor Advertisement for VIP6 seen within WAIT seconds (default
1), each with its Ethernet source and the MAC in its payload (ARP sender / TLLA, ""
if the NA has none).
Runs inside a namespace as root (AF_PACKET), with lbd importable; no packet library.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import socket
import struct
import sys
import time
from pathlib import Path

from lbd.netcfg.macmode import ones_sum

ETH_P_ALL, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0806, 0x86DD


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def own_addresses(iface: str) -> tuple[bytes, bytes, bytes]:
    """(MAC, an IPv4 address, a global IPv6 address) of ``iface``."""
    text = Path(f"/sys/class/net/{iface}/address").read_text()
    mac = bytes.fromhex(text.strip().replace(":", ""))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16s16x", iface.encode())
        ip4 = fcntl.ioctl(sock.fileno(), 0x8915, req)[20:24]  # SIOCGIFADDR
    ip6 = b""
    for line in Path("/proc/net/if_inet6").read_text().splitlines():
        cols = line.split()
        if cols[5] == iface and not cols[0].startswith("fe80"):
            ip6 = bytes.fromhex(cols[0])
            break
    return mac, ip4, ip6


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def arp_request(src_mac: bytes, dst_mac: bytes, src_ip: bytes, target: bytes) -> bytes:
    eth = dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
    return eth + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + bytes(6) + target


def ns_request(src_mac: bytes, dst_mac: bytes, src_ip: bytes, target: bytes) -> bytes:
    icmp = struct.pack("!BBHI", 135, 0, 0, 0) + target + bytes([1, 1]) + src_mac
    pseudo = src_ip + target + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", checksum(pseudo + icmp)) + icmp[4:]
    ip6 = struct.pack("!IHBB", 0x60000000, len(icmp), 58, 255) + src_ip + target
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + ip6 + icmp


def main() -> None:
    iface, dst, vip4, vip6 = sys.argv[1:5]
    wait = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    mac, ip4, ip6 = own_addresses(iface)
    dst_mac = bytes.fromhex(dst.replace(":", ""))
    t4, t6 = ipaddress.IPv4Address(vip4).packed, ipaddress.IPv6Address(vip6).packed
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.settimeout(0.05)
    sock.send(arp_request(mac, dst_mac, ip4, t4))
    sock.send(ns_request(mac, dst_mac, ip6, t6))
    found: dict[str, list[dict[str, str]]] = {"arp": [], "na": []}
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            frame, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        if addr[2] == socket.PACKET_OUTGOING or len(frame) < 42:
            continue
        kind = struct.unpack_from("!H", frame, 12)[0]
        if kind == ETH_P_ARP and frame[20:22] == b"\0\2" and frame[28:32] == t4:
            found["arp"].append({"eth_src": mac_text(frame[6:12]), "is_at": mac_text(frame[22:28])})
        elif (
            kind == ETH_P_IPV6
            and len(frame) >= 78
            and frame[20] == 58
            and frame[54] == 136
            and frame[62:78] == t6
        ):
            # Linux answers a unicast NS without a TLLA option (and without the
            # Override flag): the router keeps the MAC it has cached.
            tlla = frame[80:86] if len(frame) >= 86 and frame[78] == 2 else b""
            found["na"].append({"eth_src": mac_text(frame[6:12]), "tlla": mac_text(tlla)})
    print(json.dumps(found))


if __name__ == "__main__":
    main()
