"""Smoke test of the failover comparison harness (bench/keepalived_lab.py), real and quick.

The keepalived side of the benchmark must keep working in CI, or the README's
comparison silently rots: a 3-node bed with Debian's keepalived (VRRPv3,
``advert_int 0.1``) comes up with node 0 as master, one benchmark trial (host death of
the master under client load) moves the VIP to node 1 with a measured outage, the
harness restores node 0 as master, and a crash of the keepalived tree alone
(SIGSTOP, then SIGKILL) moves the VIP too. Under CI=true a missing keepalived is a
failure, not a skip (tests/conftest.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .bed import Bed, wait_for
from .nsutil import bench_module


@pytest.mark.timeout(90)
def test_keepalived_bed_fails_over(bed: Callable[..., Bed], tmp_path: Path) -> None:
    if shutil.which("keepalived") is None and not Path("/usr/sbin/keepalived").exists():
        pytest.skip("keepalived is not installed (apt-get install keepalived)")
    lab = bench_module("keepalived_lab")
    the_bed = bed(nodes=3, add_vip=False, unique_macs=True)
    ka = lab.KeepalivedCluster(the_bed, tmp_path / "ka", 0.1)
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scripted", [False, True], ids=["cores", "scripted"])
def test_cost_bench_with_emulated_peers(scripted: bool, tmp_path: Path) -> None:
    """bench/cost.py's large-cluster method: one real daemon, the other members
    emulated (bench/peer_emulator.py). The daemon must converge on a view of all of
    them, hear every peer, and stay put (no view change) through the window."""
    nodes = 5
    case = bench_module("cost").measure_emulated("default", nodes, 2.0, tmp_path, scripted=scripted)
    assert case["converge_s"] is not None, case
    assert case["view_members"] == nodes, case
    assert case["view_changes_in_window"] == 0, case
    assert case["per_second"]["accepted"] > 0.7 * 10 * (nodes - 1), case  # ~10/s per peer
    assert 0 < case["node0"]["cpu_percent"] < 50 and 10 < case["node0"]["rss_mb"] < 200, case
    summary = case["emulators"][0]
    assert summary is not None and summary["sent"] > 0 and summary["undecodable"] == 0, case
    if scripted:
        assert summary["epoch"] >= 2, case  # adopted the base the daemon agreed on
