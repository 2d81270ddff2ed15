"""Daemon cost: CPU % of one core and RSS of real lbd daemons, and where the RSS goes.

    .venv/bin/python bench/cost.py [--window 25] [--cases default:3,default:32,...]
                                   [--no-imports] [--json] [--out FILE]

For each case (profile:nodes) one hub bed with that many nodes and a real daemon in
each (lbd.testbed.cluster, 4096 buckets, no client load), converged, then left alone
for ``--window`` seconds: CPU % from utime+stime in /proc/PID/stat over the window and
VmRSS from /proc/PID/status at its end, for node 0 and summarised over all daemons.
All daemons share this machine's cores: ``cpu_sum_percent`` near 100 * cores means the
machine is saturated and the per-daemon figure is a lower bound (8 and 16 nodes show
the growth with N on a 2-core machine, where 32 Python daemons cannot all fit).

The import part runs ``python -X importtime -c "import lbd.daemon.service"`` (largest
cumulative imports) and the VmRSS of a bare interpreter and of one importing each heavy
dependency alone, to show which imports make the daemon's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lbd.testbed.bed import Bed
from lbd.testbed.benchout import add_output_args, emit
from lbd.testbed.cluster import LbdCluster

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUCKETS = 4096
EMU_FIRST_HOST = 150  # emulated peers send from 192.0.2.150 and up
EMU_PER_PROCESS = 8  # more cores per process would not keep time at N = 32
IMPORTS = {
    "bare python": "",
    "+ asyncio": "import asyncio",
    "+ msgpack": "import msgpack",
    "+ numpy": "import numpy",
    "+ cryptography (ChaCha20Poly1305)": (
        "from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305"
    ),
    # Only the link helper child imports it (netcfg/linkproc.py), never the daemon.
    "+ pyroute2 (IPRoute), link helper only": "from pyroute2 import IPRoute",
    "+ nftables (Debian binding)": "import nftables",
    "+ nftables, Nftables() context": "import nftables; nftables.Nftables()",
    "lbd.daemon.service (all)": "import lbd.daemon.service",
}
# The same imports one after another, in the daemon's order of weight: increments add up.
CHAIN = [
    ("bare python", ""),
    ("+ asyncio (pulls in ssl)", "import asyncio"),
    (
        "+ msgpack, cryptography",
        "import msgpack\nfrom cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305",
    ),
    ("+ numpy", "import numpy"),
    ("+ nftables, Nftables() context", "import nftables; nftables.Nftables()"),
    ("+ lbd.daemon.service", "import lbd.daemon.service"),
]
RSS_PROBE = (
    "import sys\n{code}\nprint(next(int(l.split()[1]) for l in "
    "open('/proc/self/status') if l.startswith('VmRSS:')))"
)


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _status_field(pid: int, name: str) -> int:
    """The number of a ``name:`` line in /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} for {pid}")


def wakeups(pid: int) -> int:
    """Voluntary context switches: each is one sleep of the daemon, i.e. one wake-up."""
    return _status_field(pid, "voluntary_ctxt_switches")


def rss_mb(pid: int) -> float:
    return round(_status_field(pid, "VmRSS") / 1024, 1)


def measure_case(
    profile: str, nodes: int, window: float, workdir: Path, converge_timeout: float = 60.0
) -> dict[str, Any]:
    """Start ``nodes`` daemons, converge, measure every daemon over ``window`` seconds.

    If they do not converge within ``converge_timeout`` (a machine with too few cores
    for N daemons), the figures are taken anyway and ``converge_s`` is None.
    """
    with Bed(f"lbdt-cost{nodes}{profile[:1]}-", nodes=nodes, add_vip=False) as bed:
        cluster = LbdCluster(bed, workdir / f"{profile}{nodes}", profile=profile, buckets=BUCKETS)
        try:
            started = time.monotonic()
            cluster.start_all()
            converge_s: float | None = None
            try:
                cluster.wait_converged(list(range(nodes)), timeout=converge_timeout)
                converge_s = round(time.monotonic() - started, 1)
            except (AssertionError, subprocess.TimeoutExpired):  # a starved cluster: measured
                print(
                    f"cost: {profile}:{nodes} did not converge in {converge_timeout:.0f} s",
                    file=sys.stderr,
                )
            load = Path("/proc/loadavg").read_text().split()[0]
            time.sleep(2.0)  # lbd-cli queries and start-up work out of the window
            pids = [cluster.procs[i].pid for i in range(nodes)]
            before = {pid: ticks(pid) for pid in pids}
            woken = wakeups(pids[0])
            t0 = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - t0
            woken = wakeups(pids[0]) - woken
            cpu = [round(100 * (ticks(pid) - before[pid]) / CLK_TCK / elapsed, 2) for pid in pids]
            rss = [rss_mb(pid) for pid in pids]
            alive = len(cluster.running())
        finally:
            cluster.stop_all()
    return {
        "profile": profile,
        "nodes": nodes,
        "buckets": BUCKETS,
        "window_s": round(elapsed, 1),
        "converge_s": converge_s,
        "loadavg_1min_before": float(load),
        "loadavg_1min_after": float(Path("/proc/loadavg").read_text().split()[0]),
        "daemons_alive": alive,
        "cpu_sum_percent": round(sum(cpu), 1),
        "node0": {
            "cpu_percent": cpu[0],
            "rss_mb": rss[0],
            "wakeups_per_s": round(woken / elapsed, 1),
        },
        "cpu_percent": {"mean": round(statistics.fmean(cpu), 2), "max": max(cpu)},
        "rss_mb": {"median": statistics.median(rss), "max": max(rss)},
    }


def measure_emulated(
    profile: str,
    nodes: int,
    window: float,
    workdir: Path,
    *,
    scripted: bool = False,
    converge_timeout: float = 90.0,
) -> dict[str, Any]:
    """ONE real daemon (node0) in a cluster of ``nodes``; the other members are emulated
    by bench/peer_emulator.py: real cores, up to EMU_PER_PROCESS per process, each
    process in a namespace of its own; or, ``scripted``, all in one process."""
    peers = nodes - 1
    per_process = peers if scripted else EMU_PER_PROCESS
    groups = [list(range(i, min(i + per_process, peers))) for i in range(0, peers, per_process)]
    with Bed(f"lbdt-cost{nodes}{profile[:1]}e-", nodes=1 + len(groups), add_vip=False) as bed:
        cluster = LbdCluster(bed, workdir / f"{profile}{nodes}e", profile=profile, buckets=BUCKETS)
        emulators = []
        for g, group in enumerate(groups):
            ns = bed.nodes[1 + g].name
            for i in group:
                bed.run(ns, "ip", "addr", "add", f"192.0.2.{EMU_FIRST_HOST + i}/24", "dev", "eth0")
            emulators.append(
                bed.python(
                    ns,
                    "-m",
                    "lbd.testbed.peer_emulator",
                    "--config",
                    str(cluster.config(1 + g)),
                    "--count",
                    str(len(group)),
                    "--first-address",
                    f"192.0.2.{EMU_FIRST_HOST + group[0]}",
                    "--prefix",
                    f"emu{g}x",
                    *(["--scripted"] if scripted else []),
                )
            )
        summaries: list[Any] = []
        try:
            started = time.monotonic()
            cluster.start(0)
            converge_s: float | None = None
            deadline = started + converge_timeout
            while time.monotonic() < deadline:
                status = cluster.query(0, "status")
                if status and status["converged"] and len(status["view_members"]) == nodes:
                    converge_s = round(time.monotonic() - started, 1)
                    break
                time.sleep(0.2)
            else:
                print(f"cost: {profile}:{nodes} (emulated) did not converge", file=sys.stderr)
            time.sleep(2.0)
            pid = cluster.procs[0].pid
            before = ticks(pid)
            woken = wakeups(pid)
            emu_before = [ticks(e.pid) for e in emulators]
            changes_before = cluster.view_changes(0)
            counters_before = (cluster.query(0, "status") or {}).get("counters", {})
            t0 = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - t0
            cpu = round(100 * (ticks(pid) - before) / CLK_TCK / elapsed, 2)
            woken = wakeups(pid) - woken
            emu_cpu = [
                round(100 * (ticks(e.pid) - b) / CLK_TCK / elapsed, 1)
                for e, b in zip(emulators, emu_before, strict=True)
            ]
            rss = rss_mb(pid)
            status = cluster.query(0, "status") or {}
            changes = cluster.view_changes(0)
        finally:
            cluster.stop_all()
            for emulator in emulators:
                emulator.terminate()
            for emulator in emulators:
                try:
                    emulator.wait(timeout=15)
                    lines = bed.output(emulator).strip().splitlines()
                    summaries.append(json.loads(lines[-1]) if lines else None)
                except subprocess.TimeoutExpired:
                    emulator.kill()
                    emulator.wait(timeout=5)
                    summaries.append(None)
                except ValueError:
                    summaries.append({"error": bed.output(emulator)[-500:]})
    return {
        "profile": profile,
        "nodes": nodes,
        "emulated_peers": peers,
        "emulation": "scripted" if scripted else "cores",
        "emulator_processes": len(groups),
        "buckets": BUCKETS,
        "window_s": round(elapsed, 1),
        "converge_s": converge_s,
        "view_members": len(status.get("view_members", [])),
        "view_changes_in_window": None
        if changes is None or changes_before is None
        else changes - changes_before,
        "kernel": status.get("kernel"),
        "per_second": {
            k: round((v - counters_before.get(k, 0)) / elapsed, 1)
            for k, v in status.get("counters", {}).items()
        },
        "node0": {"cpu_percent": cpu, "rss_mb": rss, "wakeups_per_s": round(woken / elapsed, 1)},
        "cpu_percent": {"mean": cpu, "max": cpu},
        "rss_mb": {"median": rss, "max": rss},
        "emulator_cpu_percent": emu_cpu,
        "emulators": summaries,
    }


def import_rss() -> dict[str, float | None]:
    """VmRSS (MB) of a fresh interpreter after each import alone."""
    out: dict[str, float | None] = {}
    for label, code in IMPORTS.items():
        run = subprocess.run(
            [sys.executable, "-c", RSS_PROBE.format(code=code)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out[label] = round(int(run.stdout) / 1024, 1) if run.returncode == 0 else None
    return out


def chain_rss() -> list[dict[str, Any]]:
    """VmRSS (MB) after each step of CHAIN, with the increment over the step before."""
    rows: list[dict[str, Any]] = []
    code = ""
    for label, step in CHAIN:
        code += step + "\n"
        run = subprocess.run(
            [sys.executable, "-c", RSS_PROBE.format(code=code)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        mb = round(int(run.stdout) / 1024, 1) if run.returncode == 0 else None
        last = rows[-1]["rss_mb"] if rows else None
        rows.append(
            {
                "step": label,
                "rss_mb": mb,
                "added_mb": None if mb is None or last is None else round(mb - last, 1),
            }
        )
    return rows


def import_times(top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` largest cumulative import times of lbd.daemon.service (ms)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import lbd.daemon.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    rows: list[dict[str, Any]] = []
    for line in run.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line.split(":", 1)[1].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append(
            {
                "module": name.strip(),
                "depth": depth,
                "self_ms": int(self_us) / 1000,
                "cumulative_ms": int(cumulative_us) / 1000,
            }
        )
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=25.0)
    parser.add_argument("--cases", default="default:3,default:8,default:16,fast:3,default:32")
    parser.add_argument("--no-imports", action="store_true")
    add_output_args(parser)
    args = parser.parse_args(argv)
    cases = []
    with tempfile.TemporaryDirectory(prefix="lbd-cost-") as tmp:
        for case in args.cases.split(","):
            profile, nodes = case.split(":")
            if nodes[-1] in "es":
                cases.append(
                    measure_emulated(
                        profile, int(nodes[:-1]), args.window, Path(tmp), scripted=nodes[-1] == "s"
                    )
                )
            else:
                cases.append(measure_case(profile, int(nodes), args.window, Path(tmp)))
    out: dict[str, Any] = {"benchmark": "cost", "cpus": os.cpu_count(), "cases": cases}
    if not args.no_imports:
        out["import_rss_mb"] = import_rss()
        out["import_chain_rss_mb"] = chain_rss()
        out["import_time_top"] = import_times()
    if not emit(args, out):
        for c in cases:
            print(
                f"{c['profile']:>8} N={c['nodes']:<3} node0 {c['node0']}; CPU % mean "
                f"{c['cpu_percent']['mean']} max {c['cpu_percent']['max']}; RSS MB median "
                f"{c['rss_mb']['median']} max {c['rss_mb']['max']}"
            )
        for row in out.get("import_chain_rss_mb", []):
            print(f"  {row['step']:<48} {row['rss_mb']} MB (+{row['added_mb']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
