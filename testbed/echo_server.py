"""Tiny TCP+UDP identify/echo server run inside a node namespace of the test bed.

TCP: on accept, send ``<name>\\n``, then echo whatever the peer sends until it closes.
UDP: answer every datagram with ``<name>``, from the address it was sent to.

Each ``--addr`` gets its own sockets bound to that exact address with IP_FREEBIND /
IPV6_FREEBIND, so a server can start before the VIP is configured and its UDP replies
leave from the VIP (not from the node's own address, as a wildcard bind would do).
Prints ``READY`` once every socket is bound. Exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
from typing import cast

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78  # linux/in6.h; not exported by Python 3.11's socket module


def bound_socket(addr: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A socket of ``kind`` bound to ``addr``:``port`` even if the address is absent."""
    v6 = ipaddress.ip_address(addr).version == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    sock.bind((addr, port))
    sock.setblocking(False)
    return sock


class Identify(asyncio.DatagramProtocol):
    """Answer each datagram with the node name."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport does not subclass DatagramTransport: cast, not assert.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.name, addr)


async def serve(name: str, addrs: list[str], tcp_port: int, udp_port: int) -> None:
    """Bind everything, print READY, run until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    tag = name.encode()

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(tag + b"\n")
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the peer reset or a test dropped packets: nothing to report
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    servers = []
    transports = []
    for addr in addrs:
        if tcp_port:
            tsock = bound_socket(addr, tcp_port, socket.SOCK_STREAM)
            servers.append(await asyncio.start_server(on_tcp, sock=tsock, backlog=1024))
        if udp_port:
            usock = bound_socket(addr, udp_port, socket.SOCK_DGRAM)
            transport, _ = await loop.create_datagram_endpoint(lambda: Identify(tag), sock=usock)
            transports.append(transport)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", name, flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="what to answer with")
    parser.add_argument("--addr", action="append", required=True, help="address to bind")
    parser.add_argument("--tcp-port", type=int, default=80, help="0 disables TCP")
    parser.add_argument("--udp-port", type=int, default=53, help="0 disables UDP")
    args = parser.parse_args()
    asyncio.run(serve(args.name, args.addr, args.tcp_port, args.udp_port))


if __name__ == "__main__":
    main()
