"""Client load of ``lbd lab`` and the e2e suite; runs inside the bed's client namespace.

    python -m lbd.testbed.load --vip 192.0.2.100 --sources a,b,... --sticky c,d,...
        --nodes 3 --out result.json [--interval 0.004] [--max-duration 600]

* New TCP connections, one every ``--interval`` seconds, round-robin over ``--sources``
  (each must connect and read the server's name line within ``--connect-timeout``,
  shorter than the 1 s SYN retransmission, so a success is always a first SYN's).
* UDP queries at the same rate, each from a fresh socket; every answer arriving within
  ``--udp-window`` is kept (two answers to one query = an S1 violation).
* Long-lived TCP connections: from the ``--sticky`` candidates, one per answering node
  (up to ``--nodes``), each exchanging a line every 50 ms; one that resets, closes or
  stays silent for ``--stall`` seconds is recorded as broken.

Prints ``READY <json of long-lived conns>`` once the long-lived connections are up, then
a progress line (``P {json}``) every 0.25 s: answers per node, failures, duplicates.
Stops on SIGTERM/SIGINT or after ``--max-duration`` and writes the full record to
``--out`` as JSON (times are CLOCK_MONOTONIC, shared by every namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PROGRESS_EVERY = 0.25
PING_EVERY = 0.05


@dataclass
class Record:
    """Everything measured; ``tcp`` rows are [start, end, source index, node or ""]."""

    sources: list[str]
    tcp: list[list[Any]] = field(default_factory=list)
    udp: list[list[Any]] = field(default_factory=list)
    conns: list[dict[str, Any]] = field(default_factory=list)
    window_ok: Counter[str] = field(default_factory=Counter)
    window_fail: int = 0
    window_dup: int = 0


async def tcp_attempt(rec: Record, index: int, args: argparse.Namespace) -> None:
    start = time.monotonic()
    name = ""
    writer = None
    try:
        async with asyncio.timeout(args.connect_timeout):
            reader, writer = await asyncio.open_connection(
                args.vip, args.tcp_port, local_addr=(rec.sources[index], 0)
            )
            name = (await reader.readline()).decode(errors="replace").strip()
    except (TimeoutError, OSError):
        name = ""
    finally:
        if writer is not None:
            writer.close()
    rec.tcp.append([round(start, 6), round(time.monotonic(), 6), index, name])
    if name:
        rec.window_ok[name] += 1
    else:
        rec.window_fail += 1


async def udp_query(rec: Record, index: int, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    names: list[str] = []
    first = 0.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.bind((rec.sources[index], 0))
            await loop.sock_sendto(sock, b"q", (args.vip, args.udp_port))
            end = start + args.udp_window
            while (left := end - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(left):
                        data = await loop.sock_recv(sock, 2048)
                except TimeoutError:
                    break
                first = first or time.monotonic()
                names.append(data.decode(errors="replace"))
        except OSError:
            pass
    rec.udp.append([round(start, 6), round(first, 6), index, names])
    if len(names) > 1:
        rec.window_dup += 1


async def long_lived(
    conn: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stall: float
) -> None:
    """Exchange a line every PING_EVERY until cancelled; record how it broke, if it did."""
    try:
        while True:
            writer.write(b"ping\n")
            async with asyncio.timeout(stall):
                await writer.drain()
                line = await reader.readline()
            if line != b"ping\n":
                raise ConnectionError("closed by the server" if not line else "garbled")
            conn["exchanges"] += 1
            await asyncio.sleep(PING_EVERY)
    except (TimeoutError, OSError) as exc:
        conn["broken_at"] = round(time.monotonic(), 6)
        conn["error"] = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    finally:
        writer.close()


async def open_long_lived(args: argparse.Namespace) -> list[tuple[dict[str, Any], Any, Any]]:
    """One connection per answering node, from the sticky candidates (bounded)."""
    found: list[tuple[dict[str, Any], Any, Any]] = []
    names: set[str] = set()
    deadline = time.monotonic() + 5.0
    for src in args.sticky.split(",") if args.sticky else []:
        if len(names) >= args.nodes or time.monotonic() > deadline:
            break
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection(
                    args.vip, args.tcp_port, local_addr=(src, 0)
                )
                name = (await reader.readline()).decode(errors="replace").strip()
        except (TimeoutError, OSError):
            continue
        if not name or name in names:
            writer.close()
            continue
        names.add(name)
        conn = {
            "source": src,
            "node": name,
            "opened_at": round(time.monotonic(), 6),
            "exchanges": 0,
            "broken_at": None,
            "error": None,
        }
        found.append((conn, reader, writer))
    return found


async def run(args: argparse.Namespace) -> Record:
    rec = Record(args.sources.split(","))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    pingers: list[asyncio.Task[None]] = []
    conns = await open_long_lived(args)
    for conn, reader, writer in conns:
        rec.conns.append(conn)
        pingers.append(asyncio.ensure_future(long_lived(conn, reader, writer, args.stall)))
    print("READY", json.dumps([c for c, _, _ in conns]), flush=True)
    began = time.monotonic()
    next_shot = next_progress = began
    shot = 0
    while not stop.is_set() and time.monotonic() - began < args.max_duration:
        now = time.monotonic()
        if now >= next_progress:
            line = {
                "t": round(now, 3),
                "ok": dict(rec.window_ok),
                "fail": rec.window_fail,
                "dup": rec.window_dup,
                "broken": sum(c["broken_at"] is not None for c in rec.conns),
            }
            print("P", json.dumps(line), flush=True)
            rec.window_ok.clear()
            rec.window_fail = rec.window_dup = 0
            next_progress = now + PROGRESS_EVERY
        if now >= next_shot:
            index = shot % len(rec.sources)
            for coro in (tcp_attempt(rec, index, args), udp_query(rec, index, args)):
                task = asyncio.ensure_future(coro)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            shot += 1
            next_shot = max(next_shot + args.interval, now - args.interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(next_shot, next_progress) - now)):
                await stop.wait()
    # Let the attempts in flight finish (each is bounded), then stop the long-lived ones.
    if tasks:
        await asyncio.wait(set(tasks), timeout=args.connect_timeout + args.udp_window + 0.5)
    everything = [*tasks, *pingers]
    for task in everything:
        task.cancel()
    await asyncio.gather(*everything, return_exceptions=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vip", default="192.0.2.100")
    parser.add_argument("--tcp-port", type=int, default=80)
    parser.add_argument("--udp-port", type=int, default=53)
    parser.add_argument("--sources", required=True, help="comma-separated client sources")
    parser.add_argument("--sticky", default="", help="candidates for long-lived conns")
    parser.add_argument("--nodes", type=int, default=3, help="long-lived conns wanted")
    parser.add_argument("--interval", type=float, default=0.004)
    parser.add_argument("--connect-timeout", type=float, default=0.25)
    parser.add_argument("--udp-window", type=float, default=0.3)
    parser.add_argument("--stall", type=float, default=2.0)
    parser.add_argument("--max-duration", type=float, default=600.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rec = asyncio.run(run(args))
    tmp = f"{args.out}.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"sources": rec.sources, "tcp": rec.tcp, "udp": rec.udp, "conns": rec.conns}, fh)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
