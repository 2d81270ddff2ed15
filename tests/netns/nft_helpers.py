"""Helpers of the data-plane tests (test_nft*.py) on top of the shared bed.

Test side: the bucket split, client-side packet counters (an nft table in the
client namespace counting SYN|ACKs, RSTs and echo replies from the VIPs: two
servers answering one SYN shows up as two SYN|ACKs), and a watcher that times the
owner table's disappearance inside a node namespace.

Client side, run as a program in the client namespace::

    nft_helpers.py stream --dst4 V --dst6 V6 --port 80 --sources a,b
        one long-lived TCP connection per source, each sending a line every
        --interval s and reading its echo, until a line arrives on stdin; prints
        {"src": {"node", "rounds", "errors", "max_rtt"}}.  Prints READY first.
    nft_helpers.py loop --dst4 V --dst6 V6 --port 80 --sources a,b --duration 1
        a fresh TCP connect every --interval s (sources in turn, --timeout each);
        prints READY, then [[monotonic_start_time, ok], ...] at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------ test side


def split(names: Sequence[str], buckets: int, seed: int) -> dict[str, frozenset[int]]:
    """Buckets per node: lbd's ownership function when it exists, else modulo."""
    try:
        from lbd.protocol.ownership import compute_owners
    except ImportError:  # ownership not written yet: any deterministic split will do
        return {n: frozenset(range(i, buckets, len(names))) for i, n in enumerate(names)}
    ordered = sorted(names)
    owners = compute_owners([(n, 1) for n in ordered], buckets, seed)
    result: dict[str, set[int]] = {n: set() for n in ordered}
    for bucket, index in enumerate(owners.tolist()):
        result[ordered[index]].add(bucket)
    return {n: frozenset(b) for n, b in result.items()}


def owner_of(shares: dict[str, frozenset[int]], bucket: int) -> str:
    return next(n for n, owned in shares.items() if bucket in owned)


COUNTERS = ("synack", "rst", "echoreply", "udpin")


def install_client_counters(bed: Any) -> None:
    """Count, in the client namespace, what comes back from the VIPs."""
    lines = ["table inet lbdprobe {"]
    lines += [f"counter {c} {{ }}" for c in COUNTERS]
    lines += [
        "chain in { type filter hook input priority -300; policy accept;",
        f"ip saddr {bed.vip4} jump vip",
        f"ip6 saddr {bed.vip6} jump vip",
        "}",
        "chain vip {",
        'tcp flags & (syn|ack) == syn|ack counter name "synack"',
        'tcp flags & rst == rst counter name "rst"',
        'icmp type echo-reply counter name "echoreply"',
        'icmpv6 type echo-reply counter name "echoreply"',
        'meta l4proto udp counter name "udpin"',
        "}",
        "}",
    ]
    bed.run(bed.client, "nft", "-f", "-", input="\n".join(lines) + "\n")


def client_counters(bed: Any, reset: bool = False) -> dict[str, int]:
    """Packets per counter since the last reset (``reset`` zeroes them)."""
    verb = "reset" if reset else "list"
    out = bed.run(bed.client, "nft", "-j", verb, "counters", "table", "inet", "lbdprobe").stdout
    result = {}
    for obj in json.loads(out)["nftables"]:
        if "counter" in obj:
            result[obj["counter"]["name"]] = int(obj["counter"]["packets"])
    return result


WATCH = r"""
import json, sys, time
import nftables
nft = nftables.Nftables()  # text output: JSON listing in a tight loop crashed 1.0.6
print("READY", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
want = "table inet " + sys.argv[1]
while time.monotonic() < deadline:
    rc, out, err = nft.cmd("list tables")
    if want not in out.splitlines():
        print(json.dumps({"gone": time.monotonic(), "rc": rc, "err": err}), flush=True)
        break
    time.sleep(0.0002)
else:
    print(json.dumps({"gone": None}), flush=True)
"""


def start_table_watch(bed: Any, ns: str, table: str = "lbd", timeout: float = 5.0) -> Any:
    """A process in ``ns`` polling (every ~0.3 ms) until ``table`` disappears."""
    proc = bed.python(ns, "-c", WATCH, table, str(timeout))
    bed.wait_for(lambda: "READY" in bed.output(proc) or proc.poll() is not None, 10.0)
    return proc


def table_gone_at(bed: Any, proc: Any, timeout: float = 10.0) -> float | None:
    proc.wait(timeout=timeout)
    for line in bed.output(proc).splitlines():
        if line.startswith("{"):
            value: float | None = json.loads(line)["gone"]
            return value
    raise AssertionError(f"table watcher said nothing: {bed.output(proc)}")


def start_streams(bed: Any, sources: list[str], interval: float = 0.005) -> Any:
    """Long-lived echo connections from ``sources`` (stream mode, below); READY awaited."""
    proc = bed.python(
        bed.client, str(HERE / "nft_helpers.py"), "stream", "--sources", ",".join(sources),
        "--dst4", bed.vip4, "--dst6", bed.vip6, "--interval", str(interval),
        stdin=subprocess.PIPE,
    )  # fmt: skip
    bed.wait_for(lambda: "READY" in bed.output(proc) or proc.poll() is not None, 10.0)
    return proc


def stop_streams(bed: Any, proc: Any) -> dict[str, Any]:
    """End the streams; per source: node, rounds, errors, max_rtt."""
    assert proc.stdin is not None
    proc.stdin.write(b"stop\n")
    proc.stdin.close()
    proc.wait(timeout=15)
    result: dict[str, Any] = json.loads(bed.output(proc).strip().splitlines()[-1])
    return result


def start_loop(
    bed: Any, sources: list[str], duration: float, interval: float = 0.005, timeout: float = 0.05
) -> Any:
    """Fresh connections in a loop (loop mode, below); READY awaited."""
    proc = bed.python(
        bed.client, str(HERE / "nft_helpers.py"), "loop", "--sources", ",".join(sources),
        "--dst4", bed.vip4, "--dst6", bed.vip6, "--interval", str(interval),
        "--timeout", str(timeout), "--duration", str(duration),
    )  # fmt: skip
    bed.wait_for(lambda: "READY" in bed.output(proc) or proc.poll() is not None, 10.0)
    return proc


def loop_results(bed: Any, proc: Any) -> list[tuple[float, bool]]:
    """[(monotonic start, answered)] of every attempt of a loop process."""
    proc.wait(timeout=30)
    return [(t, ok) for t, ok in json.loads(bed.output(proc).strip().splitlines()[-1])]


# ---------------------------------------------------------------- client side


def _dst(args: argparse.Namespace, src: str) -> str:
    return str(args.dst6 if ipaddress.ip_address(src).version == 6 else args.dst4)


async def _stream_one(args: argparse.Namespace, src: str, stop: asyncio.Event) -> dict[str, Any]:
    stats: dict[str, Any] = {"node": None, "rounds": 0, "errors": [], "max_rtt": 0.0}
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(_dst(args, src), args.port, local_addr=(src, 0)), 3.0
        )
        stats["node"] = (await asyncio.wait_for(reader.readline(), 3.0)).decode().strip()
    except (OSError, TimeoutError) as exc:
        stats["errors"].append(f"connect: {exc!r}")
        return stats
    try:
        while not stop.is_set():
            line = f"{src} {stats['rounds']} {'x' * 64}\n".encode()
            start = time.monotonic()
            writer.write(line)
            await writer.drain()
            echo = await asyncio.wait_for(reader.readexactly(len(line)), 3.0)
            if echo != line:
                stats["errors"].append(f"bad echo at round {stats['rounds']}")
                break
            stats["max_rtt"] = max(stats["max_rtt"], time.monotonic() - start)
            stats["rounds"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        stats["errors"].append(f"round {stats['rounds']}: {exc!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return stats


async def _stream(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks = {s: asyncio.ensure_future(_stream_one(args, s, stop)) for s in args.sources}
    # Everyone connected (or failed) before READY, so the test starts from a known state.
    for _ in range(300):
        await asyncio.sleep(0.01)
        if all(t.done() for t in tasks.values()):
            break
    print("READY", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.readline(), args.max_duration)
    stop.set()
    return {s: await t for s, t in tasks.items()}


def _connect_once(src: str, dst: str, port: int, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((src, 0))
        try:
            sock.connect((dst, port))
            return bool(sock.recv(100))
        except OSError:
            return False


def _loop(args: argparse.Namespace) -> list[tuple[float, bool]]:
    results = []
    print("READY", flush=True)
    end = time.monotonic() + args.duration
    i = 0
    while time.monotonic() < end and i < 100_000:
        src = args.sources[i % len(args.sources)]
        start = time.monotonic()
        results.append((start, _connect_once(src, _dst(args, src), args.port, args.timeout)))
        i += 1
        time.sleep(max(0.0, args.interval - (time.monotonic() - start)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("stream", "loop"))
    parser.add_argument("--dst4", default="192.0.2.100")
    parser.add_argument("--dst6", default="2001:db8:1::100")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--sources", type=lambda s: s.split(","), required=True)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--max-duration", type=float, default=60.0)
    args = parser.parse_args()
    result: Any = asyncio.run(_stream(args)) if args.mode == "stream" else _loop(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
