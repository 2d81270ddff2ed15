"""The soak's faults: the kinds, how each is injected, held and healed, and the
bounded waits for the cluster to agree again (``Stuck`` when it does not).

Also the cluster the faults act on (``SoakCluster``) and the journal that stamps
the daemons' log lines on the faults' clock. The runner is ``soak.py``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbd.daemon.ctl import CtlError, request
from lbd.daemon.notify import decode_journal
from lbd.testbed.bed import Bed
from lbd.testbed.cluster import CONVERGE_TIMEOUT, LbdCluster
from lbd.testbed.sink import DatagramSink

KINDS = (
    "crash",
    "hang",
    "link_flap",
    "partition_both",
    "partition_out",
    "partition_in",
    "vip_removed",
    "nft_flush",
    "restart",
    "leave",
    "join",
    "drain",
)
DOWN_KINDS = frozenset(
    {
        "crash",
        "hang",
        "link_flap",
        "partition_both",
        "partition_out",
        "partition_in",
        "restart",
        "leave",
    }
)
"""Faults that take their node out of the cluster for a while (quorum accounting)."""
AWAY_KINDS = frozenset(
    {"crash", "link_flap", "partition_both", "partition_out", "partition_in", "restart", "leave"}
)
"""A long-lived connection on a node hit by one of these during its life is not a
survivor's (S3 covers nodes that stay up; a restart is a leave, which removes the VIP;
a link flap is a host death). A hang, VIP removal, table flush or drain must break
nothing: a connection broken on such a node counts as a survivor's."""
HOLD = (0.2, 2.0)
SETTLE = 0.5  # after the cluster agrees again, before the fault's window ends
POLL = 0.05
VIP_BACK_TIMEOUT = 10.0
FLAP_HOLD_EXTRA = 35.0  # kernelwatch.FLAP_HOLD (30 s) + margin: a flapping node waits it out


class Stuck(Exception):
    """The cluster did not agree again within the bound."""


class Journal(DatagramSink):
    """The daemons' log entries, sent as native journal datagrams to a socket of ours
    (``LBD_JOURNAL_SOCKET``) and stamped with CLOCK_MONOTONIC on arrival, so that they
    line up with the faults and the capture. An entry the daemon cannot queue goes to
    its stderr instead (kept in the bed's log of that process)."""

    def __init__(self, path: Path) -> None:
        self.entries: list[tuple[float, str, str]] = []  # (time, node, message)
        super().__init__(path)  # starts the reading thread: entries must exist

    def take(self, arrived: float, data: bytes) -> None:
        try:
            fields = decode_journal(data)
        except (ValueError, IndexError):
            return
        self.entries.append(
            (
                arrived,
                fields.get("NODE", b"?").decode(errors="replace"),
                fields.get("MESSAGE", b"").decode(errors="replace"),
            )
        )

    def tail(self, node: str, count: int = 40) -> list[str]:
        return [f"{t:.3f} {m}" for t, n, m in self.entries if n == node][-count:]


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
        return {
            "kind": self.kind,
            "node": self.node,
            "t_s": round(self.at - t0, 3),
            "segment": self.segment,
            "hold_s": self.hold_s,
            "healed_t_s": round(self.healed - t0, 3) if self.healed else None,
            "absorbed_ms": self.absorbed_ms,
            "agreed_ms": self.agreed_ms,
            "restored_ms": self.restored_ms,
            "notes": self.notes,
            **self.figures,
        }


class Injector:
    """The fault half of ``soak.Soak``: choosing, injecting and healing faults, and
    waiting for agreement. The run's state it works on is set up by ``Soak``."""

    args: Any
    rng: random.Random
    bed: Bed | None
    cluster: SoakCluster | None
    journal: Journal | None
    left: set[int]  # nodes that left (down until a join)
    deck: list[str]
    faults: list[Fault]
    segment_faults: list[Fault]
    segment: int
    kernel_history: dict[tuple[int, str], list[float]]
    stuck: list[dict[str, Any]]
    flap_holds: int
    t0: float

    @property
    def everyone(self) -> list[int]:
        return list(range(self.args.nodes))

    def up(self) -> list[int]:
        return [i for i in self.everyone if i not in self.left]

    def name(self, index: int) -> str:
        assert self.bed is not None
        return self.bed.nodes[index].name

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
        return all(
            (slices.get(self.cluster.node_id(i), 0) > 0) == holds for i, holds in want.items()
        )

    def wait_agreed(
        self,
        fault: Fault,
        members: list[int] | None = None,
        want: dict[int, bool] | None = None,
        what: str = "",
    ) -> float:
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
                raise Stuck(
                    f"{fault.kind} node{fault.node}: {what or 'agreement'} not "
                    f"reached in {now - start:.1f} s"
                )
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
            states[f"node{index}"] = {
                "status": self.cluster.query(index, "status"),
                "members": self.cluster.query(index, "members"),
                "log_tail": self.cluster.log(index)[-3000:],
                "journal_tail": (
                    self.journal.tail(self.cluster.node_id(index)) if self.journal else []
                ),
            }
        self.stuck.append(
            {
                "fault": fault.kind,
                "node": fault.node,
                "t_s": round(fault.at - self.t0, 3),
                "what": what,
                "states": states,
            }
        )

    def node_run(self, index: int, *argv: str, check: bool = True) -> str:
        assert self.bed is not None
        return self.bed.run(self.name(index), *argv, check=check).stdout

    # ------------------------------------------------------------ choosing faults

    def allowed(self, kind: str) -> bool:
        if kind == "join":
            return bool(self.left)
        if kind in DOWN_KINDS:
            return bool(len(self.left) + 1 <= (self.args.nodes - 1) // 2)
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
            fresh = [
                i
                for i in candidates
                if len([t for t in self.kernel_history.get((i, key), []) if now - t < 60.0]) < 2
            ]
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
            self.wait_agreed(
                fault,
                want={**{i: True for i in others}, index: False},
                what="the drained node to hold no slice",
            )
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
            out = self.node_run(index, "ip", "-4", "-o", "addr", "show", "dev", "eth0", check=False)
            if f" {self.bed.vip4}/32 " in out:
                return round((time.monotonic() - fault.at) * 1000, 1)
            time.sleep(0.02)
        fault.notes.append(f"VIP not back within {VIP_BACK_TIMEOUT:.0f} s")
        return None

    def tables(self, index: int) -> set[str]:
        out = self.node_run(index, "nft", "list", "tables", check=False)
        return {
            line.strip() for line in out.splitlines() if line.strip() and "lbdfault" not in line
        }
