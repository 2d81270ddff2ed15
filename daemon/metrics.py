"""The Prometheus text exposition format (0.0.4) of one daemon snapshot.

``render(snapshot)`` turns the dict of ``snapshot.take`` (the one ``lbd-cli status``
prints) into the text that ``lbd-cli metrics`` prints and ``metrics_listen`` serves
at ``/metrics``. Written here rather than with a metrics library: the format is a
few lines of text, the figures already live in the snapshot, and the Debian package
then depends on Debian 12's own packages only.

Naming follows Prometheus' rules: every metric starts with ``lbd_``; base units
(seconds, ratios); counters end in ``_total``; a state is never a label of a
counter: states are gauges (``lbd_members{state="active"} 2``, ``lbd_member{node=
"a",state="active"} 1``). Every family has HELP and TYPE lines; label values are
escaped (backslash, double quote, newline).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MEMBER_STATES = ("joining", "active", "draining", "suspect", "dead", "left", "leaving",
                 "duplicate-id", "mismatch")  # fmt: skip
"""Every state a ``lbd-cli members`` row can be in (peers.PeerState, the node's own)."""
HEALTH_REASONS = ("check", "interface", "agent")
"""Why a member says it is unhealthy (messages.HEALTH_*)."""
DROP_REASONS = {
    "malformed": "malformed", "forged": "forged", "replayed": "replayed",
    "foreign_version": "foreign_version", "mismatched": "mismatched",
    "refused": "refused", "second_process": "second_process", "copies": "copy",
    "own_echo": "own_echo",
}  # fmt: skip
"""Core counter -> the ``reason`` label of lbd_datagrams_dropped_total."""
EVENT_COUNTERS = (
    ("slices_gained", "lbd_slices_gained_total",
     "Slices this node claimed (after a failover, a leave or a drain elsewhere)."),
    ("slices_released", "lbd_slices_released_total",
     "Slices this node handed over (a join, a drain or a weight change)."),
    ("members_lost", "lbd_members_lost_total",
     "Peers declared dead: each is a failover of their slices to the survivors."),
    ("members_joined", "lbd_members_joined_total", "Peers that joined."),
    ("members_left", "lbd_members_left_total", "Peers that left gracefully."),
    ("quorum_losses", "lbd_quorum_losses_total", "Times this node lost its quorum."),
    ("lease_lapses", "lbd_lease_lapses_total", "Times this node's kernel lease lapsed."),
)  # fmt: skip
AGENT_STATES = ("up", "drain", "down")

Labels = dict[str, str]
Sample = tuple[str, Labels, float]


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Families in order, each with its HELP and TYPE line and its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {escape_help(text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            self.lines.append(f"{sample}{_labels(labels)} {format_value(value)}")

    def one(
        self, name: str, kind: str, text: str, value: float, labels: Labels | None = None
    ) -> None:
        self.family(name, kind, text, [(name, labels or {}, value)])

    def per(self, name: str, kind: str, text: str, rows: Iterable[tuple[Labels, float]]) -> None:
        self.family(name, kind, text, [(name, labels, value) for labels, value in rows])

    def histogram(self, name: str, text: str, hist: dict[str, Any]) -> None:
        samples: list[Sample] = [
            (f"{name}_bucket", {"le": format_value(float(le))}, count)
            for le, count in zip(hist["le"], hist["counts"], strict=True)
        ]
        samples += [
            (f"{name}_bucket", {"le": "+Inf"}, hist["count"]),
            (f"{name}_sum", {}, float(hist["sum"])),
            (f"{name}_count", {}, hist["count"]),
        ]
        self.family(name, "histogram", text, samples)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(s: dict[str, Any]) -> str:
    """The exposition of one snapshot (``snapshot.take``)."""
    out = Exposition()
    _node(out, s)
    _members(out, s)
    _traffic(out, s)
    _kernel(out, s)
    _health(out, s)
    return out.text()


def _node(out: Exposition, s: dict[str, Any]) -> None:
    out.one("lbd_up", "gauge", "1: the daemon answered this scrape.", 1)
    out.one("lbd_build_info", "gauge", "The running lbd's version (value 1).", 1, dict(s["build"]))
    out.one(
        "lbd_node_info",
        "gauge",
        "This node's name, wire ID and address (value 1).",
        1,
        {
            "node": s["node_id"],
            "wire_id": s["wire_id"],
            "address": s["address"],
            "quorum_mode": s["quorum_mode"],
        },
    )
    out.one(
        "lbd_start_time_seconds",
        "gauge",
        "Start of the daemon, Unix time.",
        float(s["started_at_unix"]),
    )
    out.one("lbd_incarnation", "gauge", "This run's incarnation number.", s["incarnation"])
    out.one("lbd_ready", "gauge", "1 once the node first agreed a view.", bool(s["ready"]))
    out.one(
        "lbd_converged",
        "gauge",
        "1 while every live peer agrees on this node's view.",
        bool(s["converged"]),
    )
    out.one(
        "lbd_quorum",
        "gauge",
        "1 while the node hears a quorum of its agreed view.",
        bool(s["quorum"]),
    )
    lease = s["lease_remaining_ms"]
    out.one(
        "lbd_lease_remaining_seconds",
        "gauge",
        "Seconds left on the kernel lease (0: no lease, the node accepts nothing new).",
        0.0 if lease is None else lease / 1000,
    )
    out.one(
        "lbd_slices_owned", "gauge", "Slices (buckets) this node holds in the kernel.", s["slices"]
    )
    out.one("lbd_buckets", "gauge", "Slices (buckets) of the cluster (the setting).", s["buckets"])
    out.one("lbd_weight", "gauge", "This node's effective weight.", s["weight"])
    out.one(
        "lbd_draining",
        "gauge",
        "1 while the node drains (takes no NEW connections).",
        bool(s["draining"]),
    )
    out.per(
        "lbd_drain_reason",
        "gauge",
        "Why the node drains, one series per reason (value 1).",
        [({"reason": r}, 1) for r in s["drain_reasons"]],
    )
    out.one(
        "lbd_view_members", "gauge", "Members of this node's current view.", len(s["view_members"])
    )
    out.one(
        "lbd_problems",
        "gauge",
        "Problems lbd-cli status lists (PROBLEM lines).",
        len(s["problems"]),
    )


def _health_words(text: str) -> set[str]:
    """ "ok" or "unhealthy: check, agent" (messages.health_words) -> {"check", "agent"}."""
    if not text.startswith("unhealthy:"):
        return set()
    return {word.strip() for word in text.split(":", 1)[1].split(",")}


def _members(out: Exposition, s: dict[str, Any]) -> None:
    rows = s["members"]
    counts = dict.fromkeys(MEMBER_STATES, 0)
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    out.per(
        "lbd_members",
        "gauge",
        "Known nodes (this one included) by state.",
        [({"state": state}, n) for state, n in counts.items()],
    )
    out.per(
        "lbd_member",
        "gauge",
        "One series per known node with its state (value 1).",
        [
            (
                {
                    "node": r["node_id"],
                    "address": str(r["address"]),
                    "state": r["state"],
                    "is_self": "1" if r["is_self"] else "0",
                },
                1,
            )
            for r in rows
        ],
    )
    out.per(
        "lbd_member_slices",
        "gauge",
        "Slices each member holds, as it last said (0 outside the view).",
        [({"node": r["node_id"]}, r["slices"]) for r in rows],
    )
    out.per(
        "lbd_member_share_ratio",
        "gauge",
        "Each member's share of the slices (0..1).",
        [({"node": r["node_id"]}, round(r["share"] / 100, 6)) for r in rows],
    )
    out.per(
        "lbd_member_weight",
        "gauge",
        "Each member's weight, as it last said.",
        [({"node": r["node_id"]}, r["weight"]) for r in rows],
    )
    out.per(
        "lbd_member_last_heard_seconds",
        "gauge",
        "Seconds since each peer was last heard.",
        [
            ({"node": r["node_id"]}, r["last_heard_ms"] / 1000)
            for r in rows
            if not r["is_self"] and r["last_heard_ms"] is not None
        ],
    )
    words = {r["node_id"]: _health_words(r.get("health", "ok")) for r in rows}
    out.per(
        "lbd_member_healthy",
        "gauge",
        "1 if the member says it is healthy (this node: its own checks).",
        [({"node": n}, not w) for n, w in words.items()],
    )
    out.per(
        "lbd_member_unhealthy",
        "gauge",
        "1 for each reason a member is unhealthy (check, interface, agent).",
        [
            ({"node": n, "reason": reason}, reason in w)
            for n, w in words.items()
            for reason in HEALTH_REASONS
        ],
    )


def _traffic(out: Exposition, s: dict[str, Any]) -> None:
    c = s["counters"]
    out.one("lbd_heartbeats_sent_total", "counter", "Heartbeats this node sent.", c["sent"])
    out.one(
        "lbd_heartbeats_received_total",
        "counter",
        "Heartbeats (and leave notices) from peers accepted.",
        c["accepted"],
    )
    out.per(
        "lbd_datagrams_dropped_total",
        "counter",
        "Datagrams the daemon dropped, by reason.",
        [({"reason": reason}, c[key]) for key, reason in DROP_REASONS.items()],
    )
    f = s.get("heartbeat_filter") or {}
    out.per(
        "lbd_filter_datagrams_dropped_total",
        "counter",
        "Datagrams to the heartbeat port the kernel filter dropped, by reason "
        "(foreign source, bad length).",
        [({"reason": reason}, f[reason]) for reason in ("foreign", "badlen") if reason in f],
    )
    out.per(
        "lbd_filter_datagrams_passed_total",
        "counter",
        "Datagrams to the heartbeat port the kernel filter let through.",
        [({}, f["passed"])] if "passed" in f else [],
    )
    out.one("lbd_view_changes_total", "counter", "Views this node moved to.", c["view_changes"])
    events = s["events"]
    for key, name, text in EVENT_COUNTERS:
        out.one(name, "counter", text, events[key])


def _kernel(out: Exposition, s: dict[str, Any]) -> None:
    k = s["kernel"]
    out.histogram(
        "lbd_kernel_apply_duration_seconds",
        "Time of each kernel transaction (owner set and lease).",
        k["apply_seconds"],
    )
    out.one(
        "lbd_claim_pending_slices",
        "gauge",
        "Slices of a claim still to be added to the kernel (big claims go in parts).",
        k["claim_pending"],
    )


def _health(out: Exposition, s: dict[str, Any]) -> None:
    h = s.get("health")
    rows = h["checks"] if h else []
    checks = [
        r for r in rows if r["kind"] not in ("interface",) and not r["kind"].startswith("agent")
    ]
    out.one(
        "lbd_healthy",
        "gauge",
        "1 if this node's checks, tracked interfaces and agent "
        "say healthy (1 when none is configured).",
        bool(h["healthy"]) if h else True,
    )
    out.one(
        "lbd_serving_anyway",
        "gauge",
        '1 while every member is unhealthy and this one serves anyway (all_unhealthy = "serve").',
        bool(h and h["serving_anyway"]),
    )
    key = [({"check": r["name"], "kind": r["kind"]}, r) for r in checks]
    out.per(
        "lbd_check_healthy",
        "gauge",
        "1 if the check is healthy (after rise/fall).",
        [(labels, r["state"] == "healthy") for labels, r in key],
    )
    out.per(
        "lbd_check_last_passed",
        "gauge",
        "1 if the check's last run passed, 0 if it failed.",
        [(labels, r["result"] == "pass") for labels, r in key if r["result"] is not None],
    )
    out.per(
        "lbd_check_latency_seconds",
        "gauge",
        "How long the check's last run took.",
        [(labels, r["latency_ms"] / 1000) for labels, r in key if r["latency_ms"] is not None],
    )
    out.per(
        "lbd_interface_up",
        "gauge",
        "1 if the tracked interface is up with carrier.",
        [({"interface": r["name"]}, r["state"] == "up") for r in rows if r["kind"] == "interface"],
    )
    agent = [r for r in rows if r["kind"].startswith("agent")]
    out.per(
        "lbd_agent_state",
        "gauge",
        "What the load agent last said (value 1 for it).",
        [({"state": st}, r["state"] == st) for r in agent for st in AGENT_STATES],
    )
    out.per(
        "lbd_agent_capacity_ratio",
        "gauge",
        "The load agent's capacity (0..1).",
        [({}, r["capacity"] / 100) for r in agent if r.get("capacity") is not None],
    )
