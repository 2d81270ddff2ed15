"""Flood benchmark: forged heartbeats at a 3-node cluster under client load.

    .venv/bin/python bench/flood.py [--kinds forged,sniffed,maxsize,spoofed,badsize]
                                    [--rates 1000,3000,10000,30000,0] [--step 3]
                                    [--profile fast|default] [--procs 2] [--json] [--out FILE]

A hub bed (lbd.testbed.bed) with three real daemons, echo services and the e2e
suite's client load (64 sources, a new TCP connection and a UDP query every 4 ms, one
long-lived connection per node) with a packet capture. An attacker namespace joins the
hub (``192.0.2.250``: on the segment, no key) and floods node 0's heartbeat port,
alternately at node 0's own address and at the heartbeat group (which every node
hears), in steps of increasing rate. Kinds of datagram:

* ``forged``: right magic and version, a random key fingerprint, random bytes; 100-400
  bytes (heartbeat-sized), from the attacker's own address. Passes the kernel filter
  (the source is on the segment); the daemon drops it at the key lookup.
* ``sniffed``: the same with the cluster's real key fingerprint (visible in every
  heartbeat on the wire): the daemon must check the AEAD tag of each.
* ``maxsize``: ``forged`` at ``MAX_DATAGRAM`` bytes (fragmented on the wire).
* ``spoofed``: ``forged`` from random sources outside the segment (198.18.0.0/24,
  RFC 2544's benchmarking range), sent through a raw socket: the kernel filter drops it.
* ``badsize``: one byte over ``MAX_DATAGRAM`` or under ``MIN_DATAGRAM``, from the
  attacker's own address: the filter drops it.

Rates are datagrams per second over all sender processes (``--procs`` of them, each a
tight Python loop, paced); rate 0 means as fast as the senders go. Each step floods for
``--step`` seconds, then waits ``SETTLE`` s and reads, per node, the counters of
``lbd-cli status`` (forged, malformed, view changes, the heartbeat filter's drops) and
the heartbeat socket's drop count (``/proc/net/udp``: datagrams lost to a full receive
buffer, real heartbeats included), and from the client: failed new connections and
duplicate answers in the step's window. A first ``baseline`` step without any flood
shows the bed's own stray failures. A kind's ramp stops after its first step with a
view change. Per kind,
``clean_up_to`` is the highest achieved rate with zero view changes and zero failed
connections at that and every lower step, ``breaks_at`` the first rate that had either;
``no_view_change_up_to`` and ``view_changes_at`` the same for view changes alone.

All traffic stays inside the bed's namespaces (192.0.2.0/24, 198.18.0.0/24 spoofed,
group 239.255.0.1, TTL 1); every step is bounded in count and time. On a 2-core
machine the senders share the CPU with the daemons and the client load, so the rates
reached here are those of the machine, not of a network: read them as a lower bound of
what the daemons withstand.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbd.daemon.config import load_keyring
from lbd.protocol.wire import (
    MAGIC,
    MAX_DATAGRAM,
    MIN_DATAGRAM,
    WIRE_VERSION,
)
from lbd.testbed.bed import ROUTER_LAN4, TCP_PORT, UDP_PORT, Bed, BedError
from lbd.testbed.cluster import HEARTBEAT_PORT, Capture, ClientLoad, LbdCluster
from lbd.testbed.metrics import NAME, START
from lbd.testbed.pcap import count_duplicates, read_pcap

CLK_TCK = os.sysconf("SC_CLK_TCK")
GROUP = "239.255.0.1"
ATTACKER = "192.0.2.250"
SPOOF_NET = "198.18.0."  # + 1..254: outside the segment
KINDS = ("forged", "sniffed", "maxsize", "spoofed", "badsize")
RATES = (1000, 3000, 10000, 30000, 0)
SETTLE = 1.5
MAX_STEP = 10.0
POOL = 128
CHUNK = 32


# ---------------------------------------------------------------- sender (attacker side)


def _forged(rng: random.Random, size: int, fingerprint: bytes | None) -> bytes:
    fp = fingerprint if fingerprint is not None else rng.randbytes(4)
    return MAGIC + bytes((WIRE_VERSION,)) + fp + rng.randbytes(size - 7)


def _raw_packet(payload: bytes, source: str, target: str, sport: int) -> bytes:
    """IPv4 + UDP headers (the kernel fills in the IP checksum and total length)."""
    ttl = 1 if ipaddress.IPv4Address(target).is_multicast else 64
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        0,
        0,
        0,
        ttl,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source),
        socket.inet_aton(target),
    )
    udp = struct.pack("!HHHH", sport, HEARTBEAT_PORT, 8 + len(payload), 0)  # no checksum
    return ip + udp + payload


def payloads(
    kind: str, seed: int, targets: list[str], fingerprint: bytes | None, source: str | None = None
) -> list[tuple[bytes, str]]:
    """(datagram, target) pairs; for ``spoofed`` the datagram is a whole IP packet, from
    ``source`` or else from random addresses of ``SPOOF_NET``."""
    rng = random.Random(seed)
    pool: list[tuple[bytes, str]] = []
    for i in range(POOL):
        target = targets[i % len(targets)]
        if kind in ("forged", "sniffed", "spoofed"):
            data = _forged(rng, rng.randint(100, 400), fingerprint if kind == "sniffed" else None)
        elif kind == "maxsize":
            data = _forged(rng, MAX_DATAGRAM, None)
        elif kind == "badsize":
            # Too long or too short, each to every target (targets alternate with i).
            data = (
                _forged(rng, MAX_DATAGRAM + 1, None)
                if i // 2 % 2
                else rng.randbytes(MIN_DATAGRAM - 1)
            )
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if kind == "spoofed":
            data = _raw_packet(
                data,
                source or f"{SPOOF_NET}{rng.randint(1, 254)}",
                target,
                rng.randint(1024, 65535),
            )
        pool.append((data, target))
    return pool


def send(
    kind: str,
    targets: list[str],
    rate: float,
    duration: float,
    *,
    seed: int,
    fingerprint: bytes | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Flood for ``duration`` s at ``rate`` datagrams/s (0: unpaced); what was sent.
    Counts are whole multiples of ``CHUNK``."""
    duration = min(duration, MAX_STEP)
    pool = payloads(kind, seed, targets, fingerprint, source)
    if kind == "spoofed":
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        port = 0
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ATTACKER, 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ATTACKER))
        port = HEARTBEAT_PORT
    sendto = sock.sendto
    pairs = [(data, (target, port)) for data, target in pool]
    limit = round(rate * duration) if rate > 0 else None
    sent = errors = i = 0
    start = time.monotonic()
    deadline = start + duration
    while limit is None or sent < limit:
        for _ in range(CHUNK):
            data, address = pairs[i % POOL]
            i += 1
            try:
                sendto(data, address)
            except OSError:
                errors += 1  # ENOBUFS and the like: the bed's limit, not the daemon's
        sent += CHUNK
        now = time.monotonic()
        if now >= deadline:
            break
        if rate > 0:
            ahead = start + sent / rate - now
            if ahead > 0:
                time.sleep(ahead)
    elapsed = time.monotonic() - start
    sock.close()
    return {"sent": sent - errors, "errors": errors, "seconds": round(elapsed, 3)}


# ---------------------------------------------------------------- the bed side


class Attacker:
    """A namespace on the bed's hub with a segment address and no key."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.ns = f"{bed.prefix}x"  # torn down with the bed (same prefix)
        subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True, timeout=10)
        bed.run(
            bed.hub,
            "ip",
            "link",
            "add",
            "px",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.ns,
        )
        bed.run(bed.hub, "ip", "link", "set", "px", "master", "br0")
        bed.run(
            bed.hub,
            "ip",
            "link",
            "set",
            "dev",
            "px",
            "type",
            "bridge_slave",
            "learning",
            "off",
            "flood",
            "on",
            "mcast_flood",
            "on",
        )
        bed.run(bed.hub, "ip", "link", "set", "px", "up")
        bed.set_sysctls(self.ns, {"net.ipv6.conf.all.disable_ipv6": 1})
        for argv in (
            ["link", "set", "lo", "up"],
            ["addr", "add", f"{ATTACKER}/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["route", "add", "224.0.0.0/4", "dev", "eth0"],
        ):
            bed.run(self.ns, "ip", *argv)
        bed.wait_for(
            lambda: bed.run(self.ns, "cat", "/sys/class/net/eth0/operstate").stdout.strip() == "up",
            5.0,
        )
        # Resolve the node addresses now, not during the first timed step.
        for node in bed.nodes:
            bed.run(self.ns, "ping", "-c", "1", "-W", "1", node.addr4, check=False)
        bed.run(self.ns, "ping", "-c", "1", "-W", "1", ROUTER_LAN4, check=False)

    def flood(
        self,
        kind: str,
        targets: list[str],
        rate: float,
        duration: float,
        *,
        procs: int = 1,
        fingerprint: bytes | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        """``procs`` sender processes sharing ``rate``; their summed figures.
        ``source``: the spoofed source of ``kind = "spoofed"`` (default: random)."""
        share = rate / procs if rate > 0 else 0.0
        request = {
            "kind": kind,
            "targets": targets,
            "rate": share,
            "duration": duration,
            "fingerprint": fingerprint.hex() if fingerprint else None,
            "source": source,
        }
        started = [
            self.bed.python(
                self.ns,
                "-m",
                "lbd.testbed.flood",
                "_send",
                json.dumps({**request, "seed": random.getrandbits(32)}),
            )
            for _ in range(procs)
        ]
        sent = errors = 0
        seconds = 0.0
        for proc in started:
            try:
                proc.wait(timeout=duration + 30)
            except Exception:
                self.bed.stop(proc)
                raise
            lines = self.bed.output(proc).strip().splitlines()
            if proc.returncode != 0 or not lines:
                raise BedError(f"flood sender failed: {self.bed.output(proc)[-1000:]}")
            result = json.loads(lines[-1])
            sent += result["sent"]
            errors += result["errors"]
            seconds = max(seconds, result["seconds"])
        return {
            "sent": sent,
            "errors": errors,
            "seconds": round(seconds, 3),
            "rate": round(sent / seconds) if seconds else 0,
        }


def socket_drops(bed: Bed, index: int) -> int:
    """Datagrams the heartbeat socket of node ``index`` lost to a full buffer."""
    out = bed.run(bed.nodes[index].name, "cat", "/proc/net/udp").stdout
    port = f":{HEARTBEAT_PORT:04X}"
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 12 and fields[1].endswith(port):
            return int(fields[-1])
    return 0


def snapshot(cluster: LbdCluster) -> list[dict[str, Any]]:
    """Per node: the daemon's counters and filter drops, and the socket's drops."""
    nodes = []
    for index in range(len(cluster.bed.nodes)):
        status = cluster.query(index, "status") or {}
        counters = status.get("counters", {})
        hb_filter = status.get("heartbeat_filter", {})
        nodes.append(
            {
                "forged": counters.get("forged", 0),
                "malformed": counters.get("malformed", 0),
                "foreign_version": counters.get("foreign_version", 0),
                "accepted": counters.get("accepted", 0),
                "sent": counters.get("sent", 0),
                "view_changes": counters.get("view_changes", 0),
                "filter_foreign": hb_filter.get("foreign", 0),
                "filter_badlen": hb_filter.get("badlen", 0),
                "filter_passed": hb_filter.get("passed", 0),
                "socket_drops": socket_drops(cluster.bed, index),
                "cpu_ticks": _cpu_ticks(cluster.procs[index].pid),
            }
        )
    return nodes


def _cpu_ticks(pid: int) -> int:
    """User + system clock ticks of process ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _delta(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: a[key] - b[key] for key in a} for a, b in zip(after, before, strict=True)]


def run(
    workdir: Path,
    *,
    kinds: list[str],
    rates: list[float],
    step: float,
    profile: str = "fast",
    procs: int = 2,
    prefix: str = "lbdt-flood-",
) -> dict[str, Any]:
    """The whole benchmark in one bed; see the module docstring."""
    steps: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    with Bed(prefix, nodes=3, add_vip=False) as bed:
        cluster = LbdCluster(bed, workdir / "cluster", profile=profile)
        # What an attacker on the segment reads in any heartbeat's header.
        fingerprint = load_keyring(cluster.key).current_fingerprint
        try:
            cluster.start_all()
            cluster.wait_converged(what="the cluster to form")
            bed.start_echo(addrs=[bed.vip4])
            attacker = Attacker(bed)
            capture = Capture(bed, workdir)
            load = ClientLoad(bed, workdir)
            time.sleep(1.0)
            targets = [bed.nodes[0].addr4, GROUP]
            for kind in ["baseline", *kinds]:
                for rate in [0.0] if kind == "baseline" else rates:
                    before = snapshot(cluster)
                    t0 = time.monotonic()
                    if kind == "baseline":  # no flood: the bed's own failures, if any
                        time.sleep(step)
                        sent = {"sent": 0, "errors": 0, "seconds": step, "rate": 0}
                    else:
                        sent = attacker.flood(
                            kind,
                            targets,
                            rate,
                            step,
                            procs=procs,
                            fingerprint=fingerprint if kind == "sniffed" else None,
                        )
                    t1 = time.monotonic()
                    time.sleep(SETTLE)
                    delta = _delta(snapshot(cluster), before)
                    seconds = time.monotonic() - t0
                    for node in delta:  # a daemon's CPU, in % of one core over the step
                        ticks = node.pop("cpu_ticks")
                        node["cpu_percent"] = round(100 * ticks / CLK_TCK / seconds, 1)
                    steps.append(
                        {
                            "kind": kind,
                            "target_rate": rate,
                            "window": [t0, t1 + SETTLE],
                            **sent,
                            "nodes": delta,
                        }
                    )
                    if sum(n["view_changes"] for n in delta):  # the cluster broke: enough
                        cluster.wait_converged(what="the cluster to recover")
                        break
            time.sleep(0.5)
            record = load.stop()
            capture.stop()
            packets = read_pcap(capture.path)
        finally:
            cluster.stop_all()
    # Wall-clock pcap times onto the monotonic clock of the load record.
    offset = time.time() - time.monotonic()
    for entry in steps:
        t0, t1 = entry.pop("window")
        entry["failed_connections"] = sum(
            1 for row in record["tcp"] if not row[NAME] and t0 <= row[START] < t1
        )
        entry["connections"] = sum(1 for row in record["tcp"] if t0 <= row[START] < t1)
        window = [p for p in packets if t0 <= p.time - offset < t1]
        entry["duplicate_answers"] = count_duplicates(
            window, {bed.vip4}, TCP_PORT, UDP_PORT
        ).duplicates
        entry["view_changes"] = sum(n["view_changes"] for n in entry["nodes"])
        entry["clean"] = entry["view_changes"] == 0 and entry["failed_connections"] == 0
        entry["filter_drops"] = sum(
            n["filter_foreign"] + n["filter_badlen"] for n in entry["nodes"]
        )
        # Real heartbeats heard: what a node accepted over what the others sent (multicast).
        sent = sum(n["sent"] for n in entry["nodes"])
        for n in entry["nodes"]:
            others = sent - n["sent"]
            n["heard"] = round(n["accepted"] / others, 3) if others else None
        entry["min_heard"] = min(
            (n["heard"] for n in entry["nodes"] if n["heard"] is not None), default=None
        )
    baseline = steps.pop(0)
    summary = {}
    for kind in kinds:
        ramp = [s for s in steps if s["kind"] == kind]
        summary[kind] = {
            "clean_up_to": _up_to(ramp, lambda s: s["clean"]),
            "breaks_at": next((s["rate"] for s in ramp if not s["clean"]), None),
            "no_view_change_up_to": _up_to(ramp, lambda s: s["view_changes"] == 0),
            "view_changes_at": next((s["rate"] for s in ramp if s["view_changes"]), None),
        }
    return {
        "benchmark": "flood",
        "profile": profile,
        "nodes": 3,
        "step_s": step,
        "procs": procs,
        "max_datagram": MAX_DATAGRAM,
        "min_datagram": MIN_DATAGRAM,
        # The bed shares the machine: its load says how much else was running.
        "cpus": os.cpu_count(),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "baseline": baseline,
        "steps": steps,
        "summary": summary,
    }


def _up_to(ramp: list[dict[str, Any]], ok: Callable[[dict[str, Any]], bool]) -> int | None:
    """The highest achieved rate of the steps that are ``ok`` before the first that is not."""
    best: int | None = None
    for entry in ramp:
        if not ok(entry):
            break
        best = max(best or 0, entry["rate"])
    return best


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_send"]:
        r = json.loads(argv[1])
        fingerprint = bytes.fromhex(r["fingerprint"]) if r["fingerprint"] else None
        print(
            json.dumps(
                send(
                    r["kind"],
                    r["targets"],
                    r["rate"],
                    r["duration"],
                    seed=r["seed"],
                    fingerprint=fingerprint,
                    source=r["source"],
                )
            )
        )
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--rates",
        default=",".join(map(str, RATES)),
        help="datagrams/s per step, increasing; 0 = as fast as possible",
    )
    parser.add_argument("--step", type=float, default=3.0, help="seconds of flood per step")
    parser.add_argument("--profile", choices=("fast", "default"), default="fast")
    parser.add_argument("--procs", type=int, default=2, help="sender processes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        parser.error(f"kinds are {', '.join(KINDS)}")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="lbd-flood-") as tmp:
        out = run(
            Path(tmp),
            kinds=kinds,
            rates=[float(r) for r in args.rates.split(",")],
            step=min(args.step, MAX_STEP),
            profile=args.profile,
            procs=args.procs,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for s in out["steps"]:
        n0 = s["nodes"][0]
        print(
            f"{s['kind']:>8} {s['target_rate']:>7.0f}/s sent {s['rate']:>6}/s  filter drops "
            f"{s['filter_drops']:>6}  node0: forged {n0['forged']:>6} socket drops "
            f"{n0['socket_drops']:>6} cpu {n0['cpu_percent']:>4}%  heard {s['min_heard']}  vc "
            f"{s['view_changes']}  failed {s['failed_connections']}/{s['connections']}  "
            f"dup {s['duplicate_answers']}"
        )
    b = out["baseline"]
    print(f"load average before/after {out['loadavg']} on {out['cpus']} CPUs")
    print(
        f"baseline (no flood): view changes {b['view_changes']}, failed "
        f"{b['failed_connections']}/{b['connections']}, dup {b['duplicate_answers']}"
    )
    for kind, figures in out["summary"].items():
        print(
            f"{kind:>8}: clean up to {figures['clean_up_to']}/s, breaks at "
            f"{figures['breaks_at']}/s; no view change up to "
            f"{figures['no_view_change_up_to']}/s, view changes at "
            f"{figures['view_changes_at']}/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
