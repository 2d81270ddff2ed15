"""What a soak run measures and reports: each load segment's client record and
capture summed up, per-fault figures (outage, agreement, failures), the report
and the table printed from it. The runner is ``soak.py``.
"""

from __future__ import annotations

import itertools
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from lbd.testbed import metrics
from lbd.testbed.bed import Bed
from lbd.testbed.pcap import DuplicateReport
from lbd.testbed.soak_faults import AWAY_KINDS, KINDS, Fault, SoakCluster


class Accounting:
    """The figures half of ``soak.Soak``: what each segment and fault adds to the
    report. The run's state it works on is set up by ``Soak``; ``name(index)`` is
    the ``Injector``'s."""

    args: Any
    bed: Bed | None
    cluster: SoakCluster | None
    faults: list[Fault]
    segment_faults: list[Fault]
    segment: int
    segment_started: float
    sums: Counter[str]
    examples: list[str]
    broken: dict[str, list[dict[str, Any]]]
    resets: list[dict[str, Any]]
    duplicate_rows: list[dict[str, Any]]
    evidence: list[str]
    wall_offset: float
    stuck: list[dict[str, Any]]
    flap_holds: int
    harness_error: str | None
    t0: float
    name: Callable[[int], str]  # SoakCluster.name

    def account(self, record: dict[str, Any], report: DuplicateReport) -> None:
        """Add one segment's record and capture to the sums; per-fault figures."""
        summary = metrics.summary(record)
        self.sums.update(
            {
                "syns": report.syns,
                "synacks": report.synacks,
                "udp_queries_captured": report.udp_queries,
                "udp_answers_captured": report.udp_answers,
                "duplicate_synacks": report.duplicate_synacks,
                "duplicate_udp_answers": report.duplicate_udp_answers,
                "duplicate_udp_client": metrics.udp_duplicates(record),
                "failed": metrics.failures(record),
                "long_lived": len(record["conns"]),
                **{
                    k: summary[k] for k in ("tcp_attempts", "tcp_ok", "udp_queries", "udp_answered")
                },
            }
        )
        self.examples += report.examples[: max(0, 10 - len(self.examples))]
        self.sums["duplicates"] += report.duplicates + metrics.udp_duplicates(record)
        for text in report.examples:
            found = re.search(r" at ([0-9.]+)$", text)
            if found:
                self.duplicate_rows.append(
                    self.place(float(found[1]) - self.wall_offset, {"capture": text})
                )
        for row in record["udp"]:
            if len(row[metrics.NAME]) > 1:
                self.duplicate_rows.append(
                    self.place(
                        row[metrics.START],
                        {
                            "client_udp": record["sources"][row[metrics.SOURCE]],
                            "answered_by": row[metrics.NAME],
                        },
                    )
                )
        for conn in metrics.broken(record):
            row = {**conn, "segment": self.segment, "t_s": round(conn["broken_at"] - self.t0, 3)}
            cause = self.away_fault(conn["node"], conn["opened_at"], conn["broken_at"])
            if cause is None:
                self.broken["survivors"].append(row)
            else:
                self.broken["faulted"].append(
                    {**row, "fault": cause.kind, "fault_t_s": round(cause.at - self.t0, 3)}
                )
        conns = {c["source"]: c for c in record["conns"]}
        for addr, port, when in report.resets:
            reset = conns.get(addr)
            if reset is None:
                continue  # a short connection's close-time artefact (README)
            if self.away_fault(reset["node"], reset["opened_at"], when) is None:
                self.resets.append(
                    {
                        "source": addr,
                        "port": port,
                        "node": reset["node"],
                        "t_s": round(when - self.t0, 3),
                    }
                )
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
            row["fault"] = (
                f"{f.kind} node{f.node} at t_s {f.at - self.t0:.3f}, healed "
                f"{(f.healed - self.t0) if f.healed else float('nan'):.3f}, "
                f"window ends {(f.end - self.t0) if f.end else float('nan'):.3f}"
            )
        return row

    def away_fault(self, node: str, opened: float, broken: float) -> Fault | None:
        """The fault that took ``node`` away during [opened, broken], if any."""
        for fault in self.segment_faults:
            if (
                fault.kind in AWAY_KINDS
                and self.name(fault.node) == node
                and fault.at <= broken
                and (fault.end or float("inf")) >= opened
            ):
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
                figures: dict[str, Any] = {
                    "affected_sources": len(sources),
                    "outage_ms": gap,
                    "unserved_sources": 0,
                }
            else:
                found = metrics.outage(
                    record, fault.at, name, horizon=end - fault.at, lookback=lookback
                )
                figures = {
                    "affected_sources": found["affected_sources"],
                    "outage_ms": found["outage_ms"],
                    "served_again_ms": found["served_again_ms"],
                    "unserved_sources": len(found["unserved_sources"]),
                }
            figures["failed"] = metrics.failures(record, since=fault.at, until=end)
            fault.figures = figures
            previous_end = end

    def daemon_errors(self) -> list[dict[str, Any]]:
        """Daemons that exited other than by SIGTERM (code 0) or our SIGKILL, and
        tracebacks in any daemon's output."""
        assert self.cluster is not None and self.bed is not None
        found = []
        for index, proc in self.cluster.started:
            code = proc.poll()
            log = self.bed.output(proc)
            if code not in (0, None) and proc.pid not in self.cluster.killed:
                found.append(
                    {"node": index, "pid": proc.pid, "exit": code, "log_tail": log[-1500:]}
                )
            if "Traceback" in log:
                at = log.index("Traceback")
                found.append(
                    {"node": index, "pid": proc.pid, "exit": code, "traceback": log[at : at + 3000]}
                )
        return found

    def report(self, elapsed: float, aborted: str | None) -> dict[str, Any]:
        t = self.sums
        per_kind: dict[str, Any] = {}
        for kind in KINDS:
            rows = [f for f in self.faults if f.kind == kind]
            outages = [
                f.figures["outage_ms"] for f in rows if f.figures.get("outage_ms") is not None
            ]
            agreed = [f.agreed_ms for f in rows if f.agreed_ms is not None]
            per_kind[kind] = {
                "count": len(rows),
                "worst_outage_ms": max(outages, default=None),
                "median_outage_ms": (round(statistics.median(outages), 1) if outages else None),
                "worst_agreed_ms": max(agreed, default=None),
                "failed": sum(f.figures.get("failed", 0) for f in rows),
                "unserved_sources": sum(f.figures.get("unserved_sources", 0) for f in rows),
            }
        duplicates = t["duplicate_synacks"] + t["duplicate_udp_answers"] + t["duplicate_udp_client"]
        violations = []
        if duplicates:
            violations.append(f"{duplicates} duplicate answers: {self.examples}")
        if self.broken["survivors"]:
            violations.append(
                f"{len(self.broken['survivors'])} long-lived connections broken on "
                "nodes that stayed up"
            )
        if self.resets:
            violations.append(
                f"{len(self.resets)} RSTs to long-lived connections on nodes that stayed up"
            )
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
            "duplicates": {
                "synack_capture": t["duplicate_synacks"],
                "udp_capture": t["duplicate_udp_answers"],
                "udp_client": t["duplicate_udp_client"],
                "total": duplicates,
                "examples": self.examples,
                "placed": self.duplicate_rows,
            },
            "broken": {
                "on_survivors": len(self.broken["survivors"]),
                "on_faulted_nodes": len(self.broken["faulted"]),
                "long_lived": t["long_lived"],
                **self.broken,
            },
            "resets_to_long_lived": {
                "on_survivors": len(self.resets),
                "on_faulted_nodes": t["resets_faulted"],
                "survivors": self.resets,
            },
            "new_connections": {
                k: t[k] for k in ("tcp_attempts", "tcp_ok", "failed", "udp_queries", "udp_answered")
            },
            "captured": {
                "syns": t["syns"],
                "synacks": t["synacks"],
                "udp_queries": t["udp_queries_captured"],
                "udp_answers": t["udp_answers_captured"],
            },
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


def sources_gap(
    record: dict[str, Any], sources: set[int], since: float, until: float
) -> float | None:
    """The longest gap (ms) between successes from ``sources`` in [since, until]."""
    times = sorted(
        r[metrics.END]
        for r in metrics.successes(record)
        if r[metrics.SOURCE] in sources and since <= r[metrics.END] <= until
    )
    if len(times) < 2:
        return None
    return round(float(max(b - a for a, b in itertools.pairwise(times))) * 1000, 1)


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

    lines = [
        f"soak: {report['nodes']} nodes, {report['profile']} timers, seed "
        f"{report['seed']}, {report['elapsed_s']:.0f} s of faults "
        f"({report['segments']} load segments)",
        "",
        f"  {'fault':<15}{'count':>6}{'worst outage':>14}{'median':>10}"
        f"{'agreed (max)':>14}{'failed':>8}{'unserved':>10}",
    ]
    for kind, row in report["per_kind"].items():
        lines.append(
            f"  {kind:<15}{row['count']:>6}{ms(row['worst_outage_ms']):>14}"
            f"{ms(row['median_outage_ms']):>10}{ms(row['worst_agreed_ms']):>14}"
            f"{row['failed']:>8}{row['unserved_sources']:>10}"
        )
    d, b, n = report["duplicates"], report["broken"], report["new_connections"]
    r = report["resets_to_long_lived"]
    share = 100 * n["failed"] / n["tcp_attempts"] if n["tcp_attempts"] else 0.0
    lines += [
        "",
        f"  duplicate answers    {d['synack_capture']} SYN|ACK, {d['udp_capture']} UDP "
        f"(capture: {report['captured']['synacks']} SYN|ACKs, "
        f"{report['captured']['udp_answers']} UDP answers), {d['udp_client']} UDP "
        "(client)",
        f"  broken long-lived    {b['on_survivors']} on nodes that stayed up "
        f"({b['on_faulted_nodes']} on nodes crashed/partitioned/flapped/left, "
        f"of {b['long_lived']}); RSTs on survivors {r['on_survivors']}",
        f"  failed new conns     {n['failed']} of {n['tcp_attempts']} ({share:.2f} %)",
        f"  flap holds waited    {report['flap_holds']}",
        f"  verdict              {'OK' if report['ok'] else 'VIOLATION'}",
    ]
    lines += [f"    - {v}" for v in report["violations"]]
    return "\n".join(lines)
