"""The metrics renderer: format, naming, figures, and its cost (no kernel, no sockets).

Snapshots come from the simulator (a real core, through ``snapshot.take``) and, for a
large cluster, from a synthetic snapshot; every exposition is parsed back with the
strict parser of test_metrics_parse.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from test_metrics_parse import Family, parse

from lbd.daemon import ctl, metrics, snapshot
from lbd.daemon.ctl import format_status
from lbd.daemon.effects import EffectsMixin
from lbd.daemon.snapshot import APPLY_BUCKETS, Tally
from lbd.protocol.membership import Node
from lbd.testbed import clustersim

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-lbd.json"
REQUIRED = (
    "lbd_up", "lbd_build_info", "lbd_members", "lbd_member", "lbd_member_healthy",
    "lbd_member_unhealthy", "lbd_healthy", "lbd_slices_owned", "lbd_quorum",
    "lbd_lease_remaining_seconds", "lbd_heartbeats_sent_total",
    "lbd_heartbeats_received_total", "lbd_datagrams_dropped_total",
    "lbd_view_changes_total", "lbd_slices_gained_total", "lbd_slices_released_total",
    "lbd_members_lost_total", "lbd_kernel_apply_duration_seconds", "lbd_check_healthy",
)  # fmt: skip


class SimService:
    """What ``snapshot.take`` reads of a Service, around a simulated node's core."""

    def __init__(self, cluster: clustersim.Cluster, name: str) -> None:
        node = cluster.nodes[name]
        assert node.core is not None
        self.core: Node = node.core
        self.node_id = name
        self.address = name
        self.ready = True
        self.started_at = 0.0
        self.keyring = cluster.keyring
        self.tally = Tally()
        self.tally.record([event for _, event in node.events])
        for seconds in (0.0003, 0.002, 0.02, 2.0):
            self.tally.applied(seconds)
        self._nft = None
        self.hbfilter = None
        self.healthlink = None
        self.drain_reasons: set[str] = set()

    def problems(self, now: float) -> list[str]:
        return self.core.problems(now)

    def kernel_stats(self) -> dict[str, Any]:
        return EffectsMixin.kernel_stats(self)  # type: ignore[arg-type]


def sim_snapshot(cluster: clustersim.Cluster, name: str) -> dict[str, Any]:
    service: Any = SimService(cluster, name)  # duck-typed: what take() reads
    return snapshot.take(service, cluster.nodes[name].local(cluster.now))


@pytest.fixture(scope="module")
def three() -> clustersim.Cluster:
    return clustersim.start(3, seed=7)


def synthetic(n: int, buckets: int = 4096) -> dict[str, Any]:
    """A snapshot of node0 in a converged cluster of ``n``, with checks and an agent."""
    states = ["active"] * n
    if n > 3:
        states[1], states[2], states[3] = "suspect", "draining", "dead"
    rows: list[dict[str, Any]] = [
        {
            "node_id": f"node{i}",
            "wire_id": f"{i:08x}",
            "address": f"192.0.2.{i + 1}",
            "state": states[i],
            "slices": buckets // n,
            "share": 100 / n,
            "weight": 100,
            "last_heard_ms": None if i == 0 else 40 + i,
            "incarnation": 1000 + i,
            "is_self": i == 0,
            "key": "ab" * 8,
            "mismatch": [],
            "health": "unhealthy: check, agent" if i == 2 else "ok",
        }
        for i in range(n)
    ]
    tally = Tally(slices_gained=buckets // n + 7, slices_released=3, members_lost=1)
    for seconds in (0.0004, 0.0009, 0.006, 0.03):
        tally.applied(seconds)
    return {
        "node_id": "node0",
        "wire_id": "00000000",
        "incarnation": 1000,
        "address": "192.0.2.1",
        "view": "0a1b2c3d",
        "view_members": [r["node_id"] for r in rows],
        "converged": True,
        "quorum": True,
        "quorum_mode": "majority",
        "lease_remaining_ms": 1250,
        "slices": buckets // n,
        "buckets": buckets,
        "draining": False,
        "weight": 100,
        "ready": True,
        "uptime_s": 12.5,
        "started_at_unix": 1.8e9,
        "build": snapshot.build_info(),
        "counters": {
            "accepted": 900,
            "malformed": 1,
            "forged": 2,
            "replayed": 3,
            "own_echo": 0,
            "sent": 450,
            "view_changes": 4,
            "mismatched": 0,
            "foreign_version": 0,
            "refused": 0,
            "copies": 5,
            "second_process": 0,
        },
        "events": tally.events(),
        "members": rows,
        "problems": [],
        "keys": {"seals": "ab" * 8, "accepts": ["ab" * 8]},
        "kernel": {
            "applies": tally.applies,
            "mean_apply_ms": 9.3,
            "last_apply_ms": 30.0,
            "max_apply_ms": 30.0,
            "apply_seconds": tally.histogram(),
            "claim_pending": 0,
            "deadline_checked": True,
        },
        "heartbeat_filter": {"foreign": 6, "badlen": 7, "passed": 950},
        "drain_reasons": [],
        "health": {
            "healthy": True,
            "reasons": [],
            "serving_anyway": False,
            "weight": 100,
            "checks": [
                {
                    "name": "web",
                    "kind": "http",
                    "state": "healthy",
                    "result": "pass",
                    "reason": "200",
                    "latency_ms": 3.2,
                    "output": "",
                    "since": 0.0,
                    "passes": 5,
                    "fails": 0,
                    "rise": 2,
                    "fall": 2,
                },
                {
                    "name": "eth1",
                    "kind": "interface",
                    "state": "up",
                    "result": None,
                    "reason": "",
                    "latency_ms": None,
                    "output": "",
                    "since": 0.0,
                },
                {
                    "name": "agent",
                    "kind": "agent tcp",
                    "state": "up",
                    "result": "pass",
                    "reason": "75%",
                    "latency_ms": 1.0,
                    "output": "",
                    "since": 0.0,
                    "capacity": 75,
                    "weight": 75,
                },
            ],
        },
    }


def check_naming(families: dict[str, Family]) -> None:
    """Prometheus' rules as this project applies them."""
    for name, family in families.items():
        assert name.startswith("lbd_"), name
        assert family.help.strip(), name
        assert not re.search(r"_(ms|milliseconds|percent|minutes|bytes_total_bytes)(_|$)", name), (
            f"{name}: use base units"
        )
        assert (family.type == "counter") == name.endswith("_total"), name
        if family.type == "counter":
            for _, labels, value in family.samples:
                assert "state" not in labels, f"{name}: a state label on a counter"
                assert value >= 0 and value == int(value), (name, value)
    for _, labels, _ in families["lbd_member"].samples:
        assert set(labels) == {"node", "address", "state", "is_self"}


def test_three_node_snapshot_renders_strictly_and_by_the_rules(three: clustersim.Cluster) -> None:
    s = sim_snapshot(three, "n0")
    families = parse(metrics.render(s))
    check_naming(families)
    missing = [name for name in REQUIRED if name not in families]
    assert not missing, missing
    assert families["lbd_up"].value() == 1
    assert families["lbd_slices_owned"].value() == s["slices"] > 0
    assert families["lbd_members"].value(state="active") == 3
    assert families["lbd_members"].value(state="dead") == 0
    assert sum(v for _, _, v in families["lbd_member_slices"].samples) == s["buckets"]
    assert families["lbd_quorum"].value() == 1
    assert families["lbd_lease_remaining_seconds"].value() == s["lease_remaining_ms"] / 1000
    assert families["lbd_heartbeats_sent_total"].value() == s["counters"]["sent"] > 0
    assert families["lbd_heartbeats_received_total"].value() == s["counters"]["accepted"]
    assert families["lbd_view_changes_total"].value() == s["counters"]["view_changes"]
    assert families["lbd_slices_gained_total"].value() == s["slices"]  # all from the start
    hist = families["lbd_kernel_apply_duration_seconds"]
    assert hist.value(le="+Inf") == 4 and hist.value(le="0.0005") == 1
    assert hist.value(le="1.0") == 3  # the 2 s apply is in +Inf only


def test_a_failover_shows_in_the_survivors_tallies() -> None:
    """Crash one of three: the survivors' gained slices add up to the dead node's."""
    cluster = clustersim.start(3, seed=11)
    before = {n: sim_snapshot(cluster, n) for n in ("n0", "n1", "n2")}
    cluster.crash("n2")
    clustersim.settle(cluster)
    for name in ("n0", "n1"):
        after = sim_snapshot(cluster, name)
        families = parse(metrics.render(after))
        assert families["lbd_members_lost_total"].value() == 1
        assert families["lbd_members"].value(state="active") == 2
        assert families["lbd_member"].value(node="n2", address="n2", state="dead", is_self="0") == 1
        assert families["lbd_view_changes_total"].value() > before[name]["counters"]["view_changes"]
        assert families["lbd_slices_released_total"].value() == 0
    gained = sum(
        sim_snapshot(cluster, n)["events"]["slices_gained"] - before[n]["events"]["slices_gained"]
        for n in ("n0", "n1")
    )
    assert gained == before["n2"]["slices"] > 0


def test_every_figure_of_a_large_snapshot() -> None:
    s = synthetic(64)
    families = parse(metrics.render(s))
    check_naming(families)
    expected: list[tuple[str, dict[str, str], float]] = [
        ("lbd_members", {"state": "active"}, 61),
        ("lbd_members", {"state": "suspect"}, 1),
        ("lbd_member_healthy", {"node": "node2"}, 0),
        ("lbd_member_unhealthy", {"node": "node2", "reason": "check"}, 1),
        ("lbd_member_unhealthy", {"node": "node2", "reason": "interface"}, 0),
        ("lbd_member_last_heard_seconds", {"node": "node5"}, 0.045),
        ("lbd_datagrams_dropped_total", {"reason": "forged"}, 2),
        ("lbd_datagrams_dropped_total", {"reason": "copy"}, 5),
        ("lbd_filter_datagrams_dropped_total", {"reason": "badlen"}, 7),
        ("lbd_check_healthy", {"check": "web", "kind": "http"}, 1),
        ("lbd_check_latency_seconds", {"check": "web", "kind": "http"}, 0.0032),
        ("lbd_interface_up", {"interface": "eth1"}, 1),
        ("lbd_agent_state", {"state": "up"}, 1),
        ("lbd_agent_capacity_ratio", {}, 0.75),
    ]
    for name, labels, value in expected:
        assert families[name].value(**labels) == value, (name, labels)
    assert families["lbd_build_info"].value(**snapshot.build_info()) == 1
    hist = families["lbd_kernel_apply_duration_seconds"]
    assert [lab["le"] for _, lab, _ in hist.samples[:-2]] == [
        *(repr(b) for b in APPLY_BUCKETS),
        "+Inf",
    ]
    assert hist.value(le="0.001") == 2 and hist.value(le="+Inf") == 4


def test_label_values_are_escaped() -> None:
    s = synthetic(3)
    odd = 'we"ird\\name\nwith newline'
    s["members"][1]["node_id"] = odd
    s["drain_reasons"] = ['kernel: VIP "192.0.2.9" gone']
    families = parse(metrics.render(s))
    assert families["lbd_member_slices"].value(node=odd) == s["members"][1]["slices"]
    assert families["lbd_drain_reason"].value(reason='kernel: VIP "192.0.2.9" gone') == 1


def test_no_lease_and_no_health_render_too() -> None:
    s = synthetic(2)
    s.update(lease_remaining_ms=None, health=None, heartbeat_filter={}, quorum=False)
    families = parse(metrics.render(s))
    assert families["lbd_lease_remaining_seconds"].value() == 0
    assert families["lbd_healthy"].value() == 1
    assert families["lbd_quorum"].value() == 0
    assert not families["lbd_check_healthy"].samples


def test_status_text_comes_from_the_same_snapshot() -> None:
    s = synthetic(3)
    text = format_status(s)
    assert (
        f"changes     4 view changes; slices gained {s['events']['slices_gained']}, "
        "released 3; members lost 1"
    ) in text.splitlines()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "4 applies" in text


def test_tally_histogram_bounds() -> None:
    tally = Tally()
    for seconds in (APPLY_BUCKETS[0], APPLY_BUCKETS[-1], 10.0):
        tally.applied(seconds)
    hist = tally.histogram()
    assert hist["counts"][0] == 1 and hist["counts"][-1] == 2 and hist["count"] == 3


def _cost(render: Any, repeat: int = 50) -> float:
    """Median seconds of ``render()``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        render()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def test_scrape_cost(three: clustersim.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    """Snapshot plus rendering at 3 nodes (a real core) and rendering at 64 (synthetic).

    Bounds are loose (a shared 2-core machine); the figures go to the README."""
    service: Any = SimService(three, "n0")
    now = three.nodes["n0"].local(three.now)
    small = _cost(lambda: metrics.render(snapshot.take(service, now)))
    big_snapshot = synthetic(64)
    big = _cost(lambda: metrics.render(big_snapshot))
    size = len(metrics.render(big_snapshot).encode())
    with capsys.disabled():
        print(
            f"\nscrape cost: N=3 take+render {small * 1e3:.3f} ms; "
            f"N=64 render {big * 1e3:.3f} ms, {size} bytes"
        )
    assert small < 0.02 and big < 0.05


def test_grafana_dashboard_is_valid_json_on_our_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 3
    known = set(parse(metrics.render(synthetic(4))))
    for expr in exprs:
        names = set(re.findall(r"\blbd_[a-z_]+", expr))
        assert names, expr
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, f"{name} in {expr!r} is not exported"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for word in ("share", "members", "failover"):
        assert word in titles, word


def test_lbd_cli_metrics_prints_the_text_as_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = metrics.render(synthetic(3))
    asked: list[dict[str, Any]] = []

    def answer(path: str, payload: dict[str, Any]) -> str:
        asked.append(payload)
        return text

    monkeypatch.setattr(ctl, "request", answer)
    assert ctl.main(["--socket", "/nonexistent", "metrics"]) == 0
    assert asked == [{"cmd": "metrics"}]
    assert capsys.readouterr().out == text
