"""Soak: a random fault schedule on real daemons in namespaces, under client load.

    .venv/bin/python bench/soak.py [--duration 600] [--seed N] [--nodes 3]
                                   [--profile fast|default] [--segment 120]
                                   [--gap 0.5,3.0] [--kinds crash,hang,...] [--json]
                                   [--out FILE] [--logs DIR]

One hub bed (lbd.testbed.bed) with N real daemons, echo services on the VIP and the
lab's client load (64 sources, a new TCP connection and a UDP query every 4 ms, one
long-lived connection per node) with a packet capture in the client namespace. For
``--duration`` seconds, faults are injected one at a time, on a random node, after a
random gap; each is healed, then the cluster is waited on (bounded) until every
running daemon agrees on one view in which every running node holds slices:

    crash           SIGKILL, restart after 0.2-2 s
    hang            SIGSTOP, SIGCONT after 0.2-2 s
    link_flap       eth0 down, up after 0.2-2 s (host death and return)
    partition_both  / partition_out / partition_in: its heartbeats dropped (nft, by
                    port) both ways, outbound only or inbound only, for 0.2-2 s
    vip_removed     ``ip addr del VIP/32 dev eth0`` in the node (the daemon puts it back)
    nft_flush       ``nft flush ruleset`` in the node (lbd's tables must survive it)
    restart         SIGTERM, then start
    leave / join    SIGTERM and stay down / start a node that is down
    drain           ``lbd-cli drain``, ``lbd-cli undrain`` after 0.2-2 s

Kinds are drawn from shuffled decks (every kind once per deck, so a short run still
sees most of them); a kind that would take a node down while another is left out is
put back: at most (N-1)//2 nodes are ever down at once (one in a 3-node cluster), so
a quorum always runs. The load and the capture are restarted every ``--segment``
seconds (between faults) so that files stay small; figures are summed over segments.

Reported (JSON with ``--json``, else a table): faults per kind; duplicate answers (two
SYN|ACKs for one SYN or two answers to one UDP query, from the capture, and UDP from
the client); long-lived connections broken on nodes that stayed up (one on a node
that was itself crashed, partitioned, flapped, restarted or left during its life is
counted apart, as ``broken.on_faulted_nodes``; a hang, a VIP removal, a table flush or
a drain must break nothing); RSTs to long-lived connections; failed new connections;
daemon exit codes and tracebacks in their logs; per fault kind the worst and median
client-visible outage (lbd.testbed.metrics.outage: the longest gap between
successful new connections from the sources the affected node served, from the fault
until the cluster agreed again; for a join, the sources the newcomer serves after
it), the time to agree again, and sources never served again. Exit 0 when clean; 1
on any duplicate answer, a broken connection (or RST) on a surviving node, or a
cluster that does not agree again within the bound; 2 on a harness error; 130 when
interrupted. Every exit tears the bed down (processes by PID, then namespaces).

Evidence: the daemons log as native journal datagrams to a socket of the soak, stamped
on arrival with CLOCK_MONOTONIC (the clock of the faults and the client load). With
``--logs DIR`` (or on any failure, in a new /tmp directory) every daemon's output, a
``timeline.log`` (all nodes' log lines and the soak's inject/heal/agreed marks, in
seconds since the faults began) and, for a segment with a duplicate or a broken
connection, its capture and client record are kept; each duplicate is placed in
time (``duplicates.placed``) next to the fault around it.

The faults live in ``soak_faults.py``, the accounting and the report in
``soak_report.py``; this module runs them.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from lbd.testbed.bed import Bed, BedError
from lbd.testbed.cluster import Capture, ClientLoad
from lbd.testbed.soak_faults import (
    KINDS,
    SETTLE,
    Fault,
    Injector,
    Journal,
    SoakCluster,
    Stuck,
)
from lbd.testbed.soak_report import Accounting, describe, render

LOAD_SETTLE = 1.0
MAX_SEGMENT = 500.0  # the load stops by itself after 600 s
EXIT_OK, EXIT_VIOLATION, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class Soak(Injector, Accounting):
    """One soak run; ``run()`` returns the report. ``teardown()`` is always called."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.bed: Bed | None = None
        self.cluster: SoakCluster | None = None
        self.load: ClientLoad | None = None
        self.capture: Capture | None = None
        self.left: set[int] = set()
        self.deck: list[str] = []
        self.faults: list[Fault] = []
        self.segment_faults: list[Fault] = []
        self.segment = 0
        self.segment_started = 0.0
        self.sums: Counter[str] = Counter()  # over segments
        self.examples: list[str] = []  # duplicate answers, a few
        self.broken: dict[str, list[dict[str, Any]]] = {"survivors": [], "faulted": []}
        self.resets: list[dict[str, Any]] = []  # RSTs to long-lived conns on survivors
        self.duplicate_rows: list[dict[str, Any]] = []  # each duplicate, placed in time
        self.evidence: list[str] = []  # captures and load records kept
        self.journal: Journal | None = None
        self.wall_offset = time.time() - time.monotonic()  # pcap times are wall clock
        self.stuck: list[dict[str, Any]] = []
        self.flap_holds = 0
        self.harness_error: str | None = None
        self.kernel_history: dict[tuple[int, str], list[float]] = {}
        self.t0 = 0.0  # the faults' clock starts with the load (event "t_s")
        self.began = time.monotonic()  # progress lines count from the bed's build

    # ------------------------------------------------------------ helpers

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:7.1f}s] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------ segments

    def start_segment(self) -> None:
        assert self.bed is not None
        self.segment += 1
        self.segment_faults = []
        self.capture = Capture(self.bed, self.workdir)
        self.load = ClientLoad(self.bed, self.workdir, long_lived=len(self.up()))
        time.sleep(LOAD_SETTLE)
        self.segment_started = time.monotonic()

    def end_segment(self) -> None:
        assert self.load is not None and self.capture is not None
        record = self.load.stop()
        load_file = self.load.out
        self.load = None
        report = self.capture.stop()
        pcap = self.capture.path
        self.capture = None
        before = (self.sums["duplicates"], len(self.broken["survivors"]), len(self.resets))
        self.account(record, report)
        after = (self.sums["duplicates"], len(self.broken["survivors"]), len(self.resets))
        keep = self.keep_dir() if after != before else None
        for path in (load_file, pcap):
            if keep is not None and path.exists():
                keep.mkdir(parents=True, exist_ok=True)
                target = keep / f"segment{self.segment:02d}-{path.name}"
                shutil.move(path, target)
                self.evidence.append(str(target))
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        args = self.args
        self.began = time.monotonic()
        self.bed = Bed(f"lbdt-soak{secrets.token_hex(2)}-", nodes=args.nodes, add_vip=False)
        self.bed.build()
        self.cluster = SoakCluster(self.bed, self.workdir / "cluster", profile=args.profile)
        self.journal = self.cluster.journal = Journal(self.workdir / "journal.sock")
        self.cluster.start_all()
        self.cluster.wait_converged(self.everyone, what="the cluster to form")
        self.bed.start_echo(addrs=[self.bed.vip4])
        self.start_segment()
        began = self.t0 = time.monotonic()
        self.say(
            f"bed {self.bed.prefix} up, {args.nodes} nodes, {args.profile} timers, "
            f"seed {args.seed}: soaking for {args.duration:.0f} s"
        )
        aborted = None
        try:
            while time.monotonic() - began < args.duration:
                time.sleep(self.rng.uniform(*args.gap))
                if time.monotonic() - self.segment_started >= args.segment:
                    self.rotate()
                kind = self.next_kind()
                fault = self.inject(kind, self.victim(kind))
                self.say(describe(fault))
            for index in sorted(self.left):  # everyone back at the end
                self.say(describe(self.inject("join", index)) + " (end of run)")
        except Stuck as exc:
            aborted = str(exc)
            self.say(f"STUCK: {exc}")
        except (BedError, TimeoutError, subprocess.TimeoutExpired) as exc:
            # The bed's own commands failed: report what was measured so far.
            self.harness_error = f"{type(exc).__name__}: {exc}"
            self.say(f"harness error, stopping: {self.harness_error}")
        elapsed = time.monotonic() - began
        self.end_segment()
        self.cluster.stop_all()
        return self.report(elapsed, aborted)

    def rotate(self) -> None:
        """A new load and capture segment, with every node up when possible."""
        for index in sorted(self.left):
            self.say(describe(self.inject("join", index)) + " (before a new segment)")
        self.end_segment()
        self.start_segment()
        self.say(f"segment {self.segment} started")

    def keep_dir(self) -> Path:
        """Where logs and evidence go: ``--logs``, else a new directory in /tmp."""
        if self.args.logs is None:
            self.args.logs = Path(tempfile.mkdtemp(prefix="lbd-soak-logs-"))
        path: Path = self.args.logs
        return path

    def save_logs(self, target: Path) -> None:
        """Every daemon incarnation's output (cluster.log only keeps the last one's)."""
        if self.cluster is None or self.bed is None:
            return
        target.mkdir(parents=True, exist_ok=True)
        seen: Counter[int] = Counter()
        for index, proc in self.cluster.started:
            seen[index] += 1
            path = target / f"node{index}-{seen[index]:03d}-pid{proc.pid}.log"
            path.write_text(self.bed.output(proc))
        lines = [(t, f"{n:<6} {m}") for t, n, m in (self.journal.entries if self.journal else [])]
        for f in self.faults:
            lines.append((f.at, f"SOAK   {f.kind} node{f.node} injected"))
            if f.healed:
                lines.append((f.healed, f"SOAK   {f.kind} node{f.node} healed"))
            if f.end:
                lines.append(
                    (
                        f.end,
                        f"SOAK   {f.kind} node{f.node} window ends (agreed "
                        f"{f.agreed_ms} ms after the heal, +{SETTLE} s)",
                    )
                )
        (target / "timeline.log").write_text(
            "".join(f"{t - self.t0:10.3f} {text}\n" for t, text in sorted(lines))
        )

    def teardown(self) -> None:
        for part in (self.load, self.capture):
            if part is not None:
                try:
                    part.stop()
                except (BedError, OSError, ValueError) as exc:  # teardown must go on
                    print(f"soak: stopping {type(part).__name__}: {exc}", file=sys.stderr)
        self.load = self.capture = None
        if self.cluster is not None:
            self.cluster.stop_all()
        if self.bed is not None:
            self.bed.teardown()
        if self.journal is not None:
            self.journal.close()
            self.journal = None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_gap(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        pair = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gap wants MIN,MAX seconds, not {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"--gap wants 0 <= MIN <= MAX, not {text!r}")
    return pair


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    if ("leave" in kinds) != ("join" in kinds):
        raise argparse.ArgumentTypeError("leave and join go together")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds of faults (default 600)"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random (reported)")
    parser.add_argument("--nodes", type=int, default=3, choices=range(3, 9), metavar="3..8")
    parser.add_argument("--profile", choices=("fast", "default"), default="fast")
    parser.add_argument(
        "--segment",
        type=float,
        default=120.0,
        help="seconds per load/capture segment (default 120)",
    )
    parser.add_argument(
        "--gap",
        type=parse_gap,
        default=(0.5, 3.0),
        help="MIN,MAX seconds between faults (default 0.5,3.0)",
    )
    parser.add_argument(
        "--kinds",
        type=parse_kinds,
        default=KINDS,
        help="comma-separated fault kinds (default: all; leave and join go together)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep every daemon's log here (on a "
        "violation they are kept anyway, in a new /tmp directory)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    args.segment = min(max(args.segment, 10.0), MAX_SEGMENT)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="lbd-soak-"))
    soak = Soak(args, workdir)
    report: dict[str, Any] | None = None
    code = EXIT_OK
    try:
        report = soak.run()
        code = (
            EXIT_ERROR if report["harness_error"] else EXIT_OK if report["ok"] else EXIT_VIOLATION
        )
    except KeyboardInterrupt:
        print("soak: interrupted, tearing down", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as exc:  # report it, tear down, exit 2
        print(f"soak: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        try:
            logs = soak.keep_dir() if args.logs or code != EXIT_OK else None
            if logs is not None:
                soak.save_logs(logs)
                print(f"soak: daemon logs in {logs}", file=sys.stderr)
                if report is not None:
                    report["logs_dir"] = str(logs)
        finally:
            soak.teardown()
            signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(workdir, ignore_errors=True)
    if report is None:
        return code
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=2) if args.json else render(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
