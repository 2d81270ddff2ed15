"""Probe a service from many client source addresses at once; print JSON.

Run inside the bed's client namespace, whose lo carries AnyIP routes for 198.51.100.0/24
and 2001:db8:2::/64, so every source address can be bound without configuring it.

    client_probe.py --proto tcp|udp|icmp --dst4 VIP --dst6 VIP6 --port P
                    --sources a,b,c [--timeout 1.0] [--parallel 128] [--all]

For each source (destination = dst4 or dst6 by the source's family; an empty source
means "let the kernel choose"), one attempt, at most ``--timeout`` seconds:
  tcp   connect, read the server's first line (its node name)
  udp   send one datagram, take the first reply (its node name); with --all, collect
        every reply arriving within the timeout (a list: shows duplicate answers)
  icmp  one echo request; "ok" when the reply comes
Output: {source: name | "ok" | null} (or {source: [names]} with --all). At most
``--parallel`` attempts run at once; the whole run is bounded by a global deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import struct
import sys
import time
from typing import Any


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


async def tcp_attempt(src: str, dst: str, port: int) -> str | None:
    reader, writer = await asyncio.open_connection(dst, port, local_addr=(src, 0) if src else None)
    try:
        line = await reader.readline()
        return line.decode(errors="replace").strip() or None
    finally:
        writer.close()


def _udp_socket(src: str, dst: str) -> socket.socket:
    sock = socket.socket(family_of(dst), socket.SOCK_DGRAM)
    sock.setblocking(False)
    if src:
        sock.bind((src, 0))
    return sock


async def udp_attempt(src: str, dst: str, port: int, window: float, collect: bool) -> Any:
    loop = asyncio.get_running_loop()
    with _udp_socket(src, dst) as sock:
        await loop.sock_sendto(sock, b"who?", (dst, port))
        if not collect:
            data, _ = await loop.sock_recvfrom(sock, 2048)
            return data.decode(errors="replace")
        names: list[str] = []
        end = time.monotonic() + window
        while (left := end - time.monotonic()) > 0:
            try:
                data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), left)
            except TimeoutError:
                break
            names.append(data.decode(errors="replace"))
        return sorted(names)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


async def icmp_attempt(src: str, dst: str, ident: int) -> str | None:
    loop = asyncio.get_running_loop()
    v6 = family_of(dst) == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with socket.socket(family_of(dst), socket.SOCK_RAW, proto) as sock:
        sock.setblocking(False)
        if src:
            sock.bind((src, 0))
        req_type, rep_type = (128, 129) if v6 else (8, 0)
        body = struct.pack("!HH", ident, 1) + b"lbd-bed-ping"
        # The kernel fills in the ICMPv6 checksum itself; ICMPv4 needs ours.
        csum = 0 if v6 else _checksum(struct.pack("!BBH", req_type, 0, 0) + body)
        await loop.sock_sendto(sock, struct.pack("!BBH", req_type, 0, csum) + body, (dst, 0))
        for _ in range(1000):  # raw sockets see every ICMP packet: skip the others
            data = await loop.sock_recv(sock, 2048)
            if not v6:
                data = data[(data[0] & 0x0F) * 4 :]  # strip the IPv4 header
            if len(data) >= 8 and data[0] == rep_type and data[4:6] == struct.pack("!H", ident):
                return "ok"
        return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sources: list[str] = args.sources.split(",")
    limit = asyncio.Semaphore(args.parallel)
    results: dict[str, Any] = {}
    base_ident = os.getpid() & 0xFFFF

    async def one(index: int, src: str) -> None:
        fam_src = src or args.dst4
        dst = args.dst6 if family_of(fam_src) == socket.AF_INET6 else args.dst4
        async with limit:
            try:
                if args.proto == "tcp":
                    coro = tcp_attempt(src, dst, args.port)
                elif args.proto == "udp":
                    coro = udp_attempt(src, dst, args.port, args.timeout, args.all)
                else:
                    coro = icmp_attempt(src, dst, (base_ident + index) & 0xFFFF)
                # --all collects until its own window closes; give it a little slack.
                slack = 0.5 if args.all else 0.0
                results[src] = await asyncio.wait_for(coro, args.timeout + slack)
            except (TimeoutError, OSError):
                results[src] = [] if args.all else None

    deadline = args.timeout * (len(sources) / args.parallel + 2) + 2.0
    tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(sources)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    for src in sources:
        results.setdefault(src, [] if args.all else None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto", choices=("tcp", "udp", "icmp"), default="tcp")
    parser.add_argument("--dst4", default="192.0.2.100")
    parser.add_argument("--dst6", default="2001:db8:1::100")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--sources", required=True, help="comma-separated source addresses")
    parser.add_argument("--timeout", type=float, default=1.0, help="per attempt, seconds")
    parser.add_argument("--parallel", type=int, default=128)
    parser.add_argument("--all", action="store_true", help="udp: collect every reply")
    args = parser.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
