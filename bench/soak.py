"""Soak: a random fault schedule on real daemons in namespaces, under client load.

    .venv/bin/python bench/soak.py [--duration 600] [--seed N] [--nodes 3]
                                   [--profile fast|default] [--segment 120]
                                   [--gap 0.5,3.0] [--kinds crash,hang,...] [--json]
                                   [--out FILE] [--logs DIR]

One hub bed (tests/netns/bed.py) with N real daemons, echo services on the VIP and the
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
client-visible outage (lbd.daemon.lab_metrics.outage: the longest gap between
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
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from netns.bed import Bed, BedError  # noqa: E402
from netns.cluster import CONVERGE_TIMEOUT, Capture, ClientLoad, LbdCluster  # noqa: E402

from lbd.daemon import lab_metrics as metrics  # noqa: E402
from lbd.daemon.ctl import CtlError, request  # noqa: E402
from lbd.daemon.lab_pcap import DuplicateReport  # noqa: E402
from lbd.daemon.notify import decode_journal  # noqa: E402

KINDS = ("crash", "hang", "link_flap", "partition_both", "partition_out", "partition_in",
         "vip_removed", "nft_flush", "restart", "leave", "join", "drain")
DOWN_KINDS = frozenset({"crash", "hang", "link_flap", "partition_both", "partition_out",
                        "partition_in", "restart", "leave"})
"""Faults that take their node out of the cluster for a while (quorum accounting)."""
AWAY_KINDS = frozenset({"crash", "link_flap", "partition_both", "partition_out",
                        "partition_in", "restart", "leave"})
"""A long-lived connection on a node hit by one of these during its life is not a
survivor's (S3 covers nodes that stay up; a restart is a leave, which removes the VIP;
a link flap is a host death). A hang, VIP removal, table flush or drain must break
nothing: a connection broken on such a node counts as a survivor's."""
HOLD = (0.2, 2.0)
SETTLE = 0.5  # after the cluster agrees again, before the fault's window ends
LOAD_SETTLE = 1.0
POLL = 0.05
VIP_BACK_TIMEOUT = 10.0
FLAP_HOLD_EXTRA = 35.0  # kernelwatch.FLAP_HOLD (30 s) + margin: a flapping node waits it out
MAX_SEGMENT = 500.0  # lab_load stops by itself after 600 s
EXIT_OK, EXIT_VIOLATION, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class Stuck(Exception):
    """The cluster did not agree again within the bound."""


class Journal:
    """The daemons' log entries, sent as native journal datagrams to a socket of ours
    (``LBD_JOURNAL_SOCKET``) and stamped with CLOCK_MONOTONIC on arrival, so that they
    line up with the faults and the capture. An entry the daemon cannot queue goes to
    its stderr instead (kept in the bed's log of that process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.entries: list[tuple[float, str, str]] = []  # (time, node, message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            try:
                fields = decode_journal(data)
            except (ValueError, IndexError):
                continue
            self.entries.append((now, fields.get("NODE", b"?").decode(errors="replace"),
                                 fields.get("MESSAGE", b"").decode(errors="replace")))

    def tail(self, node: str, count: int = 40) -> list[str]:
        return [f"{t:.3f} {m}" for t, n, m in self.entries if n == node][-count:]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class SoakCluster(LbdCluster):
    """LbdCluster asking the daemons in-process (no lbd-cli process per query, which
    would load the 2-core machine during every wait) and keeping every daemon it
    started, for the logs."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.started: list[tuple[int, Any]] = []
        self.killed: set[int] = set()  # PIDs SIGKILLed on purpose

    journal: Journal | None = None

    def start(self, index: int, **kw: Any) -> Any:
        if self.journal is not None:
            kw["env"] = {**kw.get("env", {}), "LBD_JOURNAL_SOCKET": str(self.journal.path)}
        proc = super().start(index, **kw)
        self.started.append((index, proc))
        return proc

    def crash(self, index: int) -> float:
        self.killed.add(self.procs[index].pid)
        return super().crash(index)

    def query(self, index: int, cmd: str, *args: str) -> Any:
        try:
            return request(str(self.sock(index)), {"cmd": cmd}, timeout=1.0)
        except CtlError:
            return None


@dataclass
class Fault:
    """One injected fault and what was measured of it."""

    kind: str
    node: int
    at: float  # monotonic time of the injection
    segment: int
    hold_s: float | None = None
    healed: float = 0.0  # monotonic time of the heal (resume, link up, start...)
    end: float = 0.0  # the cluster agreed again (+ SETTLE): the fault's window ends
    absorbed_ms: float | None = None  # the others agreed on a view without it
    agreed_ms: float | None = None  # after the heal, all agreed again
    restored_ms: float | None = None  # vip_removed: the VIP back on eth0
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def row(self, t0: float) -> dict[str, Any]:
        return {"kind": self.kind, "node": self.node, "t_s": round(self.at - t0, 3),
                "segment": self.segment, "hold_s": self.hold_s,
                "healed_t_s": round(self.healed - t0, 3) if self.healed else None,
                "absorbed_ms": self.absorbed_ms, "agreed_ms": self.agreed_ms,
                "restored_ms": self.restored_ms, "notes": self.notes, **self.figures}


class Soak:
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

    @property
    def everyone(self) -> list[int]:
        return list(range(self.args.nodes))

    def up(self) -> list[int]:
        return [i for i in self.everyone if i not in self.left]

    def name(self, index: int) -> str:
        assert self.bed is not None
        return self.bed.nodes[index].name

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:7.1f}s] {text}", file=sys.stderr, flush=True)

    def hold(self) -> float:
        return round(self.rng.uniform(*HOLD), 3)

    def sleep_polling(self, seconds: float, survivors: list[int], fault: Fault) -> None:
        """Sleep ``seconds``; meanwhile note when ``survivors`` agree without the node."""
        assert self.cluster is not None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if fault.absorbed_ms is None and self.cluster.converged(survivors) is not None:
                fault.absorbed_ms = round((time.monotonic() - fault.at) * 1000, 1)
            time.sleep(max(0.0, min(POLL, end - time.monotonic())))

    def agreed(self, members: list[int], want: dict[int, bool]) -> bool:
        """``members`` agree on a view of exactly them; ``want``: node -> holds slices?"""
        assert self.cluster is not None
        slices = self.cluster.converged(members)
        if slices is None:
            return False
        return all((slices.get(self.cluster.node_id(i), 0) > 0) == holds
                   for i, holds in want.items())

    def wait_agreed(self, fault: Fault, members: list[int] | None = None,
                    want: dict[int, bool] | None = None, what: str = "") -> float:
        """Bounded wait for agreement; a node in a kernelwatch flap hold gets the hold's
        time too. Returns the time waited (s); raises Stuck after recording it."""
        members = self.up() if members is None else members
        want = {i: True for i in members} if want is None else want
        start = time.monotonic()
        deadline = start + CONVERGE_TIMEOUT
        extended = False
        while True:
            if self.agreed(members, want):
                return time.monotonic() - start
            now = time.monotonic()
            if now >= deadline:
                if not extended and self.flap_hold(members):
                    extended = True
                    self.flap_holds += 1
                    fault.notes.append("kernelwatch flap hold: waited it out")
                    deadline = now + FLAP_HOLD_EXTRA
                    continue
                self.record_stuck(fault, members, what)
                raise Stuck(f"{fault.kind} node{fault.node}: {what or 'agreement'} not "
                            f"reached in {now - start:.1f} s")
            time.sleep(POLL)

    def flap_hold(self, members: list[int]) -> bool:
        """A member drains because a kernel fault came back too often (kernelwatch)."""
        assert self.cluster is not None
        for index in members:
            status = self.cluster.query(index, "status") or {}
            problems = status.get("problems") or []
            if any("times in" in str(p) for p in problems):
                return True
        return False

    def record_stuck(self, fault: Fault, members: list[int], what: str) -> None:
        assert self.cluster is not None
        states = {}
        for index in members:
            states[f"node{index}"] = {"status": self.cluster.query(index, "status"),
                                      "members": self.cluster.query(index, "members"),
                                      "log_tail": self.cluster.log(index)[-3000:],
                                      "journal_tail": (self.journal.tail(
                                          self.cluster.node_id(index))
                                          if self.journal else [])}
        self.stuck.append({"fault": fault.kind, "node": fault.node,
                           "t_s": round(fault.at - self.t0, 3), "what": what,
                           "states": states})

    def node_run(self, index: int, *argv: str, check: bool = True) -> str:
        assert self.bed is not None
        return self.bed.run(self.name(index), *argv, check=check).stdout

    # ------------------------------------------------------------ choosing faults

    def allowed(self, kind: str) -> bool:
        if kind == "join":
            return bool(self.left)
        if kind in DOWN_KINDS:
            return len(self.left) + 1 <= (self.args.nodes - 1) // 2
        return True

    def next_kind(self) -> str:
        for _ in range(3):  # a fresh deck always holds an allowed kind
            for position, kind in enumerate(self.deck):
                if self.allowed(kind):
                    del self.deck[position]
                    return kind
            fresh = list(self.args.kinds)
            self.rng.shuffle(fresh)
            self.deck += fresh
        raise RuntimeError(f"no fault kind allowed (left: {self.left}, deck: {self.deck})")

    def victim(self, kind: str) -> int:
        if kind == "join":
            return self.rng.choice(sorted(self.left))
        candidates = self.up()
        key = {"vip_removed": "vip", "link_flap": "link"}.get(kind)
        if key is not None:  # kernelwatch holds a drain after 3 faults in 60 s: spread them
            now = time.monotonic()
            fresh = [i for i in candidates if len([t for t in self.kernel_history.get(
                (i, key), []) if now - t < 60.0]) < 2]
            candidates = fresh or candidates
        return self.rng.choice(candidates)

    # ------------------------------------------------------------ faults

    def inject(self, kind: str, index: int) -> Fault:
        """Inject, hold, heal, and wait until the cluster agrees again (bounded)."""
        assert self.cluster is not None and self.bed is not None
        cluster = self.cluster
        others = [i for i in self.up() if i != index]
        fault = Fault(kind, index, time.monotonic(), self.segment)
        self.faults.append(fault)
        self.segment_faults.append(fault)
        if kind in ("vip_removed", "link_flap"):
            key = "vip" if kind == "vip_removed" else "link"
            self.kernel_history.setdefault((index, key), []).append(fault.at)
        if kind == "crash":
            fault.hold_s = self.hold()
            fault.at = cluster.crash(index)
            self.sleep_polling(fault.hold_s, others, fault)
            cluster.start(index)
        elif kind == "hang":
            fault.hold_s = self.hold()
            fault.at = cluster.hang(index)
            self.sleep_polling(fault.hold_s, others, fault)
            cluster.resume(index)
        elif kind == "link_flap":
            fault.hold_s = self.hold()
            fault.at = cluster.link_down(index)
            self.sleep_polling(fault.hold_s, others, fault)
            cluster.link_up(index)
        elif kind.startswith("partition_"):
            fault.hold_s = self.hold()
            fault.at = cluster.partition(index, kind.removeprefix("partition_"))
            self.sleep_polling(fault.hold_s, others, fault)
            cluster.heal(index)
        elif kind == "vip_removed":
            assert self.bed is not None
            fault.at = time.monotonic()
            self.node_run(index, "ip", "addr", "del", f"{self.bed.vip4}/32", "dev", "eth0")
            fault.restored_ms = self.wait_vip(index, fault)
        elif kind == "nft_flush":
            before = self.tables(index)
            fault.at = time.monotonic()
            self.node_run(index, "nft", "flush", "ruleset")
            time.sleep(0.2)
            missing = sorted(before - self.tables(index))
            if missing:
                fault.notes.append(f"tables gone after the flush: {missing}")
        elif kind in ("restart", "leave"):
            fault.at = time.monotonic()
            code = cluster.terminate(index)
            if code != 0:
                fault.notes.append(f"SIGTERM exit code {code}")
            if kind == "restart":
                cluster.start(index)
            else:
                self.left.add(index)
        elif kind == "join":
            fault.at = time.monotonic()
            self.left.discard(index)
            cluster.start(index)
        elif kind == "drain":
            fault.hold_s = self.hold()
            fault.at = time.monotonic()
            out = cluster.cli(index, "drain")
            if out.returncode != 0:
                fault.notes.append(f"lbd-cli drain exited {out.returncode}: {out.stderr}")
            self.wait_agreed(fault, want={**{i: True for i in others}, index: False},
                             what="the drained node to hold no slice")
            fault.absorbed_ms = round((time.monotonic() - fault.at) * 1000, 1)
            time.sleep(fault.hold_s)
            out = cluster.cli(index, "undrain")
            if out.returncode != 0:
                fault.notes.append(f"lbd-cli undrain exited {out.returncode}: {out.stderr}")
        else:
            raise ValueError(kind)
        healed = fault.healed = time.monotonic()
        waited = self.wait_agreed(fault, what="every running node to agree and serve")
        fault.agreed_ms = round(waited * 1000, 1)
        if kind == "leave" and fault.absorbed_ms is None:
            fault.absorbed_ms = round((healed + waited - fault.at) * 1000, 1)
        time.sleep(SETTLE)
        fault.end = time.monotonic()
        return fault

    def wait_vip(self, index: int, fault: Fault) -> float | None:
        """Bounded wait for the daemon to put the VIP back; ms, or None (noted)."""
        assert self.bed is not None
        deadline = fault.at + VIP_BACK_TIMEOUT
        while time.monotonic() < deadline:
            out = self.node_run(index, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
                                check=False)
            if f" {self.bed.vip4}/32 " in out:
                return round((time.monotonic() - fault.at) * 1000, 1)
            time.sleep(0.02)
        fault.notes.append(f"VIP not back within {VIP_BACK_TIMEOUT:.0f} s")
        return None

    def tables(self, index: int) -> set[str]:
        out = self.node_run(index, "nft", "list", "tables", check=False)
        return {line.strip() for line in out.splitlines()
                if line.strip() and "lbdfault" not in line}

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

    def account(self, record: dict[str, Any], report: DuplicateReport) -> None:
        """Add one segment's record and capture to the sums; per-fault figures."""
        summary = metrics.summary(record)
        self.sums.update({
            "syns": report.syns, "synacks": report.synacks,
            "udp_queries_captured": report.udp_queries,
            "udp_answers_captured": report.udp_answers,
            "duplicate_synacks": report.duplicate_synacks,
            "duplicate_udp_answers": report.duplicate_udp_answers,
            "duplicate_udp_client": metrics.udp_duplicates(record),
            "failed": metrics.failures(record), "long_lived": len(record["conns"]),
            **{k: summary[k] for k in ("tcp_attempts", "tcp_ok", "udp_queries",
                                       "udp_answered")}})
        self.examples += report.examples[: max(0, 10 - len(self.examples))]
        self.sums["duplicates"] += (report.duplicates + metrics.udp_duplicates(record))
        for text in report.examples:
            found = re.search(r" at ([0-9.]+)$", text)
            if found:
                self.duplicate_rows.append(self.place(float(found[1]) - self.wall_offset,
                                                      {"capture": text}))
        for row in record["udp"]:
            if len(row[metrics.NAME]) > 1:
                self.duplicate_rows.append(self.place(row[metrics.START], {
                    "client_udp": record["sources"][row[metrics.SOURCE]],
                    "answered_by": row[metrics.NAME]}))
        for conn in metrics.broken(record):
            row = {**conn, "segment": self.segment, "t_s": round(conn["broken_at"] - self.t0, 3)}
            cause = self.away_fault(conn["node"], conn["opened_at"], conn["broken_at"])
            if cause is None:
                self.broken["survivors"].append(row)
            else:
                self.broken["faulted"].append({**row, "fault": cause.kind,
                                               "fault_t_s": round(cause.at - self.t0, 3)})
        conns = {c["source"]: c for c in record["conns"]}
        for addr, port, when in report.resets:
            conn = conns.get(addr)
            if conn is None:
                continue  # a short connection's close-time artefact (README)
            if self.away_fault(conn["node"], conn["opened_at"], when) is None:
                self.resets.append({"source": addr, "port": port, "node": conn["node"],
                                    "t_s": round(when - self.t0, 3)})
            else:
                self.sums["resets_faulted"] += 1
        self.fault_figures(record)

    def place(self, when: float, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with its time and the fault whose window holds it (or the last one
        before it), for reading it next to the daemons' logs."""
        row["t_s"] = round(when - self.t0, 3)
        before = [f for f in self.faults if f.at <= when]
        if before:
            f = before[-1]
            row["fault"] = (f"{f.kind} node{f.node} at t_s {f.at - self.t0:.3f}, healed "
                            f"{(f.healed - self.t0) if f.healed else float('nan'):.3f}, "
                            f"window ends {(f.end - self.t0) if f.end else float('nan'):.3f}")
        return row

    def away_fault(self, node: str, opened: float, broken: float) -> Fault | None:
        """The fault that took ``node`` away during [opened, broken], if any."""
        for fault in self.segment_faults:
            if (fault.kind in AWAY_KINDS and self.name(fault.node) == node
                    and fault.at <= broken and (fault.end or float("inf")) >= opened):
                return fault
        return None

    def fault_figures(self, record: dict[str, Any]) -> None:
        previous_end = self.segment_started
        for fault in self.segment_faults:
            end = fault.end or time.monotonic()
            lookback = max(0.1, min(1.0, fault.at - previous_end))
            name = self.name(fault.node)
            if fault.kind == "join":
                sources = {s for s, n in metrics.owners_at(record, end).items() if n == name}
                gap = sources_gap(record, sources, fault.at - lookback, end)
                figures: dict[str, Any] = {"affected_sources": len(sources),
                                           "outage_ms": gap, "unserved_sources": 0}
            else:
                found = metrics.outage(record, fault.at, name, horizon=end - fault.at,
                                       lookback=lookback)
                figures = {"affected_sources": found["affected_sources"],
                           "outage_ms": found["outage_ms"],
                           "served_again_ms": found["served_again_ms"],
                           "unserved_sources": len(found["unserved_sources"])}
            figures["failed"] = metrics.failures(record, since=fault.at, until=end)
            fault.figures = figures
            previous_end = end

    # ------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        args = self.args
        self.began = time.monotonic()
        self.bed = Bed(f"lbdt-soak{secrets.token_hex(2)}-", nodes=args.nodes,
                       add_vip=False)
        self.bed.build()
        self.cluster = SoakCluster(self.bed, self.workdir / "cluster", profile=args.profile)
        self.journal = self.cluster.journal = Journal(self.workdir / "journal.sock")
        self.cluster.start_all()
        self.cluster.wait_converged(self.everyone, what="the cluster to form")
        self.bed.start_echo(addrs=[self.bed.vip4])
        self.start_segment()
        began = self.t0 = time.monotonic()
        self.say(f"bed {self.bed.prefix} up, {args.nodes} nodes, {args.profile} timers, "
                 f"seed {args.seed}: soaking for {args.duration:.0f} s")
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

    def daemon_errors(self) -> list[dict[str, Any]]:
        """Daemons that exited other than by SIGTERM (code 0) or our SIGKILL, and
        tracebacks in any daemon's output."""
        assert self.cluster is not None and self.bed is not None
        found = []
        for index, proc in self.cluster.started:
            code = proc.poll()
            log = self.bed.output(proc)
            if code not in (0, None) and proc.pid not in self.cluster.killed:
                found.append({"node": index, "pid": proc.pid, "exit": code,
                              "log_tail": log[-1500:]})
            if "Traceback" in log:
                at = log.index("Traceback")
                found.append({"node": index, "pid": proc.pid, "exit": code,
                              "traceback": log[at:at + 3000]})
        return found

    def rotate(self) -> None:
        """A new load and capture segment, with every node up when possible."""
        for index in sorted(self.left):
            self.say(describe(self.inject("join", index)) + " (before a new segment)")
        self.end_segment()
        self.start_segment()
        self.say(f"segment {self.segment} started")

    def report(self, elapsed: float, aborted: str | None) -> dict[str, Any]:
        t = self.sums
        per_kind: dict[str, Any] = {}
        for kind in KINDS:
            rows = [f for f in self.faults if f.kind == kind]
            outages = [f.figures["outage_ms"] for f in rows
                       if f.figures.get("outage_ms") is not None]
            agreed = [f.agreed_ms for f in rows if f.agreed_ms is not None]
            per_kind[kind] = {
                "count": len(rows),
                "worst_outage_ms": max(outages, default=None),
                "median_outage_ms": (round(statistics.median(outages), 1)
                                     if outages else None),
                "worst_agreed_ms": max(agreed, default=None),
                "failed": sum(f.figures.get("failed", 0) for f in rows),
                "unserved_sources": sum(f.figures.get("unserved_sources", 0) for f in rows),
            }
        duplicates = t["duplicate_synacks"] + t["duplicate_udp_answers"] + t["duplicate_udp_client"]
        violations = []
        if duplicates:
            violations.append(f"{duplicates} duplicate answers: {self.examples}")
        if self.broken["survivors"]:
            violations.append(f"{len(self.broken['survivors'])} long-lived connections broken on "
                              "nodes that stayed up")
        if self.resets:
            violations.append(f"{len(self.resets)} RSTs to long-lived connections on "
                              "nodes that stayed up")
        if aborted:
            violations.append(f"stuck: {aborted}")
        if self.harness_error:
            violations.append(f"harness error (run cut short): {self.harness_error}")
        errors = self.daemon_errors()
        if errors:
            violations.append(f"{len(errors)} daemon exits or tracebacks")
        return {
            "benchmark": "soak",
            "bed": self.bed.prefix if self.bed else None,
            "nodes": self.args.nodes,
            "profile": self.args.profile,
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "elapsed_s": round(elapsed, 1),
            "segments": self.segment,
            "faults": {kind: per_kind[kind]["count"] for kind in KINDS},
            "faults_total": len(self.faults),
            "per_kind": per_kind,
            "duplicates": {"synack_capture": t["duplicate_synacks"],
                           "udp_capture": t["duplicate_udp_answers"],
                           "udp_client": t["duplicate_udp_client"],
                           "total": duplicates, "examples": self.examples,
                           "placed": self.duplicate_rows},
            "broken": {"on_survivors": len(self.broken["survivors"]),
                       "on_faulted_nodes": len(self.broken["faulted"]),
                       "long_lived": t["long_lived"], **self.broken},
            "resets_to_long_lived": {"on_survivors": len(self.resets),
                                     "on_faulted_nodes": t["resets_faulted"],
                                     "survivors": self.resets},
            "new_connections": {k: t[k] for k in ("tcp_attempts", "tcp_ok", "failed",
                                                  "udp_queries", "udp_answered")},
            "captured": {"syns": t["syns"], "synacks": t["synacks"],
                         "udp_queries": t["udp_queries_captured"],
                         "udp_answers": t["udp_answers_captured"]},
            "flap_holds": self.flap_holds,
            "harness_error": self.harness_error,
            "daemons_started": len(self.cluster.started) if self.cluster else 0,
            "daemon_errors": errors,
            "evidence": self.evidence,
            "stuck": self.stuck,
            "events": [f.row(self.t0) for f in self.faults],
            "violations": violations,
            "ok": not violations,
        }

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
        lines = [(t, f"{n:<6} {m}") for t, n, m in (self.journal.entries if self.journal
                                                      else [])]
        for f in self.faults:
            lines.append((f.at, f"SOAK   {f.kind} node{f.node} injected"))
            if f.healed:
                lines.append((f.healed, f"SOAK   {f.kind} node{f.node} healed"))
            if f.end:
                lines.append((f.end, f"SOAK   {f.kind} node{f.node} window ends (agreed "
                                     f"{f.agreed_ms} ms after the heal, +{SETTLE} s)"))
        (target / "timeline.log").write_text("".join(
            f"{t - self.t0:10.3f} {text}\n" for t, text in sorted(lines)))

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


def sources_gap(record: dict[str, Any], sources: set[int], since: float,
                until: float) -> float | None:
    """The longest gap (ms) between successes from ``sources`` in [since, until]."""
    times = sorted(r[metrics.END] for r in metrics.successes(record)
                   if r[metrics.SOURCE] in sources and since <= r[metrics.END] <= until)
    if len(times) < 2:
        return None
    return round(max(b - a for a, b in itertools.pairwise(times)) * 1000, 1)


def describe(fault: Fault) -> str:
    """One progress line per fault."""
    parts = [f"{fault.kind:<14} node{fault.node}"]
    if fault.hold_s is not None:
        parts.append(f"held {fault.hold_s:.2f} s")
    if fault.absorbed_ms is not None:
        parts.append(f"others agreed without it after {fault.absorbed_ms:.0f} ms")
    if fault.restored_ms is not None:
        parts.append(f"VIP back after {fault.restored_ms:.0f} ms")
    if fault.agreed_ms is not None:
        parts.append(f"all agreed {fault.agreed_ms:.0f} ms after the heal")
    return ", ".join(parts) + (f" ({'; '.join(fault.notes)})" if fault.notes else "")


def render(report: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    lines = [f"soak: {report['nodes']} nodes, {report['profile']} timers, seed "
             f"{report['seed']}, {report['elapsed_s']:.0f} s of faults "
             f"({report['segments']} load segments)", "",
             f"  {'fault':<15}{'count':>6}{'worst outage':>14}{'median':>10}"
             f"{'agreed (max)':>14}{'failed':>8}{'unserved':>10}"]
    for kind, row in report["per_kind"].items():
        lines.append(f"  {kind:<15}{row['count']:>6}{ms(row['worst_outage_ms']):>14}"
                     f"{ms(row['median_outage_ms']):>10}{ms(row['worst_agreed_ms']):>14}"
                     f"{row['failed']:>8}{row['unserved_sources']:>10}")
    d, b, n = report["duplicates"], report["broken"], report["new_connections"]
    r = report["resets_to_long_lived"]
    share = 100 * n["failed"] / n["tcp_attempts"] if n["tcp_attempts"] else 0.0
    lines += ["",
              f"  duplicate answers    {d['synack_capture']} SYN|ACK, {d['udp_capture']} UDP "
              f"(capture: {report['captured']['synacks']} SYN|ACKs, "
              f"{report['captured']['udp_answers']} UDP answers), {d['udp_client']} UDP "
              "(client)",
              f"  broken long-lived    {b['on_survivors']} on nodes that stayed up "
              f"({b['on_faulted_nodes']} on nodes crashed/partitioned/flapped/left, "
              f"of {b['long_lived']}); RSTs on survivors {r['on_survivors']}",
              f"  failed new conns     {n['failed']} of {n['tcp_attempts']} ({share:.2f} %)",
              f"  flap holds waited    {report['flap_holds']}",
              f"  verdict              {'OK' if report['ok'] else 'VIOLATION'}"]
    lines += [f"    - {v}" for v in report["violations"]]
    return "\n".join(lines)


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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of faults (default 600)")
    parser.add_argument("--seed", type=int, default=None, help="default: random (reported)")
    parser.add_argument("--nodes", type=int, default=3, choices=range(3, 9), metavar="3..8")
    parser.add_argument("--profile", choices=("fast", "default"), default="fast")
    parser.add_argument("--segment", type=float, default=120.0,
                        help="seconds per load/capture segment (default 120)")
    parser.add_argument("--gap", type=parse_gap, default=(0.5, 3.0),
                        help="MIN,MAX seconds between faults (default 0.5,3.0)")
    parser.add_argument("--kinds", type=parse_kinds, default=KINDS,
                        help="comma-separated fault kinds (default: all; leave and join "
                             "go together)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--logs", type=Path, help="keep every daemon's log here (on a "
                        "violation they are kept anyway, in a new /tmp directory)")
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
        code = (EXIT_ERROR if report["harness_error"] else
                EXIT_OK if report["ok"] else EXIT_VIOLATION)
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
