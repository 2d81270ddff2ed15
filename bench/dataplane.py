"""Data-plane benchmark: nft apply latency, and what lbd's rules cost per connection.

    python bench/dataplane.py [--json] [--seconds 2] [--rounds 2]

Needs root; everything runs in throw-away namespaces (prefix lbdt-bench-).

1. Apply latency, in a private namespace with one NftDataplane: one apply() (one
   transaction: guard re-assert + changed buckets + lease refresh) moving 1 or 100
   buckets, claiming all B buckets (nothing -> everything) or releasing all of them
   (a flush), at B=4096 and B=65536; median and p99 in ms. Also the same with the
   guard re-assert skipped (``guard_period`` long) to show its share.
2. Data-plane cost, in the shared test bed with ONE node: new TCP connections/s and
   UDP request/responses/s from the client (many AnyIP sources, Python asyncio load)
   to the VIP with lbd's tables installed (the node owns every bucket, so every
   packet runs the whole rule path, jhash and lookup included) versus no tables at
   all, and versus a control table that only switches conntrack on. Short samples
   alternate (none, conntrack, lbd; the order rotates every round); the ratio is
   the median over rounds of (rate with lbd / rate without) within each round, so
   the drift of a shared machine cancels out. Note the "no tables" side also has no conntrack in
   the node namespace (the kernel enables it per namespace on first use), so the
   ratio includes conntrack's cost, which lbd genuinely adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

VIPS = ["192.0.2.100", "2001:db8:1::100"]
# Control: conntrack switched on in the node namespace, no lbd rules.
CONNTRACK_ONLY = """table inet lbdbench {
  chain pre { type filter hook prerouting priority -180; policy accept;
    ct state established accept
  }
}
"""


# ----------------------------------------------------------- apply latency


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return values * 2
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def apply_worker() -> dict[str, Any]:
    """Runs INSIDE a namespace: time apply() for several move sizes."""
    from lbd.netcfg.nft import NftDataplane

    results: dict[str, Any] = {}
    for buckets in (4096, 65536):
        half = frozenset(range(0, buckets, 2))
        full = frozenset(range(buckets))
        cases = {
            # k buckets change owner (half of them arrive, half leave): state XOR k.
            "moved_1": [half, half ^ {1}],
            "moved_100": [half, half ^ frozenset(range(100))],
            "claim_all": [frozenset(), full],
            "release_all": [full, frozenset()],
        }
        for guard_period in (0.0, 3600.0):
            dp = NftDataplane(VIPS, buckets, 0x1BD, guard_period=guard_period)
            dp.install()
            for name, (before, after) in cases.items():
                big = name.endswith("_all")
                reps = (8 if buckets > 10_000 else 40) if big else 200
                times = []
                for _ in range(reps):
                    dp.apply(before, 1000)
                    dp.apply(after, 1000)  # only this one is timed
                    stats = dp.last_apply_stats
                    assert stats is not None
                    times.append(stats.seconds * 1000)
                assert stats is not None
                key = f"B{buckets}_{name}" + ("_noguard" if guard_period else "")
                results[key] = {
                    "median_ms": round(statistics.median(times), 3),
                    "p99_ms": round(_pct(times, 0.99), 3),
                    "buckets_changed": stats.added + stats.removed,
                    "elements_sent": stats.elements_sent,
                    "reps": reps,
                }
            dp.remove()
            dp.close()
    return results


def bench_apply() -> dict[str, Any]:
    ns = f"lbdt-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "_apply_worker"],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


# ------------------------------------------------------------- load client


async def _tcp_load(dst: str, port: int, sources: list[str], seconds: float, conc: int) -> Any:
    done = errors = 0
    end = time.monotonic() + seconds

    async def worker(k: int) -> None:
        nonlocal done, errors
        i = k
        while time.monotonic() < end:
            src = sources[i % len(sources)]
            i += conc
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(dst, port, local_addr=(src, 0)), 2.0
                )
                await asyncio.wait_for(reader.readline(), 2.0)
                writer.close()
                done += 1
            except (OSError, TimeoutError):
                errors += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(conc)))
    return {"count": done, "errors": errors, "seconds": time.monotonic() - start}


async def _udp_load(dst: str, port: int, sources: list[str], seconds: float, conc: int) -> Any:
    import socket

    loop = asyncio.get_running_loop()
    done = errors = 0
    end = time.monotonic() + seconds

    async def worker(k: int) -> None:
        nonlocal done, errors
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.bind((sources[k % len(sources)], 0))
            while time.monotonic() < end:
                await loop.sock_sendto(sock, b"q", (dst, port))
                try:
                    await asyncio.wait_for(loop.sock_recv(sock, 512), 1.0)
                    done += 1
                except TimeoutError:
                    errors += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(conc)))
    return {"count": done, "errors": errors, "seconds": time.monotonic() - start}


def load_worker(proto: str, seconds: float) -> dict[str, Any]:
    sources = [f"198.51.100.{i}" for i in range(1, 255)]
    fn = _tcp_load if proto == "tcp" else _udp_load
    conc = 32 if proto == "tcp" else 64
    result: dict[str, Any] = asyncio.run(fn(VIPS[0], 80 if proto == "tcp" else 53, sources,
                                            seconds, conc))  # fmt: skip
    return result


# ---------------------------------------------------------- data-plane cost


def load_server() -> None:
    """Runs in the client namespace: one ``proto seconds`` request per stdin line."""
    for line in sys.stdin:
        proto, seconds = line.split()
        print(json.dumps(load_worker(proto, float(seconds))), flush=True)


def bench_dataplane(seconds: float, rounds: int) -> dict[str, Any]:
    from lbd.testbed.bed import Bed
    from lbd.testbed.nft_agent import AgentClient

    modes = ("none", "conntrack", "lbd")
    rates: dict[str, dict[str, list[float]]] = {p: {m: [] for m in modes} for p in ("tcp", "udp")}
    errors = 0
    with Bed(f"lbdt-bench-{uuid.uuid4().hex[:4]}-", nodes=1) as bed:
        bed.start_echo()
        node = bed.nodes[0].name
        bed.set_sysctls(bed.client, {"net.ipv4.ip_local_port_range": "10000 65000"})
        # Long-lived load generator and agent: samples can be short and tightly
        # interleaved, which is what makes the comparison robust on a busy machine.
        gen = bed.python(
            bed.client, __file__, "_load_server",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        agent = AgentClient(bed, node, VIPS, buckets=4096, seed=0x1BD, extra=("--no-install",))
        try:
            for rnd in range(rounds):
                order = modes[rnd % 3 :] + modes[: rnd % 3]  # rotate: no mode always first
                for mode in order:
                    if mode == "lbd":
                        agent.call("install")
                        agent.apply(range(4096), 600_000)
                    elif mode == "conntrack":
                        bed.run(node, "nft", "-f", "-", input=CONNTRACK_ONLY)
                    for proto in ("tcp", "udp"):
                        assert gen.stdin is not None and gen.stdout is not None
                        gen.stdin.write(f"{proto} {seconds}\n")
                        res = json.loads(gen.stdout.readline())
                        errors += res["errors"]
                        rates[proto][mode].append(res["count"] / res["seconds"])
                    if mode == "lbd":
                        agent.call("remove", guard=True)
                    elif mode == "conntrack":
                        bed.run(node, "nft", "delete", "table", "inet", "lbdbench")
                    # Next sample starts without this one's conntrack entries.
                    bed.run(node, "sh", "-c", "command -v conntrack >/dev/null && "
                            "conntrack -F 2>/dev/null; true")  # fmt: skip
        finally:
            agent.stop()
            if gen.stdin is not None:
                gen.stdin.close()
            gen.wait(timeout=10)
    result: dict[str, Any] = {"load_errors": errors, "rounds": rounds, "seconds": seconds}
    for proto, by_mode in rates.items():
        med = {m: statistics.median(v) for m, v in by_mode.items()}
        # Paired per round (samples seconds apart), then the median: drift cancels.
        paired = [b / a for a, b in zip(by_mode["none"], by_mode["lbd"], strict=True)]
        paired_ct = [b / a for a, b in zip(by_mode["conntrack"], by_mode["lbd"], strict=True)]
        unit = "new_tcp_connections_per_s" if proto == "tcp" else "udp_request_responses_per_s"
        result[unit] = {
            "no_rules": round(med["none"], 1),
            "conntrack_only": round(med["conntrack"], 1),
            "lbd_rules": round(med["lbd"], 1),
            "ratio": round(statistics.median(paired), 3),
            # Spread of the per-round ratios: on a shared 2-core machine +-5-10 %
            # is noise (an A/A run of two identical rule sets shows as much).
            "ratio_quartiles": [round(q, 3) for q in _quartiles(paired)],
            "ratio_vs_conntrack_only": round(statistics.median(paired_ct), 3),
            "samples": {k: [round(v, 1) for v in vals] for k, vals in by_mode.items()},
        }
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_apply_worker":
        print(json.dumps(apply_worker()))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_load_server":
        load_server()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=0.5, help="per load sample")
    parser.add_argument("--rounds", type=int, default=15, help="none/ct/lbd alternations")
    args = parser.parse_args()
    result = {"apply": bench_apply(), "dataplane": bench_dataplane(args.seconds, args.rounds)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, val in result["apply"].items():
        print(f"apply {key:30s} median {val['median_ms']:8.3f} ms  p99 {val['p99_ms']:8.3f} ms")
    for key, val in result["dataplane"].items():
        if isinstance(val, dict):
            print(f"{key:30s} none {val['no_rules']:9.1f}  conntrack {val['conntrack_only']:9.1f}"
                  f"  lbd {val['lbd_rules']:9.1f}  ratio {val['ratio']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
