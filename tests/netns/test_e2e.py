"""End-to-end fault suite: real daemons, real rules, real client load, real failures.

Every scenario runs a 3-node cluster (fast timer profile unless the assertion needs the
default one) under ClientLoad (64 sources, a new TCP connection and a UDP query every
4 ms, one long-lived connection per node) with a packet capture in the client
namespace, and asserts:

* zero duplicate answers: no SYN answered by two nodes, no UDP query answered twice
  (counted in the capture and by the client itself);
* zero broken long-lived connections on nodes that stay up;
* the slices of a failed node served again within the bound (fast profile: failover
  bound ~0.15 s, asserted with slack as ``FAST_OUTAGE_LIMIT``);
* ``lbd-cli members`` converged on every running node afterwards.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lbd.testbed import metrics
from lbd.testbed.bed import Bed, list_netns
from lbd.testbed.cluster import Capture, ClientLoad, LbdCluster, Run, holds_slices
from lbd.testbed.pcap import DuplicateReport

FAST_OUTAGE_LIMIT_MS = 400.0  # fast profile: ~150 ms bound + client sampling + CI noise
DEFAULT_OUTAGE_LIMIT_MS = 1000.0
SETTLE = 1.0


@contextmanager
def cluster_run(
    bed: Callable[..., Bed],
    tmp_path: Path,
    *,
    nodes: int = 3,
    profile: str = "fast",
    start: list[int] | None = None,
    load: bool = True,
    buckets: int = 512,
) -> Iterator[Run]:
    the_bed = bed(nodes=nodes, add_vip=False)
    cluster = LbdCluster(the_bed, tmp_path / "cluster", profile=profile, buckets=buckets)
    run = Run(the_bed, cluster)
    try:
        cluster.start_all(start)
        cluster.wait_converged(what="the cluster to form")
        the_bed.start_echo(addrs=[the_bed.vip4])
        if load:
            run.capture = Capture(the_bed, tmp_path)
            run.load = ClientLoad(the_bed, tmp_path, long_lived=len(start or range(nodes)))
            time.sleep(SETTLE)
        yield run
    finally:
        run.close()


def assert_clean(
    record: dict[str, Any], report: DuplicateReport, down: set[str] | frozenset[str] = frozenset()
) -> None:
    """S1 and S3: no duplicate answers at all, no broken connection on nodes that stayed up."""
    assert report.syns > 100 and report.udp_queries > 100, report
    assert report.duplicates == 0, report
    assert metrics.udp_duplicates(record) == 0
    assert len(record["conns"]) >= 1
    long_lived = {c["source"] for c in record["conns"]}
    assert not [r for r in report.resets if r[0] in long_lived], report.resets
    broken = metrics.broken(record, down)
    assert not broken, broken


def assert_short_gaps(record: dict[str, Any], limit_ms: float = FAST_OUTAGE_LIMIT_MS) -> None:
    """Handoffs are break-before-make: SYNs may go unanswered, briefly."""
    bursts = metrics.failure_bursts(record)
    print("failure bursts (ms):", [round(b * 1000) for b in bursts])
    assert max(bursts, default=0.0) * 1000 <= limit_ms, bursts


def assert_failover(
    record: dict[str, Any], fault: float, node: str, limit_ms: float, sampling_ms: float = 64 * 4.0
) -> dict[str, Any]:
    figures = metrics.outage(record, fault, node)
    print("failover figures:", figures)
    assert figures["affected_sources"] >= 5, figures
    assert not figures["unserved_sources"], figures
    assert figures["outage_ms"] is not None and figures["outage_ms"] <= limit_ms, figures
    assert figures["served_again_ms"] <= limit_ms + sampling_ms, figures
    return figures


def test_crash_sigkill(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        fault = run.cluster.crash(1)
        run.cluster.wait_converged([0, 2], what="survivors to absorb node1")
        time.sleep(SETTLE)
        record, report = run.finish()
        figures = assert_failover(record, fault, run.name(1), FAST_OUTAGE_LIMIT_MS)
        assert set(figures["absorbed_by"]) <= {run.name(0), run.name(2)}, figures
        # The daemon died, not the host: its established connections live on (conntrack).
        assert_clean(record, report)
        run.cluster.start(1)
        run.cluster.wait_converged([0, 1, 2], what="node1 to rejoin")


def test_hang_sigstop_then_rejoin(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        fault = run.cluster.hang(1)
        run.cluster.wait_converged([0, 2], what="survivors to absorb the hung node1")
        time.sleep(SETTLE)  # its lease has long expired in the kernel; it must stay closed
        run.cluster.resume(1)
        run.cluster.wait_converged(
            [0, 1, 2], check=lambda s: s["node1"] > 0, what="node1 to rejoin after SIGCONT"
        )
        time.sleep(SETTLE)
        since = time.monotonic() - SETTLE  # before finish(): slow when loaded
        record, report = run.finish()
        assert_failover(record, fault, run.name(1), FAST_OUTAGE_LIMIT_MS)
        # Only the daemon hung: the node's established connections survive; after SIGCONT
        # it must rejoin through the handoff, never answer SYNs for its old slices at once.
        assert_clean(record, report)
        assert metrics.shares(record, since=since)[run.name(1)] > 0


def test_host_death_link_down(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        fault = run.cluster.link_down(1)
        run.cluster.wait_converged([0, 2], what="survivors to absorb the dead host")
        time.sleep(SETTLE)
        run.cluster.link_up(1)
        run.cluster.wait_converged(
            [0, 1, 2], check=lambda s: s["node1"] > 0, what="node1 to rejoin after link up"
        )
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_failover(record, fault, run.name(1), FAST_OUTAGE_LIMIT_MS)
        assert_clean(record, report, down={run.name(1)})


@pytest.mark.parametrize("direction", ["both", "out"])
def test_heartbeat_partition_of_one_node(
    bed: Callable[..., Bed], tmp_path: Path, direction: str
) -> None:
    """Symmetric, or one-way (peers stop hearing node1; it still hears them)."""
    with cluster_run(bed, tmp_path) as run:
        fault = run.cluster.partition(1, direction)
        run.cluster.wait_converged([0, 2], what="the majority side to absorb node1")
        time.sleep(SETTLE)
        run.cluster.heal(1)
        run.cluster.wait_converged(
            [0, 1, 2],
            check=lambda s: s["node1"] > 0,
            what="node1 to rejoin after the partition heals",
        )
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_failover(record, fault, run.name(1), FAST_OUTAGE_LIMIT_MS)
        assert_clean(record, report)


def test_one_way_partition_inbound_is_safe(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """node1 stops hearing its peers (they still hear it): never two owners, heals."""
    with cluster_run(bed, tmp_path) as run:
        run.cluster.partition(1, "in")
        time.sleep(2 * SETTLE)
        run.cluster.heal(1)
        run.cluster.wait_converged(
            [0, 1, 2],
            check=lambda s: s["node1"] > 0,
            what="node1 to rejoin after the partition heals",
        )
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_clean(record, report)


def test_heartbeat_loss_20_percent_no_flapping(bed: Callable[..., Bed], tmp_path: Path) -> None:
    """Default timers (dead_after = 7 intervals): 20 % loss on every node, no view change."""
    with cluster_run(bed, tmp_path, profile="default") as run:
        before = [run.cluster.view_changes(i) for i in range(3)]
        run.cluster.loss(20)
        time.sleep(10.0)
        after = [run.cluster.view_changes(i) for i in range(3)]
        for index in range(3):
            run.cluster.heal(index)
        record, report = run.finish()
        assert None not in before and before == after, (before, after)
        assert run.cluster.converged([0, 1, 2])
        assert_clean(record, report)
        assert metrics.failures(record) == 0


def test_join_under_load(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path, start=[0, 1]) as run:
        run.cluster.start(2)
        run.cluster.wait_converged([0, 1, 2], check=lambda s: s["node2"] > 0, what="node2 to join")
        joined = time.monotonic()
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_clean(record, report)
        assert metrics.shares(record, since=joined)[run.name(2)] > 0
        assert_short_gaps(record)


def test_graceful_leave_sigterm(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        fault = time.monotonic()
        assert run.cluster.terminate(1) == 0, run.cluster.log(1)
        run.cluster.wait_converged([0, 2], what="survivors to take node1's slices")
        time.sleep(SETTLE)
        record, report = run.finish()
        # A graceful leave hands slices over before closing: (almost) no gap at all.
        figures = assert_failover(record, fault, run.name(1), FAST_OUTAGE_LIMIT_MS)
        print("leave figures:", figures)
        # The leaving node removes the VIP, which ends its own connections (by design).
        assert_clean(record, report, down={run.name(1)})


def test_drain_and_undrain(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        assert run.cluster.cli(1, "drain").returncode == 0
        run.cluster.wait_converged(
            [0, 1, 2], check=lambda s: s["node1"] == 0, what="node1 to drain"
        )
        drained = time.monotonic()
        time.sleep(SETTLE)
        undrain = time.monotonic()
        assert run.cluster.cli(1, "undrain").returncode == 0
        run.cluster.wait_converged(
            [0, 1, 2], check=lambda s: s["node1"] > 0, what="node1 to undrain"
        )
        time.sleep(SETTLE)
        since = time.monotonic() - SETTLE  # before finish(): slow when loaded
        record, report = run.finish()
        assert metrics.shares(record, since=drained, until=undrain)[run.name(1)] == 0
        assert metrics.shares(record, since=since)[run.name(1)] > 0
        assert_clean(record, report)
        assert_short_gaps(record)


def test_rolling_restart(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        restarted_at = {}
        for index in range(3):
            restarted_at[run.name(index)] = time.monotonic()
            run.cluster.restart(index)
            run.cluster.wait_converged(
                [0, 1, 2], check=holds_slices(index), what=f"node{index} to come back"
            )
            time.sleep(0.5)
        record, report = run.finish()
        assert_clean(record, report, down=set(restarted_at))
        # A node's own connections may end when it leaves (VIP removed), never before.
        for conn in metrics.broken(record):
            assert conn["broken_at"] >= restarted_at[conn["node"]], conn
        assert_short_gaps(record)


def test_restart_all_at_once(bed: Callable[..., Bed], tmp_path: Path) -> None:
    with cluster_run(bed, tmp_path) as run:
        for index in range(3):
            run.cluster.signal(index, signal.SIGTERM)
        for index in range(3):
            assert run.cluster.procs[index].wait(timeout=15) == 0, run.cluster.log(index)
        run.cluster.start_all()
        run.cluster.wait_converged([0, 1, 2], what="the restarted cluster to form")
        formed = time.monotonic()
        time.sleep(SETTLE)
        record, report = run.finish()
        assert_clean(record, report, down={run.name(i) for i in range(3)})
        assert set(metrics.shares(record, since=formed)) == {run.name(i) for i in range(3)}


def test_lbd_lab_json_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """``lbd lab --json --nodes 3`` (fast timers to keep the suite short) measures sanely."""
    import json

    from lbd.daemon import lab

    assert lab.main(["--json", "--nodes", "3", "--profile", "fast"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["duplicate_synacks"] == 0 and figures["duplicate_udp_answers"] == 0
    assert figures["duplicate_udp_answers_client"] == 0
    assert figures["broken_connections"] == 0
    assert figures["affected_sources"] >= 5 and not figures["unserved_sources"]
    assert 0 < figures["outage_ms"] <= FAST_OUTAGE_LIMIT_MS
    assert set(figures["absorbed_by"]) == {"lbdlab-n0", "lbdlab-n2"}
    assert figures["converged_after"] and figures["tcp_ok"] > 1000
    # Nothing of the lab is left behind.
    assert not any(name.startswith("lbdlab-") for name in list_netns())


def test_lbd_lab_shows_a_service_failure(capsys: pytest.CaptureFixture[str]) -> None:
    """``lbd lab --fail service``: node1's echo service is killed while its daemon
    lives; the failing check drains node1, the others serve its clients, and the
    restarted service brings its slices back. No duplicates, nothing broken elsewhere."""
    import json

    from lbd.daemon import lab

    assert lab.main(["--json", "--nodes", "3", "--profile", "fast", "--fail", "service"]) == 0
    figures = json.loads(capsys.readouterr().out)
    print("lbd lab --fail service:", figures)
    assert figures["fail"] == "service"
    assert figures["duplicate_synacks"] == 0 and figures["duplicate_udp_answers"] == 0
    assert figures["duplicate_udp_answers_client"] == 0
    assert figures["broken_connections"] == 0  # on the nodes whose service lived
    assert figures["affected_sources"] >= 5 and not figures["unserved_sources"]
    # fall (2) x interval (0.2 s) + a run's timeout + the fast handoff, with CI slack.
    assert 0 < figures["outage_ms"] <= 1200
    assert set(figures["absorbed_by"]) >= {"lbdlab-n0", "lbdlab-n2"}
    assert figures["converged_after"] and figures["tcp_ok"] > 1000
    assert not any(name.startswith("lbdlab-") for name in list_netns())
