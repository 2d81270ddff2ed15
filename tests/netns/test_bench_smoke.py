"""Smoke test of the failover comparison harness (bench/keepalived_lab.py), real and quick.

The keepalived side of the benchmark must keep working in CI, or the README's
comparison silently rots: a 3-node bed with Debian's keepalived (VRRPv3,
``advert_int 0.1``) comes up with node 0 as master, one benchmark trial (host death of
the master under client load) moves the VIP to node 1 with a measured outage, the
harness restores node 0 as master, and a crash of the keepalived tree alone
(SIGSTOP, then SIGKILL) moves the VIP too. Under CI=true a missing keepalived is a
failure, not a skip (tests/conftest.py).

The service-failure comparison (``--fault service`` of both benches) runs a trial or
two on each side: keepalived's ``vrrp_script`` and lbd's ``[[check]]`` of the echo
service (same interval, rise, fall) must detect the killed service, the outage must
lie between (fall - 1) and fall + 1 check intervals (plus a loaded machine's slack),
and only the failed service's own long-lived connection may break.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lbd.testbed import cost, failover_lab, keepalived_lab
from lbd.testbed.bed import Bed, wait_for


def keepalived_bed(
    bed: Callable[..., Bed], tmp_path: Path, *, check: bool = False
) -> tuple[ModuleType, Bed, Any]:
    """keepalived_lab, a 3-node bed with unique MACs, its (unstarted) KeepalivedCluster
    at ``advert_int 0.1``; ``check``: every node tracks its echo service."""
    if shutil.which("keepalived") is None and not Path("/usr/sbin/keepalived").exists():
        pytest.skip("keepalived is not installed (apt-get install keepalived)")
    lab = keepalived_lab
    the_bed = bed(nodes=3, add_vip=False, unique_macs=True)
    return lab, the_bed, lab.KeepalivedCluster(the_bed, tmp_path / "ka", 0.1, check=check)


@pytest.mark.timeout(90)
def test_keepalived_bed_fails_over(bed: Callable[..., Bed], tmp_path: Path) -> None:
    lab, the_bed, ka = keepalived_bed(bed, tmp_path)
    try:
        the_bed.start_echo(addrs=[the_bed.vip4])
        ka.start_all()
        ka.wait_master(0, timeout=20.0)

        trial = lab.run_trial(ka, tmp_path, "hostdeath")
        assert trial["took_over"], trial
        assert trial["new_master"] == the_bed.nodes[1].name, trial
        assert trial["outage_ms"] is not None and 0 < trial["outage_ms"] < 3000, trial
        assert trial["long_lived_on_master"] == trial["long_lived"] >= 1, trial
        assert trial["broken"] == trial["long_lived"], trial  # VRRP: all on the master break
        assert ka.holders() == [0]  # run_trial restored the master

        ka.crash(0)  # the daemon alone: SIGSTOP the tree, then SIGKILL
        wait_for(lambda: 1 in ka.holders(), 10.0, 0.05, "node 1 to take the VIP")
        wait_for(lambda: ka.served_by(1), 10.0, 0.1, "the client to reach node 1")
    finally:
        ka.stop_all()


def outage_bounds_ms(lab: ModuleType) -> tuple[float, float]:
    """The first failing check run comes within one interval of the fault, the fall-th
    (fall - 1) intervals later; then the takeover or handoff, and this machine's load."""
    interval, fall = lab.CHECK_INTERVAL, lab.CHECK_FALL
    return 0.8 * (fall - 1) * interval * 1000, ((fall + 1) * interval + 1.5) * 1000


@pytest.mark.timeout(150)
def test_keepalived_service_failure(bed: Callable[..., Bed], tmp_path: Path) -> None:
    lab, the_bed, ka = keepalived_bed(bed, tmp_path, check=True)
    try:
        ka.start_services()
        ka.start_all()
        ka.wait_master(0, timeout=20.0)
        low, high = outage_bounds_ms(failover_lab)
        trial = lab.run_trial(ka, tmp_path, "service")
        assert trial["took_over"], trial
        assert trial["new_master"] == the_bed.nodes[1].name, trial
        assert trial["outage_ms"] is not None and low < trial["outage_ms"] < high, trial
        assert trial["broken"] == trial["long_lived"] >= 1, trial  # on the master's service
        assert trial["broken_elsewhere"] == 0, trial
        assert ka.holders() == [0]  # the restarted service: node 0 rose and preempted
    finally:
        ka.stop_all()


@pytest.mark.timeout(180)
def test_lbd_service_failure(tmp_path: Path) -> None:
    lab = failover_lab
    low, high = outage_bounds_ms(lab)
    result = lab.run_profile("default", 2, 3, tmp_path, "service", prefix="lbdt-smkfsvc-")
    assert result["trials"] == result["measured"] == 2, result
    assert all(low < o < high for o in result["outages_ms"]), result
    assert result["duplicate_synacks"] == result["duplicate_udp_answers"] == 0, result
    assert result["broken_elsewhere"] == 0, result  # the other nodes' connections live
    assert result["broken_connections"] == 1, result  # node1's, on its killed service
    assert result["long_lived_connections"] == 3, result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scripted", [False, True], ids=["cores", "scripted"])
def test_cost_bench_with_emulated_peers(scripted: bool, tmp_path: Path) -> None:
    """bench/cost.py's large-cluster method: one real daemon, the other members
    emulated (bench/peer_emulator.py). The daemon must converge on a view of all of
    them, hear every peer, and stay put (no view change) through the window."""
    nodes = 5
    case = cost.measure_emulated("default", nodes, 2.0, tmp_path, scripted=scripted)
    assert case["converge_s"] is not None, case
    assert case["view_members"] == nodes, case
    assert case["view_changes_in_window"] == 0, case
    assert case["per_second"]["accepted"] > 0.7 * 10 * (nodes - 1), case  # ~10/s per peer
    assert 0 < case["node0"]["cpu_percent"] < 50 and 10 < case["node0"]["rss_mb"] < 200, case
    summary = case["emulators"][0]
    assert summary is not None and summary["sent"] > 0 and summary["undecodable"] == 0, case
    if scripted:
        assert summary["epoch"] >= 2, case  # adopted the base the daemon agreed on
