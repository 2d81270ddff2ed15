"""``lbd lab``: a whole lbd cluster on this machine, a real failure, measured.

    lbd lab [--nodes 3] [--fail kill|stop|linkdown|partition|service]
            [--profile default|fast] [--switch] [--mac-mode shared|multicast|flood] [--json]

Builds a hub test bed of network namespaces (prefix ``lbdlab-``; leftovers of an earlier
run are removed first; ``--switch``: an ordinary learning switch instead of the hub,
where ``--mac-mode shared`` starves most clients and ``flood`` or ``multicast`` serve
them all: README, "Switched networks"), starts a real lbd daemon in every node with a
generated config and key, an echo service on the VIP (TCP 80, UDP 53) in every node, and
a client namespace that opens a new TCP connection and sends a UDP query every 4 ms from
64 source addresses, plus one long-lived connection per node. It shows the per-node
share of new connections as bars, the membership (as ``lbd-cli members``) and a progress
line; then fails one node (``kill``: SIGKILL of its daemon; ``stop``: SIGSTOP;
``linkdown``: host death; ``partition``: its heartbeats dropped; ``service``: its echo
service killed while lbd lives: every daemon then runs a ``[[check]]`` of its echo
service, and the node drains on the failing check), shows the others absorbing its
slices, brings it back, shows it rejoin, and reports the client-visible outage,
duplicate answers (from a packet capture) and broken connections. ``--json`` prints only
the measured figures. Ctrl-C, SIGTERM or any error tears everything down.

The bed and cluster harness are lbd.testbed's (bed.py, cluster.py), shared with the
namespace tests: the lab runs from an installed lbd.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from lbd.daemon.config import MAC_MODES, DaemonConfig
from lbd.daemon.ctl import format_members
from lbd.testbed import metrics
from lbd.testbed.bed import Bed
from lbd.testbed.cluster import CONVERGE_TIMEOUT, Capture, ClientLoad, LbdCluster

PREFIX = "lbdlab-"
FAULTS = ("kill", "stop", "linkdown", "partition", "service")
# --fail service: each node checks its own echo service (README, "Service health").
SERVICE_CHECK = (
    '\n[[check]]\nname = "echo"\ntcp = "127.0.0.1:80"\ninterval = 0.2\n'
    "timeout = 0.1\nrise = 2\nfall = 2\n"
)
BAR_WIDTH = 40
PHASE_SECONDS = 2.5
EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE = 0, 1, 2
DEFAULT_MAC_MODE = DaemonConfig().mac_mode


def lab_bed(nodes: int, *, switch: bool = False, mac_mode: str = DEFAULT_MAC_MODE) -> Bed:
    """A Bed whose namespaces are called lbdlab-* (Bed itself insists on lbdt-*): a hub
    or a learning switch; the nodes wear one MAC in shared mode, their own otherwise."""
    bed = Bed(
        "lbdt-lab-", nodes=nodes, add_vip=False, switch=switch, unique_macs=mac_mode != "shared"
    )
    bed.prefix = PREFIX
    bed.hub, bed.router, bed.client = f"{PREFIX}hub", f"{PREFIX}r", f"{PREFIX}c"
    bed.nodes = [dataclasses.replace(n, name=f"{PREFIX}n{n.index}") for n in bed.nodes]
    return bed


class Screen:
    """Live view: bars of recent shares, the membership table, a progress line."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stdout.isatty()

    def show(
        self,
        phase: str,
        names: list[str],
        progress: list[dict[str, Any]],
        members: str,
        started: float,
    ) -> None:
        if self.quiet:
            return
        recent = progress[-4:]  # the last second
        counts: Counter[str] = Counter()
        for line in recent:
            counts.update(line["ok"])
        fails = sum(line["fail"] for line in recent)
        total = sum(counts.values()) + fails
        lines = [f"lbd lab: {phase}", "", "new connections per node (last second):"]
        for name in names:
            share = counts[name] / total if total else 0.0
            bar = "#" * round(share * BAR_WIDTH)
            lines.append(f"  {name:<12} {bar:<{BAR_WIDTH}} {100 * share:5.1f}%")
        share = fails / total if total else 0.0
        lines.append(
            f"  {'(no answer)':<12} {'!' * round(share * BAR_WIDTH):<{BAR_WIDTH}} "
            f"{100 * share:5.1f}%"
        )
        lines += ["", members, ""]
        dup = sum(line["dup"] for line in progress)
        broken = progress[-1]["broken"] if progress else 0
        lines.append(
            f"[{time.monotonic() - started:6.1f}s] {total * 1.0:.0f} conn/s, "
            f"duplicate UDP answers {dup}, broken long-lived {broken}"
        )
        text = "\n".join(lines)
        print(("\033[H\033[2J" if self.tty else "\n") + text, flush=True)


class Lab:
    """One lab run: bed, cluster, load, capture; ``run()`` returns the figures."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.bed: Any = None
        self.cluster: Any = None
        self.load: Any = None
        self.capture: Any = None
        self.screen = Screen(args.json)
        self.started = time.monotonic()

    def names(self) -> list[str]:
        return [n.name for n in self.bed.nodes]

    def watch(self, phase: str, seconds: float) -> None:
        """Refresh the screen for ``seconds``."""
        end = time.monotonic() + seconds
        while True:
            running = self.cluster.running()
            rows = self.cluster.query(running[0], "members") if running else None
            members = format_members(rows) if rows else "(membership unavailable)"
            self.screen.show(phase, self.names(), self.load.progress(), members, self.started)
            if time.monotonic() >= end:
                return
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def converge(self, indexes: list[int], phase: str, check: Any = None) -> float:
        """Wait (bounded) until ``indexes`` agree, refreshing the screen; returns when."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        while time.monotonic() < deadline:
            slices = self.cluster.converged(indexes)
            if slices is not None and (check is None or check(slices)):
                return time.monotonic()
            self.watch(phase, 0.2)
        raise RuntimeError(f"{phase}: no agreement within the timeout")

    def run(self) -> dict[str, Any]:
        args = self.args
        self.bed = lab_bed(args.nodes, switch=args.switch, mac_mode=args.mac_mode)
        self.bed.build()
        extra = f'\nmac_mode = "{args.mac_mode}"\n'
        if args.fail == "service":
            extra += SERVICE_CHECK
        self.cluster = ConfiguredCluster(
            self.bed, self.workdir / "cluster", extra, profile=args.profile, buckets=1024
        )
        everyone = list(range(args.nodes))
        self.cluster.start_all()
        self.services: dict[int, Any] = {}
        if args.fail == "service":
            # The daemons add the VIP at start; nobody claims before its check rose.
            self.bed.wait_for(
                lambda: all(
                    self.bed.vip4 in self.bed.run(n.name, "ip", "-4", "addr").stdout
                    for n in self.bed.nodes
                ),
                10.0,
            )
            self.services = dict(enumerate(self.bed.start_echo(addrs=[self.bed.vip4, "127.0.0.1"])))
        self.cluster.wait_converged(
            everyone, what="the cluster to form", check=lambda s: all(v > 0 for v in s.values())
        )
        if args.fail != "service":
            self.bed.start_echo(addrs=[self.bed.vip4])
        self.capture = Capture(self.bed, self.workdir)
        self.load = ClientLoad(self.bed, self.workdir)
        self.watch("serving: every node takes its share", PHASE_SECONDS)

        victim = 1 if args.nodes > 1 else 0
        name = self.bed.nodes[victim].name
        survivors = [i for i in everyone if i != victim]
        fault = self.inject(victim)
        if args.fail == "service":  # it stays a member, draining
            absorbed = self.converge(
                everyone,
                f"service of {name} killed: it drains",
                check=lambda s: s[f"node{victim}"] == 0,
            )
        else:
            absorbed = self.converge(survivors, f"{args.fail} {name}: survivors absorb its slices")
        self.watch(f"{name} is down: the survivors serve its slices", PHASE_SECONDS)
        back = time.monotonic()
        self.recover(victim)
        rejoined = self.converge(
            everyone, f"{name} is back: rejoining", check=lambda s: s[f"node{victim}"] > 0
        )
        self.watch(f"{name} rejoined: slices handed back", PHASE_SECONDS)

        record = self.load.stop()
        self.load = None
        report = self.capture.stop()
        self.capture = None
        # A host that died, or a service killed under its connections, breaks them.
        down = {name} if args.fail in ("linkdown", "service") else set()
        failover = metrics.outage(record, fault, name, horizon=back - fault)
        summary = metrics.summary(record)
        return {
            "nodes": args.nodes,
            "profile": args.profile,
            "network": "learning switch" if args.switch else "hub",
            "mac_mode": args.mac_mode,
            "served_pct": round(100 * summary["tcp_ok"] / max(1, summary["tcp_attempts"]), 1),
            "fail": args.fail,
            "victim": name,
            **failover,
            "survivors_agreed_ms": round((absorbed - fault) * 1000),
            "rejoin_agreed_ms": round((rejoined - back) * 1000),
            "duplicate_synacks": report.duplicate_synacks,
            "duplicate_udp_answers": report.duplicate_udp_answers,
            "duplicate_udp_answers_client": metrics.udp_duplicates(record),
            "broken_connections": len(metrics.broken(record, down)),
            "broken_on_failed_host": len(metrics.broken(record))
            - len(metrics.broken(record, down)),
            "long_lived_connections": len(record["conns"]),
            "captured": {
                "syns": report.syns,
                "synacks": report.synacks,
                "udp_queries": report.udp_queries,
                "udp_answers": report.udp_answers,
            },
            "longest_handoff_gap_ms": round(
                1000 * max(metrics.failure_bursts(record), default=0.0)
            ),
            "converged_after": self.cluster.converged(everyone) is not None,
            **{k: v for k, v in summary.items() if k != "long_lived"},
        }

    def inject(self, victim: int) -> float:
        fail = self.args.fail
        if fail == "kill":
            return float(self.cluster.crash(victim))
        if fail == "stop":
            return float(self.cluster.hang(victim))
        if fail == "linkdown":
            return float(self.cluster.link_down(victim))
        if fail == "service":
            at = time.monotonic()
            self.services[victim].kill()  # by PID: the echo server this lab started
            self.services[victim].wait(timeout=5)
            return at
        return float(self.cluster.partition(victim, "both"))

    def recover(self, victim: int) -> None:
        fail = self.args.fail
        if fail == "kill":
            self.cluster.start(victim)
        elif fail == "stop":
            self.cluster.resume(victim)
        elif fail == "linkdown":
            self.cluster.link_up(victim)
        elif fail == "service":
            self.services[victim] = self.bed.start_echo(
                nodes=[victim], addrs=[self.bed.vip4, "127.0.0.1"]
            )[0]
        else:
            self.cluster.heal(victim)

    def teardown(self) -> None:
        for part in (self.load, self.capture):
            if part is not None:
                with contextlib.suppress(Exception):  # teardown must go on
                    part.stop()
        if self.cluster is not None:
            self.cluster.stop_all()
        if self.bed is not None:
            self.bed.teardown()


class ConfiguredCluster(LbdCluster):
    """The harness's cluster with ``text`` (TOML: the MAC mode, the echo service's
    check) added to every node's config, also when a node is started again."""

    def __init__(self, bed: Bed, workdir: Path, text: str, **kw: Any) -> None:
        super().__init__(bed, workdir, **kw)
        self.text = text

    def config(self, index: int, **extra: str) -> Path:
        path = super().config(index, **extra)
        body, timers = path.read_text().split("\n[timers]", 1)
        path.write_text(body + self.text + "\n[timers]" + timers)
        return path


def render(figures: dict[str, Any]) -> str:
    ok = (
        figures["duplicate_synacks"]
        + figures["duplicate_udp_answers"]
        + figures["duplicate_udp_answers_client"]
        + figures["broken_connections"]
    ) == 0
    return "\n".join(
        [
            "",
            f"lbd lab result ({figures['nodes']} nodes, {figures['profile']} timers, "
            f"{figures['fail']} {figures['victim']}; {figures['network']}, mac_mode "
            f"{figures['mac_mode']}):",
            f"  new connections served  {figures['served_pct']} % of {figures['tcp_attempts']}",
            f"  client-visible outage   {figures['outage_ms']} ms for the "
            f"{figures['affected_sources']} affected client sources "
            f"(all served again after {figures['served_again_ms']} ms)",
            f"  absorbed by             {', '.join(sorted(figures['absorbed_by']))}",
            f"  duplicate answers       {figures['duplicate_synacks']} SYN|ACK, "
            f"{figures['duplicate_udp_answers']} UDP (of {figures['captured']['synacks']} "
            f"and {figures['captured']['udp_answers']} captured)",
            f"  broken connections      {figures['broken_connections']} on nodes that stayed up"
            f" ({figures['long_lived_connections']} long-lived)",
            f"  rejoin                  agreed after {figures['rejoin_agreed_ms']} ms",
            f"  verdict                 {'OK' if ok else 'VIOLATION'}",
            *(
                [
                    f"  hint                    {figures['served_pct']} % served: "
                    "the switch learnt the shared MAC on one port; try --mac-mode flood"
                ]
                if figures["mac_mode"] == "shared"
                and figures["network"] != "hub"
                and figures["served_pct"] < 90
                else []
            ),
        ]
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lbd lab",
        description="a live lbd cluster in network namespaces, one failure, measured",
    )
    parser.add_argument("--nodes", type=int, default=3, choices=range(2, 17), metavar="2..16")
    parser.add_argument("--fail", choices=FAULTS, default="kill")
    parser.add_argument("--profile", choices=("default", "fast"), default="default")
    parser.add_argument(
        "--switch", action="store_true", help="an ordinary learning switch instead of a hub"
    )
    parser.add_argument(
        "--mac-mode",
        choices=MAC_MODES,
        default=DEFAULT_MAC_MODE,
        help=f"the daemons' mac_mode (default {DEFAULT_MAC_MODE})",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lbd lab: needs root (it builds network namespaces)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="lbd-lab-work-"))
    lab = None
    try:
        lab = Lab(args, workdir)
        figures = lab.run()
    except KeyboardInterrupt:
        print("lbd lab: interrupted, tearing down", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # report it, tear down, exit 1
        print(f"lbd lab: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if lab is not None:
            lab.teardown()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures, indent=2, sort_keys=True) if args.json else render(figures))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
